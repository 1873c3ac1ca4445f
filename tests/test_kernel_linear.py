"""fused_linear: the skinny Triton kernel and the composed cuBLAS path against the torch twin.

Triton runs in the CPU interpreter by default (fp32 and fp16; bf16 on CUDA only). Cases cover
every prologue/epilogue combination (RMSNorm, bias, SiLU gating, residual), row counts from 1 to
past one M block of 16, K and N that are and are not multiples of the blocks, and explicit launch
plans so the masked (ragged) branches run even where the default plan would divide evenly.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from smcgen.kernels.fused_ops import HAS_TRITON
from smcgen.kernels.linear import (
    FP8,
    MAX_SKINNY_ROWS,
    fused_linear,
    fused_linear_composed,
    fused_linear_torch,
    fused_linear_triton,
    quantize_fp8,
    quantize_int8,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

EPS = 1e-6


def rand(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(device, dtype)


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def close(a, b, dtype):
    """Sum order (fp32) or the RMS scale applied after the dot plus one output rounding (half types)."""
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a.float(), b.float(), atol=8 * eps, rtol=8 * eps)


def operands(rows, n, k, dtype, device, *, bias, norm, residual, gated, seed=0):
    x = rand((rows, k), dtype, device, seed, scale=2.0)
    w = rand((n, k), dtype, device, seed + 1, scale=k**-0.5)
    b = rand((n,), dtype, device, seed + 2) if bias else None
    g = rand((k,), dtype, device, seed + 3).abs() + 0.5 if norm else None
    n_out = n // 2 if gated else n
    r = rand((rows, n_out), dtype, device, seed + 4) if residual else None
    return (
        x,
        w,
        {"bias": b, "norm_weight": g, "eps": EPS, "residual": r, "gated": gated},
    )


FLAGS = list(itertools.product([False, True], repeat=4))  # bias, norm, residual, gated


@needs_triton
@pytest.mark.parametrize("bias,norm,residual,gated", FLAGS)
def test_every_fusion_matches_the_twin(device, bias, norm, residual, gated):
    for dtype in dtypes(device):
        x, w, kw = operands(
            5,
            96,
            64,
            dtype,
            device,
            bias=bias,
            norm=norm,
            residual=residual,
            gated=gated,
        )
        b = kw.pop("bias")
        want = fused_linear_torch(x, w, b, **kw)
        got = fused_linear_triton(x, w, b, **kw)
        assert got.shape == want.shape == (5, 48 if gated else 96)
        close(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 40, 64])
@pytest.mark.parametrize(
    "n,k,plan",
    [
        (64, 128, None),  # even in both
        (80, 96, (None, 32, 64, 4, 2, 1, False)),  # ragged N and K blocks
        (48, 40, (None, 16, 32, 4, 3, 1, True)),  # K not a multiple of 16
        (80, 200, (None, 32, 32, 4, 2, 3, True)),  # split K with a ragged last split
        (48, 96, (None, 16, 32, 4, 2, 5, False)),  # more splits asked than K blocks: no empty split
    ],
)
def test_row_counts_and_ragged_blocks(device, rows, n, k, plan):
    dtype = torch.float32
    x, w, kw = operands(rows, n, k, dtype, device, bias=True, norm=True, residual=False, gated=True)
    b = kw.pop("bias")
    if plan is not None:
        block_m = max(8 if plan[-1] else 16, 1 << (rows - 1).bit_length())
        plan = (block_m, *plan[1:])
    close(
        fused_linear_triton(x, w, b, plan=plan, **kw),
        fused_linear_torch(x, w, b, **kw),
        dtype,
    )


@needs_triton
def test_split_k_counters_are_left_zeroed_for_reuse(device):
    """A caller-kept counter buffer is re-zeroed by each split-K call, so back-to-back calls agree."""
    x, w, kw = operands(3, 64, 128, torch.float32, device, bias=False, norm=True, residual=True, gated=True)
    kw.pop("bias")
    counters = torch.zeros(8, dtype=torch.int32, device=device)
    want = fused_linear_torch(x, w, **kw)
    for _ in range(3):
        close(
            fused_linear_triton(x, w, plan=(16, 16, 32, 4, 2, 4, False), counters=counters, **kw), want, torch.float32
        )
        assert int(counters.abs().sum()) == 0


@needs_triton
def test_leading_dims_and_dispatch(device):
    """[R, T, K] inputs keep their leading dims; the dispatcher takes the composed path past max_rows."""
    x = rand((3, 2, 64), torch.float32, device, 0)
    w = rand((32, 64), torch.float32, device, 1, scale=0.125)
    r = rand((3, 2, 32), torch.float32, device, 2)
    want = fused_linear_torch(x, w, residual=r)
    close(fused_linear(x, w, residual=r), want, torch.float32)
    close(fused_linear(x, w, residual=r, max_rows=4), want, torch.float32)
    close(fused_linear_triton(x, w, residual=r), want, torch.float32)


@pytest.mark.parametrize("bias,norm,residual,gated", FLAGS)
def test_composed_path_matches_the_twin(bias, norm, residual, gated):
    x, w, kw = operands(
        9,
        64,
        48,
        torch.float32,
        torch.device("cpu"),
        bias=bias,
        norm=norm,
        residual=residual,
        gated=gated,
    )
    b = kw.pop("bias")
    close(
        fused_linear_composed(x, w, b, **kw),
        fused_linear_torch(x, w, b, **kw),
        torch.float32,
    )


def test_twin_is_the_model_formula():
    """The twin is exactly norm -> F.linear -> silu(gate) * up -> + residual."""
    x, w, kw = operands(
        4,
        32,
        16,
        torch.float32,
        torch.device("cpu"),
        bias=True,
        norm=True,
        residual=True,
        gated=True,
    )
    h = x.float()
    xn = kw["norm_weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS))
    y = xn @ w.T + kw["bias"]
    want = torch.nn.functional.silu(y[:, :16]) * y[:, 16:] + kw["residual"]
    b = kw.pop("bias")
    torch.testing.assert_close(fused_linear_torch(x, w, b, **kw), want)


def test_bad_shapes_are_named():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="features"):
        fused_linear_torch(x, torch.zeros(4, 6))
    with pytest.raises(ValueError, match="bias"):
        fused_linear_torch(x, torch.zeros(4, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="even"):
        fused_linear_torch(x, torch.zeros(5, 8), gated=True)
    with pytest.raises(ValueError, match="residual"):
        fused_linear_torch(x, torch.zeros(4, 8), residual=torch.zeros(2, 4), gated=True)


@needs_triton
def test_too_many_rows_for_the_skinny_kernel():
    x = torch.zeros(MAX_SKINNY_ROWS + 1, 16)
    with pytest.raises(ValueError, match="at most"):
        fused_linear_triton(x, torch.zeros(16, 16))


@needs_triton
@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_default_plans_fit_shared_memory(elem_bytes, gated):
    """The pipelined tiles of every default plan fit an H100's 227 KiB of shared memory per block
    (fp32 plans once asked for 240 KiB and failed to launch there)."""
    from smcgen.kernels.linear import skinny_plan

    for rows, n_out, k in itertools.product((1, 8, 16, 17, 33, 64), (96, 2048, 14336), (64, 2048, 14336)):
        block_m, block_n, block_k, _, stages, _, _ = skinny_plan(rows, n_out, k, gated, torch.device("cpu"), elem_bytes)
        tile = (block_m + (2 if gated else 1) * block_n) * block_k * elem_bytes
        assert stages * tile <= 227 * 1024, (rows, n_out, k, block_m, block_n, block_k, stages)


@needs_triton
@pytest.mark.parametrize("bias,norm,gated", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("plan", [None, (16, 32, 32, 4, 2, 3, False), (8, 32, 32, 4, 2, 3, True)])
def test_accumulate_writes_into_the_residual(device, bias, norm, gated, plan):
    """accumulate=True: the same values as a fresh output, written into the residual in place (all three paths)."""
    x, w, kw = operands(5, 96, 64, torch.float32, device, bias=bias, norm=norm, residual=True, gated=gated)
    b = kw.pop("bias")
    want = fused_linear_torch(x, w, b, **kw)
    paths = {
        "twin": fused_linear_torch,
        "composed": fused_linear_composed,
        "triton": lambda *a, **k: fused_linear_triton(*a, plan=plan, **k),
    }
    for name, fn in paths.items():
        res = kw["residual"].clone()
        got = fn(x, w, b, **{**kw, "residual": res, "accumulate": True})
        assert got.data_ptr() == res.data_ptr(), f"{name}: the result must live in the residual"
        close(res, want, torch.float32)
    with pytest.raises(ValueError, match="accumulate"):
        fused_linear_torch(x, w, b, **{**kw, "residual": None, "accumulate": True})
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(want.shape[1], 5, device=device).t()
        fused_linear_composed(x, w, b, **{**kw, "residual": strided, "accumulate": True})


# ------------------------------------------------------------------------------ fp8 / int8 weights

QUANTIZERS = {"fp8": quantize_fp8, "int8": quantize_int8}


def test_quantize_fp8_round_trip():
    w = rand((64, 96), torch.float32, torch.device("cpu"), 7)
    w[3] = 0.0  # an all-zero row keeps a usable scale
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert scale[3] == 1.0 and bool((q[3].float() == 0).all())
    back = q.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each element, and each row's peak exact
    assert bool(((back - w).abs() <= w.abs() / 16 + 1e-12).all())
    assert torch.equal(back.abs().amax(1)[:3], w.abs().amax(1)[:3])


def test_quantize_int8_round_trip():
    w = rand((64, 96), torch.float32, torch.device("cpu"), 7)
    w[3] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert scale[3] == 1.0 and bool((q[3] == 0).all())
    assert int(q.abs().max()) == 127 and bool((q.abs().amax(1)[:3] == 127).all()), "each row's peak maps to 127"
    back = q.float() * scale[:, None]
    # round to nearest step: error <= half a step (the row's peak / 254), far below e4m3's
    step = w.abs().amax(1, keepdim=True) / 127
    assert bool(((back - w).abs() <= step / 2 + 1e-7).all())
    fp8_err = (quantize_fp8(w)[0].float() * quantize_fp8(w)[1][:, None] - w).pow(2).mean()
    assert float((back - w).pow(2).mean()) < float(fp8_err) / 10


@needs_triton
@pytest.mark.parametrize("fmt", list(QUANTIZERS))
@pytest.mark.parametrize("bias,norm,residual,gated", FLAGS)
# one pass / split K with the last program reducing / the same with the weight as the tall MMA operand
@pytest.mark.parametrize("plan", [None, (16, 32, 32, 4, 2, 3, False), (8, 32, 32, 4, 2, 3, True)])
def test_quantized_weights_match_the_twin(device, fmt, bias, norm, residual, gated, plan):
    """fp8 / int8 weights with per-row scales: the kernel (one-byte tiles converted before the dot,
    scales on the fp32 sums, also after a split-K reduction) equals the twin's fp32 product of the
    same quantized values."""
    for dtype in dtypes(device):
        x, w, kw = operands(5, 96, 80, dtype, device, bias=bias, norm=norm, residual=residual, gated=gated)
        q, scale = QUANTIZERS[fmt](w.float() * 3.0)  # scales away from 1
        b = kw.pop("bias")
        want = fused_linear_torch(x, q, b, weight_scale=scale, **kw)
        got = fused_linear_triton(x, q, b, weight_scale=scale, plan=plan, **kw)
        if dtype == torch.float32:
            close(got, want, dtype)
        else:  # roundings as in close(), on outputs ~3x larger (the scaled weights): relative to the peak
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(
                got.float(), want.float(), atol=8 * eps * want.float().abs().max().item(), rtol=8 * eps
            )
        # the twin is the dequantized layer
        ref = fused_linear_torch(
            x.float(),
            (q.float() * scale[:, None]),
            None if b is None else b.float(),
            **{
                **kw,
                "residual": None if kw["residual"] is None else kw["residual"].float(),
                "norm_weight": None if kw["norm_weight"] is None else kw["norm_weight"].float(),
            },
        )
        tol = 2e-5 if dtype == torch.float32 else 16 * torch.finfo(dtype).eps
        torch.testing.assert_close(want.float(), ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("fmt", list(QUANTIZERS))
def test_quantized_composed_path_and_dispatch(device, fmt):
    """The composed path dequantizes; the dispatcher sends fp8 / int8 to the skinny kernel past
    max_rows on CUDA (the twin's result either way), and a scale without such a weight is refused."""
    x, w, kw = operands(6, 64, 48, torch.float32, device, bias=False, norm=True, residual=True, gated=True)
    q, scale = QUANTIZERS[fmt](w)
    kw.pop("bias")
    want = fused_linear_torch(x, q, weight_scale=scale, **kw)
    close(fused_linear_composed(x, q, weight_scale=scale, **kw), want, torch.float32)
    close(fused_linear(x, q, weight_scale=scale, max_rows=0, **kw), want, torch.float32)
    with pytest.raises(ValueError, match="weight_scale"):
        fused_linear_torch(x, w, weight_scale=scale, **kw)
    with pytest.raises(ValueError, match="weight_scale"):
        fused_linear_torch(x, q, **kw)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        fused_linear_torch(x, q, weight_scale=scale[:-1], **kw)


@needs_triton
@pytest.mark.parametrize("fmt", list(QUANTIZERS))
@pytest.mark.parametrize("accumulate", [False, True])
def test_quantized_past_the_skinny_rows_runs_in_row_blocks(device, monkeypatch, accumulate, fmt):
    """More rows than the skinny kernel takes: quantized layers run it on row blocks (the twin's result)."""
    from smcgen.kernels import linear as linear_mod

    monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)  # the CUDA dispatch, in the interpreter
    monkeypatch.setattr(linear_mod, "MAX_SKINNY_ROWS", 16)
    x, w, kw = operands(37, 64, 48, torch.float32, device, bias=True, norm=True, residual=True, gated=True)
    q, scale = QUANTIZERS[fmt](w)
    b = kw.pop("bias")
    want = fused_linear_torch(x, q, b, weight_scale=scale, **kw)
    res = kw["residual"].clone()
    got = fused_linear(
        x.reshape(1, 37, -1),
        q,
        b,
        weight_scale=scale,
        **{**kw, "residual": res.reshape(1, 37, -1), "accumulate": accumulate},
    )
    assert got.shape == (1, 37, 32)
    close(got.reshape(37, 32), want, torch.float32)
    if accumulate:
        close(res, want, torch.float32)
