"""What every kernel module shares: the optional triton import, the dispatch rule, device facts.

Importing triton is optional (the torch twins run without it); under ``TRITON_INTERPRET=1`` the
interpreter is patched once here so kernels may use runtime loop bounds.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch twins still work without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "fix_interpreter_loop_bounds", "require_triton", "sm_count", "tl", "triton", "use_triton"]


def fix_interpreter_loop_bounds() -> None:
    """Let Triton's CPU interpreter take runtime loop bounds under numpy >= 2.4.

    triton 3.6's interpreter keeps scalars as 1-element 1-d arrays and turns a loop bound into an
    int with ``int(array)``, which numpy 2.4 rejects; every ``range(0, n, BLOCK)`` with a runtime n
    then fails. This wraps the interpreter's tensor patching so ``__index__`` takes the single
    element. Only used when ``TRITON_INTERPRET=1``; compiled kernels are unaffected.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "_smcgen_loop_bounds", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._smcgen_loop_bounds = True
    interpreter._patch_lang_tensor = patched


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    fix_interpreter_loop_bounds()


def use_triton(t: torch.Tensor) -> bool:
    """The dispatch rule of every op: Triton for CUDA tensors, the torch twin otherwise."""
    return HAS_TRITON and t.is_cuda


def require_triton() -> None:
    """A clear error instead of a NameError when a ``*_triton`` op is called without triton."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the triton package; use the *_torch twins instead")


@functools.cache
def sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (cached: the query is not free; no sync)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count
