"""JSON from a pydantic model (enum, nested object, list) on SmolLM2-135M-Instruct.

Compares unconstrained sampling, plain masking and grammar-constrained SMC (N = 4, 8): validity
against the schema (``jsonschema``), the target's per-token log-likelihood, seconds per sample.

    python recipes/json_record.py [--samples 20] [--draft] [--methods unconstrained,masking,smc4,smc8] [--threads 1]
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

from _harness import Task, main, strip_fence
from pydantic import BaseModel, Field

from smcgen import GrammarPotential


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    favorite_color: Color
    address: Address
    hobbies: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


SCHEMA = Person.model_json_schema()


def valid_json(text: str) -> bool:
    """Valid iff the reply (a surrounding Markdown code fence allowed) is JSON that the schema accepts."""
    import jsonschema

    body = strip_fence(text, "json")
    try:
        jsonschema.validate(json.loads(body), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


TASK = Task(
    title="Recipe: JSON record from a pydantic model",
    prompt=(
        "Write a JSON object describing a fictional person with these fields: name (string), age (integer), "
        "favorite_color (red, green or blue), address (an object with city and a 5-digit zip_code string) and "
        "hobbies (a list of at most 3 short strings). Reply with the JSON object only."
    ),
    # compact-ish layout: any whitespace between tokens, at most 4 characters of it in a row
    grammar=GrammarPotential.json_schema(Person, max_whitespace=4),
    validate=valid_json,
    max_new_tokens=96,
)

if __name__ == "__main__":
    main(TASK, default_samples=20, description=__doc__)
