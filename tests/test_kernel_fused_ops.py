"""Fused layer ops: rms_norm, rope_qk_write_kv, silu_mul -- Triton against the torch twins, twins against transformers' formulas.

Triton runs in the CPU interpreter by default (fp32 and fp16; bf16 only on CUDA, the interpreter
mishandles it). Shapes are ragged: hidden sizes that are not a multiple of the block (and the
two-pass path with a small ``max_block``), T = 1, 5, 9, head dims 64 and 128, GQA, strided q/k
views of a fused QKV output, rows at different start positions, and Qwen3's per-head q/k norm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smcgen.kernels.fused_ops import (
    rms_norm,
    rms_norm_torch,
    rms_norm_triton,
    rope_qk_torch,
    rope_qk_write_kv,
    rope_qk_write_kv_torch,
    rope_qk_write_kv_triton,
    silu_mul,
    silu_mul_torch,
    silu_mul_triton,
)

EPS = 1e-6


def dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def tol(dtype):
    """Element tolerance between Triton and the twin: fp32 sum order / rsqrt, else one ulp of the dtype."""
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    eps = torch.finfo(dtype).eps
    return {"atol": 2 * eps, "rtol": 2 * eps}


def rand(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(device, dtype)


def rope_tables(max_pos, dim, dtype, device, theta=10000.0):
    """Built like NativeCausalLM.rope_cos / rope_sin: [max_pos, D], fp32 math then the model dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


# --------------------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,max_block", [((3, 1, 96), 8192), ((2, 5, 200), 8192), ((7, 1000), 8192), ((2, 3, 300), 128)]
)
def test_rms_norm_triton_matches_twin(device, shape, max_block):
    n = shape[-1]
    for dtype in dtypes(device):
        x = rand(shape, dtype, device, 0)
        w = rand((n,), dtype, device, 2, scale=0.2) + 1
        normed = rms_norm_triton(x, w, EPS, max_block=max_block)
        assert normed.shape == shape and normed.dtype == dtype
        torch.testing.assert_close(normed, rms_norm_torch(x, w, EPS), **tol(dtype))


def test_rms_norm_strided_rows(device):
    """Last-token views (the final norm with last_only) have a row stride != hidden."""
    h = rand((3, 4, 72), torch.float32, device, 3)
    w = rand((72,), torch.float32, device, 5)
    torch.testing.assert_close(
        rms_norm_triton(h[:, -1], w, EPS), rms_norm_torch(h[:, -1], w, EPS), atol=1e-5, rtol=1e-5
    )


def reference_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm.forward, written out."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def reference_rope(x, cos, sin):
    """transformers' apply_rotary_pos_emb for one tensor (the rotate-half convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_twin_is_the_reference_formula(dtype):
    """Bit-equal to transformers' RMSNorm formula."""
    h = rand((2, 5, 64), dtype, "cpu", 6, 2.0)
    w = rand((64,), dtype, "cpu", 8)
    assert torch.equal(rms_norm(h, w, EPS), reference_rms_norm(h, w, EPS))  # CPU: the dispatcher takes the twin


# --------------------------------------------------------------------------------------------------
# rope_qk
# --------------------------------------------------------------------------------------------------


def qkv_views(n_rows, n_q, n_qh, n_kvh, dim, dtype, device, seed):
    """q, k as strided views of one fused QKV output, the way model.py splits it."""
    qkv = rand((n_rows, n_q, (n_qh + 2 * n_kvh) * dim), dtype, device, seed)
    q, k, _ = qkv.split((n_qh * dim, n_kvh * dim, n_kvh * dim), dim=-1)
    return q.reshape(n_rows, n_q, n_qh, dim), k.reshape(n_rows, n_q, n_kvh, dim)


def paged_pools(n_rows, n_kvh, dim, dtype, device, page=4, max_pages=16):
    """Empty K/V pools and a block table giving each row its own pages (page ids shuffled)."""
    n_pages = n_rows * max_pages
    k_pool = torch.zeros(n_pages, page, n_kvh, dim, dtype=dtype, device=device)
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(0)).view(n_rows, max_pages)
    return k_pool, k_pool.clone(), perm.to(torch.int32).to(device)


