"""What users pass as a JSON schema (a pydantic model, a dict, JSON text, an Enum, a Literal), and the
parsed value of a finished document."""

from __future__ import annotations

import enum
import json
import typing
from typing import Any

from smcgen.potentials.errors import GrammarError


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
