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

A schema is refused (:class:`GrammarError`) only when it cannot be generated or checked: a remote
``$ref`` (no network), an unknown ``type``, contradictory bounds, a schema the validator's
metaschema rejects, or one xgrammar cannot compile.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import re
import sys
import typing
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from smcgen.potentials.errors import GrammarError, engine_message

# keywords that shape the generated language and that xgrammar enforces (alone; see _lower for the
# combinations it approximates: pattern or format with lengths, multipleOf on numbers, oneOf)
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
_BOUNDS = (
    ("minimum", "maximum"),
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
)
_MAX_INLINE_DEPTH = 16  # $ref targets inlined into an allOf merge, nested at most this deep


class SchemaWarning(UserWarning):
    """A schema feature accepted as the specification says but worth knowing (unknown format or keyword)."""


@dataclass(frozen=True)
class LoweredSchema:
    """A schema split into the grammar xgrammar generates and the exact check that completes it.

    ``grammar_schema``: what is compiled into the mask (equal to or looser than the schema, apart
    from the layout: schema property order, no properties or items the schema does not name).
    ``checked_after``: ``"<pointer>: <keyword>"`` for every part only the validator enforces.
    ``warnings``: what was ignored as the specification allows (unknown formats and keywords).
    ``schema``: the original schema, which ``validator`` checks exactly.
    """

    schema: dict[str, Any] | bool
    grammar_schema: dict[str, Any] | bool
    checked_after: tuple[str, ...]
    warnings: tuple[str, ...]
    validator: Any

    @property
    def exact(self) -> bool:
        """Whether the grammar alone generates exactly the schema (nothing is checked after)."""
        return not self.checked_after

    def violation(self, text: str) -> str | None:
        """Why ``text`` is not a document valid against the schema, or None when it is."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            return f"not JSON ({err.msg} at character {err.pos})"
        try:
            error = next(iter(self.validator.iter_errors(doc)), None)
        except Exception as err:  # noqa: BLE001 - e.g. a ref the validator cannot resolve: not valid, and why
            return f"the validator cannot check it ({type(err).__name__}: {str(err)[:120]})"
        if error is None:
            return None
        where = "#" + "".join(f"/{p}" for p in error.absolute_path)
        return f"{where} violates {error.validator}: {error.message[:200]}"


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


def _resolve(root: Any, ref: str) -> Any:
    """The node a local JSON-pointer ``$ref`` names, or raise KeyError."""
    if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
        raise KeyError(ref)
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(ref)
    return node


# ---------------------------------------------------------------------------- ECMA-262 patterns
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


def _validator_for(schema: dict[str, Any] | bool) -> Any:
    try:
        import jsonschema
        from jsonschema.exceptions import SchemaError
    except ImportError as err:  # pragma: no cover - jsonschema is a dependency
        raise ImportError("JSON-schema grammars need the jsonschema package: pip install 'jsonschema>=4.18'") from err
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as err:
        where = "#" + "".join(f"/{p}" for p in err.absolute_path)
        raise GrammarError(f"JSON schema not supported: {where}: the schema is invalid ({err.message[:200]})") from None
    return cls(schema)


class _Lowering:
    """One pass over a schema: builds the grammar schema and collects what is checked after."""

    def __init__(self, root: Any):
        self.root = root
        # JSON pointers that some $ref points into: unknown keywords on them hold schemas, kept
        self.ref_prefixes = {r[1:] for r in _all_refs(root) if r.startswith("#/")}
        self.checked: list[str] = []
        self.warnings: list[str] = []
        self.problems: list[str] = []
        # refs whose target the grammar schema does not keep at the same pointer (through a dropped
        # keyword, a tuple ``items`` renamed ``prefixItems``, a merged ``allOf``): target lowered once
        # into ``$defs`` under a fresh name, the ref pointed there
        self.relocated: dict[str, str] = {}
        self.extra_defs: dict[str, Any] = {}

    def lower(self, node: Any, path: list[str], depth: int = 0) -> Any:
        where = _pointer(path)
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            self.problems.append(f"{where}: a schema must be an object or a boolean, got {type(node).__name__}")
            return True
        node = self._draft4(node)
        if isinstance(node.get("allOf"), list):
            node = self._merge_all_of(node, path, depth)
        out: dict[str, Any] = {}
        for key, value in node.items():
            at = _pointer(path + [key])
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
        for low, high in _BOUNDS:
            lo, hi = out.get(low), out.get(high)
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
                self.problems.append(f"{where}: {low} ({lo}) is greater than {high} ({hi}); no value can satisfy it")
        return out

    def _referenced(self, value: Any, path: list[str], depth: int) -> Any:
        """A value under an unknown keyword that $refs point into: lowered where a ref names it exactly,
        walked through (keeping only what refs reach) where refs point deeper."""
        inner = _pointer(path)[1:]
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
        at = _pointer(path + [key])
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
                target = _resolve(self.root, value if isinstance(value, str) else "")
                if not _kept_in_place(self.root, value):
                    if depth >= _MAX_INLINE_DEPTH:  # deep chains of relocations: the place is left open
                        self.checked.append(f"{at}: $ref {value!r}")
                        return _DROP
                    return self._relocate(value, target, depth)
            except KeyError:
                if isinstance(value, str) and _registry_resolves(self.root, value):
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
            merged, ok = _merge(merged, self._draft4(part))
            exact = exact and ok
        if not exact:
            self.checked.append(f"{_pointer(path + ['allOf'])}: allOf (merged approximately)")
        return merged

    def _inline(self, part: Any, depth: int) -> Any:
        """``part`` with a top-level local ``$ref`` replaced by its target (None when it cannot be)."""
        seen = 0
        while isinstance(part, dict) and isinstance(part.get("$ref"), str) and len(part) == 1:
            if seen >= _MAX_INLINE_DEPTH or depth >= _MAX_INLINE_DEPTH:
                return None
            try:
                part = _resolve(self.root, part["$ref"])
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


# keywords whose value the lowering keeps at the same place, and what stands under them
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_ONE_SCHEMA = frozenset({"additionalProperties", "items", "propertyNames"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "prefixItems"})


def _kept_in_place(root: Any, ref: str) -> bool:
    """Whether the node a local ``$ref`` names sits at the same pointer in the grammar schema: the path
    runs only through keywords the lowering keeps as they are (not a dropped or unknown keyword, a
    tuple ``items``, or a schema with ``allOf``, which is merged away)."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in ref[1:].split("/") if p]
    node, i = root, 0
    while i < len(parts):
        if not isinstance(node, dict) or "allOf" in node:
            return False
        key = parts[i]
        value = node.get(key)
        if key in _NAMED_SCHEMAS and isinstance(value, dict) and i + 1 < len(parts):
            node, i = value.get(parts[i + 1]), i + 2
        elif key in _ONE_SCHEMA and isinstance(value, (dict, bool)):
            node, i = value, i + 1
        elif key in _SCHEMA_LISTS and isinstance(value, list) and i + 1 < len(parts) and parts[i + 1].isdigit():
            node, i = value[int(parts[i + 1])], i + 2
        else:
            return False
    return True