@pytest.mark.parametrize(
    "n_q,n_qh,n_kvh,dim",
    [(1, 4, 1, 64), (5, 8, 2, 128), (9, 14, 2, 64), (5, 3, 3, 128), (1, 8, 8, 32), (9, 3, 3, 32)],
)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_qk_write_kv_matches_rope_then_write(device, n_q, n_qh, n_kvh, dim, qk_norm):
    """The fused op returns rope_qk's q and leaves the pools exactly as write_kv of rope_qk's k and v."""
    start = torch.tensor([0, 7, 40], dtype=torch.int32, device=device)
    for dtype in dtypes(device):
        cos, sin = rope_tables(64, dim, dtype, device, theta=500.0)
        qkv = rand((3, n_q, (n_qh + 2 * n_kvh) * dim), dtype, device, dim + n_q)
        q, k, v = qkv.split((n_qh * dim, n_kvh * dim, n_kvh * dim), dim=-1)
        q, k, v = (t.reshape(3, n_q, -1, dim) for t in (q, k, v))
        qn = kn = None
        if qk_norm:
            qn, kn = rand((dim,), dtype, device, 1, 0.2) + 1, rand((dim,), dtype, device, 2, 0.2) + 1
        k_pool, v_pool, table = paged_pools(3, n_kvh, dim, dtype, device)
        k_ref_pool, v_ref_pool = k_pool.clone(), v_pool.clone()
        q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
        q_out = rope_qk_write_kv_triton(q, k, v, cos, sin, start, k_pool, v_pool, table, qn, kn, EPS)
        q_ref = rope_qk_write_kv_torch(q, k, v, cos, sin, start, k_ref_pool, v_ref_pool, table, qn, kn, EPS)
        assert torch.equal(q, q_in) and torch.equal(k, k_in) and torch.equal(v, v_in), "inputs must be left untouched"
        assert q_out.shape == q.shape and q_out.dtype == dtype and q_out.is_contiguous()
        torch.testing.assert_close(q_out, q_ref, **tol(dtype))
        torch.testing.assert_close(k_pool, k_ref_pool, **tol(dtype))
        assert torch.equal(v_pool, v_ref_pool)
        if not qk_norm and dtype != torch.float32 and device.type == "cpu":
            # without the norm every step is one rounding of exact products: bit-equal to the twin
            # (the interpreter rounds op by op; compiled code may fuse a multiply-add, so on a GPU
            # the tolerance above is the contract)
            assert torch.equal(q_out, q_ref) and torch.equal(k_pool, k_ref_pool)
        assert int((k_pool != 0).any(-1).sum()) == 3 * n_q * n_kvh, "exactly the new tokens' slots are written"
        disp = rope_qk_write_kv(q, k, v, cos, sin, start, k_pool.clone(), v_pool.clone(), table, qn, kn, EPS)
        torch.testing.assert_close(disp, q_ref, **tol(dtype))


