"""One SMC step, two runners: the transformers runner and the native paged model agree.

The shared cycle (smcgen.samplers.cycle) over the transformers runner and over the native model's
paged runner (PagedLMRunner) draws from the same torch generator, so one seed gives the same
tokens, ancestors and weights on both, resampling, potentials and draft included.

The native *engine* (its captured cycle) draws from Philox counters instead, so there the same
seed gives different tokens: the documented difference. What must agree is the step: given the
same tokens, the same weights. The native run's tokens are replayed through the generic engine by a
proposal that proposes exactly them with the target's own powered probabilities, which makes the
generic weights alpha log p - log q = log sum_v p(v)^alpha, the native engine's weight of a
target-drawn token; potentials (host, lagged on the native engine, and device) must then give
identical final weights. That replay needs one generic step to cover the whole run (a generic
step always ends with a bonus drawn from its own generator), so it runs without resampling.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_exactness import count_b
from tiny_models import EOS, PROMPT, LetterDecoder, tiny_lm

import smcgen
from smcgen import SMC, SMCConfig
from smcgen.core.sampling import log_probs
from smcgen.potentials.lm import LMPotential
from smcgen.potentials.reward import RewardPotential
from smcgen.potentials.token import TokenPotential
from smcgen.proposals.base import Proposal
from smcgen.runners.native.model import NativeCausalLM
from smcgen.runners.native.paged_runner import PagedLMRunner
from smcgen.runners.transformers import CausalLMRunner
from smcgen.samplers.native import NativeSMC

MAX_NEW = 6
ALPHA = 0.5


class CountOnes(TokenPotential):
    def log_potential(self, tokens, lengths, finished):
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return 0.5 * ((tokens == 1) & (pos < lengths[:, None])).sum(dim=1).float()


class Replay(Proposal):
    """Proposes given tokens, with log q = the target's powered, normalized log-probability."""

    def __init__(self, lm, tokens: torch.Tensor, alpha: float):
        self.lm, self.tokens, self.alpha = lm, tokens, alpha

    def start(self, prompt_ids, n_rows):
        self.runner = CausalLMRunner(self.lm)
        self.runner.start(prompt_ids, n_rows)
        self.n_prompt = prompt_ids.shape[1]

    def propose(self, sequences, n_tokens, generator):
        seq, toks, lq = sequences, [], []
        for _ in range(n_tokens):
            powered = self.alpha * log_probs(self.runner.forward_new(seq)[:, -1], 1.0)
            y = self.tokens[:, seq.shape[1] - self.n_prompt]
            toks.append(y)
            lq.append((powered - torch.logsumexp(powered, -1, keepdim=True)).gather(-1, y[:, None]).squeeze(-1))
            seq = torch.cat([seq, y[:, None]], dim=1)
        return torch.stack(toks, 1), torch.stack(lq, 1).double()

    def reorder(self, rows):
        self.runner.reorder(rows)


@pytest.fixture(scope="module")
def target():
    return tiny_lm(0, logit_scale=2.0, hidden=32)


def potentials():
    return [RewardPotential(count_b, beta=0.7, prefix=True), CountOnes()]


def test_both_runners_give_the_same_weights_for_the_same_tokens(target):
    cfg = SMCConfig(n_particles=12, max_new_tokens=MAX_NEW, seed=4, alpha=ALPHA, ess_threshold=0.0)
    native = NativeSMC(
        NativeCausalLM.from_hf(target.model),
        cfg,
        eos_token_ids=(EOS,),
        page_size=4,
        potentials=potentials(),
        tokenizer=LetterDecoder(),
    ).run(PROMPT)
    tokens = native.tokens[0]
    assert int(native.lengths.min()) < MAX_NEW  # some particle stopped on EOS: its padding is ignored
    replay_cfg = cfg.model_copy(update={"block_size": MAX_NEW})
    generic = SMC(
        LMPotential(target, alpha=ALPHA), replay_cfg, proposal=Replay(target, tokens, ALPHA), potentials=potentials()
    ).run(PROMPT)
    assert torch.equal(generic.tokens, native.tokens)
    assert torch.equal(generic.lengths, native.lengths)
    assert torch.allclose(generic.log_weights, native.log_weights.double(), atol=1e-4)
    assert torch.allclose(generic.log_z, native.log_z.double(), atol=1e-4)


