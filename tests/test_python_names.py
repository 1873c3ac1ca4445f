"""The names potential: static cases, soundness of its prefix score, and exactness of SMC with it.

The exactness target is p(x) conditioned on ``x`` being a straight-line program over three
statements that runs without a NameError and matches a regex (the potential composed with a
grammar by ``*``). The ground truth comes from running each program (``exec``), not from the
potential's own analysis.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from test_grammar_exactness import check_unbiased
from tiny_models import EOS, PROMPT, tiny_lm

from smcgen import (
    SMC,
    GrammarPotential,
    LMPotential,
    Potential,
    PythonNamesPotential,
    SequenceBatch,
    SMCConfig,
)
from smcgen.exact import enumerate_target
from smcgen.potentials.python_names import undefined_names
from smcgen.runners.transformers import LanguageModel

STATIC = {
    "def f(n):\n    return n + m\n": [("m", 2)],
    "def f(n):\n    x = len(n)\n    return x\n": [],
    "def f(n):\n    print(x)\n    x = 1\n": [("x", 2)],
    "def f(n):\n    for i in range(n):\n        if i:\n            print(y)\n        y = i\n": [],
    "def f(n):\n    return [i * j for i, j in n if i]\n": [],
    "def f(n):\n    g = [i for i in n]\n    return i\n": [("i", 3)],
    "def f(n):\n    def g():\n        return h()\n    def h():\n        return 1\n    return g()\n": [],
    "def f(n):\n    len = len(n)\n": [("len", 2)],
    "class A:\n    x = 1\n    def m(self):\n        return x\n": [("x", 4)],
    "def f(n):\n    try:\n        import os\n    except ImportError as e:\n        raise e\n    return os.sep\n": [],
    "def f(n):\n    if (k := n):\n        return k\n    return f(k)\n": [],
    "def f(n):\n    return lambda a: a + n + q\n": [("q", 2)],
    "def f(n):\n    with open(n) as fh, g(fh) as (a, b):\n        return a + b\n": [("g", 2)],
    "def f(n):\n    match n:\n        case [x, *rest]:\n            return x, rest\n        case {'k': v}:\n            return v\n": [],
}

PREFIXES = {
    "def f(n):\n    for i in range(n):\n        print(z)\n": [],  # the loop may still bind z
    "def f(n):\n    print(z)\n": [("z", 2)],
    "def f(n):\n    if n:\n": [],
    "def f(n):\n    try:\n        x = y\n": [("y", 3)],
    "def f(n):\n    x = foo(n,\n": [],  # an unfinished statement is not checked yet
    "def f(n):\n    def g():\n        return w\n": [],  # f may still bind w before g runs
}


@pytest.mark.parametrize("code", list(STATIC))
def test_undefined_names_on_complete_code(code):
    assert undefined_names(code) == STATIC[code]


@pytest.mark.parametrize("code", list(PREFIXES))
def test_undefined_names_on_unfinished_code(code):
    assert undefined_names(code, complete=False) == PREFIXES[code]


def test_uncertain_and_unparseable_text_is_not_ruled_out():
    p = PythonNamesPotential(prefix="def f(n):")
    batch = SequenceBatch([[0]], [], None)
    batch.__dict__["texts"] = ["\n    while n:\n        n = m\n"]
    assert p.log_prefix(batch).tolist() == [0.0]  # m may be bound later in the loop
    assert p.log_complete(batch).tolist() == [-math.inf]  # ... but the function ended without it
    batch.__dict__["texts"] = ["\n    return (n +"]
    assert p.log_complete(batch).tolist() == [0.0]  # syntax is the grammar's job
    with pytest.raises(ValueError, match="cache_size"):
        PythonNamesPotential(cache_size=0)


# ---------------------------------------------------------------------------------------- exactness
LINES = ["a=1\n", "b=a\n", "c=b\n"]
MAX_NEW = 4
RUNS = 2000
REGEX = r"(a=1\n|b=a\n)(a=1\n|b=a\n|c=b\n)*"  # the grammar factor: the program does not start with c=b


class LineDecoder:
    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(LINES[t] for t in s if t != EOS) for s in sequences]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.batch_decode([ids])[0]


class RunOracle(Potential):
    """Psi(x) = 1 iff the program runs without a NameError and matches REGEX (complete sequences only)."""

    def log_prefix(self, batch):
        raise AssertionError("the oracle only scores complete sequences")

    def log_complete(self, batch):
        out = []
        for s in batch.token_ids:
            code = "".join(LINES[t] for t in s if t != EOS)
            try:
                exec(code, {})  # noqa: S102 - three fixed statements
                ok = re.fullmatch(REGEX, code) is not None
            except NameError:
                ok = False
            out.append(0.0 if ok else -math.inf)
        return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def lm():
    base = tiny_lm(2, logit_scale=1.0)
    return LanguageModel(base.model, LineDecoder(), (EOS,), base.context_length)


def factors():
    g = GrammarPotential.regex(REGEX, [*LINES, None], eos_token_ids=[EOS])
    return g * PythonNamesPotential()


def test_prefix_score_never_rules_out_a_valid_completion(lm):
    names = PythonNamesPotential()
    for n in range(MAX_NEW):
        for prefix in itertools.product(range(3), repeat=n):
            pre = SequenceBatch([list(prefix)], PROMPT, lm.tokenizer)
            if names.log_prefix(pre).item() == 0.0:
                continue
            tails = [
                list(prefix) + list(t) for k in range(MAX_NEW - n + 1) for t in itertools.product(range(3), repeat=k)
            ]
            done = SequenceBatch([t + [EOS] for t in tails], PROMPT, lm.tokenizer)
            assert torch.isneginf(names.log_complete(done)).all(), f"prefix {prefix} was ruled out too early"


def test_potential_agrees_with_running_the_programs(lm):
    target = LMPotential(lm)
    exact = enumerate_target(target, PROMPT, MAX_NEW, [factors()])
    oracle = enumerate_target(target, PROMPT, MAX_NEW, [RunOracle()])
    assert exact.sequences == oracle.sequences
    assert torch.equal(torch.isneginf(exact.log_weights), torch.isneginf(oracle.log_weights))
    assert 0.05 < math.exp(oracle.log_z) < 0.95  # the factor rules out a real share of the mass


@pytest.mark.parametrize("n", [8, 16])
def test_smc_with_grammar_times_names_matches_the_conditioned_target(lm, n):
    target = LMPotential(lm)
    exact = enumerate_target(target, PROMPT, MAX_NEW, [RunOracle()])
    index = {s: i for i, s in enumerate(exact.sequences)}
    cfg = SMCConfig(n_particles=n, block_size=1, max_new_tokens=MAX_NEW, seed=7 + n, ess_threshold=1.0)
    out = SMC(target, cfg, potentials=factors()).run(PROMPT, n_groups=RUNS, on_dead="flag")
    check_unbiased(f"names N={n}", out, exact, index)