@pytest.mark.parametrize("hidden", [48, 5000])  # 5000: more than one BLOCK_X chunk of the row
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_with_the_folded_input_norm(device, hidden, qk_norm):
    """``rms_of``: projecting the raw input with W * g and scaling q, k, v by its inverse RMS in RoPE
    equals RMSNorm(x, g) before the projection (fp32), and the Triton kernel equals its twin."""
    n_rows, n_q, n_qh, n_kvh, dim = 3, 5, 4, 2, 32
    start = torch.tensor([0, 7, 40], dtype=torch.int32, device=device)
    x = rand((n_rows, n_q, hidden), torch.float32, device, 5, scale=3.0)
    g = rand((hidden,), torch.float32, device, 6, 0.3) + 1
    w = rand(((n_qh + 2 * n_kvh) * dim, hidden), torch.float32, device, 7, scale=hidden**-0.5)
    qn = kn = None
    if qk_norm:
        qn, kn = rand((dim,), torch.float32, device, 1, 0.2) + 1, rand((dim,), torch.float32, device, 2, 0.2) + 1

    def heads(qkv):
        q, k, v = qkv.split((n_qh * dim, n_kvh * dim, n_kvh * dim), dim=-1)
        return (t.reshape(n_rows, n_q, -1, dim) for t in (q, k, v))

    cos, sin = rope_tables(64, dim, torch.float32, device, theta=500.0)
    pools = {name: paged_pools(n_rows, n_kvh, dim, torch.float32, device) for name in ("norm", "twin", "triton")}
    q_norm_first = rope_qk_write_kv_torch(
        *heads(rms_norm_torch(x, g, EPS) @ w.T), cos, sin, start, *pools["norm"], qn, kn, EPS
    )
    folded = heads(x @ (w * g).T)
    q_twin = rope_qk_write_kv_torch(*folded, cos, sin, start, *pools["twin"], qn, kn, EPS, rms_of=x)
    torch.testing.assert_close(q_twin, q_norm_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pools["twin"][0], pools["norm"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pools["twin"][1], pools["norm"][1], rtol=1e-5, atol=1e-5)
    q_tri = rope_qk_write_kv_triton(*heads(x @ (w * g).T), cos, sin, start, *pools["triton"], qn, kn, EPS, rms_of=x)
    torch.testing.assert_close(q_tri, q_twin, **tol(torch.float32))
    torch.testing.assert_close(pools["triton"][0], pools["twin"][0], **tol(torch.float32))
    torch.testing.assert_close(pools["triton"][1], pools["twin"][1], **tol(torch.float32))
    # fp32 activations into a half-precision cache: v is scaled in its own dtype, rounded once on the store
    k_t, v_t, table = paged_pools(n_rows, n_kvh, dim, torch.float16, device)
    k_r, v_r = k_t.clone(), v_t.clone()
    rope_qk_write_kv_triton(*heads(x @ (w * g).T), cos, sin, start, k_t, v_t, table, qn, kn, EPS, rms_of=x)
    rope_qk_write_kv_torch(*heads(x @ (w * g).T), cos, sin, start, k_r, v_r, table, qn, kn, EPS, rms_of=x)
    torch.testing.assert_close(k_t, k_r, **tol(torch.float16))
    torch.testing.assert_close(v_t, v_r, rtol=0, atol=0)
    for dtype in dtypes(device)[1:]:  # the half types: the twin's roundings
        xh, qkv = x.to(dtype), (x @ (w * g).T).to(dtype)
        k_t, v_t, table = paged_pools(n_rows, n_kvh, dim, dtype, device)
        k_r, v_r = k_t.clone(), v_t.clone()
        qh = None if qn is None else (qn.to(dtype), kn.to(dtype))
        args = (cos.to(dtype), sin.to(dtype), start)
        out = rope_qk_write_kv_triton(*heads(qkv), *args, k_t, v_t, table, *(qh or (None, None)), EPS, rms_of=xh)
        ref = rope_qk_write_kv_torch(*heads(qkv), *args, k_r, v_r, table, *(qh or (None, None)), EPS, rms_of=xh)
        torch.testing.assert_close(out, ref, **tol(dtype))
        torch.testing.assert_close(k_t, k_r, **tol(dtype))
        torch.testing.assert_close(v_t, v_r, **tol(dtype))


def test_rope_qk_write_kv_skips_missing_pages(device):
    """A row whose page is missing (-1: pool exhausted) writes nothing; the other rows still write."""
    dim, n_kvh = 32, 2
    cos, sin = rope_tables(64, dim, torch.float32, device)
    q = rand((2, 1, 4, dim), torch.float32, device, 0)
    k = rand((2, 1, n_kvh, dim), torch.float32, device, 1)
    v = rand((2, 1, n_kvh, dim), torch.float32, device, 2)
    k_pool, v_pool, table = paged_pools(2, n_kvh, dim, torch.float32, device)
    table[1, :] = -1
    start = torch.tensor([5, 5], dtype=torch.int32, device=device)
    rope_qk_write_kv_triton(q, k, v, cos, sin, start, k_pool, v_pool, table)
    written = (k_pool != 0).any(-1).any(-1).nonzero()
    assert written.shape[0] == 1 and int(written[0, 0]) == int(table[0, 5 // 4])
    assert int((v_pool != 0).any(-1).any(-1).sum()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_qk_twin_is_the_reference_formula(dtype, qk_norm):
    """Bit-equal to transformers' per-layer code: gather cos/sin by position, optional q/k RMSNorm, rotate half."""
    n_rows, n_q, n_qh, n_kvh, dim = 2, 5, 8, 2, 64
    start = torch.tensor([3, 11], dtype=torch.int32)
    cos_t, sin_t = rope_tables(32, dim, dtype, "cpu")
    q, k = qkv_views(n_rows, n_q, n_qh, n_kvh, dim, dtype, "cpu", seed=9)
    qn, kn = (rand((dim,), dtype, "cpu", 3), rand((dim,), dtype, "cpu", 4)) if qk_norm else (None, None)
    q_out, k_out = rope_qk_torch(q, k, cos_t, sin_t, start, qn, kn, EPS)
    positions = start.long()[:, None] + torch.arange(n_q)
    cos, sin = cos_t[positions].unsqueeze(2), sin_t[positions].unsqueeze(2)
    if qk_norm:
        q, k = reference_rms_norm(q, qn, EPS), reference_rms_norm(k, kn, EPS)
    assert torch.equal(q_out, reference_rope(q, cos, sin)) and torch.equal(k_out, reference_rope(k, cos, sin))


# --------------------------------------------------------------------------------------------------
# silu_mul
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,block", [((3, 1, 2 * 96), 1024), ((2, 5, 2 * 300), 128), ((4, 2 * 1000), 1024)])
def test_silu_mul_triton_matches_twin(device, shape, block):
    for dtype in dtypes(device):
        gate_up = rand(shape, dtype, device, 10, scale=3.0)
        out = silu_mul_triton(gate_up, block=block)
        ref = silu_mul_torch(gate_up)
        assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
        torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_twin_is_old_formula(dtype):
    gate_up = rand((2, 5, 2 * 48), dtype, "cpu", 11, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_mul(gate_up), F.silu(gate) * up)


# --------------------------------------------------------------------------------------------------
# in the model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True])
def test_model_forward_triton_matches_twins(device, monkeypatch, qk_norm):
    """A prefill + last_only verify step of a tiny native model: fused Triton ops vs the torch twins."""
    from smcgen.kernels import fused_ops
    from smcgen.runners.native.model import NativeCausalLM, NativeConfig

    cfg = NativeConfig(
        model_type="qwen3" if qk_norm else "llama",
        vocab_size=40,
        hidden_size=96,
        intermediate_size=120,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        head_dim=32,
        rms_norm_eps=EPS,
        max_positions=64,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        qk_norm=qk_norm,
        rope_theta=10000.0,
        rope=(("rope_type", "default"),),
        initializer_range=0.2,
    )
    from smcgen.kernels import linear

    # The two runs differ only in the fused_ops kernels; the linear layers take the same path in
    # both (on the CPU the composed one; on a GPU the skinny kernel, forced on because these tiny
    # layers would not fill a quarter of the SMs). tests/test_native_model.py compares the skinny
    # path itself with transformers.
    monkeypatch.setattr(linear, "_fills_the_gpu", lambda *a: True)
    native = NativeCausalLM.from_config(cfg, dtype=torch.float32, device=device, seed=1)
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    outs = []
    for use_triton in (False, True):
        monkeypatch.setattr(fused_ops, "use_triton", lambda t, use=use_triton: use)
        cache = native.make_cache(n_pages=8, n_rows=2, max_pages=4, page_size=4)
        cache.reserve(5)
        prefill = native(tokens[:, :5], torch.zeros(2, dtype=torch.int32, device=device), cache)
        cache.reserve(7)
        step = native(tokens[:, 5:], torch.full((2,), 5, dtype=torch.int32, device=device), cache, last_only=True)
        outs.append((prefill, step))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=1e-4)
