"""A short document valid against a lowered JSON schema: what a token budget must at least fit."""

from __future__ import annotations

import json
from typing import Any

from smcgen.potentials.json_schema_keywords import MAX_INLINE_DEPTH
from smcgen.potentials.json_schema_refs import resolve_local


def shortest_document(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A short document valid against the (lowered) schema: what a budget must at least fit.

    Required properties only, ``minItems`` items, ``minLength`` characters, the shortest
    ``enum``/``const`` value or ``anyOf`` branch. Not guaranteed minimal for patterns and formats
    (callers validate it before relying on it).
    """
    root = schema if root is None else root
    if depth > MAX_INLINE_DEPTH or schema is True or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        try:
            return shortest_document(resolve_local(root, schema["$ref"]), root, depth + 1)
        except KeyError:
            return None
    for key in ("const",):
        if key in schema:
            return schema[key]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return min(schema["enum"], key=lambda v: len(json.dumps(v)))
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            options = [shortest_document(s, root, depth + 1) for s in schema[key]]
            return min(options, key=lambda v: len(json.dumps(v)))
    types = schema.get("type")
    types = types if isinstance(types, list) else [types] if types else []
    kind = next((t for t in ("null", "boolean", "integer", "number", "string", "array", "object") if t in types), None)
    if kind is None:
        kind = (
            "object" if "properties" in schema else "array" if "items" in schema or "prefixItems" in schema else "null"
        )
    if kind == "null":
        return None
    if kind == "boolean":
        return False
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        value = 0
        if isinstance(lo, (int, float)) and value < lo:
            value = int(lo) + (1 if "exclusiveMinimum" in schema and "minimum" not in schema else 0)
        elif isinstance(hi, (int, float)) and value > hi:
            value = int(hi) - (1 if "exclusiveMaximum" in schema and "maximum" not in schema else 0)
        return value
    if kind == "string":
        samples = {
            "date": "2000-01-01",
            "time": "00:00:00Z",
            "date-time": "2000-01-01T00:00:00Z",
            "uuid": "00000000-0000-0000-0000-000000000000",
            "email": "a@b.c",
            "ipv4": "0.0.0.0",
            "ipv6": "::",
            "uri": "a:b",
            "duration": "P1D",
            "hostname": "a",
        }
        if schema.get("format") in samples:
            return samples[schema["format"]]
        return "a" * int(schema.get("minLength", 0))
    if kind == "array":
        prefix = schema.get("prefixItems") or []
        items = [shortest_document(s, root, depth + 1) for s in prefix]
        extra = max(0, int(schema.get("minItems", 0)) - len(items))
        return items + [shortest_document(schema.get("items", True), root, depth + 1)] * extra
    props = schema.get("properties") or {}
    return {name: shortest_document(props.get(name, True), root, depth + 1) for name in schema.get("required", [])}