def _all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        refs = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for v in node.values():
            if isinstance(v, (dict, list)):
                refs.extend(_all_refs(v))
        return refs
    if isinstance(node, list):
        return [r for v in node for r in _all_refs(v)]
    return []


def _registry_resolves(root: Any, ref: str) -> bool:
    """Whether ``ref`` resolves inside the document (anchors, embedded ``$id`` resources) or names a
    draft's metaschema, with no network."""
    try:
        from jsonschema_specifications import REGISTRY as METASCHEMAS
        from referencing.jsonschema import DRAFT202012, specification_with

        dialect = root.get("$schema", "") if isinstance(root, dict) else ""
        spec = specification_with(dialect, default=DRAFT202012) if dialect else DRAFT202012
        resource = spec.create_resource(root)
        registry = METASCHEMAS.with_resource(
            resource.id() or "", resource
        ).crawl()  # the drafts' metaschemas are known offline too
        registry.resolver(base_uri=resource.id() or "").lookup(ref)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not resolvable offline
        return False


_MIN_KEYS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_MAX_KEYS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], bool]:
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
                if name in props:
                    props[name] = {"allOf": [props[name], sb]}
                else:
                    props[name] = sb
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
            out[key] = {"allOf": [va, vb]}
        else:
            exact = False  # two different values of a keyword we cannot conjoin: keep the first, check after
    return out, exact


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
    validator = _validator_for(python_patterns(normalized))
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


# ---------------------------------------------------------------------------- output types
def schema_of_type(obj: Any) -> dict[str, Any] | None:
    """A JSON schema for a ``Literal[...]``, an ``Enum`` class or a pydantic model; None for anything else."""
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return {"enum": [m.value for m in obj]}
    if typing.get_origin(obj) is typing.Literal:
        return {"enum": list(typing.get_args(obj))}
    if isinstance(obj, type) and hasattr(obj, "model_json_schema"):
        return obj.model_json_schema()
    return None


def parse_as(output_type: Any, text: str) -> Any:
    """``text`` (a document of ``output_type``'s schema) as a value of ``output_type``."""
    if isinstance(output_type, type) and hasattr(output_type, "model_validate_json"):
        return output_type.model_validate_json(text)
    value = json.loads(text)
    if isinstance(output_type, type) and issubclass(output_type, enum.Enum):
        return output_type(value)
    return value


# ---------------------------------------------------------------------------- shortest documents
def shortest_document(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A short document valid against the (lowered) schema: what a budget must at least fit.

    Required properties only, ``minItems`` items, ``minLength`` characters, the shortest
    ``enum``/``const`` value or ``anyOf`` branch. Not guaranteed minimal for patterns and formats
    (callers validate it before relying on it).
    """
    root = schema if root is None else root
    if depth > _MAX_INLINE_DEPTH or schema is True or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        try:
            return shortest_document(_resolve(root, schema["$ref"]), root, depth + 1)
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
