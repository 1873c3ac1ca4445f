"""The JSON Schema keywords, by what the lowering does with each (see :mod:`json_schema_lowering`).

Kept for the grammar (``SUPPORTED``), dropped as annotations (``ANNOTATIONS``), dropped from the
grammar and enforced by the exact validator (``CHECKED_AFTER``); the ``format`` values xgrammar
generates; the warning class for what the specification says to ignore.
"""

from __future__ import annotations

# keywords that shape the generated language and that xgrammar enforces (alone; see
# _Lowering._approximations for the combinations it approximates: pattern or format with lengths,
# multipleOf on numbers, oneOf)
SUPPORTED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "minLength",
        "maxLength",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
    }
)
# keywords without effect on validity (annotations and identifiers): dropped silently
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "example",
        "$schema",
        "$id",
        "id",
        "$comment",
        "$anchor",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",
        "contentMediaType",
        "contentEncoding",
        "contentSchema",
        "$vocabulary",
        "$dynamicAnchor",
        "$recursiveAnchor",
        "additionalItems",
    }
)
# validation keywords xgrammar 0.2.x cannot generate: dropped from the mask, enforced by the validator
CHECKED_AFTER = {
    "uniqueItems": "uniqueItems",
    "contains": "contains",
    "minContains": "minContains",
    "maxContains": "maxContains",
    "dependentRequired": "dependentRequired",
    "dependentSchemas": "dependentSchemas",
    "dependencies": "dependencies",
    "not": "not",
    "if": "if/then/else",
    "then": "if/then/else",
    "else": "if/then/else",
    "unevaluatedProperties": "unevaluatedProperties",
    "unevaluatedItems": "unevaluatedItems",
    "$dynamicRef": "$dynamicRef",
    "$recursiveRef": "$recursiveRef",
}
FORMATS = frozenset(
    {
        "date",
        "time",
        "date-time",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "uri-template",
        "uuid",
        "json-pointer",
        "relative-json-pointer",
    }
)
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
BOUNDS = (
    ("minimum", "maximum"),
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
)
MAX_INLINE_DEPTH = 16  # $ref targets inlined into an allOf merge, nested at most this deep


class SchemaWarning(UserWarning):
    """A schema feature accepted as the specification says but worth knowing (unknown format or keyword)."""
