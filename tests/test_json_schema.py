"""JSON Schema on real schemas: spec-conformant acceptance, the exact check after generation,
output types, the budget twist and the budget check.

Every keyword xgrammar cannot generate is dropped from the mask and enforced by the validator:
for each one a document that the mask lets through but the schema rejects must score zero, and
an enumerable case shows that SMC under the looser mask targets exactly the valid documents.
"""

from __future__ import annotations

import enum
import json
import math
import typing

import jsonschema
import pytest
import torch
from test_exactness import masses
from test_grammar_exactness import check_unbiased
from tiny_models import PROMPT, tiny_lm

from smcgen import (
    SMC,
    GrammarError,
    GrammarPotential,
    LMPotential,
    Potential,
    SequenceBatch,
    SMCConfig,
)
from smcgen.exact import enumerate_target
from smcgen.potentials.json_budget import budget_twist, closing_need
from smcgen.potentials.json_schema import lower_json_schema, shortest_document
from smcgen.potentials.output import as_grammar, grammar_kind

CHARS = [chr(i) for i in range(32, 127)]
CHAR_TOKENS = CHARS + [None]
CHAR_EOS = len(CHARS)


def char_grammar(schema) -> GrammarPotential:
    return GrammarPotential.json_schema(
        schema, CHAR_TOKENS, eos_token_ids=[CHAR_EOS], any_whitespace=False, separators=(",", ":")
    )


def ids_of(text: str) -> list[int]:
    return [CHARS.index(c) for c in text] + [CHAR_EOS]


def accepted(g: GrammarPotential, text: str) -> bool:
    return bool(g.log_complete(SequenceBatch([ids_of(text)], [], None))[0] == 0)


def mask_lets_through(g: GrammarPotential, text: str) -> bool:
    """Whether the grammar (the mask) alone accepts ``text``: every token allowed and the grammar complete."""
    ids = ids_of(text)
    if g.log_prefix(SequenceBatch([ids[:-1]], [], None))[0] != 0:
        return False
    why = g.explain_zero(ids, finished=True)
    return why is None or "fails the schema check after generation" in why


