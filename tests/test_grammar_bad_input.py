"""Grammar bad input: compile-time errors that say what and where, unsupported JSON-schema
features named, and the documented outcome when every particle dead-ends."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import EOS, PROMPT, tiny_lm

import smcgen
from smcgen import (
    SMC,
    AllParticlesDeadError,
    GrammarError,
    GrammarPotential,
    LMPotential,
    SMCConfig,
)
from smcgen.potentials.json_schema import SUPPORTED

CHARS = [chr(i) for i in range(32, 127)]
CHAR_TOKENS = CHARS + [None]
CHAR_EOS = len(CHARS)


@pytest.mark.parametrize(
    "pattern,words",
    [
        ("[a-", ["invalid regex '[a-'", "position 4", "Unclosed '['"]),
        ("(ab", ["position 4", "parenthesis is not closed"]),
        ("(?=a)b", ["position 3", "Lookahead is not supported"]),
        (r"(a)\1", ["Backreference is not supported"]),
    ],
)
def test_invalid_regex_says_what_and_where(pattern, words):
    with pytest.raises(GrammarError) as err:
        GrammarPotential.regex(pattern)
    msg = str(err.value)
    for w in words:
        assert w in msg, msg
    assert "^" in msg  # a caret under the position


@pytest.mark.parametrize(
    "grammar,words",
    [
        ('root ::= "a" b', ["invalid EBNF grammar", 'Rule "b" is not defined', "line 1"]),
        ('root ::= "a\nb ::= "c"', ["line 1, column", 'Expect "']),
        ('start ::= "a"', ['root rule with name "root" is not found']),
        ('root ::= "a" |\n', ["line"]),
    ],
)
def test_invalid_ebnf_says_what_and_where(grammar, words):
    with pytest.raises(GrammarError) as err:
        GrammarPotential.ebnf(grammar)
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "grammar,words",
    [
        ('start: "a" b\n', ["invalid Lark grammar", "line 1, column 12", "unknown name 'b'"]),
        ('start: "a" (\n', ["line 1, column 13", "expected ')'"]),
    ],
)
def test_invalid_lark_says_what_and_where(grammar, words):
    with pytest.raises(GrammarError) as err:
        GrammarPotential.lark(grammar)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_invalid_json_text_says_where():
    with pytest.raises(GrammarError, match=r"not JSON .*line 1, column 10"):
        GrammarPotential.json_schema('{"type": ')


@pytest.mark.parametrize(
    "schema,words",
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, ["#/properties/a/type", "unknown type 'strin'"]),
        ({"type": "integer", "minimum": 5, "maximum": 1}, ["minimum (5) is greater than maximum (1)"]),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/X"}}}, ["#/properties/a/$ref", "does not resolve"]),
        ({"$ref": "https://example.com/s.json"}, ["no remote refs"]),
        ({"type": "object", "required": "a"}, ["#/required", "the schema is invalid"]),
        (["not", "a", "schema"], ["pydantic model class, a dict or JSON text"]),
    ],
)
def test_bad_json_schema_named_with_pointer(schema, words):
    with pytest.raises(GrammarError) as err:
        GrammarPotential.json_schema(schema)
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "schema,words",
    [
        (
            {"type": "object", "properties": {"a": {"type": "integer"}}, "requried": ["a"]},
            ["#/requried", "unknown keyword 'requried'"],
        ),
        ({"type": "string", "format": "int32"}, ["#/format", "unknown format 'int32'", "plain string"]),
    ],
)
def test_ignored_json_schema_parts_are_warned_about(schema, words):
    from smcgen.potentials.json_schema import SchemaWarning

    with pytest.warns(SchemaWarning) as record:
        g = GrammarPotential.json_schema(schema)
    msg = " ".join(str(r.message) for r in record)
    for w in words:
        assert w in msg, msg
    assert g.checked_after == ()


def _accepts(g: GrammarPotential, text: str) -> bool:
    from smcgen import SequenceBatch

    ids = [CHARS.index(c) for c in text] + [CHAR_EOS]
    return bool(g.log_complete(SequenceBatch([ids], [], None))[0] == 0)


# every keyword the check lets through must really be enforced by the engine: (schema, good, bad)
ENFORCED = {
    "type": ({"type": "integer"}, "3", '"s"'),
    "properties": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        '{"a": 1}',
        '{"a": "x"}',
    ),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, '{"a": 1}', "{}"),
    "additionalProperties": ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"b": 2}', '{"b": "x"}'),
    "items": ({"type": "array", "items": {"type": "integer"}}, "[1, 2]", '["a"]'),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1]", '["a"]'),
    "minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1, 2]", "[1]"),
    "maxItems": ({"type": "array", "items": {"type": "integer"}, "maxItems": 1}, "[1]", "[1, 2]"),
    "enum": ({"enum": ["a", 1]}, '"a"', '"b"'),
    "const": ({"const": "x"}, '"x"', '"y"'),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"s"'),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"s"'),
    "allOf": ({"allOf": [{"type": "integer"}]}, "1", '"s"'),
    "$ref": ({"$defs": {"A": {"type": "integer"}}, "$ref": "#/$defs/A"}, "1", '"s"'),
    "$defs": ({"$defs": {"A": {"type": "integer"}}, "$ref": "#/$defs/A"}, "1", '"s"'),
    "definitions": ({"definitions": {"A": {"type": "integer"}}, "$ref": "#/definitions/A"}, "1", '"s"'),
    "pattern": ({"type": "string", "pattern": "^a+$"}, '"aa"', '"b"'),
    "minLength": ({"type": "string", "minLength": 3}, '"abc"', '"ab"'),
    "maxLength": ({"type": "string", "maxLength": 2}, '"ab"', '"abc"'),
    "format": ({"type": "string", "format": "date"}, '"2024-01-02"', '"hello"'),
    "minimum": ({"type": "integer", "minimum": 5}, "7", "3"),
    "maximum": ({"type": "integer", "maximum": 5}, "3", "7"),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 5}, "6", "5"),
    "exclusiveMaximum": ({"type": "integer", "exclusiveMaximum": 5}, "4", "5"),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "6", "4"),
    "minProperties": (
        {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1},
        '{"b": 2}',
        "{}",
    ),
    "maxProperties": (
        {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 1},
        '{"b": 2}',
        '{"a": 1, "b": 2}',
    ),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
        '{"x": 1}',
        '{"x": "s"}',
    ),
    "propertyNames": (
        {"type": "object", "propertyNames": {"pattern": "^x"}, "additionalProperties": {"type": "integer"}},
        '{"x": 1}',
        '{"y": 1}',
    ),
}


def test_enforced_table_covers_every_supported_keyword():
    assert set(ENFORCED) == set(SUPPORTED)


@pytest.mark.parametrize("keyword", sorted(ENFORCED))
def test_supported_keywords_are_enforced(keyword):
    schema, good, bad = ENFORCED[keyword]
    g = GrammarPotential.json_schema(schema, CHAR_TOKENS, eos_token_ids=[CHAR_EOS])
    assert _accepts(g, good), f"{keyword}: {good} should be accepted"
    assert not _accepts(g, bad), f"{keyword}: {bad} should be rejected"
    assert json.loads(good) is not None


# ---------------------------------------------------------------------------- dead ends

TINY_TOKENS = ["a", "b", "c", None]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(0, logit_scale=2.0)


def test_grammar_outside_the_vocabulary_is_a_clear_error(lm):
    """The language needs a character no token has: at step 1 no token is allowed."""
    g = GrammarPotential.regex("x+", TINY_TOKENS, eos_token_ids=[EOS])
    with pytest.raises(AllParticlesDeadError) as err:
        SMC(LMPotential(lm), SMCConfig(n_particles=4, max_new_tokens=4, seed=0), mask=g).run(PROMPT)
    msg = str(err.value)
    assert "step 1" in msg and "GrammarPotential(regex: 'x+')" in msg and "not allowed by the grammar" in msg, msg
    assert err.value.step == 1 and err.value.groups == [0] and len(err.value.sequences) == 4


def test_length_limit_before_the_grammar_can_end_is_a_clear_error(lm):
    """Every particle reaches max_new_tokens inside the grammar: documented outcome, with the partials."""
    g = GrammarPotential.regex("(ab){4}", TINY_TOKENS, eos_token_ids=[EOS])
    with pytest.raises(AllParticlesDeadError) as err:
        SMC(LMPotential(lm), SMCConfig(n_particles=4, max_new_tokens=5, seed=0), mask=g).run(PROMPT)
    msg = str(err.value)
    assert "unfinished regex string (length limit reached?)" in msg, msg
    assert all(s == [0, 1, 0, 1, 0] for s in err.value.sequences)  # "ababa": the best partials


def test_dead_groups_can_be_flagged_instead_of_raising(lm):
    """Batch runs may keep going: dead groups are flagged (Z_hat = 0) and keep their partials."""
    g = GrammarPotential.regex("a*[bc]*", TINY_TOKENS, eos_token_ids=[EOS])
    smc = SMC(LMPotential(lm), SMCConfig(n_particles=1, max_new_tokens=4, seed=0), potentials=[g])
    with pytest.raises(AllParticlesDeadError):
        smc.run(PROMPT, n_groups=200)
    out = smc.run(PROMPT, n_groups=200, on_dead="flag")
    dead = out.dead
    assert 0 < int(dead.sum()) < 200
    assert torch.isneginf(out.log_z[dead]).all() and torch.isfinite(out.log_z[~dead]).all()
    assert torch.isneginf(out.log_weights[dead]).all() and not torch.isnan(out.log_weights).any()
    for b in dead.nonzero().squeeze(-1).tolist():
        partial = out.tokens[b, 0, : out.lengths[b, 0]].tolist()
        assert g.explain_zero(partial, finished=True) is not None
    with pytest.raises(ValueError, match="on_dead must be"):
        smc.run(PROMPT, on_dead="ignore")


def test_plain_factor_where_every_particle_leaves_the_language(lm, target, tok):
    g = GrammarPotential.regex("c{3}", TINY_TOKENS, eos_token_ids=[EOS])
    with pytest.raises(AllParticlesDeadError, match="not allowed by the grammar"):
        SMC(LMPotential(lm), SMCConfig(n_particles=2, max_new_tokens=4, seed=0), potentials=[g]).run(PROMPT)
    # through generate too, on a tokenizer: the same documented error, never a crash
    with pytest.raises(AllParticlesDeadError, match="GrammarPotential"):
        smcgen.generate(
            target, "a", tokenizer=tok, grammar=GrammarPotential.regex("(ab){9}"), n_particles=2, max_new_tokens=4
        )


def test_grammar_bind_errors(lm):
    with pytest.raises(GrammarError, match="needs eos_token_ids"):
        GrammarPotential.regex("a", TINY_TOKENS)
    with pytest.raises(GrammarError, match="expected a smcgen.LanguageModel, a Hugging Face tokenizer"):
        GrammarPotential.regex("a", 42)
    with pytest.raises(GrammarError, match="has no tokenizer"):
        GrammarPotential.regex("a", smcgen.LanguageModel(lm.model, None, (EOS,), 64))
    with pytest.raises(TypeError, match="only apply together with vocab"):
        GrammarPotential.regex("a", eos_token_ids=[3])
