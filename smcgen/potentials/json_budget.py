"""The budget twist of JSON-schema grammars: push particles to close their document in time.

A run with ``max_new_tokens`` targets documents that end within the budget; a particle still
inside a long string at the limit scores zero. :func:`budget_twist` is a finite score on
*prefixes* only, so it telescopes out of the SMC weights (the finished document's score is the
exact check alone) and leaves the target unchanged; it only changes which particles resampling
keeps: those that can still close in the tokens left.

:func:`closing_need` estimates how many tokens a JSON prefix needs at least to become a finished
document: one per closer (the open string's quote, a value after a dangling ``:`` or ``,``, each open
``{``/``[``), the required properties of each open object that are still missing (their name and
shortest value, at :data:`CHARS_PER_TOKEN`), and the EOS token. It reads the prefix with its own
small JSON state tracker and the lowered schema (local ``$ref`` followed; inside ``anyOf`` /
``oneOf`` the branch is unknown and only the closers count). It is an estimate, not a bound: the
twist needs none, since it cancels at completion whatever it is.
"""

from __future__ import annotations

import json
import math
from typing import Any

from smcgen.potentials.json_schema import LoweredSchema, _resolve, shortest_document

TWIST_NATS_PER_TOKEN = 2.0  # how hard a particle that cannot close in time is pushed down, per missing token
TWIST_MARGIN = 8  # tokens of slack asked for beyond the estimate, so particles turn back before it is too late
CHARS_PER_TOKEN = 4  # characters of a missing property (name, colon, value) per token, for the estimate
_MAX_REF_HOPS = 16


def _follow(node: Any, root: Any) -> Any:
    """``node`` with local ``$ref`` chains followed; None where the schema does not say (unknown branch)."""
    for _ in range(_MAX_REF_HOPS):
        if not isinstance(node, dict):
            return None
        if isinstance(node.get("$ref"), str):
            try:
                node = _resolve(root, node["$ref"])
            except KeyError:
                return None
            continue
        if "anyOf" in node or "oneOf" in node:
            return None
        return node
    return None


def _child(frame: dict[str, Any], root: Any) -> Any:
    """The schema of the value about to start inside ``frame`` (None when unknown)."""
    node = frame["node"]
    if node is None:
        return None
    if frame["kind"] == "{":
        props = node.get("properties") or {}
        return _follow(props.get(frame["key"]), root) if frame["key"] in props else None
    prefix = node.get("prefixItems") or []
    if frame["count"] < len(prefix):
        return _follow(prefix[frame["count"]], root)
    return _follow(node.get("items"), root)


def _missing_chars(frame: dict[str, Any], root: Any, cache: dict[int, int]) -> int:
    """Characters the still-missing required properties of an open object take at least."""
    node = frame["node"]
    if frame["kind"] != "{" or node is None:
        return 0
    props = node.get("properties") or {}
    total = 0
    for name in node.get("required") or []:
        if name in frame["seen"]:
            continue
        sub = props.get(name, True)
        if id(sub) not in cache:
            try:
                cache[id(sub)] = len(json.dumps(shortest_document(sub, root), separators=(",", ":")))
            except (TypeError, ValueError, RecursionError):
                cache[id(sub)] = 1
        total += len(json.dumps(name)) + 2 + cache[id(sub)]  # "name" : value ,
    return total


def closing_need(text: str, schema: LoweredSchema | None = None) -> int:
    """Tokens a JSON prefix needs at least to end (an estimate; see the module docstring).

    Without a schema only the closers and EOS count; with one, the missing required properties of
    every open object too.
    """
    root = schema.grammar_schema if schema is not None else None
    frames: list[dict[str, Any]] = []
    in_string = escaped = False
    string_is_key = False
    buf: list[str] = []
    last = ""
    top = _follow(root, root) if root is not None else None
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                last = '"'
                if string_is_key and frames:
                    frames[-1]["key"] = "".join(buf)
                    frames[-1]["seen"].add(frames[-1]["key"])
            elif string_is_key:
                buf.append(ch)
            continue
        if ch == '"':
            in_string = True
            string_is_key = bool(frames) and frames[-1]["kind"] == "{" and frames[-1]["expect_key"]
            buf = []
        elif ch in "{[":
            node = top if not frames else (_child(frames[-1], root) if root is not None else None)
            frames.append({"kind": ch, "node": node, "seen": set(), "key": None, "expect_key": ch == "{", "count": 0})
        elif ch in "}]" and frames:
            frames.pop()
        elif ch == ":" and frames:
            frames[-1]["expect_key"] = False
        elif ch == "," and frames:
            frames[-1]["expect_key"] = frames[-1]["kind"] == "{"
            frames[-1]["count"] += 1
        if not ch.isspace():
            last = ch
    need = int(in_string) + len(frames) + int(last in (":", ",") and not in_string) + 1
    if root is not None:
        cache = _need_cache(schema)
        chars = sum(_missing_chars(f, root, cache) for f in frames)
        need += math.ceil(chars / CHARS_PER_TOKEN)
    return need


_CACHES: dict[int, tuple[Any, dict[int, int]]] = {}


def _need_cache(schema: LoweredSchema) -> dict[int, int]:
    """Shortest-value lengths per schema node, kept while the lowered schema lives."""
    entry = _CACHES.get(id(schema))
    if entry is None or entry[0] is not schema:
        if len(_CACHES) > 64:
            _CACHES.clear()
        entry = (schema, {})
        _CACHES[id(schema)] = entry
    return entry[1]


def shortfall_twist(
    need: int, tokens_left: int, margin: int | None = None, nats_per_token: float | None = None
) -> float:
    """The budget twist's one formula: 0 while a prefix that needs ``need`` more tokens has ``margin``
    to spare, ``-nats_per_token`` per token short of that (defaults: :data:`TWIST_MARGIN`,
    :data:`TWIST_NATS_PER_TOKEN`, read at call time). Finite, so it telescopes out of the weights."""
    margin = TWIST_MARGIN if margin is None else margin
    nats = TWIST_NATS_PER_TOKEN if nats_per_token is None else nats_per_token
    return -nats * max(0, need + margin - tokens_left)


def budget_twist(text: str, tokens_left: int, schema: LoweredSchema | None = None) -> float:
    """Log-twist of a JSON prefix with ``tokens_left`` tokens of budget: 0 while it can close with
    ``TWIST_MARGIN`` tokens to spare, ``-TWIST_NATS_PER_TOKEN`` per token short of that. Finite, so it
    telescopes out of the weights: the target does not change, only which particles resampling keeps."""
    return shortfall_twist(closing_need(text, schema), tokens_left)


__all__ = ["budget_twist", "closing_need", "shortfall_twist"]
