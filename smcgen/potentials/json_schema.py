"""JSON-schema input for the grammar potential: normalization and a check of what is supported.

xgrammar 0.2.8 compiles most of JSON Schema but silently ignores some keywords (it would then
generate JSON that the schema rejects). :func:`check_json_schema` walks the schema first and
raises :class:`GrammarError` naming every unsupported keyword, unknown keyword and contradiction
with its JSON pointer. The support table below was measured by compiling each keyword and
checking that a violating instance is rejected (``tests/test_grammar_bad_input.py`` keeps it true).
"""

from __future__ import annotations

import json
from typing import Any

import xgrammar as xgr

from smcgen.potentials.errors import GrammarError, engine_message

# keywords that shape the generated language and that xgrammar enforces
SUPPORTED = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
        "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern",
        "minLength", "maxLength", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "multipleOf", "minProperties", "maxProperties", "patternProperties", "propertyNames",
    }
)
# keywords without effect on validity (annotations), accepted and ignored
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment", "$anchor",
        "deprecated", "readOnly", "writeOnly", "discriminator", "contentMediaType", "contentEncoding",
    }
)
# keywords xgrammar 0.2.8 ignores or approximates: generating under them could violate the schema
UNSUPPORTED = {
    "uniqueItems": "uniqueItems (use a list without the uniqueness constraint)",
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
    "unevaluatedProperties": "unevaluatedProperties (other than false)",
    "unevaluatedItems": "unevaluatedItems (other than false)",
    "$dynamicRef": "$dynamicRef",
    "$dynamicAnchor": "$dynamicAnchor",
    "$recursiveRef": "$recursiveRef",
    "$recursiveAnchor": "$recursiveAnchor",
    "nullable": "nullable (an OpenAPI keyword; use \"type\": [..., \"null\"] or anyOf with null)",
    "contentSchema": "contentSchema",
}
FORMATS = frozenset(
    {
        "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference",
        "uri-template", "uuid", "json-pointer", "relative-json-pointer",
    }
)
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_BOUNDS = (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"))


def normalize_schema(schema: Any) -> dict[str, Any] | bool:
    """A pydantic model class, a dict or JSON text -> the schema as a dict (or a boolean schema)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if hasattr(schema, "json_schema") and callable(schema.json_schema):  # pydantic TypeAdapter
        return schema.json_schema()
    if isinstance(schema, (bytes, str)):
        text = schema.decode() if isinstance(schema, bytes) else schema
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as err:
            raise GrammarError(
                f"invalid JSON schema: the text is not JSON ({err.msg} at line {err.lineno}, column {err.colno})"
            ) from None
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise GrammarError(
            f"a JSON schema must be a pydantic model class, a dict or JSON text, got {type(schema).__name__}"
        )
    return schema


def _pointer(path: list[str]) -> str:
    return "#" + "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


def check_json_schema(schema: dict[str, Any] | bool) -> None:
    """Raise :class:`GrammarError` listing every problem found, each with its JSON pointer."""
    problems: list[str] = []
    _walk(schema, [], schema, problems)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise GrammarError(f"JSON schema not supported: {shown}")


def _resolve(root: Any, ref: str) -> bool:
    if not ref.startswith("#"):
        return False
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _walk(node: Any, path: list[str], root: Any, problems: list[str]) -> None:
    where = _pointer(path)
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        problems.append(f"{where}: a schema must be an object or a boolean, got {type(node).__name__}")
        return
    for key, value in node.items():
        at = _pointer(path + [key])
        if key in ANNOTATIONS or key.startswith("x-"):
            continue
        if key in ("unevaluatedProperties", "unevaluatedItems") and value is False:
            continue  # what strict generation does anyway
        if key in UNSUPPORTED:
            if key == "uniqueItems" and value is False:
                continue
            problems.append(f"{at}: unsupported keyword {UNSUPPORTED[key]}")
            continue
        if key not in SUPPORTED:
            problems.append(f"{at}: unknown keyword {key!r}")
            continue
        if key == "type":
            names = value if isinstance(value, list) else [value]
            bad = [t for t in names if t not in TYPES]
            if bad:
                problems.append(f"{at}: unknown type {bad[0]!r} (expected one of {sorted(TYPES)})")
        elif key == "format" and value not in FORMATS:
            problems.append(f"{at}: unsupported format {value!r} (supported: {', '.join(sorted(FORMATS))})")
        elif key == "multipleOf":
            types = node.get("type")
            if types != "integer" or not isinstance(value, int):
                problems.append(f"{at}: unsupported keyword multipleOf except on integers with an integer factor")
        elif key == "allOf" and isinstance(value, list) and len(value) > 1:
            problems.append(f"{at}: unsupported keyword allOf with more than one schema (merge them into one)")
        elif key == "$ref" and not (isinstance(value, str) and _resolve(root, value)):
            problems.append(f"{at}: $ref {value!r} does not resolve inside the schema (only local refs are supported)")
        elif key == "pattern":
            _check_pattern(value, at, problems)
        elif key == "items" and isinstance(value, list):
            problems.append(f"{at}: items must be a schema (use prefixItems for tuples)")

    for low, high in _BOUNDS:
        lo, hi = node.get(low), node.get(high)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
            problems.append(f"{where}: {low} ({lo}) is greater than {high} ({hi}); no value can satisfy it")

    # recurse into sub-schemas (never into enum/const/default values)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        sub = node.get(key)
        if isinstance(sub, dict):
            for name, s in sub.items():
                _walk(s, path + [key, name], root, problems)
    for key in ("additionalProperties", "items", "propertyNames"):
        if key in node and not isinstance(node[key], list):
            _walk(node[key], path + [key], root, problems)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        sub = node.get(key)
        if isinstance(sub, list):
            for i, s in enumerate(sub):
                _walk(s, path + [key, str(i)], root, problems)


def _check_pattern(pattern: Any, at: str, problems: list[str]) -> None:
    if not isinstance(pattern, str):
        problems.append(f"{at}: pattern must be a string")
        return
    try:
        xgr.Grammar.from_regex(pattern)
    except RuntimeError as err:
        problems.append(f"{at}: pattern {pattern!r} is not a supported regex ({engine_message(err)})")
