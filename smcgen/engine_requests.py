"""What an :class:`~smcgen.engine.Engine` request is: prompt ids (chat messages through the model's
template), the validated settings and guide, and which requests may share one native batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import Tensor

from smcgen.core.config import SMCConfig
from smcgen.potentials.base import Potential
from smcgen.runners.transformers import LanguageModel, encode_prompt

#: a prompt: text, token ids, a [T] / [1, T] tensor, or chat messages ({"role", "content"} dicts)
PromptLike = str | Sequence[int] | Tensor | Sequence[Mapping[str, Any]]


#: roles a chat message may have: the OpenAI API's, and Llama 3.1's tool-output role (the server's
#: request bodies take the same)
ChatRole = Literal["system", "user", "assistant", "developer", "tool", "ipython"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages (mappings with a role)."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, (str, bytes))
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def chat_prompt_ids(messages: Sequence[Mapping[str, Any]], lm: LanguageModel) -> list[int]:
    """Token ids of ``messages`` under the model's chat template, ending with the assistant's turn."""
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} needs 'role' and 'content' keys, got {sorted(m)}")
        if m["role"] not in CHAT_ROLES:  # a template renders any role as given: a typo would pass silently
            raise ValueError(f"chat message {i} has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
    tok = lm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("chat messages need a tokenizer with a chat template; pass text or token ids instead")
    ids = tok.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(t) for t in ids]


def prompt_ids(prompt: PromptLike, lm: LanguageModel) -> list[int]:
    """Token ids of a prompt: chat messages get the chat template, the rest is :func:`encode_prompt`."""
    if is_chat(prompt):
        return chat_prompt_ids(prompt, lm)  # type: ignore[arg-type]
    return encode_prompt(prompt, lm)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Request:
    """One validated request (from :meth:`~smcgen.engine.Engine.resolve`): its token ids, config and guide (a bound
    grammar, any potential with a next-token mask, or None)."""

    ids: list[int]
    config: SMCConfig
    grammar: Potential | None


def batch_key(request: Request) -> tuple:
    """Requests with equal keys can share one native batch: the same config up to the seed and the
    token limit (each request keeps its own in the batch) and the same guide (a JSON schema's
    budget counts down from the limit, so guided requests also share the limit)."""
    free = {"seed": None} if request.grammar is not None else {"seed": None, "max_new_tokens": 1}
    return (request.config.model_copy(update=free).model_dump_json(), id(request.grammar))


def one_guide(guide: Any, grammar: Any) -> Any:
    """The guide asked for: ``guide=`` or its older name ``grammar=`` (both only when the same object)."""
    if guide is not None and grammar is not None and guide is not grammar:
        raise ValueError("give guide= or grammar= (its older name), not both")
    return guide if guide is not None else grammar


__all__ = ["PromptLike", "Request", "batch_key", "chat_prompt_ids", "is_chat", "one_guide", "prompt_ids"]
