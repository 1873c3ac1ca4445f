"""Potentials, guides and resamplers on the native engine (CPU torch twins): exactness and bad input.

The exactness cases run thousands of independent groups through ``NativeSMC`` and check them
against the enumerated target as tests/test_exactness.py does: E[Z_hat] = Z, every outcome's
weighted mass (z-tests) and TV shrinking with N. Host potentials are scored one cycle late (the
lag the GPU uses), so these runs check the lagged weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_exactness import MAX_NEW, NoRepeats, assert_matches_target, count_b
from tiny_models import EOS, PROMPT, LetterDecoder, tiny_lm

from smcgen import SMCConfig
from smcgen.core.resampling import MultinomialResampler
from smcgen.exact import enumerate_target
from smcgen.potentials.base import Potential, PotentialError, SequenceBatch
from smcgen.potentials.lm import LMPotential
from smcgen.potentials.reward import RewardPotential
from smcgen.potentials.token import LearnedReward, TokenPotential
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC
from smcgen.samplers.run import AllParticlesDeadError
from smcgen.samplers.step import NonFiniteError

RUNS = 1500


class CountOnes(TokenPotential):
    """A device potential: exp(0.7 * number of token 1), prefix-scored with torch ops."""

    def log_potential(self, tokens, lengths, finished):
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return 0.7 * ((tokens == 1) & (pos < lengths[:, None])).sum(dim=1).float()


class TinyScorer(torch.nn.Module):
    """A learned reward: an embedding-bag over the particle's tokens (a ~100-parameter 'model')."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.emb = torch.nn.Embedding(4, 1)

    def forward(self, tokens, lengths):
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return (self.emb(tokens).squeeze(-1) * (pos < lengths[:, None])).sum(dim=1)


class NoTwos(Potential):
    """A hard constraint with a next-token mask: token 2 never appears (masked instead of killed)."""

    def log_prefix(self, batch):
        return torch.tensor([-math.inf if 2 in t else 0.0 for t in batch.token_ids])

    def next_token_mask(self, batch):
        allowed = torch.ones(len(batch), 4, dtype=torch.bool)
        allowed[:, 2] = False
        return allowed


class TorchResampler(MultinomialResampler):
    """A user resampler written in torch (multinomial by inverse CDF, own code path)."""

    name = "user"

    def _ancestors(self, weights, generator):
        u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
        cdf = weights.cumsum(-1)
        return torch.searchsorted(cdf / cdf[:, -1:], u.clamp(max=1 - 1e-12), right=True).clamp(max=weights.shape[1] - 1)


@pytest.fixture(scope="module")
def models(device):
    # on the GPU host (SMCGEN_TEST_DEVICE=cuda) the same cases run with the Triton kernels and the
    # captured cycle: device potentials inside the graph, host potentials lagged over pinned copies
    target, draft = tiny_lm(0, logit_scale=2.0, hidden=32), tiny_lm(0, logit_scale=1.0, hidden=32)
    return (
        target,
        NativeCausalLM.from_hf(target.model, device=device),
        NativeCausalLM.from_hf(draft.model, device=device),
    )


CASES = {
    # name: (use draft, potentials factory, guide factory, resampler)
    "reward_prefix_lagged": (True, lambda: [RewardPotential(count_b, beta=1.0, prefix=True)], None, "systematic"),
    "reward_end": (False, lambda: [RewardPotential(count_b, beta=1.0)], None, "systematic"),
    "product_user": (True, lambda: [NoRepeats() * RewardPotential(count_b, beta=-0.5)], None, "systematic"),
    "device_potential": (True, lambda: [CountOnes()], None, "systematic"),
    "learned_reward_end_only": (True, lambda: [LearnedReward(TinyScorer(), every_step=False)], None, "systematic"),
    "user_guide_mask": (True, list, NoTwos, "systematic"),
    # a guide with host and device potentials: every cycle waits on the host, so no lag
    "guide_with_potentials": (
        True,
        lambda: [RewardPotential(count_b, beta=1.0, prefix=True), CountOnes()],
        NoTwos,
        "stratified",
    ),
    "multinomial": (True, lambda: [CountOnes()], None, "multinomial"),
    "stratified": (False, lambda: [RewardPotential(count_b, beta=1.0, prefix=True)], None, "stratified"),
    "residual": (True, lambda: [NoRepeats()], None, "residual"),
    "user_resampler": (True, lambda: [CountOnes()], None, TorchResampler()),
}


def native_run(models, n, seed, use_draft, potentials, guide, resampler):
    _, native_target, native_draft = models
    for p in potentials:
        if isinstance(p, LearnedReward):
            p.model.to(native_target.device)  # a learned reward lives beside the models
    name = resampler if isinstance(resampler, str) else "systematic"
    cfg = SMCConfig(n_particles=n, block_size=2, max_new_tokens=MAX_NEW, seed=seed, ess_threshold=0.5, resampler=name)
    engine = NativeSMC(
        native_target,
        cfg,
        draft=native_draft if use_draft else None,
        eos_token_ids=(EOS,),
        page_size=4,
        potentials=potentials,
        guide=guide,
        tokenizer=LetterDecoder(),
        resampler=None if isinstance(resampler, str) else resampler,
    )
    return engine.run(PROMPT, n_groups=RUNS)


