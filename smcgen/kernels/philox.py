"""Torch implementation of Triton's ``tl.rand`` (Philox4x32-10), bit-identical to triton 3.6.

The Triton kernels draw their noise with ``tl.rand(seed, offsets)``; their torch twins call
:func:`philox_uniform` with the same seed and offsets and get the very same float32 uniforms, so the
twin and the kernel sample identical tokens and ancestors.

Layout reproduced from ``triton/language/random.py`` (``rand`` -> ``randint`` -> ``randint4x`` ->
``philox``), for an int64 offset and an int64 seed:

- key: ``k0 = seed & 0xffffffff``, ``k1 = (seed >> 32) & 0xffffffff`` (the seed's two's-complement
  bits, so negative seeds are fine);
- counter: ``c0 = offset & 0xffffffff``, ``c1 = (offset >> 32) & 0xffffffff``, ``c2 = c3 = 0``;
- ten rounds of ``c0' = hi(B*c2) ^ c1 ^ k0``, ``c2' = hi(A*c0) ^ c3 ^ k1``, ``c1' = lo(B*c2)``,
  ``c3' = lo(A*c0)``, then ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85`` (all mod 2**32);
- output: the final ``c0``, read as int32 ``x``; ``x < 0`` becomes ``-x - 1`` (that is ``~x``), and the
  result in ``[0, 2**31)`` is converted to float32 (round to nearest) and multiplied in float32 by
  ``4.6566127342e-10`` (which rounds to ``2**-31 * (1 - 2**-24)``), so ``u`` lies in ``[0, 1 - 2**-24]``.

All integer work happens in int64 tensors holding uint32 values; 32x32-bit products are split into
16-bit halves so nothing ever overflows int64 (signed overflow is not something to rely on).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PHILOX_ROUNDS", "philox4x32", "philox_randint", "philox_uniform", "uint32_to_uniform"]

PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
# float32(4.6566127342e-10): the largest scale with (2**31 - 1) * scale < 1 in float32 (triton's constant)
_UNIFORM_SCALE = 4.6566127342e-10


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of the 64-bit product ``a * b`` (``a``, ``b`` < 2**32), overflow-free.

    With ``b = bh * 2**16 + bl``: ``a*b = 2**16 * t + (a*bl mod 2**16)`` where ``t = a*bh + (a*bl >> 16)``
    stays below 2**49, so every intermediate fits comfortably in int64.
    """
    lo_part = a * (b & 0xFFFF)
    t = a * (b >> 16) + (lo_part >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Philox4x32 block function (Random123's, and triton's ``philox_impl``) on uint32s held in int64.

    ``c0..c3`` are the counter words, ``k0, k1`` the key words (broadcastable tensors); returns the
    four output words.
    """
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint(seed: Tensor | int, offsets: Tensor) -> Tensor:
    """``tl.randint(seed, offsets)`` for int64 offsets: uint32 values returned in an int64 tensor.

    Args:
        seed: int64 tensor broadcastable to ``offsets`` (e.g. shape ``[1]``, on the same device) or a
            Python int; only its 64 bits matter.
        offsets: int64 counters, any shape.

    Returns:
        int64 tensor shaped like ``offsets`` with values in ``[0, 2**32)``.
    """
    offsets = offsets.to(torch.int64)
    if isinstance(seed, Tensor):
        seed = seed.to(device=offsets.device, dtype=torch.int64)
        k0 = seed & _MASK32
        k1 = (seed >> 32) & _MASK32
    else:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        k0 = torch.tensor(seed & _MASK32, dtype=torch.int64, device=offsets.device)
        k1 = torch.tensor(seed >> 32, dtype=torch.int64, device=offsets.device)
    zero = torch.zeros_like(offsets)
    c0, _, _, _ = philox4x32(offsets & _MASK32, (offsets >> 32) & _MASK32, zero, zero, k0, k1)
    return c0


def uint32_to_uniform(x: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit inputs: uint32 (held in int64) -> float32 in [0, 1)."""
    # As int32, negative values (top bit set) map to -x - 1 == ~x, i.e. x ^ 0xffffffff as uint32.
    folded = torch.where(x >= 2**31, x ^ _MASK32, x)
    # a Python scalar is rounded to float32 and multiplied in float32 (no host-to-device copy)
    return folded.to(torch.int32).to(torch.float32) * _UNIFORM_SCALE


def philox_uniform(seed: Tensor | int, offsets: Tensor) -> Tensor:
    """``tl.rand(seed, offsets)`` for int64 offsets: float32 uniforms in ``[0, 1)``, bit-identical to Triton."""
    return uint32_to_uniform(philox_randint(seed, offsets))
