"""ECMA-262 patterns of JSON schemas, in the spelling Python's regex engines run (for the validator)."""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from typing import Any

# JSON Schema patterns are ECMA-262 regexes; the validator runs them with Python's re. Spellings re
# does not know but that mean the same are rewritten (only for patterns re rejects as written).
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "example"})
_NAMED_GROUP = re.compile(r"\(\?<(?![=!])")
_BACKREF = re.compile(r"\\k<(\w+)>")
_PROPERTY = re.compile(r"\\([pP])\{([A-Za-z_]+)\}")
_DASH_AFTER_CLASS = re.compile(r"(\\[wdsWDS])-(?!\])")
_DASH_BEFORE_CLASS = re.compile(r"(?<!\\)-(\\[wdsWDS])")


@functools.lru_cache(maxsize=32)
def _category_ranges(name: str) -> str | None:
    """The code points of a Unicode general category (``L``, ``Lu``, ``Cc``, ...) as class ranges."""
    if not (1 <= len(name) <= 2 and name[0] in "CLMNPSZ"):
        return None
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(name):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) or None


def python_regex(pattern: str) -> str:
    """``pattern`` (ECMA-262) in Python ``re`` syntax where re rejects it as written; else unchanged.

    Rewrites named groups ``(?<n>...)`` and ``\\k<n>``, Unicode general categories ``\\p{L}`` /
    ``\\P{L}`` (``\\P`` outside classes only), and a ``-`` next to ``\\w``/``\\d``/``\\s`` inside a class (a
    literal dash in ECMA). A pattern still rejected after that is returned unchanged.
    """
    try:
        re.compile(pattern)
        return pattern
    except re.error:
        pass

    def prop(m: re.Match[str]) -> str:
        ranges = _category_ranges(m.group(2))
        if ranges is None:
            return m.group(0)
        inside = m.string[: m.start()].count("[") > m.string[: m.start()].count("]")  # rough, enough here
        if inside:
            return ranges if m.group(1) == "p" else m.group(0)
        return f"[{ranges}]" if m.group(1) == "p" else f"[^{ranges}]"

    out = _NAMED_GROUP.sub("(?P<", pattern)
    out = _BACKREF.sub(r"(?P=\1)", out)
    out = _PROPERTY.sub(prop, out)
    out = _DASH_AFTER_CLASS.sub(r"\1\\-", out)
    out = _DASH_BEFORE_CLASS.sub(r"\\-\1", out)
    try:
        re.compile(out)
        return out
    except re.error:
        return pattern


def python_patterns(schema: Any) -> Any:
    """``schema`` with every ``pattern`` and ``patternProperties`` key through :func:`python_regex`."""
    if isinstance(schema, list):
        return [python_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key == "pattern" and isinstance(value, str):
            out[key] = python_regex(value)
        elif key == "patternProperties" and isinstance(value, dict):
            out[key] = {python_regex(k): python_patterns(v) for k, v in value.items()}
        else:
            out[key] = python_patterns(value)
    return out


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> Any:
    """``pattern`` compiled by ``re``, or by the ``regex`` package where ``re`` rejects it: ECMA-262
    constructs ``re`` lacks, such as a variable-length lookbehind ``(?<=^v?|\\sv?)``, run there."""
    try:
        return re.compile(pattern)
    except re.error:
        import regex  # a dependency of transformers, listed in ours too

        return regex.compile(pattern)


def pattern_compiles(pattern: Any) -> bool:
    """Whether a ``pattern`` value can be run (the metaschema's ``regex`` format check)."""
    if not isinstance(pattern, str):
        return True
    try:
        _compiled(pattern)
        return True
    except Exception:  # noqa: BLE001 - re.error or regex.error: not a pattern either engine runs
        return False


def pattern_search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` matches somewhere in ``text`` (JSON Schema patterns are not anchored)."""
    return _compiled(pattern).search(text) is not None
