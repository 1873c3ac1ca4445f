"""Device memory one owner keeps for reuse, and free memory read with it released.

A native engine keeps its last runs' KV pools and CUDA graphs for the next runs of the same shapes
(smcgen/samplers/native.py). One owner at a time may hold such memory. It is released in two
places only: where free GPU memory is read (:func:`free_gpu_bytes`, which every sizing from free
memory goes through) and where a paged pool is made (``NativeCausalLM.make_cache``). The owner
itself may keep its memory while it sizes new pools beside it (:func:`keeping`).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_HELD_LOCK = threading.RLock()
_holder: weakref.ref | None = None
#: the owner that is sizing new pools while it keeps its held memory (see :func:`keeping`)
_sizing: Any = None


def hold(owner: Any) -> None:
    """Record ``owner`` (with a ``release_held()`` method) as the one holder of reusable device
    memory, releasing another holder's. A weak reference: the memory goes with its owner."""
    global _holder
    with _HELD_LOCK:
        if _holder is None or _holder() is not owner:  # an owner keeping a new run keeps it
            release_held()
        _holder = weakref.ref(owner)


@contextmanager
def keeping(owner: Any) -> Iterator[None]:
    """While the block runs, :func:`release_held` leaves ``owner``'s held memory as it is.

    For an owner that sizes and makes new pools beside the runs it keeps: the sizing then reads the
    free memory with those runs in place, and the owner releases them itself if the pools do not fit.
    """
    global _sizing
    with _HELD_LOCK:
        before, _sizing = _sizing, owner
        try:
            yield
        finally:
            _sizing = before


def release_held() -> None:
    """Free the memory the current holder keeps for reuse (call before sizing from free memory)."""
    global _holder
    with _HELD_LOCK:
        if _sizing is not None and _holder is not None and _holder() is _sizing:
            return
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


def device_memory_bytes(device: torch.device) -> int:
    """The device's total memory: the GPU's, or the host's (as the CPU engine's pools live there)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): 0, so nothing is kept beside a new run
        return 0


__all__ = ["device_memory_bytes", "free_gpu_bytes", "hold", "keeping", "release_held"]
