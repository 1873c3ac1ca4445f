"""The torch Philox twin reproduces triton's tl.rand / tl.randint bit for bit."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from smcgen.kernels.philox import (
    philox4x32,
    philox_randint,
    philox_uniform,
    uint32_to_uniform,
)


@triton.jit
def _rand_kernel(seed_ptr, offset_ptr, u_ptr, x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    counters = tl.load(offset_ptr) + i  # int64, like the smcgen kernels' counters
    seed = tl.load(seed_ptr)
    tl.store(u_ptr + i, tl.rand(seed, counters), mask=i < n)
    tl.store(x_ptr + i, tl.randint(seed, counters), mask=i < n)


@triton.jit
def _to_uniform_kernel(x_ptr, u_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n).to(tl.uint32, bitcast=True)
    tl.store(u_ptr + i, tl.uint_to_uniform_float(x), mask=i < n)


def _triton_rand(seed: int, base: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    off_t = torch.tensor([base], dtype=torch.int64, device=device)
    u = torch.empty(n, dtype=torch.float32, device=device)
    x = torch.empty(n, dtype=torch.int32, device=device)
    _rand_kernel[(triton.cdiv(n, 256),)](seed_t, off_t, u, x, n, BLOCK=256)
    return u, x


@pytest.mark.parametrize(
    "seed, base",
    [
        (0, 0),
        (1234, 5),
        (-7, 2**32 - 300),  # negative seed; counters cross into the high word
        (2**40 + 3, 2**33 + 17),  # seed with a high word
        (-(2**63), 2**62),
    ],
)
def test_uniforms_bit_identical_to_triton(device, seed, base):
    n = 1000
    u, x = _triton_rand(seed, base, n, device)
    counters = base + torch.arange(n, dtype=torch.int64, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    ref_u = philox_uniform(seed_t, counters)
    assert torch.equal(u.view(torch.int32), ref_u.view(torch.int32))
    assert torch.equal(x.to(torch.int64) & 0xFFFFFFFF, philox_randint(seed_t, counters))
    # a Python int seed is the same key
    assert torch.equal(philox_uniform(seed, counters), ref_u)


def test_uint_to_float_conversion_bit_identical(device):
    edges = [0, 1, 2, 2**23 - 1, 2**24 + 1, 2**25 + 3, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]
    rand = torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    x = torch.cat([torch.tensor(edges, dtype=torch.int64), rand]).to(device)
    u = torch.empty(x.numel(), dtype=torch.float32, device=device)
    x32 = torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)
    _to_uniform_kernel[(triton.cdiv(x.numel(), 512),)](x32, u, x.numel(), BLOCK=512)
    ref = uint32_to_uniform(x)
    assert torch.equal(u.view(torch.int32), ref.view(torch.int32))
    assert float(ref.min()) == 0.0 and float(ref.max()) < 1.0


def test_random123_known_answers():
    """Philox4x32-10 known-answer vectors of Random123 (counter words, key words -> output words)."""
    vectors = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for ctr, key, expected in vectors:
        words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in ctr + key))
        assert [int(w) for w in words] == expected


def test_uniform_sanity():
    u = philox_uniform(99, torch.arange(200_000, dtype=torch.int64))
    assert u.dtype == torch.float32
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    # mean and variance of U(0, 1) within ~5 standard errors
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / 200_000**0.5
    assert abs(float(u.var()) - 1 / 12) < 2e-3
    # different seeds give different streams
    assert not torch.equal(u[:100], philox_uniform(100, torch.arange(100, dtype=torch.int64)))
