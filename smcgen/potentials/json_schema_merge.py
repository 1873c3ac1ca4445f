"""``allOf`` merging: the conjunction of two schemas as one, exact where the keywords allow it."""

from __future__ import annotations

import copy
from typing import Any

from smcgen.potentials.json_schema_keywords import ANNOTATIONS

_MIN_KEYS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_MAX_KEYS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def conjunction(a: Any, b: Any) -> Any:
    """``{"allOf": [...]}`` of two schemas, flat and without repeats: merging the same parts again
    gives the same node (so a recursive merge meets a node it has seen, see _Lowering._merged_def)."""
    parts: list[Any] = []
    for s in (a, b):
        for part in s["allOf"] if isinstance(s, dict) and set(s) == {"allOf"} and isinstance(s["allOf"], list) else [s]:
            if part is not True and part not in parts:
                parts.append(part)
    if not parts:
        return True
    return parts[0] if len(parts) == 1 else {"allOf": parts}


def merge_schemas(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The conjunction of two schemas as one, and whether it is exact (else it is looser)."""
    out = dict(a)
    exact = True
    for key, vb in b.items():
        if key not in out:
            out[key] = copy.deepcopy(vb)
            continue
        va = out[key]
        if va == vb or key in ANNOTATIONS:
            continue
        if key == "required":
            out[key] = list(dict.fromkeys([*va, *vb]))
        elif key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(va, dict):
            props = dict(va)
            for name, sb in vb.items():
                props[name] = conjunction(props[name], sb) if name in props else sb
            out[key] = props
        elif key == "type":
            ta = set(va if isinstance(va, list) else [va])
            tb = set(vb if isinstance(vb, list) else [vb])
            if "number" in ta and "integer" in tb:
                ta.add("integer")
            if "number" in tb and "integer" in ta:
                tb.add("integer")
            both = sorted(ta & tb)
            out[key] = both[0] if len(both) == 1 else both
        elif key in _MIN_KEYS and isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            out[key] = max(va, vb)
        elif key in _MAX_KEYS and isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            out[key] = min(va, vb)
        elif key == "enum" and isinstance(va, list) and isinstance(vb, list):
            out[key] = [v for v in va if v in vb]
        elif key in ("additionalProperties", "items", "propertyNames") and isinstance(va, (dict, bool)):
            out[key] = conjunction(va, vb)
        else:
            exact = False  # two different values of a keyword we cannot conjoin: keep the first, check after
    return out, exact
