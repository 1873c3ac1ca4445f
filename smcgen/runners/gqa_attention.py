"""transformers' SDPA attention without copying the key/value heads of grouped-query models on a CPU.

With a mask (every verify forward of more than one new position: the causal mask is offset by the
cache), transformers' ``sdpa`` attention repeats each key/value head over its query heads before
calling ``scaled_dot_product_attention``: a copy of the whole KV cache, three times over for
SmolLM2 (9 query heads, 3 key/value heads), at every layer of every forward. PyTorch's CPU kernel
takes the grouping itself (``enable_gqa=True``) and gives the same numbers. :func:`gqa_attention`
is a context manager that runs a model's forwards with such an attention function: on a CPU, when
the model uses ``sdpa`` and the call has a boolean mask; every other call goes to transformers'
own function unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

#: the name the attention function is registered under in transformers' attention registries
NAME = "smcgen_sdpa_gqa"


def sdpa_gqa_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' ``sdpa_attention_forward``, with the key/value heads grouped by the kernel
    instead of copied when a CPU call has a boolean mask (the case transformers copies them in)."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if (
        groups > 1
        and plain
        and query.device.type == "cpu"
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
    ):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# registered once, at import: the same masks as "sdpa" (the mask registry must know the name, or
# transformers builds no mask at all for it)
AttentionInterface.register(NAME, sdpa_gqa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextmanager
def gqa_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s forwards inside the block with :func:`sdpa_gqa_forward` when it uses ``sdpa``
    on a CPU (the model's setting is restored on exit)."""
    config = getattr(model, "config", None)
    switch = (
        config is not None
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and next(model.parameters()).device.type == "cpu"
    )
    if not switch:
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


__all__ = ["NAME", "gqa_attention", "sdpa_gqa_forward"]
