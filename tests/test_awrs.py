"""Adaptive weighted rejection sampling: proper weights, zero-weight rows, exact SMC targets.

The AWRS draw is checked on its own (E[Z_hat f(x)] = sum over allowed tokens of q f, by z-tests
over many rows), then inside SMC against the enumerated target p(x) 1[constraint] on the tiny
models, with the target's own draws (``constraint=``) and with a draft (``AWRSProposal``).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_exactness import assert_matches_target
from tiny_models import EOS, PROMPT, LetterDecoder, tiny_lm

from smcgen import SMC, AllParticlesDeadError, LMPotential, Potential, SMCConfig
from smcgen.exact import enumerate_target
from smcgen.potentials.base import SequenceBatch
from smcgen.proposals.awrs import AWRS, AWRSProposal

MAX_NEW = 4
RUNS = 2000


class Forbid(Potential):
    """Boolean: zero once the text contains any of ``patterns``."""

    def __init__(self, *patterns: str):
        self.patterns = patterns

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([-math.inf if any(p in t for p in self.patterns) else 0.0 for t in batch.texts])


class MustEndWith(Potential):
    """Any prefix is fine; a finished text must contain ``letter`` (checked by ``log_complete`` only)."""

    def __init__(self, letter: str):
        self.letter = letter

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.zeros(len(batch), dtype=torch.float64)

    def log_complete(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([0.0 if self.letter in t else -math.inf for t in batch.texts])


def test_draw_is_properly_weighted():
    """E[Z_hat] = Z and E[Z_hat 1{x = v}] = exp(score_v) 1{v allowed}, with most mass forbidden
    (many rejections per row: the check rounds grow and the candidate list widens past 16)."""
    torch.manual_seed(0)
    V, rows = 40, 10000
    scores = torch.randn(V) * 2.0
    scores[:30] += 1.5  # tokens 0..29 ('a'..'~', but 3 = EOS decodes to ''): forbidden, most of the mass
    letters = LetterDecoder().decode(list(range(30)))
    awrs = AWRS(Forbid(*letters), LetterDecoder(), eos_token_ids=())
    seq = torch.tensor(PROMPT).expand(rows, -1)
    gen = torch.Generator().manual_seed(1)
    tokens, log_z = awrs.draw(scores.expand(rows, -1).clone(), seq, len(PROMPT), gen)
    assert not torch.isnan(log_z).any()
    w = log_z.exp()
    allowed = torch.tensor([t >= 30 or t == EOS for t in range(V)])
    assert allowed[tokens].all()
    z = float(scores.exp()[allowed].sum())
    se = float(w.std()) / math.sqrt(rows)
    assert abs(float(w.mean()) - z) <= 4.5 * se, (float(w.mean()), z, se)
    want = scores.double().exp() * allowed
    # allowed tokens drawn often enough for their SE to hold get a column each, the rest one pooled column
    common = allowed & (want / z * rows >= 30)
    onehot = torch.nn.functional.one_hot(tokens, V).double() * w[:, None]
    onehot = torch.cat([onehot[:, common], onehot[:, ~common].sum(1, keepdim=True)], dim=1)
    want = torch.cat([want[common], want[~common].sum().reshape(1)])
    est, se_v = onehot.mean(0), onehot.std(0) / math.sqrt(rows)
    assert bool(((est - want).abs() <= 4.5 * se_v + 1e-9).all()), (est, want, se_v)
    assert awrs.checks < rows * V / 2  # far from checking the whole vocabulary


def test_all_rejected_rows_get_zero_weight_not_nan():
    V, rows = 6, 5
    awrs = AWRS(Forbid(*"abcdef"), LetterDecoder(), eos_token_ids=())
    seq = torch.tensor(PROMPT).expand(rows, -1)
    scores = torch.randn(rows, V)
    scores[:, EOS] = -math.inf  # EOS decodes to '' (allowed): give it no mass
    scores[0, 2:] = -math.inf  # a row with few tokens of positive mass
    tokens, log_z = awrs.draw(scores, seq, len(PROMPT), torch.Generator().manual_seed(0))
    assert torch.isneginf(log_z).all()
    assert ((tokens >= 0) & (tokens < V)).all()


def test_rejected_prefix_is_not_scanned():
    """A row whose prefix already breaks the constraint ends after one round, not a vocabulary scan."""
    V = 1000
    awrs = AWRS(Forbid("b"), LetterDecoder(), eos_token_ids=())
    seq = torch.tensor([PROMPT + [1]])  # generated 'b'
    _, log_z = awrs.draw(torch.zeros(1, V), seq, len(PROMPT), torch.Generator().manual_seed(0))
    assert torch.isneginf(log_z).all() and awrs.checks <= 2 * awrs.checks_per_round


@pytest.fixture(scope="module")
def target_lm():
    # a flatter target than test_exactness's: at N=1 the locally constrained proposal must reach
    # every outcome often enough in RUNS runs for the per-outcome z-tests to hold
    return tiny_lm(0, logit_scale=1.0)


@pytest.fixture(scope="module")
def draft_lm():
    return tiny_lm(1, logit_scale=0.7)


CASES = {
    # name: (constraint factory, use a draft (block 2), target temperature)
    "no_bb_target": (lambda: Forbid("bb"), False, 1.0),
    "must_contain_b_target": (lambda: MustEndWith("b"), False, 1.0),
    "no_ab_draft_tempered": (lambda: Forbid("ab"), True, 0.7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_awrs_smc_matches_enumerated_target(case, target_lm, draft_lm):
    make, use_draft, tau = CASES[case]
    target = LMPotential(target_lm, temperature=tau)
    exact = enumerate_target(target, PROMPT, MAX_NEW, [make()])
    outs = {}
    for n, seed in ((1, 21), (4, 22), (16, 23)):
        cfg = SMCConfig(n_particles=n, block_size=2, max_new_tokens=MAX_NEW, seed=seed, ess_threshold=0.5)
        c = make()
        if use_draft:
            smc = SMC(target, cfg, proposal=AWRSProposal(draft_lm, c))
        else:
            smc = SMC(target, cfg, constraint=c)
        outs[n] = smc.run(PROMPT, n_groups=RUNS, on_dead="flag")
        # AWRS steers every draw: a particle dies only where no allowed token is left
        assert smc.awrs is not None and smc.awrs.checks > 0
    assert_matches_target(case, exact, outs)


def test_no_allowed_continuation_raises_clear_error(target_lm):
    """Every token forbidden after the first: every particle dies, the engine says so (no NaN)."""

    class OneTokenOnly(Potential):
        def log_prefix(self, batch):
            return torch.tensor([0.0 if len(t) <= 1 else -math.inf for t in batch.token_ids])

    cfg = SMCConfig(n_particles=4, max_new_tokens=MAX_NEW, seed=0)
    run = SMC(LMPotential(target_lm), cfg, constraint=OneTokenOnly()).run(PROMPT, n_groups=8, on_dead="flag")
    # a group survives only where its first token was EOS; the rest are flagged dead
    first_eos = run.tokens[:, :, 0] == EOS
    assert bool((run.dead == ~first_eos.any(dim=1)).all())
    assert not torch.isnan(run.log_weights).any() and not torch.isnan(run.log_z).any()
    with pytest.raises(AllParticlesDeadError):
        SMC(LMPotential(target_lm), cfg.model_copy(update={"seed": 1}), constraint=OneTokenOnly()).run(
            PROMPT, n_groups=64
        )


class NoLetterE(Potential):
    """The lipogram of the README: zero once the text holds an 'e' or 'E'."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([-math.inf if "e" in t.lower() else 0.0 for t in batch.texts])


