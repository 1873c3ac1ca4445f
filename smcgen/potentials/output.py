"""Output types as structured-generation users write them, turned into a grammar potential.

``smcgen.generate(grammar=...)`` passes whatever it gets through :func:`as_grammar`: a pydantic
model, a JSON Schema (dict, or JSON text), a ``Literal[...]`` or an ``Enum`` class, a regex, a Lark
or EBNF grammar text, or a ready :class:`GrammarPotential`. The potential remembers the output type,
so :meth:`GrammarPotential.parse` turns the chosen text back into it (a pydantic object, an Enum
member, a JSON value).
"""

from __future__ import annotations

import json
import re
from typing import Any

from smcgen.potentials.errors import GrammarError
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.json_schema import schema_of_type, shortest_document

_EBNF_RULE = re.compile(r"^\s*[A-Za-z_][\w-]*\s*::=", re.MULTILINE)
_LARK_START = re.compile(r"^\s*\??start\s*:", re.MULTILINE)


def grammar_kind(text: str) -> str:
    """How :func:`as_grammar` reads a string: ``"json_schema"`` (JSON object text), ``"ebnf"`` (has
    a ``name ::=`` rule), ``"lark"`` (has a ``start:`` rule) or ``"regex"`` (anything else)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return "json_schema" if isinstance(json.loads(stripped), dict) else "regex"
        except json.JSONDecodeError:
            pass
    if _EBNF_RULE.search(text):
        return "ebnf"
    if _LARK_START.search(text):
        return "lark"
    return "regex"


def as_grammar(obj: Any, vocab: Any = None, *, max_new_tokens: int | None = None) -> GrammarPotential | None:
    """``obj`` as a :class:`GrammarPotential` (None stays None), bound to ``vocab`` when given.

    With ``max_new_tokens`` (and a bound JSON-schema grammar) the budget twist is switched on and a
    budget too small for the schema's shortest document is refused with a :class:`GrammarError`.
    """
    if obj is None:
        return None
    if isinstance(obj, GrammarPotential):
        g = obj
    elif (schema := schema_of_type(obj)) is not None:
        g = GrammarPotential.json_schema(schema)
        g.output_type = obj
    elif isinstance(obj, (dict, bool)) or (hasattr(obj, "json_schema") and callable(obj.json_schema)):
        g = GrammarPotential.json_schema(obj)
    elif isinstance(obj, str):
        kind = grammar_kind(obj)
        g = getattr(GrammarPotential, kind)(obj)
    else:
        raise GrammarError(
            "grammar must be a GrammarPotential, a pydantic model class, a JSON Schema (dict or JSON text), a "
            f"Literal[...] or Enum class, a regex or a Lark/EBNF grammar text; got {type(obj).__name__}"
        )
    if vocab is not None and not g.bound:
        g = g.bind(vocab)
    if g.bound and g.schema is not None:
        if max_new_tokens is not None:
            check_budget(g, vocab, max_new_tokens)
        g.finish_within = max_new_tokens
    return g


def check_budget(g: GrammarPotential, vocab: Any, max_new_tokens: int) -> None:
    """Raise :class:`GrammarError` when ``max_new_tokens`` cannot hold the schema's shortest document.

    The shortest document is built from the schema (required properties, minimal items and
    lengths, the shortest enum value or branch), checked against the schema, and counted in the
    tokenizer's tokens plus EOS; a schema whose shortest document cannot be built is not checked.
    """
    assert g.schema is not None
    tokenizer = getattr(vocab, "tokenizer", vocab)
    if not hasattr(tokenizer, "encode"):
        return
    doc = shortest_document(g.schema.grammar_schema)
    text = json.dumps(doc, separators=(",", ":"))
    if g.schema.violation(text) is not None:
        return
    n = len(tokenizer.encode(text, add_special_tokens=False)) + 1
    if n > max_new_tokens:
        raise GrammarError(
            f"max_new_tokens={max_new_tokens} is too small for this JSON schema: its shortest document "
            f"{text[:80]!r} takes {n} tokens with EOS; raise max_new_tokens to at least {n}"
        )


__all__ = ["as_grammar", "check_budget", "grammar_kind"]
