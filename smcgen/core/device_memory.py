"""Device memory one owner keeps for reuse, and free memory read with it released.

A native engine keeps its last run's KV pools and CUDA graphs for the next run of the same shape
(smcgen/samplers/native.py). One owner at a time may hold such memory. It is released in two
places only: where free GPU memory is read (:func:`free_gpu_bytes`, which every sizing from free
memory goes through) and where a paged pool is made (``NativeCausalLM.make_cache``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

_HELD_LOCK = threading.RLock()
_holder: weakref.ref | None = None


def hold(owner: Any) -> None:
    """Record ``owner`` (with a ``release_held()`` method) as the one holder of reusable device
    memory, releasing another holder's. A weak reference: the memory goes with its owner."""
    global _holder
    with _HELD_LOCK:
        if _holder is None or _holder() is not owner:  # an owner keeping a new run keeps it
            release_held()
        _holder = weakref.ref(owner)


def release_held() -> None:
    """Free the memory the current holder keeps for reuse (call before sizing from free memory)."""
    global _holder
    with _HELD_LOCK:
        ref, _holder = _holder, None
        owner = ref() if ref is not None else None
        if owner is not None:
            owner.release_held()


def free_gpu_bytes(device: torch.device) -> int:
    """Free memory on the CUDA ``device`` once held memory is released, counting what torch's
    allocator caches but no tensor uses (an earlier run's pools)."""
    release_held()
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


__all__ = ["free_gpu_bytes", "hold", "release_held"]
