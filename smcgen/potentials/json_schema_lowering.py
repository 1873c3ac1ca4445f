"""Lowering a JSON schema into the grammar schema xgrammar compiles, and what is checked after.

See :mod:`smcgen.potentials.json_schema` for the contract.
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

import xgrammar as xgr

from smcgen.potentials.errors import GrammarError, engine_message
from smcgen.potentials.json_schema_check import LoweredSchema, validator_for
from smcgen.potentials.json_schema_keywords import (
    ANNOTATIONS,
    BOUNDS,
    CHECKED_AFTER,
    FORMATS,
    MAX_INLINE_DEPTH,
    SUPPORTED,
    TYPES,
    SchemaWarning,
)
from smcgen.potentials.json_schema_merge import merge_schemas
from smcgen.potentials.json_schema_patterns import python_patterns
from smcgen.potentials.json_schema_refs import all_refs, json_pointer, kept_in_place, registry_resolves, resolve_local
from smcgen.potentials.json_schema_types import normalize_schema


class _Lowering:
    """One pass over a schema: builds the grammar schema and collects what is checked after."""

    def __init__(self, root: Any):
        self.root = root
        # JSON pointers that some $ref points into: unknown keywords on them hold schemas, kept
        self.ref_prefixes = {r[1:] for r in all_refs(root) if r.startswith("#/")}
        self.checked: list[str] = []
        self.warnings: list[str] = []
        self.problems: list[str] = []
        # refs whose target the grammar schema does not keep at the same pointer (through a dropped
        # keyword, a tuple ``items`` renamed ``prefixItems``, a merged ``allOf``): target lowered once
        # into ``$defs`` under a fresh name, the ref pointed there
        self.relocated: dict[str, str] = {}
        self.extra_defs: dict[str, Any] = {}
        # allOf nodes merged into ``$defs``, by their canonical JSON (see _merged_def)
        self.merged: dict[str, str] = {}

    def lower(self, node: Any, path: list[str], depth: int = 0) -> Any:
        where = json_pointer(path)
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            self.problems.append(f"{where}: a schema must be an object or a boolean, got {type(node).__name__}")
            return True
        node = self._draft4(node)
        if isinstance(node.get("allOf"), list):
            if path and depth < MAX_INLINE_DEPTH:
                # merged once into $defs, keyed by its content: a recursive $ref reached through allOf
                # meets the same node again and points back to it, a finite grammar instead of an
                # endless expansion
                return {"$ref": self._merged_def(node, path, depth)}
            node = self._merge_all_of(node, path, depth)
            depth += 1  # the inlined parts' children: a depth that carries across recursive refs
        out: dict[str, Any] = {}
        for key, value in node.items():
            at = json_pointer(path + [key])
            if key in ANNOTATIONS:
                continue
            if key.startswith("x-"):
                continue
            if key in CHECKED_AFTER:
                if key in ("unevaluatedProperties", "unevaluatedItems") and value is False:
                    continue  # strict generation adds nothing unevaluated anyway
                if key == "uniqueItems" and value is False:
                    continue
                self.checked.append(f"{at}: {CHECKED_AFTER[key]}")
                continue
            if key not in SUPPORTED:
                inner = at[1:]
                if any(r == inner or r.startswith(inner + "/") for r in self.ref_prefixes):
                    # a schema, or a container of schemas, that a $ref points into (#/$defs/group/item): kept
                    out[key] = self._referenced(value, path + [key], depth)
                    continue
                self.warnings.append(f"{at}: unknown keyword {key!r} ignored (the specification says to)")
                continue
            lowered = self._keyword(node, key, value, path, depth)
            if lowered is not _DROP:
                out[key] = lowered
        if isinstance(out.get("prefixItems"), list):
            prefix = [{} if v is True else v for v in out["prefixItems"]]
            if False in prefix:  # no item may stand at a false position: the array ends before it
                cut = prefix.index(False)
                prefix = prefix[:cut]
                out["maxItems"] = min(out.get("maxItems", cut), cut)
            out["prefixItems"] = prefix
            if not prefix:
                del out["prefixItems"]
        n_prefix = len(out.get("prefixItems", []))
        if "items" not in out and isinstance(out.get("minItems"), int) and out["minItems"] > n_prefix:
            out["items"] = {}  # generation adds no unnamed items by default; here the schema needs some
        if (
            isinstance(out.get("minProperties"), int)
            and out["minProperties"] > len(out.get("properties") or {})
            and "additionalProperties" not in out
            and "patternProperties" not in out
        ):
            # the schema allows other properties and needs some: strict generation would allow none
            out["additionalProperties"] = True
        for key in ("properties", "patternProperties"):
            if isinstance(out.get(key), dict):  # a false property schema: the property never appears
                out[key] = {k: v for k, v in out[key].items() if v is not False}
        for key in ("anyOf", "oneOf"):
            if isinstance(out.get(key), list) and False in out[key] and any(v is not False for v in out[key]):
                out[key] = [v for v in out[key] if v is not False]
        self._approximations(out, where)
        for low, high in BOUNDS:
            lo, hi = out.get(low), out.get(high)
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
                self.problems.append(f"{where}: {low} ({lo}) is greater than {high} ({hi}); no value can satisfy it")
        return out

    def _referenced(self, value: Any, path: list[str], depth: int) -> Any:
        """A value under an unknown keyword that $refs point into: lowered where a ref names it exactly,
        walked through (keeping only what refs reach) where refs point deeper."""
        inner = json_pointer(path)[1:]
        if inner in self.ref_prefixes or not isinstance(value, dict):
            return self.lower(value, path, depth)
        return {
            k: self._referenced(v, path + [k], depth)
            for k, v in value.items()
            if any(r == f"{inner}/{k}" or r.startswith(f"{inner}/{k}/") for r in self.ref_prefixes)
        }

    def _draft4(self, node: dict[str, Any]) -> dict[str, Any]:
        """Draft 4's boolean exclusive bounds and tuple ``items`` in their 2020-12 spelling."""
        node = dict(node)
        for excl, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(excl), bool) and node.pop(excl) and bound in node:
                node[excl] = node.pop(bound)
        if isinstance(node.get("items"), list):
            node["prefixItems"] = node.pop("items")
            extra = node.get("additionalItems", True)
            if extra is not True:
                node["items"] = extra
        return node

    def _keyword(self, node: dict[str, Any], key: str, value: Any, path: list[str], depth: int) -> Any:
        at = json_pointer(path + [key])
        if key == "type":
            names = value if isinstance(value, list) else [value]
            bad = [t for t in names if t not in TYPES]
            if bad:
                self.problems.append(f"{at}: unknown type {bad[0]!r} (expected one of {sorted(TYPES)})")
            return value
        if key == "format":
            if isinstance(value, str) and value in FORMATS:
                return value
            self.warnings.append(
                f"{at}: unknown format {value!r} generated as a plain string (format is an annotation)"
            )
            return _DROP
        if key == "multipleOf":
            if node.get("type") == "integer" and isinstance(value, int):
                return value
            self.checked.append(f"{at}: multipleOf (not on an integer type with an integer factor)")
            return _DROP
        if key == "pattern":
            if not isinstance(value, str):
                self.problems.append(f"{at}: pattern must be a string")
                return _DROP
            try:
                xgr.Grammar.from_regex(value)
            except RuntimeError as err:
                self.checked.append(f"{at}: pattern (xgrammar cannot generate it: {engine_message(err)[:80]})")
                return _DROP
            return value
        if key == "$ref":
            try:
                target = resolve_local(self.root, value if isinstance(value, str) else "")
                if not kept_in_place(self.root, value):
                    if depth >= MAX_INLINE_DEPTH:  # deep chains of relocations: the place is left open
                        self.checked.append(f"{at}: $ref {value!r}")
                        return _DROP
                    return self._relocate(value, target, depth)
            except KeyError:
                if isinstance(value, str) and registry_resolves(self.root, value):
                    # an anchor or an $id inside this document: the validator resolves it, the grammar
                    # leaves the place open
                    self.checked.append(f"{at}: $ref {value!r}")
                    return _DROP
                self.problems.append(f"{at}: $ref {value!r} does not resolve inside the schema (no remote refs)")
                return _DROP
            return value
        if key in ("properties", "patternProperties", "$defs", "definitions"):
            if not isinstance(value, dict):
                self.problems.append(f"{at}: {key} must be an object")
                return _DROP
            if key == "patternProperties":
                unparsed = [k for k in value if not _xgrammar_regex_ok(k)]
                for k in unparsed:  # narrower, not looser: such names are simply never generated
                    self.warnings.append(
                        f"{at}: property names matching {k!r} are not generated (xgrammar cannot parse it)"
                    )
                value = {k: v for k, v in value.items() if k not in unparsed}
            return {name: self.lower(s, path + [key, name], depth) for name, s in value.items()}
        if key in ("additionalProperties", "items", "propertyNames"):
            return self.lower(value, path + [key], depth)
        if key in ("anyOf", "oneOf", "prefixItems", "allOf"):
            if not isinstance(value, list):
                self.problems.append(f"{at}: {key} must be an array")
                return _DROP
            if key == "oneOf" and len(value) > 1:
                self.checked.append(f"{at}: oneOf (exactly one branch; generated as anyOf)")
            return [self.lower(s, path + [key, str(i)], depth) for i, s in enumerate(value)]
        return value

    def _relocate(self, ref: str, target: Any, depth: int) -> str:
        """A ``$ref`` to ``target`` in the grammar schema's ``$defs`` (lowered once, recursion allowed)."""
        if ref not in self.relocated:
            name = f"_smcgen_ref{len(self.relocated)}"
            self.relocated[ref] = name  # before lowering: a target that refers to itself finds its name
            parts = [p.replace("~1", "/").replace("~0", "~") for p in ref[1:].split("/") if p]
            self.extra_defs[name] = self.lower(target, parts, depth + 1)
        return f"#/$defs/{self.relocated[ref]}"

    def _merged_def(self, node: dict[str, Any], path: list[str], depth: int) -> str:
        """A ``$ref`` to ``node`` (holding ``allOf``) merged and lowered into the grammar's ``$defs`` once."""
        key = json.dumps(node, sort_keys=True, default=str)
        if key not in self.merged:
            name = f"_smcgen_allof{len(self.merged)}"
            self.merged[key] = name  # before lowering: a node reached again through a recursive ref finds it
            merged = self._merge_all_of(node, path, depth)
            self.extra_defs[name] = self.lower(merged, path, depth + 1)
        return f"#/$defs/{self.merged[key]}"

    def _approximations(self, out: dict[str, Any], where: str) -> None:
        """Combinations xgrammar 0.2.x compiles with a keyword ignored: that keyword is checked after."""
        lengths = [k for k in ("minLength", "maxLength") if k in out]
        for other in ("pattern", "format"):
            if other in out and lengths:
                self.checked.append(f"{where}: {'/'.join(lengths)} with {other}")
        if "$ref" in out and any(k in out for k in SUPPORTED - {"$ref", "$defs", "definitions"}):
            self.checked.append(f"{where}: keywords beside $ref")

    # -------------------------------------------------------------- allOf
    def _merge_all_of(self, node: dict[str, Any], path: list[str], depth: int) -> dict[str, Any]:
        """Fold ``allOf`` (and the node's own keywords) into one schema; inexact merges are checked after."""
        parts = node["allOf"]
        merged = {k: v for k, v in node.items() if k != "allOf"}
        exact = True
        for part in parts:
            part = self._inline(part, depth)
            if part is None:
                exact = False
                continue
            if part is True:
                continue
            if part is False:
                return {"not": {}}  # nothing is valid: generation can only end dead, the validator says why
            merged, ok = merge_schemas(merged, self._draft4(part))
            exact = exact and ok
        if not exact:
            self.checked.append(f"{json_pointer(path + ['allOf'])}: allOf (merged approximately)")
        return merged

    def _inline(self, part: Any, depth: int) -> Any:
        """``part`` with a top-level local ``$ref`` replaced by its target (None when it cannot be)."""
        seen = 0
        while isinstance(part, dict) and isinstance(part.get("$ref"), str) and len(part) == 1:
            if seen >= MAX_INLINE_DEPTH or depth >= MAX_INLINE_DEPTH:
                return None
            try:
                part = resolve_local(self.root, part["$ref"])
            except KeyError:
                return None
            seen += 1
        if isinstance(part, dict) and isinstance(part.get("allOf"), list):
            part = self._merge_all_of(part, [], depth + 1)
        return part


