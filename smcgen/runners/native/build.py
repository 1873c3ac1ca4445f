"""Random-weight native models built one layer at a time, optionally straight into fp8 / int8.

``NativeCausalLM.from_config`` allocates every layer in the model's dtype first: a Llama-3.1-70B
in bf16 is 141 GB, more than one GPU holds. :func:`random_layerwise` starts from the model without
layers (embedding, final norm, LM head, RoPE tables), then draws one layer's weights, quantizes
them with ``NativeCausalLM.quantize_weights`` (the same weight-only path as a quantized draft) and
appends the layer, so at most one bf16 layer (1.7 GB for the 70B) exists at a time: the 70B in
weight-only fp8 is ~71 GB. Works for ``TensorParallelLM`` too (each rank draws its shard).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from smcgen.runners.native.config import NativeConfig
from smcgen.runners.native.model import NativeCausalLM
from smcgen.runners.native.weights import NativeLayer, init_random

__all__ = ["random_layerwise"]


@torch.no_grad()
def random_layerwise(
    config: Any,
    *,
    cls: type[NativeCausalLM] = NativeCausalLM,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    seed: int = 0,
    quantize: str | None = None,
    names: tuple[str, ...] = NativeCausalLM.FP8_NAMES,
    max_positions: int | None = None,
    progress: bool = True,
    **cls_kwargs: Any,
) -> NativeCausalLM:
    """A ``cls`` model with random weights (``init_random``'s rule) built layer by layer on ``device``.

    ``quantize``: None (weights in ``dtype``), 'fp8' or 'int8': the ``names`` weights (from
    ``NativeCausalLM.FP8_NAMES``; default all of them, the LM head included) are stored quantized as
    soon as each layer is drawn. ``config``: a transformers config or a ``NativeConfig``.
    ``cls_kwargs`` go to the constructor (``group=`` of a ``TensorParallelLM``).
    """
    cfg = config if isinstance(config, NativeConfig) else NativeConfig.from_hf(config)
    if quantize not in (None, "fp8", "int8"):
        raise ValueError(f"quantize must be None, 'fp8' or 'int8', got {quantize!r}")
    model = cls(dataclasses.replace(cfg, n_layers=0), dtype, device, max_positions, **cls_kwargs)
    gen = torch.Generator(device=model.embed.device).manual_seed(seed)
    init_random(model, cfg, gen)  # embedding, final norm, LM head (no layers yet)
    layer_names = tuple(n for n in names if n != "lm_head")
    if quantize is not None and "lm_head" in names:
        model.quantize_weights(quantize, ("lm_head",))
    local = dataclasses.replace(model.cfg, n_layers=cfg.n_layers)
    for _ in tqdm(range(cfg.n_layers), desc="layers", disable=not progress, leave=False):
        layer = NativeLayer(local, dtype, model.embed.device)
        init_random(layer, local, gen)
        model.layers.append(layer)
        if quantize is not None and layer_names:
            model.quantize_weights(quantize, layer_names)  # quantizes only the layer just appended
    model.cfg = local
    if hasattr(model, "full_config"):
        model.full_config = cfg
    # the random input norms are 1, so W * g == W: the QKV weights already are the folded ones
    model.input_norm_folded = not cfg.qkv_bias
    return model.eval()
