"""The native model's weight tensors: one decoder layer's fused layout, random init, copying
a transformers model's weights into that layout.

A layer keeps q, k and v in one ``qkv`` matrix and gate and up in one ``gate_up`` matrix, so a
forward runs one GEMM for each pair (see ``model.NativeCausalLM``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from smcgen.runners.native.config import NativeConfig

if TYPE_CHECKING:
    from smcgen.runners.native.model import NativeCausalLM


def empty_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A frozen parameter of ``shape``, uninitialized."""
    # Uninitialized: from_hf / from_config fill every tensor, so no time goes to a throwaway init.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


@torch.no_grad()
def init_random(module: nn.Module, cfg: NativeConfig, gen: torch.Generator) -> None:
    """Random weights like transformers' initializer: matrices ~ N(0, initializer_range), norms 1,
    biases 0 (every parameter of ``module``, in ``named_parameters`` order)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, cfg.initializer_range, generator=gen)
        elif name.endswith("norm"):
            p.fill_(1.0)
        else:
            p.zero_()


class NativeLayer(nn.Module):
    """One decoder layer's weights: fused ``qkv`` [(Hq + 2 Hkv) D, H] and ``gate_up`` [2 I, H]."""

    def __init__(self, cfg: NativeConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        hidden, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * d
        self.input_norm = empty_param((hidden,), dtype, device)
        self.qkv = empty_param((qkv_out, hidden), dtype, device)
        self.qkv_bias = empty_param((qkv_out,), dtype, device) if cfg.qkv_bias else None
        self.q_norm = empty_param((d,), dtype, device) if cfg.qk_norm else None
        self.k_norm = empty_param((d,), dtype, device) if cfg.qk_norm else None
        self.o = empty_param((hidden, cfg.n_heads * d), dtype, device)
        self.o_bias = empty_param((hidden,), dtype, device) if cfg.o_bias else None
        self.post_norm = empty_param((hidden,), dtype, device)
        self.gate_up = empty_param((2 * inter, hidden), dtype, device)
        self.gate_up_bias = empty_param((2 * inter,), dtype, device) if cfg.mlp_bias else None
        self.down = empty_param((hidden, inter), dtype, device)
        self.down_bias = empty_param((hidden,), dtype, device) if cfg.mlp_bias else None


@torch.no_grad()
def copy_hf_weights(native: NativeCausalLM, model: nn.Module) -> None:
    """Copy a transformers ``*ForCausalLM``'s weights into ``native`` (built from the same config),
    q/k/v into the fused ``qkv`` rows and gate/up into ``gate_up``."""
    cfg = native.cfg
    base = model.model
    native.embed.copy_(base.embed_tokens.weight)
    native.norm.copy_(base.norm.weight)
    if not cfg.tie_word_embeddings:
        native.lm_head.copy_(model.lm_head.weight)
    q, kv = native.q_size, native.kv_size
    inter = cfg.intermediate_size
    for mine, theirs in zip(native.layers, base.layers, strict=True):
        att, mlp = theirs.self_attn, theirs.mlp
        mine.input_norm.copy_(theirs.input_layernorm.weight)
        mine.post_norm.copy_(theirs.post_attention_layernorm.weight)
        # Slices are filled in place: no concatenated temporary of the full weights.
        for sl, proj in (
            (slice(0, q), att.q_proj),
            (slice(q, q + kv), att.k_proj),
            (slice(q + kv, None), att.v_proj),
        ):
            mine.qkv[sl].copy_(proj.weight)
            if mine.qkv_bias is not None:
                mine.qkv_bias[sl].copy_(proj.bias)
        if mine.q_norm is not None:
            mine.q_norm.copy_(att.q_norm.weight)
            mine.k_norm.copy_(att.k_norm.weight)
        mine.o.copy_(att.o_proj.weight)
        if mine.o_bias is not None:
            mine.o_bias.copy_(att.o_proj.bias)
        mine.gate_up[:inter].copy_(mlp.gate_proj.weight)
        mine.gate_up[inter:].copy_(mlp.up_proj.weight)
        mine.down.copy_(mlp.down_proj.weight)
        if mine.gate_up_bias is not None:
            mine.gate_up_bias[:inter].copy_(mlp.gate_proj.bias)
            mine.gate_up_bias[inter:].copy_(mlp.up_proj.bias)
            mine.down_bias.copy_(mlp.down_proj.bias)
