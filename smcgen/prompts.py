"""What a prompt may be: text, token ids (list or tensor) or a tokenizer's output, checked.

Kept apart from :mod:`smcgen.validation` because the backend's ``encode_prompt`` uses it and must
not import the potentials (which import the backend).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def _kind(value: Any) -> str:
    return type(value).__name__


def _token_id(value: Any, where: str) -> int:
    if isinstance(value, (bool, float, complex)) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"prompt token ids must be integers, got {value!r} at {where}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"prompt token ids must be integers, got {_kind(value)} {value!r} at {where}") from None


def prompt_ids_from(prompt: Any) -> list[int] | str:
    """Text (returned as is), or the token ids of a list, a ``[T]``/``[1, T]`` tensor or a tokenizer's
    output (``BatchEncoding`` / ``apply_chat_template(..., return_dict=True)``); anything else is an
    error naming ``prompt`` and what it may be."""
    if isinstance(prompt, str):
        bad = next((i for i, ch in enumerate(prompt) if 0xD800 <= ord(ch) <= 0xDFFF), None)
        if bad is not None:
            raise ValueError(
                f"prompt text has a lone surrogate {prompt[bad]!r} at character {bad}: not valid Unicode "
                "(decode bytes with errors='replace' first)"
            )
        return prompt
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError("prompt must be text (str) or token ids, got bytes; decode it first (prompt.decode('utf-8'))")
    if isinstance(prompt, Mapping):
        if "input_ids" not in prompt:
            raise TypeError(f"a dict prompt must be a tokenizer output with 'input_ids'; got keys {sorted(prompt)[:5]}")
        mask = prompt.get("attention_mask")
        ids = prompt_ids_from(prompt["input_ids"])
        if mask is not None and not all(int(m) == 1 for m in torch.as_tensor(mask).reshape(-1).tolist()):
            raise ValueError("prompt's attention_mask has padding (zeros); pass one unpadded prompt")
        return ids
    if isinstance(prompt, Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise ValueError(f"a tensor prompt must have shape [T] or [1, T], got {tuple(prompt.shape)}")
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise TypeError(f"a tensor prompt must hold integer token ids, got dtype {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, Sequence) and getattr(prompt, "ndim", 0) < 1:
        raise TypeError(f"prompt must be text, a list of token ids or a tensor of them, got {_kind(prompt)}")
    items = list(prompt)
    if items and all(isinstance(p, str) for p in items):
        raise ValueError(
            f"prompt is a list of {len(items)} strings (a batch); generate takes one prompt: use "
            "smcgen.Engine(...).batch(prompts) for many"
        )
    if items and all(isinstance(p, (list, tuple)) or getattr(p, "ndim", 0) >= 1 for p in items):
        if len(items) == 1:
            return prompt_ids_from(items[0])
        raise ValueError(
            f"prompt is a batch of {len(items)} token-id lists; generate takes one prompt: use "
            "smcgen.Engine(...).batch(prompts) for many"
        )
    return [_token_id(t, f"position {i}") for i, t in enumerate(items)]


__all__ = ["prompt_ids_from"]
