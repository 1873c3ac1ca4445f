"""Standard speculative decoding on the native engine (samplers.native_sd), on the CPU twins.

Its random streams differ from the generic SD loop's, so the test of exactness is the enumerated
target itself (the same outcome-wise and TV checks as tests/test_speculative.py), with rows that
stop at different steps leaving the batch. A long run with the draft equal to the target checks the
per-row rollback: any stale or misplaced K/V in either cache would make p differ from q and reject.
"""

from __future__ import annotations

import math

import pytest
from test_speculative import MAX_NEW
from tiny_models import EOS, PROMPT, tiny_lm

import smcgen
from smcgen.exact import enumerate_target
from smcgen.potentials.lm import LMPotential
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native_sd import native_speculative_decode

ROWS = 2000


def assert_exact(rows: list[list[int]], exact, min_expected: float = 5.0) -> None:
    """The rows' empirical distribution matches ``exact`` within noise.

    Outcomes expected fewer than ``min_expected`` times are pooled into one bucket before the
    per-outcome z-test (4.5 standard errors): a single legitimate draw of a 1e-6 outcome is
    otherwise tens of "standard errors" off. The total variation must stay within three noise levels.
    """
    pi = exact.probabilities()
    n = len(rows)
    counts: dict[tuple[int, ...], int] = {}
    for r in rows:
        counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    assert set(counts) <= set(pi), f"rows outside the support: {set(counts) - set(pi)}"
    rare = [s for s, p in pi.items() if p * n < min_expected]
    buckets = [([s], p) for s, p in pi.items() if p * n >= min_expected]
    buckets.append((rare, sum(pi[s] for s in rare)))
    for members, p in buckets:
        freq = sum(counts.get(s, 0) for s in members) / n
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(freq - p) <= 4.5 * se, f"{members[:3]}...: frequency {freq:.4f} against probability {p:.4f}"
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in pi.items())
    noise = 0.5 * sum(math.sqrt(2 / math.pi) * math.sqrt(p * (1 - p) / n) for p in pi.values())
    assert tv <= 3 * noise, f"TV {tv:.4f} exceeds three noise levels ({noise:.4f})"


@pytest.fixture(scope="module")
def pair(device):
    # hidden 32: head_dim 16, the smallest the Triton attention kernel takes (the file runs on CUDA too)
    target, draft = tiny_lm(0, logit_scale=2.0, hidden=32), tiny_lm(1, logit_scale=0.7, hidden=32)
    native = [NativeCausalLM.from_hf(m.model, device=device) for m in (target, draft)]
    return target, *native


@pytest.mark.parametrize("block, tau, draft_tau", [(2, 1.0, 1.0), (5, 1.0, 1.0), (3, 0.7, 1.4)])
def test_native_sd_matches_enumerated_target(block, tau, draft_tau, pair):
    target_lm, target, draft = pair
    exact = enumerate_target(LMPotential(target_lm, temperature=tau), PROMPT, MAX_NEW)
    run = native_speculative_decode(
        target, draft, PROMPT, n_rows=ROWS, block_size=block, max_new_tokens=MAX_NEW,
        target_temperature=tau, draft_temperature=draft_tau, eos_token_ids=(EOS,), seed=200 + block, page_size=2,
    )  # fmt: skip
    assert 0 < run.acceptance_rate < 1  # a different draft: some drafts are rejected, some kept
    lengths = {len(r) for r in run.tokens}
    assert len(lengths) > 1  # rows stopped at different steps and left the batch
    assert_exact(run.tokens, exact)


def test_draft_alone_fails_the_same_check(pair):
    """The check has power here too: the draft verifying itself returns the draft's distribution."""
    target_lm, _, draft = pair
    exact = enumerate_target(LMPotential(target_lm), PROMPT, MAX_NEW)
    own = native_speculative_decode(
        draft, draft, PROMPT, n_rows=ROWS, block_size=3, max_new_tokens=MAX_NEW, eos_token_ids=(EOS,), seed=7
    )
    with pytest.raises(AssertionError):
        assert_exact(own.tokens, exact)


def test_rollback_keeps_both_caches_right_over_long_runs(pair):
    """Draft = target over 40 tokens and 64 rows of uneven lengths: p and q agree at every position
    only if each row's target and draft caches hold exactly its kept prefix."""
    _, target, _ = pair
    # a different sampling temperature for the draft side would make rejections legitimate; equal here
    run = native_speculative_decode(
        target, target, PROMPT, n_rows=64, block_size=4, max_new_tokens=40, eos_token_ids=(), seed=1, page_size=3
    )
    assert all(len(r) == 40 for r in run.tokens)
    assert run.acceptance_rate > 0.999, run.acceptance_rate
    # and with a real draft, rejections move rows apart; the output stays well-formed and seeded
    _, t, d = pair
    a = native_speculative_decode(
        t, d, PROMPT, n_rows=16, block_size=4, max_new_tokens=30, eos_token_ids=(EOS,), seed=5
    )
    b = native_speculative_decode(
        t, d, PROMPT, n_rows=16, block_size=4, max_new_tokens=30, eos_token_ids=(EOS,), seed=5
    )
    assert a.tokens == b.tokens and a.steps == b.steps
    for row in a.tokens:
        assert 1 <= len(row) <= 30 and (len(row) == 30 or row[-1] == EOS) and EOS not in row[:-1]


def test_generate_routes_sd_to_the_native_engine(target, draft, tok):
    kw = {"draft": draft, "tokenizer": tok, "method": "sd", "n_particles": 3, "block_size": 2, "max_new_tokens": 6}
    res = smcgen.generate(target, "ab", engine="native", seed=0, **kw)
    assert res.method == "sd" and res.engine == "native" and res.engine_reason is None
    assert len(res.sequences) == 3 and 0 <= res.acceptance_rate <= 1
    assert smcgen.generate(target, "ab", engine="native", seed=0, **kw).sequences == res.sequences
    generic = smcgen.generate(target, "ab", engine="generic", seed=0, **kw)
    assert generic.engine == "generic" and "engine='generic'" in generic.engine_reason
    auto = smcgen.generate(target, "ab", seed=0, **kw)  # auto on the CPU: generic, saying why
    assert auto.engine == "generic" and "not on a GPU" in auto.engine_reason


def test_native_sd_refuses_bad_input(pair, target, draft, tok):
    _, t, d = pair
    with pytest.raises(ValueError, match="n_rows must be >= 1"):
        native_speculative_decode(t, d, PROMPT, n_rows=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        native_speculative_decode(t, d, [0], n_rows=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        native_speculative_decode(t, d, PROMPT, max_new_tokens=10_000)
    with pytest.raises(ValueError, match="engine='native' cannot run this request: .*at least 2 tokens"):
        smcgen.generate(target, [0], draft=draft, tokenizer=tok, method="sd", engine="native", max_new_tokens=4)
