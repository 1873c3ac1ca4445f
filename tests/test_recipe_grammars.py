"""The recipes' grammars accept only valid programs: random walks under their masks (a
character-level vocabulary) must give Python that parses and compiles, and SQL that runs against
the schema in SQLite. A random walk reaches odd corners (keywords as names, aggregates in the
wrong clause, tuple targets of augmented assignments) that a language model rarely does."""

from __future__ import annotations

import ast
import random
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from smcgen import GrammarPotential
from smcgen.core.sampling import allowed_from_bitmask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from _grammars import identifier_rules, python_function_body_grammar, sql_grammar

CHARS = [chr(i) for i in range(32, 127)] + ["\n", "    "]
TOKENS = [*CHARS, None]
EOS = len(CHARS)


CLOSERS = [CHARS.index(c) for c in "\n)]:;"]


def random_member(
    g: GrammarPotential, rng: random.Random, max_len: int, p_end: float, p_close: float = 0.3
) -> str | None:
    """Walk the grammar's masks from the empty string; the text at EOS, or None past max_len.

    Closing characters (newline, brackets, colon) are favoured with probability ``p_close`` so
    that walks end within ``max_len`` characters often enough."""
    prefix: list[int] = []
    for _ in range(max_len):
        mask = g.next_token_bitmask(torch.tensor([[0, *prefix]]), 1)
        allowed = allowed_from_bitmask(mask, len(TOKENS), torch.device("cpu"))[0]
        chars = [v for v in range(EOS) if allowed[v]]
        if allowed[EOS] and (not chars or rng.random() < p_end):
            return "".join(CHARS[t] for t in prefix)
        assert chars, f"dead end after {''.join(CHARS[t] for t in prefix)!r}"
        closers = [v for v in CLOSERS if allowed[v]]
        prefix.append(rng.choice(closers if closers and rng.random() < p_close else chars))
    return None


def test_identifiers_exclude_reserved_words():
    g = GrammarPotential.ebnf(identifier_rules("root", ["if", "in", "is", "None"]), TOKENS, eos_token_ids=[EOS])
    from smcgen import SequenceBatch

    words = ["if", "in", "is", "None", "i", "ifs", "inner", "Non", "x_1", "_", "1x", "i f"]
    ids = [[CHARS.index(c) for c in w] + [EOS] for w in words]
    ok = (g.log_complete(SequenceBatch(ids, [], None)) == 0).tolist()
    assert ok == [False, False, False, False, True, True, True, True, True, True, False, False]


def test_python_subset_grammar_only_makes_valid_functions():
    g = GrammarPotential.ebnf(python_function_body_grammar(), TOKENS, eos_token_ids=[EOS])
    rng = random.Random(0)
    n_valid = 0
    for _ in range(100):
        body = random_member(g, rng, max_len=160, p_end=0.3)
        if body is None:
            continue
        source = "def f(n):" + body.removesuffix("\n").removesuffix("```")
        try:
            ast.parse(source)
            compile(source, "<walk>", "exec")
        except SyntaxError as err:
            pytest.fail(f"the grammar made invalid Python: {source!r}: {err}")
        n_valid += 1
    assert n_valid >= 20


def test_sql_grammar_only_makes_queries_that_run():
    tables = {"departments": ["id", "name", "budget"], "employees": ["id", "name", "department_id", "salary"]}
    g = GrammarPotential.ebnf(
        sql_grammar(tables, [("employees", "department_id", "departments", "id")]), TOKENS, eos_token_ids=[EOS]
    )
    db = sqlite3.connect(":memory:")
    db.executescript(
        "CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, budget REAL);"
        "CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department_id INTEGER, salary REAL);"
    )
    rng = random.Random(1)
    n_valid = 0
    for _ in range(200):
        query = random_member(g, rng, max_len=200, p_end=0.5, p_close=0.0)
        if query is None:
            continue
        try:
            db.execute(query).fetchall()
        except sqlite3.Error as err:
            pytest.fail(f"the grammar made an invalid query: {query!r}: {err}")
        n_valid += 1
    assert n_valid >= 120