def test_generate_constraint_on_embedded_model_never_writes_e():
    """The issue's case (embedded model, N=8, no letter e), where plain SMC died: AWRS survives."""
    import smcgen

    lm = smcgen.load_model("smollm2-135m", "cpu")
    msgs = [{"role": "user", "content": "Write a short story about a cat."}]
    ids = list(lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    result = smcgen.generate(
        lm, ids, constraint=NoLetterE(), n_particles=8, max_new_tokens=12, seed=0, return_all_particles=True
    )
    assert result.engine == "generic" and math.isfinite(result.log_z)
    assert len(result.token_ids) > 0 and "e" not in result.text.lower()
    live = [t for t, w in zip(result.texts, result.log_weights) if w > -math.inf]
    assert live and all("e" not in t.lower() for t in live)


def test_generate_with_draft_and_constraint(target, draft, tok):
    """generate(draft=..., constraint=...) drafts by AWRSProposal and draws the bonus by AWRS."""
    import smcgen

    result = smcgen.generate(
        target,
        [0, 1],
        draft=draft,
        tokenizer=tok,
        constraint=Forbid("b"),
        n_particles=4,
        block_size=2,
        max_new_tokens=6,
        seed=0,
        return_all_particles=True,
    )
    live = [t for t, w in zip(result.texts, result.log_weights) if w > -math.inf]
    assert result.engine == "generic" and live and all("b" not in t for t in live)
    with pytest.raises(ValueError, match="grammar or constraint"):
        smcgen.generate(
            target,
            [0, 1],
            tokenizer=tok,
            constraint=Forbid("b"),
            grammar=smcgen.GrammarPotential.regex("a+"),
            max_new_tokens=2,
        )
    with pytest.raises(TypeError, match="constraint must be a Potential"):
        smcgen.generate(target, [0, 1], tokenizer=tok, constraint="no b", max_new_tokens=2)
