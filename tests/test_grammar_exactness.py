"""Grammar-constrained SMC against the exactly enumerated target on tiny models.

The target is p(x) conditioned on the language of a regex: pi(x) ∝ p(x) 1[x in L]. The ground
truth comes from an independent oracle (Python's ``re.fullmatch`` on the decoded letters), not
from xgrammar. Checked:
- the grammar potential and its next-token masks agree with the oracle on every prefix;
- masked target (plain SMC, every token drawn from p restricted to the allowed tokens, weight
  log sum_{allowed} p) and masked draft (SMC-SD, K=2, masked draft and masked bonus token):
  E[Z_hat] = Z and E[Z_hat * weighted mass on x] = pi~(x) for every x, at every N (z-tests),
  and the total variation to pi shrinks with N;
- plain masking (what outlines and most servers do: one particle, masked tokens, weights ignored)
  samples prod_t p(x_t | x_<t, mask) instead: its output distribution matches that exactly
  computed distribution and measurably differs from pi;
- the potential as a plain factor with unmasked proposals (the target itself, or a draft) is
  unbiased too (z-tests at N=16; smaller N lets whole groups die, which the batch run reports as
  an error).
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from test_exactness import assert_tv_shrinks, masses, pooled, tv_and_noise
from tiny_models import EOS, PROMPT, tiny_lm

from smcgen import SMC, LMPotential, LMProposal, Potential, SequenceBatch, SMCConfig
from smcgen.core.sampling import allowed_from_bitmask
from smcgen.exact import enumerate_target
from smcgen.potentials.grammar import GrammarPotential
from smcgen.proposals.masked import MaskedLMProposal

MAX_NEW = 4
RUNS = 3000
LETTERS = "abc"
TOKENS = ["a", "b", "c", None]  # id 3 is EOS
# masked runs: a finite language (at most 3 letters, so the length limit never cuts a particle)
# whose mass p puts mostly on prefixes with few completions: masking is strongly biased here
MASKED_REGEX = "(a|b)(a|c)?b?"
# plain-factor runs: a language the unconstrained proposals stay in often enough (Z ~ 0.4)
FACTOR_REGEX = "a*[bc]*"


class RegexOracle(Potential):
    """Psi(x) = 1 iff the letters of x fully match ``regex`` (x ends at EOS or at MAX_NEW tokens)."""

    def __init__(self, regex: str):
        self.regex = re.compile(regex)

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        raise AssertionError("the oracle only scores complete sequences")

    def log_complete(self, batch: SequenceBatch) -> torch.Tensor:
        out = []
        for s in batch.token_ids:
            ended = bool(s) and s[-1] == EOS
            assert ended or len(s) == MAX_NEW
            text = letters(s[:-1] if ended else s)
            out.append(0.0 if self.regex.fullmatch(text) else -math.inf)
        return torch.tensor(out, dtype=torch.float64)


def language(regex: str, max_len: int) -> set[str]:
    return {
        "".join(w)
        for n in range(max_len + 1)
        for w in itertools.product(LETTERS, repeat=n)
        if re.fullmatch(regex, "".join(w))
    }


def letters(tokens) -> str:
    return "".join(LETTERS[t] for t in tokens)


def oracle_allowed(lang: set[str], prefix: str) -> list[bool]:
    """Next tokens that keep ``prefix`` a prefix of a member of ``lang``; EOS iff a member."""
    return [any(w.startswith(prefix + c) for w in lang) for c in LETTERS] + [prefix in lang]


@pytest.fixture(scope="module")
def target_lm():
    return tiny_lm(0, logit_scale=1.0)


@pytest.fixture(scope="module")
def draft_lm():
    return tiny_lm(1, logit_scale=0.7)


def grammar(regex: str) -> GrammarPotential:
    return GrammarPotential.regex(regex, TOKENS, eos_token_ids=[EOS])


def check_unbiased(name: str, out, exact, index) -> tuple[float, float]:
    """z-tests: E[Z_hat] = Z and E[Z_hat * mass on x] = pi~(x) (rare outcomes pooled). Returns (TV, noise)."""
    pi = torch.exp(exact.log_weights - exact.log_z)
    m = masses(out, index)
    z = torch.exp(out.log_z - exact.log_z)  # Z_hat / Z, mean 1 if unbiased
    se = z.std() / math.sqrt(len(z))
    assert abs(z.mean() - 1) <= 4.5 * se + 1e-6, f"{name}: mean Z_hat/Z = {z.mean():.4f} +- {se:.4f}"
    common = pi * len(z) >= 30
    zm = pooled(z[:, None] * m, common)
    want = pooled(pi[None], common)[0]
    if int((zm[:, -1] > 0).sum()) < 30:
        # the pooled rare outcomes were reached in too few runs for a normal approximation (a
        # proposal that rarely visits them gives heavy-tailed estimates); E[Z_hat] covers their sum
        zm, want = zm[:, :-1], want[:-1]
    est, se_x = zm.mean(0), zm.std(0) / math.sqrt(len(z))
    ok = (est - want).abs() <= 4.5 * se_x + 1e-6
    assert bool(ok.all()), (
        f"{name}: unnormalized estimate off at {(~ok).nonzero().squeeze(-1).tolist()}: {est} vs {want}"
    )
    return tv_and_noise(m, pi)


def masked_sampling_distribution(lm, lang: set[str], index) -> torch.Tensor:
    """Exact output distribution of plain masking: prod_t p(x_t | x_<t) m_t(x_t) / sum_v p(v | x_<t) m_t(v)."""
    q = torch.zeros(len(index), dtype=torch.float64)

    def walk(prefix: list[int], prob: float) -> None:
        if (prefix and prefix[-1] == EOS) or len(prefix) == MAX_NEW:
            q[index[tuple(prefix)]] += prob
            return
        with torch.no_grad():
            p = torch.softmax(lm.model(input_ids=torch.tensor([PROMPT + prefix])).logits[0, -1].double(), -1)
        allowed = torch.tensor(oracle_allowed(lang, letters(prefix)))
        p = torch.where(allowed, p, torch.zeros_like(p))
        for v in allowed.nonzero().squeeze(-1).tolist():
            walk(prefix + [v], prob * float(p[v] / p.sum()))

    walk([], 1.0)
    return q


@pytest.mark.parametrize("regex", [MASKED_REGEX, FACTOR_REGEX])
def test_grammar_potential_and_masks_match_the_oracle(regex, target_lm):
    g = grammar(regex)
    target = LMPotential(target_lm)
    exact = enumerate_target(target, PROMPT, MAX_NEW, [g])
    oracle = enumerate_target(target, PROMPT, MAX_NEW, [RegexOracle(regex)])
    assert exact.sequences == oracle.sequences
    assert torch.equal(torch.isneginf(exact.log_weights), torch.isneginf(oracle.log_weights))
    assert torch.allclose(exact.log_weights, oracle.log_weights)

    # masks on every viable prefix, batched over the prefixes of one length, against the oracle
    lang = language(regex, 8)
    for n in range(MAX_NEW):
        prefixes = [list(p) for p in itertools.product(range(3), repeat=n)]
        prefixes = [p for p in prefixes if any(w.startswith(letters(p)) for w in lang)]
        if not prefixes:
            continue
        mask = g.next_token_bitmask(torch.tensor([PROMPT + p for p in prefixes]), len(PROMPT))
        got = allowed_from_bitmask(mask, 4, torch.device("cpu")).tolist()
        for p, row in zip(prefixes, got):
            assert row == oracle_allowed(lang, letters(p)), f"{regex}: prefix {p}: mask {row}"


CASES = {
    # name: (regex, draft?, block, masked?, Ns)
    "masked_target": (MASKED_REGEX, False, 1, True, (1, 4, 16)),
    "masked_draft_k2": (MASKED_REGEX, True, 2, True, (1, 4, 16)),
    "factor_target_proposal": (FACTOR_REGEX, False, 1, False, (16,)),
    "factor_draft_k2": (FACTOR_REGEX, True, 2, False, (16,)),
}


_RUNS_CACHE: dict[tuple[str, int], tuple[object, int]] = {}


def run_case(case: str, n: int, target_lm, draft_lm):
    """(BatchRun of RUNS groups, grammar forks) for a case at N = n; cached for the module."""
    key = (case, n)
    if key not in _RUNS_CACHE:
        regex, use_draft, block, masked, _ = CASES[case]
        g = grammar(regex)
        # resampling after every step (but the last) forks grammar states as often as possible
        cfg = SMCConfig(n_particles=n, block_size=block, max_new_tokens=MAX_NEW, seed=100 + n, ess_threshold=1.0)
        target = LMPotential(target_lm)
        if masked:
            proposal = MaskedLMProposal(draft_lm, g) if use_draft else None
            smc = SMC(target, cfg, proposal=proposal, mask=g)
        else:
            smc = SMC(target, cfg, proposal=LMProposal(draft_lm) if use_draft else None, potentials=[g])
        out = smc.run(PROMPT, n_groups=RUNS)
        # every row's cached grammar state followed its particle (forked, never replayed)
        assert g.stats.rebuilds == 0, f"{case} N={n}: {g.stats.rebuilds} grammar states were rebuilt"
        _RUNS_CACHE[key] = (out, g.stats.forks)
    return _RUNS_CACHE[key]


@pytest.mark.parametrize("case", list(CASES))
def test_constrained_smc_matches_conditioned_target(case, target_lm, draft_lm):
    regex, _, _, _, ns = CASES[case]
    exact = enumerate_target(LMPotential(target_lm), PROMPT, MAX_NEW, [RegexOracle(regex)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    tvs = {}
    forks = 0
    for n in ns:
        out, n_forks = run_case(case, n, target_lm, draft_lm)
        tvs[n] = check_unbiased(f"{case} N={n}", out, exact, index)
        forks += n_forks
    assert forks > 0, f"{case}: resampling never forked a grammar state"

    if len(ns) == 3:
        assert_tv_shrinks(case, tvs)


def test_plain_masking_is_biased_and_smc_corrects_it(target_lm, draft_lm):
    """One masked particle per run = plain masking: it follows the locally normalized distribution."""
    exact = enumerate_target(LMPotential(target_lm), PROMPT, MAX_NEW, [RegexOracle(MASKED_REGEX)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    pi = torch.exp(exact.log_weights - exact.log_z)
    q = masked_sampling_distribution(target_lm, language(MASKED_REGEX, 3), index)
    tv_q_pi = 0.5 * float((q - pi).abs().sum())
    assert tv_q_pi > 0.25, f"the chosen case should make masking clearly biased, TV(q, pi) = {tv_q_pi:.3f}"

    plain, _ = run_case("masked_target", 1, target_lm, draft_lm)
    m = masses(plain, index)
    tv_to_q, noise = tv_and_noise(m, q)
    tv_to_pi, _ = tv_and_noise(m, pi)
    assert tv_to_q <= 3 * noise, f"plain masking should sample q exactly: TV {tv_to_q:.4f}, noise {noise:.4f}"
    assert tv_to_pi > 10 * noise and tv_to_pi > 0.2, f"plain masking should differ from pi: TV {tv_to_pi:.4f}"

    smc, _ = run_case("masked_target", 16, target_lm, draft_lm)
    tv_smc, _ = tv_and_noise(masses(smc, index), pi)
    assert tv_smc < tv_to_pi / 4, f"SMC N=16 TV {tv_smc:.4f} vs plain masking {tv_to_pi:.4f}"