# keyword -> (schema, valid document, invalid document that the looser mask lets through)
CHECKED_AFTER_CASES = {
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,2]", "[1,1]"),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}}, "[3]", "[1]"),
    "minContains": (
        {"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}, "minContains": 2},
        "[3,3]",
        "[3,1]",
    ),
    "maxContains": (
        {"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}, "maxContains": 1},
        "[3,1]",
        "[3,3]",
    ),
    "dependentRequired": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
        },
        '{"a":1,"b":2}',
        '{"a":1}',
    ),
    "dependentSchemas": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentSchemas": {"a": {"required": ["b"]}},
        },
        '{"b":2}',
        '{"a":1}',
    ),
    "dependencies": (
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependencies": {"a": ["b"]},
        },
        '{"a":1,"b":2}',
        '{"a":1}',
    ),
    "not": ({"type": "integer", "not": {"const": 3}}, "4", "3"),
    "if/then/else": (
        {"type": "integer", "if": {"minimum": 10}, "then": {"multipleOf": 5}, "else": {"maximum": 3}},
        "15",
        "7",
    ),
    "multipleOf": ({"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 9}, "1.5", "1.25"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, "1", "3"),
    "maxLength with pattern": ({"type": "string", "pattern": "^a+$", "maxLength": 2}, '"aa"', '"aaa"'),
    "minLength with format": ({"type": "string", "format": "date", "maxLength": 5}, None, '"2024-01-02"'),
    "pattern (lookahead)": ({"type": "string", "pattern": "^(?!ab)[a-c]{2}$"}, '"ba"', '"ab"'),
    "allOf (merged approximately)": ({"allOf": [{"type": "integer", "const": 1}, {"const": 2}]}, None, "1"),
    "$ref beside keywords": ({"$defs": {"A": {"type": "integer"}}, "$ref": "#/$defs/A", "minimum": 5}, "6", "2"),
}


@pytest.mark.parametrize("case", sorted(CHECKED_AFTER_CASES))
def test_checked_after_keyword_never_returns_an_invalid_document(case):
    schema, good, bad = CHECKED_AFTER_CASES[case]
    g = char_grammar(schema)
    assert g.checked_after, f"{case}: the potential should name what is checked after generation"
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert not validator.is_valid(json.loads(bad))
    assert mask_lets_through(g, bad), f"{case}: the mask should be looser than the schema here ({bad})"
    assert not accepted(g, bad), f"{case}: {bad} violates the schema but scored as valid"
    assert "fails the schema check" in g.explain_zero(ids_of(bad), finished=True)
    if good is not None:
        assert validator.is_valid(json.loads(good)) and accepted(g, good), f"{case}: {good} should be accepted"


@pytest.mark.parametrize(
    "schema,good,bad",
    [
        # draft 4: id, boolean exclusiveMinimum, tuple items + additionalItems
        (
            {
                "$schema": "http://json-schema.org/draft-04/schema#",
                "id": "http://x/y",
                "type": "integer",
                "minimum": 3,
                "exclusiveMinimum": True,
            },
            "4",
            "3",
        ),
        (
            {
                "$schema": "http://json-schema.org/draft-04/schema#",
                "type": "array",
                "items": [{"type": "integer"}, {"type": "string"}],
                "additionalItems": {"type": "boolean"},
            },
            '[1,"a",true]',
            '[1,"a",2]',
        ),
        # draft 6 / 7: definitions, const, exclusiveMaximum as a number
        (
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "definitions": {"n": {"type": "integer", "exclusiveMaximum": 4}},
                "$ref": "#/definitions/n",
            },
            "3",
            "4",
        ),
        ({"$schema": "http://json-schema.org/draft-06/schema#", "const": "x"}, '"x"', '"y"'),
        # 2019-09 and 2020-12: $defs, prefixItems
        (
            {
                "$schema": "https://json-schema.org/draft/2019-09/schema",
                "$defs": {"s": {"type": "string", "maxLength": 2}},
                "$ref": "#/$defs/s",
            },
            '"ab"',
            '"abc"',
        ),
        (
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "array",
                "prefixItems": [{"type": "integer"}],
                "items": False,
            },
            "[1]",
            '["a"]',
        ),
        # annotations and vendor keys are ignored
        (
            {
                "type": "integer",
                "title": "t",
                "description": "d",
                "example": 1,
                "examples": [1],
                "x-vendor": {"a": 1},
                "$comment": "c",
                "default": 0,
                "deprecated": False,
                "readOnly": True,
            },
            "1",
            '"s"',
        ),
        # allOf merged exactly into one schema
        (
            {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                    {"properties": {"a": {"minimum": 2}}},
                ]
            },
            '{"a":3}',
            '{"a":1}',
        ),
    ],
)
def test_drafts_and_annotations_are_accepted_and_enforced(schema, good, bad):
    g = char_grammar(schema)
    assert accepted(g, good), good
    assert not accepted(g, bad), bad


def test_exact_merges_and_plain_schemas_are_checked_by_the_grammar_alone():
    merged = {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"a": {"minimum": 2}}},
        ]
    }
    assert lower_json_schema(merged).checked_after == ()
    g = char_grammar(merged)
    assert not mask_lets_through(g, '{"a":1}'), "an exact merge should be enforced by the mask itself"


