"""How much memory a generic-engine request needs, estimated before it starts, and the refusal.

The generic engine holds, per step, the target's logits for the K+1 scored positions of every
particle row ([N, K+1, V] float32) and a few full-vocabulary copies made while turning logits into
log-probabilities and drawing the bonus token (log-softmax, the powered distribution, the draw's
probabilities and mask: about 5 [N, V] float32 tensors), the draft's per-token logits and their
copies, and the key/value caches of both models for prompt + max_new_tokens positions. A request
whose estimate exceeds the memory free on its device is refused with both numbers (N = 10000 on
the embedded model needs ~10 GB of logits alone and died in the CPU allocator after 86 s).
The native engine sizes its paged KV pool itself and is not estimated here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from smcgen.core.config import SMCConfig
from smcgen.core.device_memory import free_gpu_bytes

# full-vocabulary float32 copies the step makes beside the logits themselves (see the module docstring)
_VOCAB_COPIES_PER_ROW = 5


class RequestTooLargeError(ValueError):
    """The request's estimated memory exceeds what its device has free."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one generic-engine request needs: per-step vocabulary tensors and KV caches."""

    vocab_bytes: int
    kv_bytes: int

    @property
    def total(self) -> int:
        return self.vocab_bytes + self.kv_bytes


def _kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Key + value bytes one token adds to a model's cache (0 when the config does not say)."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (layers and heads and hidden):
        return 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    param = next(model.parameters(), None)
    itemsize = param.element_size() if param is not None else 4
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * itemsize


def estimate_request(cfg: SMCConfig, target, draft, prompt_len: int, vocab_size: int) -> MemoryEstimate:
    """The generic engine's estimate for ``cfg`` (``target``/``draft`` are LanguageModels, draft may be None)."""
    n = cfg.n_particles
    k = cfg.block_size if draft is not None else 0
    per_row = (k + 1) + _VOCAB_COPIES_PER_ROW  # target logits of K+1 positions + the step's copies
    if draft is not None:
        per_row += 1 + _VOCAB_COPIES_PER_ROW  # the draft's logits of one token + its draw's copies
    vocab_bytes = 4 * n * vocab_size * per_row
    positions = prompt_len + cfg.max_new_tokens + k + 1
    kv = _kv_bytes_per_token(target.model) + (_kv_bytes_per_token(draft.model) if draft is not None else 0)
    return MemoryEstimate(vocab_bytes=vocab_bytes, kv_bytes=n * positions * kv)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: :func:`~smcgen.core.device_memory.free_gpu_bytes`, held
    memory released and the allocator's unused cache counted; CPU: MemAvailable), None when unknown."""
    override = os.environ.get("SMCGEN_MEMORY_LIMIT_BYTES")
    if override:
        return int(float(override))
    if device.type == "cuda":
        return free_gpu_bytes(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_request_memory(cfg: SMCConfig, target, draft, prompt_len: int) -> MemoryEstimate:
    """Raise :class:`RequestTooLargeError` when the request cannot fit its device's free memory.

    A request longer than the model's context is left to the engine's clearer context error."""
    context = getattr(target, "context_length", None)
    if context is not None and prompt_len + cfg.max_new_tokens > context:
        return estimate_request(cfg, target, draft, prompt_len, target.vocab_size)
    est = estimate_request(cfg, target, draft, prompt_len, target.vocab_size)
    limit = available_bytes(target.device)
    if limit is not None and est.total > limit:
        fits = max(1, int(cfg.n_particles * limit / est.total))
        raise RequestTooLargeError(
            f"n_particles={cfg.n_particles} needs about {_gb(est.total)} on {target.device} "
            f"({_gb(est.vocab_bytes)} of [particles x vocab] step tensors, {_gb(est.kv_bytes)} of KV cache) but "
            f"{_gb(limit)} is free; lower n_particles (about {fits} fits), block_size or max_new_tokens"
        )
    return est


__all__ = ["MemoryEstimate", "RequestTooLargeError", "available_bytes", "check_request_memory", "estimate_request"]
