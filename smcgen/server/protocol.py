"""The OpenAI-compatible request bodies the server accepts, validated by pydantic.

The OpenAI fields smcgen can honour are typed; those it cannot (several choices, stop
strings, log-probabilities) are accepted only at their neutral value, so a client setting them
gets a 400 naming the field instead of a silently different answer. SMC settings are extra body
fields (``extra_body={"n_particles": 16}`` in the ``openai`` client); their ranges are checked by
:class:`smcgen.SMCConfig` itself, the one definition of them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from smcgen.engine_requests import ChatRole

#: the body fields that are SMCConfig fields under the same name
SMC_FIELDS = (
    "n_particles",
    "block_size",
    "alpha",
    "ess_threshold",
    "resampler",
    "draft_temperature",
    "target_temperature",
)


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema (``strict`` is always on here)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_named(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with a 'schema'")
        return self


class SMCRequest(BaseModel):
    """Fields shared by both endpoints: sampling settings, SMC settings, structured output."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, description="New tokens at most (default: the server's max_new_tokens).")
    max_completion_tokens: int | None = None
    temperature: float | None = Field(
        None, description="Sets target_temperature and draft_temperature where those are not given."
    )
    seed: int | None = None
    response_format: ResponseFormat | None = None
    # OpenAI fields accepted at their neutral value only
    n: Literal[1] = 1
    stream: bool = Field(False, description="Server-sent events of the text as it becomes stable.")
    top_p: Literal[1, 1.0] | None = None
    stop: None = None
    logprobs: None | Literal[False] = None
    frequency_penalty: Literal[0, 0.0] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    user: str | None = None
    # SMC settings (ranges checked by SMCConfig)
    n_particles: int | None = None
    block_size: int | None = None
    alpha: float | None = None
    ess_threshold: float | None = None
    resampler: str | None = None
    draft_temperature: float | None = None
    target_temperature: float | None = None
    # structured output beside response_format (smcgen extensions)
    regex: str | None = Field(None, description="Constrain the output to a regular expression.")
    grammar: str | None = Field(None, description="Constrain the output to an EBNF grammar (xgrammar syntax).")

    def smc_overrides(self) -> dict[str, Any]:
        """The SMCConfig overrides this request asks for (unset fields keep the server's defaults)."""
        out = {k: getattr(self, k) for k in SMC_FIELDS if getattr(self, k) is not None}
        if self.temperature is not None:  # SMCConfig sets both temperatures from it where not given
            out["temperature"] = self.temperature
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is not None:
            out["max_new_tokens"] = limit
        if self.seed is not None:
            out["seed"] = self.seed
        return out


class CompletionRequest(SMCRequest):
    """``POST /v1/completions``: a text prompt (or several: one choice each), or token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None


class ChatMessage(BaseModel):
    """One chat message; ``content`` as text or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: ChatRole
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise ValueError(f"only text content parts are supported, got {p.get('type')!r}")
            parts.append(str(p.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(SMCRequest):
    """``POST /v1/chat/completions``: chat messages, formatted with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
