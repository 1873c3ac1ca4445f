"""Standard speculative decoding (method='sd') against the exactly enumerated target on tiny models.

SD's rows are exact samples, so the empirical distribution of many rows must match the target
within Monte Carlo noise: every continuation's frequency within 4.5 standard errors (Bonferroni
over the outcomes), and the total variation within three noise levels.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import PROMPT, tiny_lm

import smcgen
from smcgen import LMPotential, RewardPotential
from smcgen.exact import enumerate_target
from smcgen.runners.transformers import CausalLMRunner
from smcgen.samplers.speculative import speculative_decode, verify_block

MAX_NEW = 4
ROWS = 2000


@pytest.fixture(scope="module")
def target_lm():
    return tiny_lm(0, logit_scale=2.0)


@pytest.fixture(scope="module")
def draft_lm():
    return tiny_lm(1, logit_scale=0.7)


def assert_exact(rows: list[list[int]], exact) -> None:
    """The rows' empirical distribution matches ``exact`` within noise (outcome-wise and in TV)."""
    pi = exact.probabilities()
    n = len(rows)
    counts: dict[tuple[int, ...], int] = {}
    for r in rows:
        counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    assert set(counts) <= set(pi), f"rows outside the support: {set(counts) - set(pi)}"
    worst = 0.0
    for s, p in pi.items():
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        worst = max(worst, abs(counts.get(s, 0) / n - p) / se)
    assert worst <= 4.5, f"an outcome's frequency is {worst:.1f} standard errors from its probability"
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in pi.items())
    noise = 0.5 * sum(math.sqrt(2 / math.pi) * math.sqrt(p * (1 - p) / n) for p in pi.values())
    assert tv <= 3 * noise, f"TV {tv:.4f} exceeds three noise levels ({noise:.4f})"


@pytest.mark.parametrize("block, tau, draft_tau", [(2, 1.0, 1.0), (5, 1.0, 1.0), (3, 0.7, 1.4)])
def test_sd_matches_enumerated_target(block, tau, draft_tau, target_lm, draft_lm):
    exact = enumerate_target(LMPotential(target_lm, temperature=tau), PROMPT, MAX_NEW)
    run = speculative_decode(
        target_lm,
        draft_lm,
        PROMPT,
        n_rows=ROWS,
        block_size=block,
        max_new_tokens=MAX_NEW,
        target_temperature=tau,
        draft_temperature=draft_tau,
        seed=100 + block,
    )
    assert 0 < run.acceptance_rate < 1  # a different draft: some drafts are rejected, some kept
    assert_exact(run.tokens, exact)


def test_a_poor_draft_alone_is_off_target(target_lm, draft_lm):
    """The check above has power: the draft's own samples fail it."""
    exact = enumerate_target(LMPotential(target_lm), PROMPT, MAX_NEW)
    own = speculative_decode(draft_lm, draft_lm, PROMPT, n_rows=1000, block_size=4, max_new_tokens=MAX_NEW, seed=3)
    assert own.acceptance_rate == pytest.approx(1.0)  # a draft verifying itself keeps everything
    with pytest.raises(AssertionError):
        assert_exact(own.tokens, exact)


def test_verify_block_emits_the_target_marginal():
    """One position: P(out = x) = q(x) min(1, p/q) + P(reject) residual(x) equals p(x), by Monte Carlo."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    draws = 20000
    first = torch.zeros(4)
    for _ in range(draws):
        x = torch.multinomial(q[0], 1, generator=gen)
        kept, last = verify_block(p, q, x, gen)
        first[int(x) if kept == 1 else last] += 1
    freq = first / draws
    se = (p[0] * (1 - p[0]) / draws).sqrt().float()
    assert bool(((freq - p[0].float()).abs() <= 4.5 * se).all()), f"{freq} vs {p[0]}"


def test_truncate_rolls_the_cache_back(target_lm):
    """After a rollback the runner gives the logits of a fresh run over the kept prefix."""
    seq = torch.tensor([[0, 1, 2, 1, 0, 2]])
    rolled = CausalLMRunner(target_lm)
    rolled.start(seq[:, :2], 1)
    rolled.forward_new(seq)
    rolled.truncate(3)
    again = rolled.forward_new(torch.tensor([[0, 1, 2, 0, 1]]))
    fresh = CausalLMRunner(target_lm)
    fresh.start(seq[:, :2], 1)
    want = fresh.forward_new(torch.tensor([[0, 1, 2, 0, 1]]))[:, -2:]
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-5)


def test_generate_sd_reports_method_and_reason(target, draft, tok):
    kw = {
        "draft": draft,
        "tokenizer": tok,
        "method": "sd",
        "n_particles": 3,
        "block_size": 2,
        "max_new_tokens": MAX_NEW,
    }
    res = smcgen.generate(target, "ab", seed=0, **kw)
    assert res.method == "sd" and res.engine == "generic" and "method='sd'" in res.engine_reason
    assert len(res.sequences) == 3 and 0 <= res.acceptance_rate <= 1
    again = smcgen.generate(target, "ab", seed=0, **kw)
    assert again.sequences == res.sequences  # seeded runs reproduce


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 2.0}, "alpha must be 1.0"),
        ({"potentials": [RewardPotential(lambda t: 0.0, beta=1.0)]}, "potentials"),
        ({"draft": None}, "needs a draft"),
    ],
)
def test_sd_refuses_what_it_cannot_sample(kwargs, match, target, draft, tok):
    kw = {"draft": draft, "tokenizer": tok, "method": "sd", "max_new_tokens": MAX_NEW}
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        smcgen.generate(target, "ab", **kw)


def test_weak_draft_is_reported_and_warned_once(target, draft, tok, caplog):
    """A poor draft at N=4, K=8: mean ESS/N and weight variance report it, and one warning says so."""
    from smcgen import api

    api._WARNED.discard("weak-draft")
    kw = {"tokenizer": tok, "n_particles": 4, "block_size": 8, "max_new_tokens": 16, "ess_threshold": 0.0}
    with caplog.at_level("WARNING", logger="smcgen"):
        runs = [smcgen.generate(target, "ab", draft=draft, seed=s, **kw) for s in range(4)]
    fracs = [r.mean_ess_fraction for r in runs]
    assert sum(fracs) / len(fracs) < api.WEAK_DRAFT_ESS, fracs
    assert all(r.weight_variance > 0.5 for r in runs)
    warnings = [r for r in caplog.records if "limits fidelity" in r.getMessage()]
    assert len(warnings) == 1
    good = smcgen.generate(target, "ab", draft=target, seed=1, **kw)
    assert good.mean_ess_fraction == pytest.approx(1.0) and good.weight_variance == pytest.approx(0.0, abs=1e-6)