_DROP = object()


@functools.lru_cache(maxsize=1024)
def _xgrammar_regex_ok(pattern: str) -> bool:
    try:
        xgr.Grammar.from_regex(pattern)
        return True
    except RuntimeError:
        return False


def lower_json_schema(schema: Any) -> LoweredSchema:
    """Split ``schema`` (pydantic model, dict or JSON text) into grammar schema + exact validator.

    Raises :class:`GrammarError` listing every problem (with its JSON pointer) when the schema
    cannot be generated or checked; emits a :class:`SchemaWarning` for what is ignored.
    """
    normalized = normalize_schema(schema)
    lowering = _Lowering(normalized)
    try:
        grammar_schema = lowering.lower(normalized, [])
    except RecursionError:
        # a recursive $ref reached through allOf is expanded, not referenced: refuse it by name
        raise GrammarError(
            "JSON schema not supported: expanding allOf through a recursive $ref does not terminate "
            "(write the recursive part as a plain $ref, outside allOf)"
        ) from None
    if lowering.extra_defs and isinstance(grammar_schema, dict):
        grammar_schema = {**grammar_schema, "$defs": {**grammar_schema.get("$defs", {}), **lowering.extra_defs}}
    if lowering.problems:
        p = lowering.problems
        shown = "; ".join(p[:8]) + (f"; and {len(p) - 8} more" if len(p) > 8 else "")
        raise GrammarError(f"JSON schema not supported: {shown}")
    validator = validator_for(python_patterns(normalized))
    if lowering.warnings:
        w = lowering.warnings
        warnings.warn(
            "; ".join(w[:5]) + (f"; and {len(w) - 5} more" if len(w) > 5 else ""), SchemaWarning, stacklevel=3
        )
    return LoweredSchema(
        normalized, grammar_schema, tuple(dict.fromkeys(lowering.checked)), tuple(lowering.warnings), validator
    )


def check_json_schema(schema: dict[str, Any] | bool) -> None:
    """Raise :class:`GrammarError` when ``schema`` cannot be generated or checked (see :func:`lower_json_schema`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SchemaWarning)
        lower_json_schema(schema)
