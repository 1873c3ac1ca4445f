"""JSON-schema input for the grammar potential: lowering to what xgrammar generates, and the exact check.

A real schema goes through :func:`lower_json_schema`, which returns two things:

- the *grammar schema* that xgrammar compiles into the mask. It keeps every keyword xgrammar
  enforces and drops what the specification says to ignore (annotations, unknown keywords and
  vendor ``x-*`` keys, unknown ``format`` values, which are annotations unless asserted: warned
  about) and what xgrammar 0.2.x cannot generate (``not``, ``if``/``then``/``else``,
  ``uniqueItems``, ``contains``, ``dependentRequired``, ...). Drafts 4 to 2020-12 are normalized
  (draft-4 ``id`` and boolean ``exclusiveMinimum``, tuple ``items`` + ``additionalItems`` become
  ``prefixItems`` + ``items``), and ``allOf`` is merged into one schema.
- an exact validator (the ``jsonschema`` package, for the schema's own draft) that decides
  membership of a finished document. :class:`~smcgen.potentials.grammar.GrammarPotential` uses it
  in ``log_complete``, so the target is exactly "valid against the schema" (within the layout the
  grammar generates) even where the mask is looser; ``checked_after`` names, by JSON pointer, the
  parts that only the validator enforces.

A schema is refused (:class:`~smcgen.potentials.errors.GrammarError`) only when it cannot be
generated or checked: a remote ``$ref`` (no network), an unknown ``type``, contradictory bounds, a
schema the validator's metaschema rejects, or one xgrammar cannot compile.

This module is the public entry point; the work is done in ``json_schema_lowering`` (the walk),
``json_schema_keywords`` (what each keyword becomes), ``json_schema_refs`` (local ``$ref``s),
``json_schema_merge`` (``allOf``), ``json_schema_patterns`` (ECMA regexes), ``json_schema_check``
(the exact validator), ``json_schema_shortest`` (shortest documents) and ``json_schema_types``
(user input and parsed output).
"""

from __future__ import annotations

from smcgen.potentials.json_schema_check import LoweredSchema, validator_for
from smcgen.potentials.json_schema_keywords import (
    ANNOTATIONS,
    CHECKED_AFTER,
    FORMATS,
    SUPPORTED,
    TYPES,
    SchemaWarning,
)
from smcgen.potentials.json_schema_lowering import check_json_schema, lower_json_schema
from smcgen.potentials.json_schema_patterns import python_patterns, python_regex
from smcgen.potentials.json_schema_refs import resolve_local
from smcgen.potentials.json_schema_shortest import shortest_document
from smcgen.potentials.json_schema_types import normalize_schema, parse_as, schema_of_type

_resolve = resolve_local  # the name json_budget and older callers import

__all__ = [
    "ANNOTATIONS",
    "CHECKED_AFTER",
    "FORMATS",
    "SUPPORTED",
    "TYPES",
    "LoweredSchema",
    "SchemaWarning",
    "check_json_schema",
    "lower_json_schema",
    "normalize_schema",
    "parse_as",
    "python_patterns",
    "python_regex",
    "resolve_local",
    "schema_of_type",
    "shortest_document",
    "validator_for",
]
