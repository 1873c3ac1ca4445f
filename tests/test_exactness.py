"""SMC against the exactly enumerated target on tiny models, for every kind of target.

Two facts are checked for each target:
- unbiasedness, which holds at every N: E[Z_hat] = Z, and E[Z_hat * sum_i wbar_i 1{x_i = x}]
  = pi~(x) for every continuation x (z-tests with standard errors from the runs themselves);
- consistency: the total variation between the weighted particle distribution and the
  normalized target shrinks as N grows, down to the Monte Carlo noise level.
Thousands of runs are vectorized as groups of one batch, so each case takes about a second.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import PROMPT, tiny_lm

from smcgen import SMC, LMPotential, LMProposal, Potential, RewardPotential, SMCConfig
from smcgen.exact import enumerate_target
from smcgen.models.self_draft import int8_self_draft
from smcgen.potentials.base import SequenceBatch

MAX_NEW = 4
RUNS = 3000


class NoRepeats(Potential):
    """A user potential: penalize each repeated adjacent token (prefix-scored)."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([-0.8 * sum(a == b for a, b in zip(s, s[1:])) for s in batch.token_ids])


def count_b(text: str) -> float:
    return float(text.count("b"))


@pytest.fixture(scope="module")
def target_lm():
    return tiny_lm(0, logit_scale=2.0)


@pytest.fixture(scope="module")
def draft_lm():
    return tiny_lm(1, logit_scale=0.7)


def smc_estimates(target: LMPotential, proposal, potentials, n: int, block: int, seed: int, runs: int = RUNS):
    """Run ``runs`` independent SMC runs; return per-run Z_hat and per-run weighted particle masses."""
    cfg = SMCConfig(n_particles=n, block_size=block, max_new_tokens=MAX_NEW, seed=seed, ess_threshold=0.5)
    out = SMC(target, cfg, proposal=proposal, potentials=potentials).run(PROMPT, n_groups=runs)
    return out


def masses(out, index: dict[tuple[int, ...], int]) -> torch.Tensor:
    """[runs, outcomes]: the normalized weight each run puts on each continuation.

    Particles of weight zero are skipped: they may hold sequences outside ``index`` (e.g. outside a
    grammar's language)."""
    runs, n, _ = out.tokens.shape
    m = torch.zeros(runs, len(index), dtype=torch.float64)
    w = out.log_weights.exp()
    toks, lens = out.tokens.tolist(), out.lengths.tolist()
    for r in range(runs):
        for i in range(n):
            if w[r, i] > 0:
                m[r, index[tuple(toks[r][i][: lens[r][i]])]] += w[r, i]
    return m


