"""The reward recipes' pieces: the haiku potential passes smcgen.testing, the rewards score as
documented, and the shared evaluation (best-of-N vs SMC, token counts, paired CIs) runs end to end
on a tiny model."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_lm, tiny_tokenizer

import smcgen
from smcgen.testing import check_potential

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import _harness
import code_tests
import haiku
import keywords


def test_syllables_and_meter():
    assert [haiku.syllables(w) for w in ["pond", "silent", "table", "make", "into", "again"]] == [1, 2, 2, 1, 2, 2]
    poem = "An old silent pond\nA frog jumps into the pond\nsplash! Silence again"
    assert haiku.line_counts(poem, True) == [5, 7, 5] and haiku.meter_ok(poem, True)
    assert haiku.meter_ok("An old silent pond\nA frog ju", False)  # the unfinished word does not count yet
    assert not haiku.meter_ok("An old silent pond is here", False)  # 6 syllables on line one
    assert not haiku.meter_ok("An old silent pond\nA frog", True)  # finished too early


def test_haiku_potential_passes_the_harness_on_real_tokens():
    tok = smcgen.load_model("smollm2-135m").tokenizer
    texts = [
        "An old silent pond\nA frog jumps into the pond\nsplash! Silence again",
        "An old silent pond is here",
        "Leaves fall",
        "",
        "Cold wind\n\nbright",
    ]
    check_potential(haiku.Haiku(), [tok.encode(t) for t in texts], decoder=tok, monotone=True)


def test_keyword_fraction():
    words = ("river", "clock", "purple")
    assert keywords.fraction_used("The purple river flows.", words) == pytest.approx(2 / 3)
    assert keywords.fraction_used("Clocks by the River are PURPLE", words) == 1.0
    assert keywords.fraction_used("riverside clockwork", words) == 0.0  # whole words only


def test_unit_test_reward_runs_code_apart_and_stops_loops():
    case = code_tests.TASK.cases[0]  # add(a, b)
    runner = code_tests.TestRunner()
    good = case.prefix + "\n    return a + b\n```\nSome prose."
    scores = runner(case, [good, case.prefix + "\n    return a - b", case.prefix + "\n    while True:\n        pass"])
    assert scores == [1.0, 0.25, 0.0]  # a - b passes only add(0, 0)
    assert code_tests.syntax_ok_so_far(case.prefix + "\n    if a:\n        x = 1\n    ret")
    assert not code_tests.syntax_ok_so_far(case.prefix + "\nThis adds two numbers\n")


def test_evaluation_runs_end_to_end_on_a_tiny_model():
    lm = tiny_lm(0, logit_scale=2.0)
    lm = smcgen.LanguageModel(lm.model, tiny_tokenizer(), lm.eos_token_ids, lm.context_length)
    task = _harness.RewardTask(
        title="tiny: count a",
        cases=[_harness.Case("ab"), _harness.Case("ba")],
        reward=lambda case, texts: [t.count("a") / max(len(t), 1) for t in texts],
        success=lambda case, text: text.count("a") >= 2,
        potential=lambda case, lm_, args: smcgen.RewardPotential(lambda t: t.count("a"), beta=2.0, prefix=True),
        max_new_tokens=5,
    )
    args = argparse.Namespace(temperature=None, max_new_tokens=None, particles="2,4", groups=3, cases=2, seed=0)
    results = {r.name: r for r in _harness.run_reward_task(task, args, lm)}
    assert list(results) == ["plain sampling", "best-of-2", "best-of-4", "SMC N=2", "SMC N=4"]
    for r in results.values():
        assert len(r.answers) == 6 and r.seconds > 0
        assert all(0 <= a.reward <= 1 and math.isfinite(a.loglik_per_token) for a in r.answers if a.tokens)
    # best-of-n keeps, per group, the best of n samples: never worse than plain sampling on the same group
    plain = {(a.case, a.group): a.reward for a in results["plain sampling"].answers}
    assert all(a.reward >= plain[(a.case, a.group)] for a in results["best-of-4"].answers)
    # compute matches: best-of-4 and SMC N=4 both generate about 4 answers' worth of tokens, plain one
    assert results["plain sampling"].tokens_per_answer <= 5
    assert 4 < results["best-of-4"].tokens_per_answer <= 20 and 4 < results["SMC N=4"].tokens_per_answer <= 20
    d, h = _harness.paired_diff(results["SMC N=4"], results["best-of-4"], "reward")
    assert math.isfinite(d) and h >= 0


def test_paired_difference_and_ci():
    m, h = _harness.ci95([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and h == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    a = _harness.MethodResult(
        "a", "SMC", 2, [_harness.Answer(0, g, "", [], r, math.nan) for g, r in enumerate([1, 1, 2])], 0, 1
    )
    b = _harness.MethodResult(
        "b", "SMC", 2, [_harness.Answer(0, g, "", [], r, math.nan) for g, r in enumerate([0, 0, 1])], 0, 1
    )
    assert _harness.paired_diff(a, b, "reward") == (1.0, 0.0)  # the same +1 on every pair: no spread
