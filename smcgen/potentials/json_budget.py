"""The token budget of JSON-schema grammars: push particles to close their document in time.

A run with ``max_new_tokens`` targets documents that end within the budget; a particle still
inside a long string at the limit scores zero. Two exact tools act on that:

- :func:`budget_twist`, a score on *prefixes* only, so it telescopes out of the SMC weights (the
  finished document's score is the exact check alone) and leaves the target unchanged; it only
  changes which particles resampling keeps: those expected to close in the tokens left. It is
  graded (``-TWIST_NATS_PER_TOKEN`` per token short of :func:`closing_need` plus
  ``TWIST_MARGIN``) and ``-inf`` exactly where :func:`min_tokens` proves the prefix cannot end in
  time (such prefixes have zero target mass, so removing them changes nothing).
- :func:`budget_forbidden`, the tokens the proposal's mask drops near the limit: those after which
  :func:`min_tokens` exceeds the tokens left. Also exact, for the same reason; it makes a particle
  close its last string and brackets in the final tokens instead of dying at the limit.

:func:`closing_need` *estimates* the tokens a prefix needs (closers, the missing required
properties at :data:`CHARS_PER_TOKEN` characters per token plus :data:`VALUE_TOKENS` for their
values, EOS): it only steers, and may be wrong. :func:`min_tokens` is a *true lower bound*, which
the exactness of ``-inf`` and the mask rests on: it counts only characters every completion must
contain (the open string's quote, each open bracket's closer, the quotes and colon of each
missing required property, the quotes or brackets of their values when the schema fixes the
type) and divides each kind by the most a single token of the vocabulary holds
(:class:`TokenCapacity`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from smcgen.potentials.json_schema_check import LoweredSchema
from smcgen.potentials.json_schema_refs import resolve_local
from smcgen.potentials.json_schema_shortest import shortest_document

TWIST_NATS_PER_TOKEN = 2.0  # how hard a particle that cannot close in time is pushed down, per missing token
TWIST_MARGIN = 8  # tokens of slack asked for beyond the estimate, so particles turn back before it is too late
CHARS_PER_TOKEN = 4  # characters of a missing property (name, colon, value) per token, for the estimate
VALUE_TOKENS = 3  # tokens a model typically spends on a missing property's value beyond its shortest form
MASK_HORIZON = 4  # the budget mask is computed for rows with at most this many tokens left after the next
_MAX_REF_HOPS = 16
# the characters min_tokens counts, by kind: every completion must contain them
_KINDS = {'"': 0, "{": 1, "}": 1, "[": 2, "]": 2, ":": 3}


def _follow(node: Any, root: Any) -> Any:
    """``node`` with local ``$ref`` chains followed; None where the schema does not say (unknown branch)."""
    for _ in range(_MAX_REF_HOPS):
        if not isinstance(node, dict):
            return None
        if isinstance(node.get("$ref"), str):
            try:
                node = resolve_local(root, node["$ref"])
            except KeyError:
                return None
            continue
        if "anyOf" in node or "oneOf" in node:
            return None
        return node
    return None


class _Frame:
    """One open object or array of a JSON prefix, with its schema node (None when unknown)."""

    __slots__ = ("kind", "node", "seen", "key", "expect_key", "count")

    def __init__(self, kind: str, node: Any):
        self.kind, self.node = kind, node
        self.seen: frozenset[str] = frozenset()
        self.key: str | None = None
        self.expect_key = kind == "{"
        self.count = 0

    def copy(self) -> _Frame:
        f = _Frame.__new__(_Frame)
        f.kind, f.node, f.seen, f.key, f.expect_key, f.count = (
            self.kind,
            self.node,
            self.seen,
            self.key,
            self.expect_key,
            self.count,
        )
        return f

    def missing(self) -> list[tuple[str, Any]]:
        """The required properties not seen yet, with their schemas (an object of known schema only)."""
        node = self.node
        if self.kind != "{" or not isinstance(node, dict) or not isinstance(node.get("required"), list):
            return []
        props = node.get("properties") or {}
        return [(n, props.get(n, True)) for n in node["required"] if isinstance(n, str) and n not in self.seen]


class JsonPrefix:
    """The lexical state of a JSON prefix (open strings and brackets, keys seen), fed characters.

    Follows the schema (``root``: the lowered grammar schema) into open objects and arrays, so the
    required properties still missing are known; a key with an escape makes its object unknown.
    """

    def __init__(self, root: Any = None):
        self.root = root
        self.frames: list[_Frame] = []
        self.in_string = self.escaped = self.string_is_key = False
        self.buf: list[str] = []
        self.last = ""

    def copy(self) -> JsonPrefix:
        c = JsonPrefix.__new__(JsonPrefix)
        c.root, c.in_string, c.escaped, c.string_is_key, c.last = (
            self.root,
            self.in_string,
            self.escaped,
            self.string_is_key,
            self.last,
        )
        c.frames = [f.copy() for f in self.frames]
        c.buf = list(self.buf)
        return c

    def _child(self) -> Any:
        if self.root is None:
            return None
        if not self.frames:
            return _follow(self.root, self.root)
        frame = self.frames[-1]
        node = frame.node
        if not isinstance(node, dict):
            return None
        if frame.kind == "{":
            props = node.get("properties") or {}
            return _follow(props.get(frame.key), self.root) if frame.key in props else None
        prefix = node.get("prefixItems") or []
        if frame.count < len(prefix):
            return _follow(prefix[frame.count], self.root)
        return _follow(node.get("items"), self.root)

    def feed(self, text: str) -> JsonPrefix:
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                    if self.string_is_key and self.frames:
                        self.frames[-1].node = None  # an escaped key: its name is not tracked
                elif ch == '"':
                    self.in_string = False
                    self.last = '"'
                    if self.string_is_key and self.frames:
                        frame = self.frames[-1]
                        frame.key = "".join(self.buf)
                        frame.seen = frame.seen | {frame.key}
                elif self.string_is_key:
                    self.buf.append(ch)
                continue
            if ch == '"':
                self.in_string = True
                self.string_is_key = bool(self.frames) and self.frames[-1].kind == "{" and self.frames[-1].expect_key
                self.buf = []
            elif ch in "{[":
                self.frames.append(_Frame(ch, self._child()))
            elif ch in "}]" and self.frames:
                self.frames.pop()
            elif ch == ":" and self.frames:
                self.frames[-1].expect_key = False
            elif ch == "," and self.frames:
                self.frames[-1].expect_key = self.frames[-1].kind == "{"
                self.frames[-1].count += 1
            if not ch.isspace():
                self.last = ch
        return self

    def closers(self) -> int:
        """Tokens of the closers alone at one per closer (the estimate), and EOS."""
        return int(self.in_string) + len(self.frames) + int(self.last in (":", ",") and not self.in_string) + 1

    def required_chars(self) -> list[int]:
        """Characters every completion must still contain, by kind (quote, brace, bracket, colon)."""
        need = [int(self.in_string), 0, 0, 0]
        for depth, frame in enumerate(self.frames):
            need[1 if frame.kind == "{" else 2] += 1
            parts = []
            for _, sub in frame.missing():
                part = [2, 0, 0, 1]  # the name's quotes and its colon
                kind = _fixed_type(_follow(sub, self.root) if self.root is not None else None)
                if kind in ("string", "object", "array"):
                    part[{"string": 0, "object": 1, "array": 2}[kind]] += 2  # the value's quotes or brackets
                parts.append(part)
            if parts and self.in_string and self.string_is_key and depth == len(self.frames) - 1:
                # the key being typed may be any missing property, its opening quote already written:
                # leave out the most any one of them adds (per kind), so the count stays a lower bound
                parts.append([-max(p[k] for p in parts) for k in range(4)])
            for part in parts:
                need = [n + c for n, c in zip(need, part)]
        return need


def _fixed_type(node: Any) -> str | None:
    """The one JSON type every value of ``node`` has (None when several or unknown)."""
    if not isinstance(node, dict):
        return None
    t = node.get("type")
    if isinstance(t, str):
        return t
    values = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]] if "const" in node else None
    if values and all(isinstance(v, str) for v in values):
        return "string"
    return None


@dataclass(frozen=True)
class TokenCapacity:
    """The most characters of each kind (quote, brace, bracket, colon, and all four together) that one
    token of a vocabulary holds: the divisors of :func:`min_tokens`."""

    per_kind: tuple[int, int, int, int]
    total: int

    @classmethod
    def of(cls, vocab: list[bytes]) -> TokenCapacity:
        per = [0, 0, 0, 0]
        total = 0
        for raw in vocab:
            counts = [0, 0, 0, 0]
            for b in raw:
                k = _KINDS.get(chr(b)) if b < 128 else None
                if k is not None:
                    counts[k] += 1
            per = [max(p, c) for p, c in zip(per, counts)]
            total = max(total, sum(counts))
        return cls((per[0], per[1], per[2], per[3]), total)


def min_tokens(state: JsonPrefix, capacity: TokenCapacity) -> int:
    """A lower bound on the tokens any valid completion of the prefix takes (EOS not counted: a run
    may also end at its length limit)."""
    need = state.required_chars()
    bound = 0
    for n, cap in zip(need, capacity.per_kind):
        if n:
            bound = max(bound, math.ceil(n / cap) if cap else 1 << 30)  # no token holds it: never
    if sum(need):
        bound = max(bound, math.ceil(sum(need) / capacity.total) if capacity.total else 1 << 30)
    return bound


def closing_need(text: str, schema: LoweredSchema | None = None) -> int:
    """Tokens a JSON prefix needs at least to end (an estimate; see the module docstring).

    Without a schema only the closers and EOS count; with one, the missing required properties of
    every open object too.
    """
    root = schema.grammar_schema if schema is not None else None
    return _closing_need_of(JsonPrefix(root).feed(text), schema)


def _closing_need_of(state: JsonPrefix, schema: LoweredSchema | None) -> int:
    """:func:`closing_need` of a prefix already read into ``state`` (built with ``schema``'s root)."""
    root = state.root
    need = state.closers()
    if root is not None:
        assert schema is not None
        cache = _need_cache(schema)
        chars = tokens = 0
        for frame in state.frames:
            for name, sub in frame.missing():
                if id(sub) not in cache:
                    try:
                        cache[id(sub)] = len(_compact(shortest_document(sub, root)))
                    except (TypeError, ValueError, RecursionError):
                        cache[id(sub)] = 1
                chars += len(_compact(name)) + 2 + cache[id(sub)]  # "name" : value ,
                tokens += VALUE_TOKENS
        need += math.ceil(chars / CHARS_PER_TOKEN) + tokens
    return need


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


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


def budget_twist(
    text: str, tokens_left: int, schema: LoweredSchema | None = None, capacity: TokenCapacity | None = None
) -> float:
    """Log-twist of a JSON prefix with ``tokens_left`` tokens of budget: ``-inf`` when ``capacity`` is
    given, ``tokens_left <= MASK_HORIZON`` and :func:`min_tokens` exceeds ``tokens_left`` (no
    completion fits: zero target mass); else
    0 while :func:`closing_need` fits with ``TWIST_MARGIN`` tokens to spare and
    ``-TWIST_NATS_PER_TOKEN`` per token short of that. Finite wherever the target is not zero, so it
    telescopes out of the weights: the target does not change, only which particles resampling keeps."""
    root = schema.grammar_schema if schema is not None else None
    state = JsonPrefix(root).feed(text)  # read once for both estimates
    # only where budget_forbidden also looks, so the mask allows a token exactly when the score
    # after it is finite (a prefix that cannot end further from the limit dies at the limit)
    if capacity is not None and tokens_left <= MASK_HORIZON and min_tokens(state, capacity) > tokens_left:
        return -math.inf
    return shortfall_twist(_closing_need_of(state, schema), tokens_left)


def string_specials(vocab: list[bytes]) -> np.ndarray:
    """bool per token id of ``vocab``: the token holds a quote or a backslash (the only tokens that
    can change a JSON prefix's state inside a string; see :func:`budget_forbidden`)."""
    return np.fromiter((b'"' in raw or b"\\" in raw for raw in vocab), dtype=bool, count=len(vocab))


def budget_forbidden(
    text: str,
    candidates: np.ndarray,
    vocab: list[bytes],
    tokens_after: int,
    schema: LoweredSchema | None,
    capacity: TokenCapacity,
    specials: np.ndarray,
) -> np.ndarray:
    """The ``candidates`` (token ids the grammar allows next) after which no completion fits in
    ``tokens_after`` more tokens (by :func:`min_tokens`): dropping them from the mask is exact.

    Inside a string, a token without a quote or backslash (``specials``, from
    :func:`string_specials`) leaves the state as it is, so those are decided together, as one
    array operation over the vocabulary; the others are fed one by one.
    """
    root = schema.grammar_schema if schema is not None else None
    state = JsonPrefix(root).feed(text)
    out = np.empty(0, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    if state.in_string:
        special = specials[candidates]
        if min_tokens(state, capacity) > tokens_after:
            out = candidates[~special]
        candidates = candidates[special]
    fed = [
        t
        for t in candidates.tolist()
        if min_tokens(state.copy().feed(vocab[t].decode("utf-8", "replace")), capacity) > tokens_after
    ]
    return np.concatenate([out, np.asarray(fed, dtype=np.int64)]) if fed else out


__all__ = [
    "JsonPrefix",
    "TokenCapacity",
    "budget_forbidden",
    "string_specials",
    "budget_twist",
    "closing_need",
    "min_tokens",
    "shortfall_twist",
]
