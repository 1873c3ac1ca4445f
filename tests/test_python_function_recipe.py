"""recipes/python_function.py: its metrics (parse, NameError, unit tests) on known bodies, and one
end-to-end run of grammar masking and grammar + names SMC with the lazily compiled grammar on the
embedded model (the eager compile alone would take minutes)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import python_function as pf


def test_evaluate_tells_parse_name_errors_and_tests_apart():
    is_prime = pf.PROBLEMS[0]
    good = "\n    if n < 2:\n        return False\n    return all(n % i for i in range(2, int(n ** 0.5) + 1))\n```\n"
    assert pf.evaluate(is_prime, good, 10) == pf.Outcome(True, False, True, 10)
    assert pf.evaluate(is_prime, "\n    return isprime(n)\n", 5) == pf.Outcome(True, True, False, 5)
    assert pf.evaluate(is_prime, "\n    return n ==\n", 4) == pf.Outcome(False, False, False, 4)
    assert pf.evaluate(is_prime, "\n    return n > 1\n", 4) == pf.Outcome(True, False, False, 4)  # 9 is not prime


def test_recipe_runs_masking_and_grammar_names_smc_end_to_end(capsys, tmp_path):
    t0 = time.perf_counter()
    argv = ["--problems", "1", "--n", "2", "--max-new-tokens", "24", "--methods", "masking,smc_names"]
    out = pf.main([*argv, "--out", str(tmp_path)])
    assert time.perf_counter() - t0 < 120  # an eager compile of the grammar alone takes minutes
    assert sorted(out) == ["masking", "smc_names"]
    assert [len(v) for v in out.values()] == [1, 1]
    assert out["masking"][0].cut == (out["masking"][0].tokens == 24)  # one particle: its tokens are the answer's
    assert out["smc_names"][0].tokens > 0 and not out["smc_names"][0].name_error
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert [(a["method"], a["problem"]) for a in answers] == [("masking", "is_prime"), ("smc_names", "is_prime")]
    assert answers[1]["text"] and answers[1]["name_error"] is False
    # a sample with a particle of positive weight returns a member of the grammar: it parses
    assert all(a["dead"] or a["parses"] for a in answers if a["method"] == "smc_names")
    printed = capsys.readouterr().out
    assert "compiled lazily" in printed and "| grammar + names SMC N=2 | 1 |" in printed
