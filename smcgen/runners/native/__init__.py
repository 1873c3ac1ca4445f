"""Native GPU runner for Llama / Qwen2 / Qwen3: paged, refcounted KV shared by particles.

``NativeCausalLM`` holds the weights (fused QKV and gate/up) and runs graph-capturable steps over
a ``PagedKVCache``; the kernels it calls live in ``smcgen.kernels``.
"""

from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import (
    SUPPORTED_MODEL_TYPES,
    NativeCausalLM,
    NativeConfig,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "NativeCausalLM", "NativeConfig", "PagedKVCache"]