# ---------------------------------------------------------------------------- the exact target
TOKENS = ["[", "1", "2", "]", ",", None]  # id 5 is EOS
EOS6 = 5
MAX_NEW = 6
UNIQUE = {"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True, "maxItems": 2}


class SchemaOracle(Potential):
    """Psi(x) = 1 iff the text of x is a JSON document valid against ``schema`` (by jsonschema)."""

    def __init__(self, schema):
        self.validator = jsonschema.Draft202012Validator(schema)

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        raise AssertionError("the oracle only scores complete sequences")

    def log_complete(self, batch: SequenceBatch) -> torch.Tensor:
        out = []
        for s in batch.token_ids:
            if not s or s[-1] != EOS6:
                out.append(-math.inf)
                continue
            try:
                ok = self.validator.is_valid(json.loads("".join(TOKENS[t] for t in s[:-1])))
            except json.JSONDecodeError:
                ok = False
            out.append(0.0 if ok else -math.inf)
        return torch.tensor(out, dtype=torch.float64)


def test_smc_under_the_looser_mask_targets_exactly_the_valid_documents():
    lm = tiny_lm(0, vocab=6, eos=EOS6, logit_scale=0.5)
    g = GrammarPotential.json_schema(UNIQUE, TOKENS, eos_token_ids=[EOS6], any_whitespace=False, separators=(",", ":"))
    assert g.checked_after and mask_unique_duplicates(g), "the mask should allow [1,1]: uniqueItems is checked after"
    exact = enumerate_target(LMPotential(lm), PROMPT, MAX_NEW, [SchemaOracle(UNIQUE)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    pi = torch.exp(exact.log_weights - exact.log_z)
    valid = {s for s, p in zip(exact.sequences, pi.tolist()) if p > 0}
    assert {"".join(TOKENS[t] for t in s[:-1]) for s in valid} == {"[]", "[1]", "[2]", "[1,2]", "[2,1]"}

    cfg = SMCConfig(n_particles=8, max_new_tokens=MAX_NEW, seed=3, ess_threshold=1.0)
    out = SMC(LMPotential(lm), cfg, mask=g).run(PROMPT, n_groups=1500, on_dead="flag")
    m = masses(out, index)
    invalid = [i for s, i in index.items() if s not in valid]
    assert float(m[:, invalid].sum()) == 0.0, "a document the schema rejects kept a positive weight"
    # z-tests: E[Z_hat] = Z and E[Z_hat * weight on x] = the exact unnormalized target of x, for every
    # common x (groups whose particles all drew an invalid document count with Z_hat = 0, as they should)
    check_unbiased("uniqueItems N=8", out, exact, index)
    assert int(out.dead.sum()) < 1500 - 200, "too few groups kept a valid document for the z-tests to mean much"


def mask_unique_duplicates(g: GrammarPotential) -> bool:
    ids = [0, 1, 4, 1, 3]  # "[1,1]"
    return bool(g.log_prefix(SequenceBatch([ids], [], None))[0] == 0) and not accepted_tokens(g, ids + [EOS6])


def accepted_tokens(g: GrammarPotential, ids: list[int]) -> bool:
    return bool(g.log_complete(SequenceBatch([ids], [], None))[0] == 0)


# ---------------------------------------------------------------------------- output types
class Color(enum.Enum):
    """A closed set of answers."""

    red = "red"
    green = "green"


def test_output_types_become_grammars_and_parse_back():
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    g = as_grammar(Point)
    assert g.kind == "json_schema" and g.parse('{"x": 1, "y": 2}') == Point(x=1, y=2)
    assert as_grammar(Color).parse('"red"') is Color.red
    assert as_grammar(typing.Literal["yes", "no"]).parse('"no"') == "no"
    assert as_grammar({"type": "integer"}).parse("12") == 12
    assert as_grammar('{"type": "boolean"}').kind == "json_schema"
    assert as_grammar(r"[0-9]{3}").kind == "regex" and as_grammar(r"[0-9]{3}").parse("123") is None
    assert grammar_kind('root ::= "a" | "b"') == "ebnf" and grammar_kind('start: "a"\n') == "lark"
    g = as_grammar(typing.Literal["yes", "no"])
    assert g is not None and as_grammar(None) is None
    with pytest.raises(GrammarError, match="grammar must be"):
        as_grammar(3.5)


def test_literal_grammar_admits_exactly_its_values():
    g = as_grammar(typing.Literal["yes", "no"])
    g = g.bind(CHAR_TOKENS, eos_token_ids=[CHAR_EOS])
    assert accepted(g, '"yes"') and accepted(g, '"no"') and not accepted(g, '"maybe"')


# ---------------------------------------------------------------------------- budget
def test_closing_need_counts_open_strings_brackets_and_eos():
    assert closing_need("") == 1
    assert closing_need('{"a": [1, "x') == 4  # quote, ], }, EOS
    assert closing_need('{"a":') == 3  # a value, }, EOS
    assert closing_need('{"a": "b\\"}"}') == 1
    assert budget_twist('{"a": "xx', 100) == 0.0
    assert budget_twist('{"a": "xx', 3) < budget_twist('{"a": "xx', 6) < 0


def test_closing_need_counts_missing_required_properties_of_open_objects():
    schema = lower_json_schema(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tags": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"k": {"type": "string", "minLength": 12}},
                        "required": ["k"],
                    },
                },
            },
            "required": ["name", "tags"],
        }
    )
    # '"tags":[]' (9 chars + comma) is missing after the name: ceil(11 / 4) = 3 tokens beyond the
    # closers, and VALUE_TOKENS (3) for the value a model writes
    assert closing_need('{"name": "x', schema) == closing_need('{"name": "x') + 6
    assert closing_need('{"name": "x", "tags": [', schema) == closing_need('{"name": "x", "tags": [')
    # inside an item the item's own required "k" (12 characters at least) is missing
    assert closing_need('{"name": "x", "tags": [{', schema) > closing_need('{"name": "x", "tags": [{') + 3
    assert closing_need('{"name": "x", "tags": [{"k": "abcdefghijkl"}', schema) == closing_need(
        '{"name": "x", "tags": [{"k": "abcdefghijkl"}'
    )


def test_budget_twist_leaves_the_target_unchanged(monkeypatch):
    """SMC with the budget twist on targets exactly the same documents as without it (z-tests against
    the enumerated target), while the twist is active at this budget (it scores prefixes below zero).
    A margin of 1 and 1 nat per token: the default margin would twist every prefix of this 6-token
    budget hard, and the z-tests need weights with light tails."""
    import smcgen.potentials.json_budget as jb

    monkeypatch.setattr(jb, "TWIST_MARGIN", 1)
    monkeypatch.setattr(jb, "TWIST_NATS_PER_TOKEN", 1.0)
    lm = tiny_lm(1, vocab=6, eos=EOS6, logit_scale=0.5)
    g = GrammarPotential.json_schema(UNIQUE, TOKENS, eos_token_ids=[EOS6], any_whitespace=False, separators=(",", ":"))
    g.finish_within = MAX_NEW
    assert g.log_prefix(SequenceBatch([[0, 1, 4]], [], None))[0] < 0, "the twist should be active at this budget"
    exact = enumerate_target(LMPotential(lm), PROMPT, MAX_NEW, [SchemaOracle(UNIQUE)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    cfg = SMCConfig(n_particles=4, max_new_tokens=MAX_NEW, seed=5, ess_threshold=1.0)
    out = SMC(LMPotential(lm), cfg, mask=g).run(PROMPT, n_groups=1500, on_dead="flag")
    check_unbiased("budget twist N=4", out, exact, index)


def test_budget_mask_and_infinite_twist_keep_the_target_exact():
    """With 4 tokens of budget, after "[1," no document can end in time ("[1,2]" takes 5): the budget
    mask drops every next token there, and the twist is -inf on prefixes that cannot end. Both are exact: SMC
    still targets exactly the enumerated documents that end within the budget (z-tests)."""
    budget = 4
    lm = tiny_lm(1, vocab=6, eos=EOS6, logit_scale=0.5)
    g = GrammarPotential.json_schema(UNIQUE, TOKENS, eos_token_ids=[EOS6], any_whitespace=False, separators=(",", ":"))
    g.finish_within = budget
    prefix = torch.tensor([PROMPT + [0, 1, 4]])
    assert g.next_token_bitmask(prefix, len(PROMPT)).eq(0).all(), "nothing fits after '[1,' in 4 tokens"
    # "[1,2" at the limit still needs its "]": the twist is -inf there, finite on "[1]" (one token left)
    assert g.log_prefix(SequenceBatch([[0, 1, 4, 2]], [], None))[0] == -math.inf
    assert g.log_prefix(SequenceBatch([[0, 1, 3]], [], None))[0] > -math.inf
    # the mask allows a token exactly where the score after it is finite, at every prefix
    from smcgen.testing import check_mask_consistency

    seqs = [[], [0], [0, 1], [0, 1, 4], [0, 2, 4], [0, 1, 4, 2], [0, 3]]
    check_mask_consistency(g, seqs, len(TOKENS), [EOS6], PROMPT)
    g.finish_within = None
    assert g.next_token_bitmask(prefix, len(PROMPT)).ne(0).any(), "without a budget the grammar allows '2'"
    g.finish_within = budget
    exact = enumerate_target(LMPotential(lm), PROMPT, budget, [SchemaOracle(UNIQUE)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    cfg = SMCConfig(n_particles=4, max_new_tokens=budget, seed=3, ess_threshold=1.0)
    out = SMC(LMPotential(lm), cfg, mask=g).run(PROMPT, n_groups=1500, on_dead="flag")
    check_unbiased("budget mask N=4", out, exact, index)


def test_budget_mask_inside_strings_drops_exactly_the_tokens_that_cannot_end_in_time():
    """Inside a string the mask decides the tokens without a quote or backslash together (one array
    operation) and feeds the rest one by one: at every prefix and budget it must still allow a token
    exactly where the score after it is finite. Tokens that close the string and the object at once,
    escapes, and plain letters, from 0 to 4 tokens of budget left."""
    from smcgen.testing import check_mask_consistency

    schema = {
        "type": "object",
        "properties": {"s": {"type": "string"}, "t": {"type": "string"}},
        "required": ["s", "t"],
    }
    tokens = ['{"s":"', "a", "b", "ab", '"', '",', '","t":"', '"}', "\\", '\\"', "x", None]  # fmt: skip
    eos = len(tokens) - 1
    g = GrammarPotential.json_schema(schema, tokens, eos_token_ids=[eos], any_whitespace=False, separators=(",", ":"))
    prefixes = [[0], [0, 1], [0, 3, 8], [0, 1, 6], [0, 1, 6, 2], [0, 9, 1]]
    for prefix in prefixes:
        for left in range(0, 5):
            g.finish_within = len(prefix) + 1 + left
            check_mask_consistency(g, [prefix], len(tokens), [eos])
    g.finish_within = 4  # after '{"s":"a' two tokens remain: only '","t":"' then '"}' can end in time
    allowed = g.next_token_bitmask(torch.tensor([[0, 1]]), 0)[0]
    assert [v for v in range(len(tokens)) if allowed >> v & 1] == [6]


def _segmentations(text: str, vocab: list[str], limit: int = 200) -> list[list[str]]:
    """Up to ``limit`` ways to write ``text`` as a sequence of vocabulary tokens."""
    out: list[list[str]] = []

    def walk(rest: str, acc: list[str]) -> None:
        if len(out) >= limit:
            return
        if not rest:
            out.append(acc)
            return
        for tok in vocab:
            if rest.startswith(tok):
                walk(rest[len(tok) :], acc + [tok])

    walk(text, [])
    return out


def test_min_tokens_is_a_lower_bound_on_every_tokenization_of_valid_documents():
    """The bound the mask and the -inf twist rest on: for every valid document, every way to write it
    in tokens, and every prefix, min_tokens(prefix) <= the tokens that follow. A vocabulary with
    multi-character tokens (closing several brackets at once, whole keys) makes the bound tight."""
    from smcgen.potentials.json_budget import JsonPrefix, TokenCapacity, min_tokens

    schema = {
        "type": "object",
        "properties": {
            "ab": {"type": "string"},
            "n": {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]},
            "t": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["ab", "n", "t"],
    }
    lowered = lower_json_schema(schema)
    vocab = ['"', "{", "}", "[", "]", ":", ",", "a", "b", "k", "n", "t", "x", "y", "1", " ", '"}', '"}}', '":"',
             '{"', '"ab"', '","', '"]', "]}", '":{"', '"},"', '":[', "\\", '\\"']  # fmt: skip
    capacity = TokenCapacity.of([v.encode() for v in vocab])
    docs = [
        '{"ab":"a","n":{"k":"x"},"t":[]}',
        '{"ab":"\\"b","n":{"k":"y"},"t":[1,1]}',
        '{ "ab" : "" , "n":{"k":"x"},"t":[1]}',
    ]
    checked = 0
    for doc in docs:
        assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(doc))
        for tokens in _segmentations(doc, vocab):
            for cut in range(len(tokens) + 1):
                state = JsonPrefix(lowered.grammar_schema).feed("".join(tokens[:cut]))
                assert min_tokens(state, capacity) <= len(tokens) - cut, (doc, tokens[:cut])
                checked += 1
    assert checked > 500
    # and it is not vacuous: inside the first key, the rest needs several tokens
    state = JsonPrefix(lowered.grammar_schema).feed('{"a')
    assert min_tokens(state, capacity) >= 3


def test_budget_too_small_for_the_shortest_document_is_a_clear_error():
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer('{}[]":,ab01')
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 4}}, "required": ["a"]}
    assert shortest_document(lower_json_schema(schema).grammar_schema) == {"a": "aaaa"}
    with pytest.raises(GrammarError, match=r"max_new_tokens=5 is too small .* raise max_new_tokens to at least 13"):
        as_grammar(schema, tok, max_new_tokens=5)
    g = as_grammar(schema, tok, max_new_tokens=13)
    assert g.finish_within == 13


