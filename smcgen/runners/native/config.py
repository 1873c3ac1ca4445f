"""The architecture numbers of a Llama / Qwen2 / Qwen3 model, read from its transformers config.

``NativeConfig.from_hf`` refuses what the native runner cannot run (other model types, activations,
sliding-window layers, rope types) with a ValueError naming it; ``rope_inv_freq`` computes the
rotary frequencies exactly as transformers does, so the native logits match for the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class NativeConfig:
    """The architecture numbers the native runner needs, read from a transformers config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 (always), Llama / Qwen3 with attention_bias
    o_bias: bool  # Llama / Qwen3 with attention_bias
    mlp_bias: bool  # Llama with mlp_bias
    qk_norm: bool  # Qwen3: RMSNorm over each head's q and k before RoPE
    rope_theta: float
    rope: tuple[tuple[str, Any], ...]  # the rope parameters (rope_type, factor, ...) as sorted items
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: Any) -> NativeConfig:
        """Read a LlamaConfig / Qwen2Config / Qwen3Config; raise ValueError for anything else."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"NativeCausalLM supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got '{model_type}' "
                f"({type(config).__name__}). Use the generic transformers backend for this model."
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"NativeCausalLM: {model_type} with hidden_act '{act}' is not supported (only silu)")
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False):
            raise ValueError(f"NativeCausalLM: {model_type} with sliding-window layers is not supported")

        n_heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        rope = _rope_parameters(config)
        if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"NativeCausalLM: rope type '{rope['rope_type']}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("NativeCausalLM: partial rotary embeddings are not supported")
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.rms_norm_eps),
            max_positions=int(config.max_position_embeddings),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,  # Qwen2 has no attention_bias field: its o_proj never has a bias
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            rope_theta=float(rope["rope_theta"]),
            rope=tuple(sorted((k, v) for k, v in rope.items() if k != "rope_theta")),
            initializer_range=float(getattr(config, "initializer_range", 0.02) or 0.02),
        )


def _rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings from either the transformers 5 ``rope_parameters`` or the older ``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def rope_inv_freq(cfg: NativeConfig) -> Tensor:
    """Inverse frequencies [head_dim / 2] (fp32, CPU) computed the way transformers computes them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    rope = dict(cfg.rope)
    kind = rope["rope_type"]
    if kind == "linear":
        return inv_freq / float(rope["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope.get("original_max_position_embeddings") or cfg.max_positions)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq
