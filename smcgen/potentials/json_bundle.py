"""Schemas that ``$ref`` other documents, made self-contained for generation (no network).

A real schema often points into sibling files (``"$ref": "definitions.json#/definitions/id"``).
:func:`bundle_schema` takes the documents the caller has (a mapping from URI to schema, e.g. read
from a package or a folder) and returns one schema: every other document it reaches is embedded
under ``$defs`` and each ``$ref`` rewritten to point there, so the grammar and the exact validator
both see the same, complete schema. Refs to documents not given are left as they are (the lowering
then refuses them, naming the ref).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urldefrag, urljoin

_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "example"})
_PREFIX = "_bundled"


def _uri_of(schema: Any, fallback: str) -> str:
    if isinstance(schema, dict):
        for key in ("$id", "id"):
            if isinstance(schema.get(key), str) and "://" in schema[key]:
                return urldefrag(schema[key])[0]
    return urldefrag(fallback)[0]


def bundle_schema(schema: Any, documents: Mapping[str, Any], base_uri: str = "") -> Any:
    """``schema`` with the documents its ``$ref``s reach (from ``documents``) embedded under ``$defs``.

    ``base_uri``: where ``schema`` comes from (relative refs resolve against it, or against its
    ``$id``). A document is looked up by its URI, also with ``.json`` appended (SchemaStore spells
    refs both ways). Embedded documents lose their ``$id``/``$schema`` so refs resolve as rewritten.
    """
    if not isinstance(schema, dict):
        return schema
    root_uri = _uri_of(schema, base_uri)
    names: dict[str, str] = {root_uri: ""}
    embedded: dict[str, Any] = {}
    queue: list[tuple[str, Any]] = []

    by_id = {_uri_of(doc, ""): doc for doc in documents.values() if isinstance(doc, dict) and _uri_of(doc, "")}

    def lookup(uri: str) -> Any:
        for variant in (uri, uri.replace("http://", "https://", 1), uri.replace("https://", "http://", 1)):
            for key in (variant, variant + ".json"):
                if key in documents:
                    return documents[key]
                if key in by_id:
                    return by_id[key]
        return None

    def rewrite(ref: str, doc_uri: str) -> str:
        absolute = urljoin(doc_uri, ref) if doc_uri else ref
        target, fragment = urldefrag(absolute)
        if not target:
            target = doc_uri
        if fragment and not fragment.startswith("/"):
            return ref  # an anchor: left to the validator's own resolution
        if target not in names and target.replace("http://", "https://", 1) == root_uri.replace(
            "http://", "https://", 1
        ):
            target = root_uri
        if target not in names:
            doc = lookup(target)
            if doc is None or not isinstance(doc, (dict, bool)):
                return ref
            names[target] = f"{_PREFIX}{len(embedded)}"
            body = {k: v for k, v in doc.items() if k not in ("$id", "id", "$schema")} if isinstance(doc, dict) else doc
            embedded[names[target]] = body
            queue.append((target, names[target]))
        name = names[target]
        return f"#{fragment}" if name == "" else f"#/$defs/{name}{fragment}"

    def walk(node: Any, doc_uri: str) -> Any:
        if isinstance(node, list):
            return [walk(v, doc_uri) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                out[key] = value
            elif key == "$ref" and isinstance(value, str):
                out[key] = rewrite(value, doc_uri)
            else:
                out[key] = walk(value, doc_uri)
        return out

    result = walk(schema, root_uri)
    done: set[str] = set()
    while queue:
        uri, name = queue.pop()
        if name in done:
            continue
        done.add(name)
        embedded[name] = walk(embedded[name], uri)
    if embedded:
        result["$defs"] = {**result.get("$defs", {}), **embedded}
    return result


__all__ = ["bundle_schema"]