@pytest.mark.parametrize("case", list(CASES))
def test_native_potentials_match_enumerated_target(case, models):
    use_draft, make_potentials, make_guide, resampler = CASES[case]
    factors = make_potentials() + ([make_guide()] if make_guide else [])
    exact = enumerate_target(LMPotential(models[0]), PROMPT, MAX_NEW, factors)
    outs = {}
    for n, seed in ((1, 31), (4, 32), (16, 33)):
        guide = make_guide() if make_guide else None
        outs[n] = native_run(models, n, seed, use_draft, make_potentials(), guide, resampler)
        if make_guide is not None:
            # the mask steers: no particle ever holds the forbidden token, none dies
            assert not bool((outs[n].tokens == 2).any()) and not bool(outs[n].dead.any())
    assert_matches_target(case, exact, outs)


def test_the_lagged_host_potential_ends_at_the_unlagged_weights(models):
    """With no resampling (threshold 0), the lag changes no token and the final weights equal a
    direct computation: sum of the token weights plus log_complete (the twists telescope)."""
    _, native_target, _ = models
    cfg = SMCConfig(n_particles=8, max_new_tokens=MAX_NEW, seed=3, ess_threshold=0.0)
    plain = NativeSMC(native_target, cfg, eos_token_ids=(EOS,), page_size=4).run(PROMPT)
    reward = RewardPotential(count_b, beta=1.0, prefix=True)
    run = NativeSMC(
        native_target, cfg, eos_token_ids=(EOS,), page_size=4, potentials=[reward], tokenizer=LetterDecoder()
    ).run(PROMPT)
    assert torch.equal(run.tokens, plain.tokens)  # potentials draw no randomness
    seqs = [t[:n] for t, n in zip(run.tokens[0].tolist(), run.lengths[0].tolist())]
    final = reward.log_complete(SequenceBatch(seqs, PROMPT, LetterDecoder())).double()
    plain_lw = plain.log_weights[0].double() + plain.log_z[0].double()
    lw = run.log_weights[0].double() + run.log_z[0].double()
    assert torch.allclose(lw, plain_lw + final, atol=1e-5)


class Broken(Potential):
    """A potential that misbehaves on purpose (``how``), from its second call on."""

    def __init__(self, how):
        self.how, self.calls = how, 0

    def log_prefix(self, batch):
        self.calls += 1
        n = len(batch)
        if self.calls < 2:
            return torch.zeros(n)
        if self.how == "shape":
            return torch.zeros(n + 1)
        if self.how == "nan":
            return torch.full((n,), math.nan)
        if self.how == "inf":
            return torch.full((n,), math.inf)
        if self.how == "raise":
            raise KeyError("lookup failed")
        return torch.full((n,), -math.inf)  # "dead"


class BrokenDevice(TokenPotential):
    def __init__(self, how):
        self.how = how

    def log_potential(self, tokens, lengths, finished):
        r = tokens.shape[0]
        if self.how == "shape":
            return torch.zeros(r, 2)
        if self.how == "raise":
            raise KeyError("lookup failed")
        bad = math.nan if self.how == "nan" else math.inf
        return torch.where(
            lengths > 0, torch.full((r,), bad, device=tokens.device), torch.zeros(r, device=tokens.device)
        )


@pytest.mark.parametrize(
    "how, error, match",
    [
        ("shape", ValueError, r"step \d+: potential Broken returned \d+ scores for a batch of \d+ particles"),
        ("nan", ValueError, r"step \d+: potential Broken returned NaN"),
        ("inf", ValueError, r"step \d+: potential Broken returned \+inf"),
        ("raise", PotentialError, r"step \d+: potential Broken raised KeyError"),
        ("dead", AllParticlesDeadError, r"every particle of group\(s\) \[0\] has weight zero"),
    ],
)
def test_bad_host_potentials_raise_clear_errors(models, how, error, match):
    _, native_target, _ = models
    cfg = SMCConfig(n_particles=8, max_new_tokens=MAX_NEW, seed=0)
    engine = NativeSMC(native_target, cfg, eos_token_ids=(EOS,), page_size=4, potentials=[Broken(how)])
    with pytest.raises(error, match=match):
        engine.run(PROMPT)


@pytest.mark.parametrize(
    "how, error, match",
    [
        ("shape", ValueError, r"step 0: potential BrokenDevice returned \(8, 2\) scores for 8 particles"),
        ("raise", PotentialError, r"step 0: potential BrokenDevice raised KeyError"),
        ("nan", NonFiniteError, r"potential BrokenDevice produced NaN or \+inf at step 1"),
        ("inf", NonFiniteError, r"potential BrokenDevice produced NaN or \+inf at step 1"),
    ],
)
def test_bad_device_potentials_raise_clear_errors(models, how, error, match):
    _, native_target, _ = models
    cfg = SMCConfig(n_particles=8, max_new_tokens=MAX_NEW, seed=0)
    engine = NativeSMC(native_target, cfg, eos_token_ids=(EOS,), page_size=4, potentials=[BrokenDevice(how)])
    with pytest.raises(error, match=match):
        engine.run(PROMPT)


def test_nan_logits_name_the_model_and_the_step(models, device):
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=6, seed=0)
    broken = NativeCausalLM.from_hf(tiny_lm(0, logit_scale=1.0, hidden=32).model, device=device)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(math.nan)
    with pytest.raises(NonFiniteError, match="the draft model's logits produced NaN or \\+inf at step 1"):
        NativeSMC(native_target, cfg, draft=broken, eos_token_ids=(EOS,), page_size=4).run(PROMPT)
    with pytest.raises(NonFiniteError, match="the target model's logits produced NaN or \\+inf at step 1"):
        NativeSMC(broken, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4).run(PROMPT)


def test_the_built_in_resamplers_are_graph_safe_and_a_user_generator_one_is_not():
    from smcgen.core.resampling import RESAMPLERS, graph_safe

    assert all(graph_safe(cls()) for cls in RESAMPLERS.values())
    assert not graph_safe(TorchResampler())  # overrides _ancestors with its own torch.rand: eager