@pytest.mark.parametrize(
    "schema",
    [
        {"$defs": {"a": {"$anchor": "foo", "type": "integer"}}, "$ref": "#foo"},
        {"$id": "http://example.com/root.json", "$defs": {"a": {"$id": "a.json", "type": "integer"}}, "$ref": "a.json"},
    ],
)
def test_in_document_refs_are_left_to_the_validator(schema):
    g = char_grammar(schema)
    assert any("$ref" in part for part in g.checked_after)
    assert accepted(g, "1") and not accepted(g, '"s"')


def test_metaschema_ref_resolves_offline_and_remote_refs_are_refused():
    g = char_grammar(
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "properties": {"s": {"$ref": "http://json-schema.org/draft-07/schema#"}},
        }
    )
    assert accepted(g, '{"s":{"type":"integer"}}') and not accepted(g, '{"s":{"type":3}}')
    with pytest.raises(GrammarError, match="no remote refs"):
        GrammarPotential.json_schema({"$ref": "http://example.com/x.json"})


# ---------------------------------------------------------------------------- real-schema spellings
def test_ecma_patterns_are_checked_with_their_python_spelling():
    from smcgen.potentials.json_schema import python_regex

    assert python_regex(r"^a+$") == r"^a+$"  # re accepts it: unchanged
    g = char_grammar({"type": "string", "pattern": r"^[^\p{Cc}]+$"})  # CircleCI's spelling
    assert accepted(g, '"ab"') and not accepted(g, '"a\\u0007"')
    g = char_grammar({"type": "string", "pattern": r"^(?<major>[0-9]+)\.[\w-_.]+$"})
    assert accepted(g, '"1.a-b_c"') and not accepted(g, '"x.a"')


