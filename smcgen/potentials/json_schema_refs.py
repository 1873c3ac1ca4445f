"""Local ``$ref``s of a JSON schema: JSON pointers, resolution, and where the lowering keeps a target."""

from __future__ import annotations

from typing import Any


def json_pointer(path: list[str]) -> str:
    """``path`` (keys from the root) as a JSON pointer fragment, ``#/a/b~1c``."""
    return "#" + "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


def resolve_local(root: Any, ref: str) -> Any:
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


# keywords whose value the lowering keeps at the same place, and what stands under them
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_ONE_SCHEMA = frozenset({"additionalProperties", "items", "propertyNames"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "prefixItems"})


def kept_in_place(root: Any, ref: str) -> bool:
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


def all_refs(node: Any) -> list[str]:
    """Every ``$ref`` string anywhere in ``node``."""
    if isinstance(node, dict):
        refs = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for v in node.values():
            if isinstance(v, (dict, list)):
                refs.extend(all_refs(v))
        return refs
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


def registry_resolves(root: Any, ref: str) -> bool:
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
