"""qkv_rope_write_kv: the QKV projection with RoPE and the KV write in its epilogue, against its twin.

The twin is the native model's two-step path on the torch twins (projection, then
``rope_qk_write_kv_torch``). Triton runs in the CPU interpreter by default (fp32 and fp16; bf16 on
CUDA only). Cases: the input norm folded (row_norm) or not, Qwen3's q/k norms, a bias, fp8
weights, one token per row (a draft step) and several (a verify), a missing page, both operand
orders of the MMA.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from smcgen.kernels import linear
from smcgen.kernels._triton import HAS_TRITON
from smcgen.kernels.linear import quantize_fp8, quantize_int8
from smcgen.kernels.qkv_rope import (
    qkv_rope_write_kv,
    qkv_rope_write_kv_torch,
    qkv_rope_write_kv_triton,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

EPS = 1e-6
N_QH, N_KVH = 4, 2


def rand(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(device, dtype)


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def rope_tables(max_pos, dim, dtype, device, theta=500.0):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def pools(n_rows, dim, dtype, device, page=4, max_pages=16):
    """Empty K/V pools and a block table giving each row its own (shuffled) pages."""
    k_pool = torch.zeros(n_rows * max_pages, page, N_KVH, dim, dtype=dtype, device=device)
    perm = torch.randperm(n_rows * max_pages, generator=torch.Generator().manual_seed(0)).view(n_rows, max_pages)
    return k_pool, k_pool.clone(), perm.to(torch.int32).to(device)


def case(dtype, device, n_rows, n_new, dim, hidden, *, bias, norm, row_norm, qk_norm, seed=0):
    x = rand((n_rows, n_new, hidden), dtype, device, seed, scale=2.0)
    w = rand(((N_QH + 2 * N_KVH) * dim, hidden), dtype, device, seed + 1, scale=hidden**-0.5)
    kw = {
        "n_heads": N_QH,
        "n_kv_heads": N_KVH,
        "eps": EPS,
        "row_norm": row_norm,
        "bias": rand((w.shape[0],), dtype, device, seed + 2, 0.5) if bias else None,
        "norm_weight": rand((hidden,), dtype, device, seed + 3, 0.3) + 1 if norm else None,
    }
    if qk_norm:
        kw["q_norm"] = rand((dim,), dtype, device, seed + 4, 0.2) + 1
        kw["k_norm"] = rand((dim,), dtype, device, seed + 5, 0.2) + 1
    start = torch.tensor([0, 7, 13][:n_rows], dtype=torch.int32, device=device)
    return x, w, start, kw


def fp32_setup(device, n_rows, n_new, dim, hidden, *, norm, max_pages=16, max_pos=64):
    """An fp32 case without bias or q/k norms (input norm unfolded if ``norm``, else folded), its
    RoPE tables and empty pools: (x, w, start, kw, cos, sin, k_pool, v_pool, table)."""
    x, w, start, kw = case(
        torch.float32, device, n_rows, n_new, dim, hidden, bias=False, norm=norm, row_norm=not norm, qk_norm=False
    )
    cos, sin = rope_tables(max_pos, dim, torch.float32, device)
    return (x, w, start, kw, cos, sin, *pools(n_rows, dim, torch.float32, device, max_pages=max_pages))


def tol(dtype, scale=1.0):
    """fp32: sum order; half types: the projection's rounding (as in the skinny kernel's tests)
    carried through the norm and rotation: a few ulps of the outputs' magnitude."""
    if dtype == torch.float32:
        return {"atol": 3e-5 * scale, "rtol": 3e-5}
    eps = torch.finfo(dtype).eps
    return {"atol": 16 * eps * scale, "rtol": 16 * eps}