def test_refs_through_dropped_keywords_and_tuple_items_are_relocated():
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"opts": {"if": {"type": "integer", "maximum": 3}, "items": [{"type": "string"}]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/definitions/opts/if"}, "b": {"$ref": "#/definitions/opts/items/0"}},
        "required": ["a", "b"],
    }
    g = char_grammar(schema)
    assert accepted(g, '{"a":2,"b":"x"}')
    assert not mask_lets_through(g, '{"a":5,"b":"x"}') and not mask_lets_through(g, '{"a":2,"b":1}')


def test_min_properties_beyond_the_named_ones_allows_other_properties():
    g = char_grammar({"type": "object", "minProperties": 1})
    assert accepted(g, '{"k":1}') and not mask_lets_through(g, "{}")


def test_bundle_embeds_the_documents_refs_reach():
    from smcgen.potentials.json_bundle import bundle_schema

    docs = {
        "https://example.com/defs.json": {
            "$id": "https://example.com/defs.json",
            "definitions": {"id": {"type": "integer", "minimum": 1}},
        }
    }
    schema = {"type": "object", "properties": {"id": {"$ref": "defs.json#/definitions/id"}}, "required": ["id"]}
    with pytest.raises(GrammarError, match="no remote refs"):
        char_grammar(schema)
    g = char_grammar(bundle_schema(schema, docs, "https://example.com/main.json"))
    assert accepted(g, '{"id":3}') and not accepted(g, '{"id":0}')


def test_recursive_ref_inside_allof_is_a_finite_exact_grammar():
    """allOf through a recursive $ref (as in asyncapi 2.4.0: a schema that is the metaschema allOf
    its own extensions): each allOf node is merged once into $defs and recursive occurrences point
    back to it, so the grammar is finite and exact at every depth, nothing left to the validator."""
    schema = {
        "$defs": {
            "base": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}},
            "node": {
                "allOf": [
                    {"$ref": "#/$defs/base"},
                    {"properties": {"child": {"allOf": [{"$ref": "#/$defs/node"}]}, "n": {"minimum": 1}}},
                ]
            },
        },
        "$ref": "#/$defs/node",
    }
    lowered = lower_json_schema(schema)
    assert lowered.exact, lowered.checked_after
    g = char_grammar(schema)
    deep = '{"n":3,"child":{"n":1,"child":{"child":{"child":{"n":5}}}}}'
    assert accepted(g, deep)
    # the merged bounds hold at depth 4 too, in the mask itself
    for bad in ('{"child":{"child":{"child":{"child":{"n":0}}}}}', '{"child":{"child":{"child":{"n":6}}}}'):
        assert not mask_lets_through(g, bad) and not accepted(g, bad)


def test_ecma_patterns_re_cannot_run_are_checked_with_the_regex_package():
    """A variable-length lookbehind (ECMA-262 2018; Python's re refuses it) was a refused schema: the
    metaschema check and the validator now run it with the regex package, and it is enforced."""
    schema = {"type": "string", "pattern": r"(?<=^v?|\sv?)(?:(?:0|[1-9][0-9]*)\.){2}(?:0|[1-9][0-9]*)\b"}
    g = char_grammar(schema)
    assert any("pattern" in part for part in g.checked_after)
    assert accepted(g, '"v1.2.3"') and accepted(g, '"1.2.3"')
    assert mask_lets_through(g, '"x1.2.3"') and not accepted(g, '"x1.2.3"')
    with pytest.raises(GrammarError, match="invalid"):
        char_grammar({"type": "string", "pattern": "(unclosed"})