@pytest.mark.parametrize(
    ("resampler", "use_draft", "guided", "stops"),
    [
        ("multinomial", True, False, False),
        ("stratified", False, False, True),
        ("residual", True, True, False),
        ("systematic", True, False, True),
    ],
)
def test_the_shared_cycle_gives_the_same_run_over_both_runners(target, resampler, use_draft, guided, stops):
    from test_native_potentials import NoTwos

    from smcgen import LMProposal
    from smcgen.runners.transformers import LanguageModel

    draft = tiny_lm(1, logit_scale=1.0, hidden=32)
    # without EOS every particle runs to the end, so resampled rows keep being fed (the caches matter)
    lm = target if stops else LanguageModel(target.model, target.tokenizer, (), target.context_length)
    cfg = SMCConfig(
        n_particles=6, block_size=1, max_new_tokens=10, seed=5, alpha=ALPHA, ess_threshold=0.8, resampler=resampler
    )
    native = NativeCausalLM.from_hf(target.model)
    runs = [
        SMC(
            LMPotential(lm, alpha=ALPHA),
            cfg,
            proposal=LMProposal(draft) if use_draft else None,
            potentials=potentials(),
            guide=NoTwos() if guided else None,
            target_runner=make,
        ).run(PROMPT, n_groups=2, on_dead="flag")
        for make in (None, lambda: PagedLMRunner(native, cfg.max_new_tokens, page_size=4))
    ]
    hf, paged = runs
    assert bool(hf.resampled[:-1].any())  # the resampler ran with steps after it, on the same steps for both
    assert torch.equal(hf.resampled, paged.resampled)
    assert torch.equal(hf.tokens, paged.tokens) and torch.equal(hf.lengths, paged.lengths)
    assert torch.allclose(hf.log_weights, paged.log_weights, atol=1e-4)
    assert torch.allclose(hf.log_z, paged.log_z, atol=1e-4)
    assert torch.allclose(hf.ess_history, paged.ess_history, atol=1e-3)
    assert bool((hf.lengths < cfg.max_new_tokens).any()) == stops
    if guided:  # the guide masks the bonus draws; a drafted 2 makes its particle's weight zero
        positions = torch.arange(hf.tokens.shape[-1])
        has_two = ((hf.tokens == 2) & (positions < hf.lengths[..., None])).any(-1)
        assert bool(torch.isneginf(hf.log_weights[has_two]).all())


def test_the_paged_runner_checks_its_sizes(target):
    native = NativeCausalLM.from_hf(target.model)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        PagedLMRunner(native, 0)
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        PagedLMRunner(native, 4, page_size=0)
    with pytest.raises(ValueError, match="exceeds the native model's"):
        PagedLMRunner(native, native.max_positions).start(torch.tensor([PROMPT]), 2)


def test_the_same_seed_reproduces_each_runner(target):
    cfg = SMCConfig(n_particles=4, max_new_tokens=MAX_NEW, seed=9, alpha=ALPHA)
    runs = [
        NativeSMC(
            NativeCausalLM.from_hf(target.model),
            cfg,
            eos_token_ids=(EOS,),
            page_size=4,
            potentials=potentials(),
            tokenizer=LetterDecoder(),
        ).run(PROMPT)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].log_weights, runs[1].log_weights)


def test_auto_says_why_it_fell_back_and_logs_once(target, caplog):
    """On a CPU the generic engine is the usual path: the reason is logged once at info level (no
    warning on every CPU run); on a GPU the same fallback is a warning."""
    from smcgen.engine_results import _warn_fallback

    smcgen.api._WARNED.clear()
    with caplog.at_level(logging.INFO, logger="smcgen"):
        results = [smcgen.generate(target, PROMPT, max_new_tokens=3, n_particles=2, seed=i) for i in range(2)]
    assert all(r.engine == "generic" for r in results)
    assert results[0].engine_reason == "the model is not on a GPU"
    logged = [r for r in caplog.records if "generic engine" in r.getMessage()]
    assert len(logged) == 1 and "not on a GPU" in logged[0].getMessage() and logged[0].levelno == logging.INFO
    caplog.clear()
    reason = "a reason only this test gives"
    with caplog.at_level(logging.INFO, logger="smcgen"):
        _warn_fallback(reason, "cuda")
    smcgen.api._WARNED.discard(reason)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_potentials_run_on_the_native_engine_through_generate(target):
    out = smcgen.generate(
        target, PROMPT, max_new_tokens=4, n_particles=4, seed=0, engine="native", potentials=potentials()
    )
    assert out.engine == "native" and out.engine_reason is None

    class Custom(Proposal):
        def propose(self, sequences, n_tokens, generator):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="a custom Proposal runs on the generic engine only"):
        smcgen.generate(target, PROMPT, max_new_tokens=4, engine="native", proposal=Custom())


def test_any_potential_with_a_next_token_mask_guides_the_generic_engine(target):
    from test_native_potentials import NoTwos

    cfg = SMCConfig(n_particles=8, max_new_tokens=MAX_NEW, seed=2)
    run = SMC(LMPotential(target), cfg, guide=NoTwos()).run(PROMPT, n_groups=4)
    assert not bool((run.tokens == 2).any()) and not bool(run.dead.any())
    with pytest.raises(TypeError, match="guide must be a Potential with a next-token mask"):
        SMC(LMPotential(target), cfg, guide=RewardPotential(count_b))


def test_nan_logits_on_the_generic_engine_name_the_model_and_the_step(target):
    from smcgen import LMProposal, NonFiniteError

    broken = tiny_lm(1, logit_scale=1.0, hidden=32)
    with torch.no_grad():
        for p in broken.model.parameters():
            p.fill_(float("nan"))
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=4, seed=0)
    with pytest.raises(NonFiniteError, match="the target model's logits produced NaN or \\+inf at step 1"):
        SMC(LMPotential(broken), cfg, proposal=LMProposal(target)).run(PROMPT)
    with pytest.raises(NonFiniteError, match="the proposal produced NaN or \\+inf at step 1"):
        SMC(LMPotential(target), cfg, proposal=LMProposal(broken)).run(PROMPT)
