"""What every kernel module shares: the optional triton import, the dispatch rule, device facts.

Importing triton is optional (the torch twins run without it); under ``TRITON_INTERPRET=1`` the
interpreter is patched once here so kernels may use runtime loop bounds.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch twins still work without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "fix_interpreter_loop_bounds",
    "pdl_begin",
    "pdl_enabled",
    "pdl_release",
    "pdl_scope",
    "pdl_wait",
    "require_triton",
    "sm_count",
    "tl",
    "triton",
    "use_triton",
]


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
def _properties(device: torch.device):
    """A CUDA device's properties (cached: the query is not free; no sync)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index)


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device."""
    return _properties(device).multi_processor_count


# Programmatic dependent launch (PDL, Hopper and later). A decode step is a chain of ~7 short
# kernels per layer; with PDL a kernel is launched while its predecessor still runs and waits in
# ``griddepcontrol.wait`` before touching memory, so its launch latency hides behind the previous
# kernel instead of adding to it. On by default since the skinny kernel and attention release
# their successor only after their main loop and QKV and the LM head run in the skinny kernel (so
# a decode step is a chain of Triton kernels): on the H100 AR +2.5%, N=8 K=8 +1.6%, 8 x 8 -0.4%
# (BENCHMARKS.md, fifth measurement; released at the start instead, it had slowed the 8B's AR
# steps and an fp8 draft; prefetching weights into L2 before the wait lost everywhere).
# SMCGEN_PDL=0 turns it off everywhere, ``NativeCausalLM.pdl`` per model; a CUDA graph keeps the
# launch mode it was captured with.
_PDL = os.environ.get("SMCGEN_PDL", "1") == "1"


@contextlib.contextmanager
def pdl_scope(enabled: bool | None) -> Iterator[None]:
    """Kernels launched inside the block use PDL iff ``enabled`` (``None``: the setting as it is)."""
    global _PDL
    before = _PDL
    if enabled is not None:
        _PDL = bool(enabled)
    try:
        yield
    finally:
        _PDL = before


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: CUDA sm_90+, triton present, not turned off."""
    return _PDL and HAS_TRITON and t.is_cuda and _properties(t.device).major >= 9


if HAS_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """The first half of ``pdl_begin``: wait for the previous kernel (same rules), no release yet."""
        if PDL:
            gdc_wait()

    @triton.jit
    def pdl_release(PDL: tl.constexpr):
        """Let the next kernel launch: for kernels with more programs than fit at once, called after
        their main loop. The next kernel's programs take SM slots while they wait, so releasing it at
        the start starves this kernel's later programs (an fp8 draft with PDL ran 4% slower, H100)."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def pdl_begin(PDL: tl.constexpr):
        """Wait for the previous kernel (all its writes visible), then let the next one launch.

        Every PDL kernel calls this (or ``pdl_wait`` and later ``pdl_release``) before its first
        read of a predecessor's output and before its first write, on every path (an early-exit
        program too): a kernel launched early waits only on its direct predecessor, so the chain
        stays ordered only if each link waits. Only reads of constants (weights) may come before it.
        """
        pdl_wait(PDL)
        pdl_release(PDL)