def run_both(x, w, start, kw, dim, dtype, device, weight_scale=None):
    cos, sin = rope_tables(64, dim, dtype, device)
    k_pool, v_pool, table = pools(x.shape[0], dim, dtype, device)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    q = qkv_rope_write_kv_triton(x, w, cos, sin, start, k_pool, v_pool, table, weight_scale=weight_scale, **kw)
    q_ref = qkv_rope_write_kv_torch(x, w, cos, sin, start, k_ref, v_ref, table, weight_scale=weight_scale, **kw)
    return (q, k_pool, v_pool), (q_ref, k_ref, v_ref)


def assert_same(got, want, dtype):
    scale = max(float(t.float().abs().max()) for t in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol(dtype, scale))


@needs_triton
@pytest.mark.parametrize("n_rows,n_new", [(3, 1), (2, 5)])
@pytest.mark.parametrize(
    "bias,norm,row_norm,qk_norm",
    [
        (False, False, True, False),  # Llama with the input norm folded (the native model's default)
        (False, True, False, False),  # the input norm unfolded
        (True, True, False, False),  # Qwen2: a QKV bias
        (False, False, True, True),  # Qwen3: per-head q/k norms
        (False, False, False, False),  # a bare projection
    ],
)
@pytest.mark.parametrize("swap", [True, False])
def test_matches_the_two_step_twin(device, monkeypatch, n_rows, n_new, bias, norm, row_norm, qk_norm, swap):
    monkeypatch.setattr(linear, "SWAP_AB", swap)
    for dtype, dim in itertools.product(dtypes(device), (64, 32)):
        x, w, start, kw = case(
            dtype, device, n_rows, n_new, dim, 96, bias=bias, norm=norm, row_norm=row_norm, qk_norm=qk_norm
        )
        got, want = run_both(x, w, start, kw, dim, dtype, device)
        assert got[0].shape == (n_rows, n_new, N_QH, dim) and got[0].dtype == dtype
        assert_same(got, want, dtype)
        written = int((got[1] != 0).any(-1).sum())
        assert written == n_rows * n_new * N_KVH, "exactly the new tokens' slots are written"


@needs_triton
@pytest.mark.parametrize("quantize", [quantize_fp8, quantize_int8])
def test_quantized_weights(device, quantize):
    """Weight-only fp8 / int8: the same as the twin on the same quantized weights and scales."""
    dim, hidden = 64, 80  # 80: K not a multiple of the K step (the ragged branch)
    x, w, start, kw = case(
        torch.float32, device, 3, 1, dim, hidden, bias=False, norm=False, row_norm=True, qk_norm=False
    )
    q8, scale = quantize(w * 3.0)
    got, want = run_both(x, q8, start, kw, dim, torch.float32, device, weight_scale=scale)
    assert_same(got, want, torch.float32)


@needs_triton
def test_positions_past_the_table_are_skipped(device):
    """Tokens whose positions run past a short block table are not written (as in the twin); q is
    still returned for them."""
    x, w, start, kw, cos, sin, k_pool, v_pool, table = fp32_setup(device, 2, 5, 64, 64, norm=False)
    table = table[:, :4].contiguous()  # 4 pages of 4 slots: row 2 starts at 13, its positions 16-17 fall off
    start = torch.tensor([0, 13], dtype=torch.int32, device=device)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    q = qkv_rope_write_kv_triton(x, w, cos, sin, start, k_pool, v_pool, table, **kw)
    q_ref = qkv_rope_write_kv_torch(x, w, cos, sin, start, k_ref, v_ref, table, **kw)
    assert_same((q, k_pool, v_pool), (q_ref, k_ref, v_ref), torch.float32)
    assert int((k_pool != 0).any(-1).sum()) == (5 + 3) * N_KVH