def pooled(values: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
    """Keep the common outcomes' columns and add one column holding the sum of the rest."""
    return torch.cat([values[:, common], values[:, ~common].sum(1, keepdim=True)], dim=1)


CASES = {
    # name: (use draft, block, alpha, tau, potentials factory)
    "plain": (False, 1, 1.0, 1.0, list),
    "smc_sd_k1": (True, 1, 1.0, 1.0, list),
    "smc_sd_k2": (True, 2, 1.0, 1.0, list),
    "power_alpha2": (False, 1, 2.0, 1.0, list),
    "power_with_draft": (True, 1, 2.0, 1.0, list),
    "target_temperature": (True, 1, 1.0, 0.7, list),
    "tempered_draft": (True, 2, 1.0, 0.7, list),  # the draft at 0.7 too: LMProposal(temperature=0.7)
    "bf16_draft": (True, 2, 1.0, 1.0, list),  # a bf16 copy of the draft (LanguageModel.to_dtype)
    "int8_self_draft": (True, 2, 1.0, 1.0, list),  # the target itself in int8 (models/self_draft.py)
    "reward_end": (False, 1, 1.0, 1.0, lambda: [RewardPotential(count_b, beta=1.0)]),
    "reward_prefix_draft": (True, 1, 1.0, 1.0, lambda: [RewardPotential(count_b, beta=1.0, prefix=True)]),
    "product_user": (True, 1, 1.0, 1.0, lambda: [NoRepeats() * RewardPotential(count_b, beta=-0.5)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_smc_matches_enumerated_target(case, target_lm, draft_lm):
    use_draft, block, alpha, tau, make_potentials = CASES[case]
    target = LMPotential(target_lm, temperature=tau, alpha=alpha)
    exact = enumerate_target(target, PROMPT, MAX_NEW, make_potentials())
    draft = draft_lm.to_dtype("bfloat16") if case == "bf16_draft" else draft_lm
    if case == "int8_self_draft":
        draft = int8_self_draft(target_lm)
    outs = {
        n: smc_estimates(
            target,
            LMProposal(draft, temperature=0.7 if case == "tempered_draft" else 1.0) if use_draft else None,
            make_potentials(),
            n,
            block,
            seed,
        )
        for n, seed in ((1, 11), (4, 12), (16, 13))
    }
    assert_matches_target(case, exact, outs)


def assert_matches_target(case: str, exact, outs: dict) -> None:
    """Check runs of SMC at N = 1, 4, 16 (``outs[n]`` a BatchRun of many groups) against ``exact``."""
    index = {s: i for i, s in enumerate(exact.sequences)}
    pi = torch.exp(exact.log_weights - exact.log_z)
    tvs = {}
    for n, out in outs.items():
        runs = out.log_z.shape[0]
        common = pi * runs >= 30
        m = masses(out, index)
        z = torch.exp(out.log_z - exact.log_z)  # Z_hat / Z, mean 1 if unbiased

        # E[Z_hat] = Z
        se = z.std() / math.sqrt(len(z))
        assert abs(z.mean() - 1) <= 4.5 * se + 1e-6, f"{case} N={n}: mean Z_hat/Z = {z.mean():.4f} +- {se:.4f}"

        # E[Z_hat * weighted mass on x] = pi(x), every x (Bonferroni over outcomes); rare
        # outcomes are pooled into one bin so every bin is seen often enough for its SE to hold
        zm = pooled(z[:, None] * m, common)
        est, se_x = zm.mean(0), zm.std(0) / math.sqrt(len(z))
        want = pooled(pi[None], common)[0]
        zcrit = 4.5
        # the pooled rare bin carries the heaviest-tailed weights (rare draws with large p/q), whose
        # sample SE is itself underestimated in most runs; it is held to 4.5 SE plus 30% of its mass
        slack = torch.zeros_like(want)
        slack[-1] = 0.3 * want[-1]
        ok = (est - want).abs() <= zcrit * se_x + slack + 1e-6
        assert bool(ok.all()), f"{case} N={n}: unnormalized estimate off at {(~ok).nonzero().squeeze(-1).tolist()}"

        tvs[n] = tv_and_noise(m, pi)

    (tv1, noise1), (tv4, noise4), (tv16, noise16) = tvs[1], tvs[4], tvs[16]
    if tv1 <= 3 * noise1:
        # the proposal is the target itself: every N is exact, TV is pure Monte Carlo noise
        assert tv4 <= 3 * noise4 and tv16 <= 3 * noise16, f"{case}: TV by N {tvs}"
    else:
        assert_tv_shrinks(case, tvs)


def tv_and_noise(m: torch.Tensor, pi: torch.Tensor) -> tuple[float, float]:
    """TV between the mean weighted distribution and ``pi``, and its Monte Carlo noise level."""
    p_hat = m.mean(0)
    noise = 0.5 * math.sqrt(2 / math.pi) * float((m.std(0) / math.sqrt(m.shape[0])).sum())
    return 0.5 * float((p_hat - pi).abs().sum()), noise


def assert_tv_shrinks(case: str, tvs: dict) -> None:
    """Self-normalized SMC has O(1/N) bias: TV (``tvs[n] = (tv, noise)``) must fall measurably from
    N=1 to 4, and quadrupling N again must at least halve it (up to three noise levels each)."""
    (tv1, noise1), (tv4, noise4), (tv16, noise16) = tvs[1], tvs[4], tvs[16]
    assert tv4 + 3 * noise4 < tv1 - 3 * noise1, f"{case}: TV does not shrink from N=1 to 4: {tvs}"
    assert tv16 - 3 * noise16 <= 0.5 * (tv4 + 3 * noise4), f"{case}: TV does not halve from N=4 to 16: {tvs}"


def test_adaptive_block_size_keeps_the_target(target_lm, draft_lm):
    """block_size_policy='adaptive': the block size each step drafts is chosen from the previous step's
    weights (a predictable choice), so the output is still the target's; and the blocks do change."""
    target = LMPotential(target_lm)
    exact = enumerate_target(target, PROMPT, MAX_NEW, [])
    outs = {}
    for n, seed in ((1, 41), (4, 42), (16, 43)):
        cfg = SMCConfig(
            n_particles=n,
            block_size=4,
            max_new_tokens=MAX_NEW,
            seed=seed,
            ess_threshold=0.5,
            block_size_policy="adaptive",
        )
        outs[n] = SMC(target, cfg, proposal=LMProposal(draft_lm)).run(PROMPT, n_groups=RUNS)
    assert_matches_target("adaptive_block", exact, outs)

    class Widths:
        def __init__(self):
            self.seen = []

        def record(self, block, valid, log_weights, ess, ancestors):
            self.seen.append(block.shape[1])  # drafted tokens + the bonus token

    rec = Widths()
    cfg = SMCConfig(n_particles=8, block_size=4, max_new_tokens=40, seed=0, block_size_policy="adaptive")
    long_target = LMPotential(tiny_lm(5, vocab=16, eos=15, logit_scale=1.0))  # EOS rare: many steps
    long_draft = LMProposal(tiny_lm(6, vocab=16, eos=15, logit_scale=1.0))
    SMC(long_target, cfg, proposal=long_draft).run(PROMPT, n_groups=4, recorder=rec)
    assert rec.seen[0] == 5 and len(set(rec.seen)) > 1, rec.seen  # starts at block_size, then moves