@needs_triton
def test_missing_page_is_skipped(device):
    """A row whose page is missing (-1: pool exhausted) writes nothing; the other rows still do."""
    x, w, start, kw, cos, sin, k_pool, v_pool, table = fp32_setup(device, 3, 1, 64, 64, norm=False)
    table[1] = -1
    q = qkv_rope_write_kv_triton(x, w, cos, sin, start, k_pool, v_pool, table, **kw)
    k_ref, v_ref = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    q_ref = qkv_rope_write_kv_torch(x[[0, 2]], w, cos, sin, start[[0, 2]], k_ref, v_ref, table[[0, 2]], **kw)
    torch.testing.assert_close(q[[0, 2]], q_ref, **tol(torch.float32))
    torch.testing.assert_close(k_pool, k_ref, **tol(torch.float32))
    torch.testing.assert_close(v_pool, v_ref, **tol(torch.float32))


@needs_triton
@pytest.mark.parametrize("dim,rows,fused", [(64, 2, True), (32, 2, False), (64, 65, False)])
def test_dispatch(device, monkeypatch, dim, rows, fused):
    """The dispatcher takes the fused kernel for 64-wide heads up to MAX_SKINNY_ROWS rows (forced onto
    the interpreter here), the two-step path otherwise; both equal the twin."""
    import smcgen.kernels.qkv_rope as mod

    monkeypatch.setattr(mod, "use_triton", lambda t: True)
    calls = []
    real = mod.qkv_rope_write_kv_triton
    monkeypatch.setattr(mod, "qkv_rope_write_kv_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, start, kw, cos, sin, k_pool, v_pool, table = fp32_setup(
        device, 1, rows, dim, 48, norm=True, max_pages=32, max_pos=128
    )
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    q = qkv_rope_write_kv(x, w, cos, sin, start, k_pool, v_pool, table, **kw)
    q_ref = qkv_rope_write_kv_torch(x, w, cos, sin, start, k_ref, v_ref, table, **kw)
    assert len(calls) == (1 if fused else 0)
    torch.testing.assert_close(q, q_ref, **tol(torch.float32))
    torch.testing.assert_close(k_pool, k_ref, **tol(torch.float32))
    torch.testing.assert_close(v_pool, v_ref, **tol(torch.float32))


def test_bad_input_is_named(device):
    dim = 32
    x, w, start, kw, cos, sin, k_pool, v_pool, table = fp32_setup(device, 2, 1, dim, 48, norm=True)
    args = (cos, sin, start, k_pool, v_pool, table)
    for fn in (qkv_rope_write_kv_torch, qkv_rope_write_kv_triton) if HAS_TRITON else (qkv_rope_write_kv_torch,):
        with pytest.raises(ValueError, match="norm_weight"):
            fn(x, w, *args, **{**kw, "row_norm": True})
        with pytest.raises(ValueError, match="rows"):
            fn(x, w[:-1], *args, **kw)
        with pytest.raises(ValueError, match="features"):
            fn(x[..., :-1], w, *args, **kw)
        with pytest.raises(ValueError, match="q_norm"):
            fn(x, w, *args, **kw, q_norm=torch.ones(dim))
        with pytest.raises(ValueError, match="kv heads"):
            fn(x, w, *args, **{**kw, "n_kv_heads": N_KVH + 1, "n_heads": N_QH - 2})
        with pytest.raises(ValueError, match="cos_table"):
            fn(x, w, cos[:, :-2], *args[1:], **kw)
        with pytest.raises(ValueError, match="bias"):
            fn(x, w, *args, **{**kw, "norm_weight": None, "row_norm": True, "bias": torch.zeros(w.shape[0])})
    if HAS_TRITON:
        with pytest.raises(ValueError, match="at most"):
            big = x.new_zeros(1, linear.MAX_SKINNY_ROWS + 1, x.shape[-1])
            qkv_rope_write_kv_triton(big, w, *args[:2], start[:1], k_pool, v_pool, table[:1], **kw)
        with pytest.raises(ValueError, match="unit stride"):
            wt = w.t().contiguous().t()
            qkv_rope_write_kv_triton(x, wt, *args, **kw)
        q8, _ = quantize_fp8(w)
        with pytest.raises(ValueError, match="weight_scale"):
            qkv_rope_write_kv_triton(x, q8, *args, **kw)
