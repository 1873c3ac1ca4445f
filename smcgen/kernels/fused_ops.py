"""Fused elementwise ops of the native decoder layer: RMSNorm, RoPE on q/k with the KV write, SiLU-gated MLP.

Each op has a torch twin (``<op>_torch``, the reference formulas of the native model), a Triton
version (``<op>_triton``) and a dispatcher (``<op>``: Triton on CUDA tensors when triton imports,
the twin otherwise). All are CUDA-graph safe: static shapes, positions read on the device, no syncs.

Numerics (shared by both versions; they follow transformers' Llama/Qwen modules):

- ``rms_norm(x, weight, eps) -> normed``: ``weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)`` with
  ``h = x`` in fp32. Only the order of the sum of squares differs between the versions. (The
  residual adds live in the linear layers' epilogues: kernels.linear.)
- ``rope_qk_write_kv(q, k, v, cos_table, sin_table, start_pos, k_pool_l, v_pool_l, block_table,
  q_norm=None, k_norm=None, eps=1e-6) -> q``: RoPE on q and k, then k and v stored in their page
  slots (as ``attention.write_kv_torch``); returns the rotated q as a NEW contiguous tensor (inputs
  untouched; they may be strided views of the fused QKV output). Token t of row r sits at position ``start_pos[r] + t`` (< len(table), not checked); the
  rotate-half rotation ``x * cos + rotate_half(x) * sin`` is done with the model dtype's
  roundings (each product rounded, then the sum), so bf16 results are bit-equal to the twin up to
  the table gather. With ``q_norm``/``k_norm`` (Qwen3) each head is first RMSNormed over D
  exactly like ``rms_norm`` (fp32, cast, weight multiply). With ``rms_of`` [R, T, H] (the layer
  input whose RMSNorm weight the model folded into its QKV weights) q, k and v are first scaled
  by that row's ``rsqrt(mean(rms_of^2) + eps)`` in fp32 and rounded to their dtype: the norm's
  scale applied after the projection, so the layer needs no separate norm kernel.
- ``silu_mul(gate_up) -> out``: ``gate_up [..., 2I]`` (gate first), ``out = silu(gate) * up`` with
  silu rounded to the input dtype before the multiply, as ``F.silu(gate) * up`` does.

Triton launch plans: rms_norm runs one program per row holding the whole row in registers
(hidden <= 8192, up to 16 warps), or two passes over BLOCK-wide chunks beyond that. rope_qk_write_kv
runs one program per token, rotating all its q and k heads as [heads, D] tiles (cos/sin loaded once).
silu_mul runs a (row, chunk of I) grid.

Why one long module: the Triton kernels, their torch twin and the dispatcher of one op stay
together, so each kernel is read beside the reference its tests compare it with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smcgen.kernels._triton import (
    HAS_TRITON,
    pdl_begin,
    pdl_enabled,
    tl,
    triton,
    use_triton,
)
from smcgen.kernels.attention import write_kv_torch

__all__ = [
    "HAS_TRITON",
    "rms_norm",
    "rms_norm_torch",
    "rms_norm_triton",
    "rope_qk_torch",
    "rope_qk_write_kv",
    "rope_qk_write_kv_torch",
    "rope_qk_write_kv_triton",
    "silu_mul",
    "silu_mul_torch",
    "silu_mul_triton",
]


# widest row rms_norm keeps in registers in one block (Llama-3 70B's hidden size is 8192)
_MAX_NORM_BLOCK = 8192
_SILU_BLOCK = 1024


def _rows(t: Tensor) -> Tensor:
    """``t`` as a 2-d [rows, last] view with unit stride along the last dim (a copy only if needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


# --------------------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------------------


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim in fp32, cast back before the weight multiply (as transformers does)."""
    f = x.float()
    f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    return weight * f.to(x.dtype)


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, *, max_block: int = _MAX_NORM_BLOCK) -> Tensor:
    """Triton version of :func:`rms_norm_torch`: one program per row, one read and one write.

    ``max_block`` (keyword, for tests) is the widest row kept in registers in one block; wider
    rows take two passes over chunks of ``max_block``.
    """
    n = x.shape[-1]
    assert weight.shape == (n,)
    x2 = _rows(x)
    weight = weight.contiguous()
    n_rows = x2.shape[0]
    out = torch.empty((n_rows, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    single = block <= max_block
    block = min(block, max_block)
    if n_rows > 0:
        pdl = pdl_enabled(x)
        _rms_norm_kernel[(n_rows,)](
            x2,
            weight,
            out,
            n,
            x2.stride(0),
            out.stride(0),
            eps,
            BLOCK=block,
            SINGLE=single,
            PDL=pdl,
            num_warps=min(max(block // 512, 1), 16),
            launch_pdl=pdl,
        )
    return out.reshape(x.shape)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim (Triton on CUDA, torch otherwise)."""
    fn = rms_norm_triton if use_triton(x) else rms_norm_torch
    return fn(x, weight, eps)


# --------------------------------------------------------------------------------------------------
# rope_qk
# --------------------------------------------------------------------------------------------------


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_qk_torch(
    q: Tensor,
    k: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Rotate q [R, T, Hq, D] and k [R, T, Hkv, D] by the table rows of positions start_pos[r] + t.

    With ``q_norm``/``k_norm`` [D], each head is RMSNormed over D first (Qwen3). Returns new tensors.
    """
    positions = start_pos.long()[:, None] + torch.arange(q.shape[1], device=q.device)
    cos = cos_table[positions].unsqueeze(2)  # [R, T, 1, D]
    sin = sin_table[positions].unsqueeze(2)
    if q_norm is not None:
        q = rms_norm_torch(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm_torch(k, k_norm, eps)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_qk_write_kv_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    eps: float = 1e-6,
    rms_of: Tensor | None = None,
) -> Tensor:
    """``rope_qk_torch`` then ``write_kv_torch`` of the rotated k and of v; returns the rotated q.

    With ``rms_of`` q, k and v are first scaled by its rows' inverse RMS (module doc).
    """
    if rms_of is not None:
        inv = torch.rsqrt(rms_of.float().pow(2).mean(-1) + eps)[:, :, None, None]
        q, k, v = ((t.float() * inv).to(t.dtype) for t in (q, k, v))
    q, k = rope_qk_torch(q, k, cos_table, sin_table, start_pos, q_norm, k_norm, eps)
    write_kv_torch(k, v, k_pool_l, v_pool_l, block_table, start_pos)
    return q


def rope_qk_write_kv_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    eps: float = 1e-6,
    rms_of: Tensor | None = None,
) -> Tensor:
    """Triton version of :func:`rope_qk_write_kv_torch`: one program per (row, token) rotates all
    its q and k heads as [heads, D] tiles (cos/sin loaded once) and stores k and v in their page
    slot; the rotated k never exists outside the cache. A missing page (pool exhausted) is
    skipped, never written. ``q``/``k``/``v`` may be strided views of the fused QKV output (unit
    stride along D); ``start_pos`` must be a contiguous [R] integer tensor."""
    n_rows, n_q, n_qh, dim = q.shape
    n_kvh = k.shape[2]
    assert k.shape == (n_rows, n_q, n_kvh, dim) and dim % 2 == 0 and cos_table.shape[-1] == dim
    assert (q_norm is None) == (k_norm is None), "q_norm and k_norm go together"
    assert start_pos.is_contiguous() and start_pos.shape == (n_rows,)
    # v keeps its dtype (the twin's roundings); the store converts it to the cache's
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos_table = cos_table if cos_table.stride(-1) == 1 else cos_table.contiguous()
    sin_table = sin_table if sin_table.stride(-1) == 1 else sin_table.contiguous()
    assert cos_table.stride(0) == sin_table.stride(0)
    assert k_pool_l.shape == v_pool_l.shape and k_pool_l.stride() == v_pool_l.stride() and k_pool_l.stride(-1) == 1
    assert k_pool_l.shape[2:] == (n_kvh, dim) and block_table.is_contiguous() and v.shape == k.shape
    has_norm = q_norm is not None
    if has_norm:
        q_norm, k_norm = q_norm.contiguous(), k_norm.contiguous()
    else:
        q_norm = k_norm = cos_table  # unused
    row_norm = rms_of is not None
    if row_norm:
        assert rms_of.shape[:2] == (n_rows, n_q)
        xs = _rows(rms_of)
    else:
        xs = cos_table  # unused
    dtype = q.dtype if not has_norm else torch.promote_types(q.dtype, q_norm.dtype)
    q_out = torch.empty(q.shape, dtype=torch.promote_types(dtype, cos_table.dtype), device=q.device)
    pdl = pdl_enabled(q)
    if n_rows * n_q > 0:
        block_d = triton.next_power_of_2(dim)
        block_hq = triton.next_power_of_2(n_qh)
        _rope_qk_kernel[(n_rows * n_q,)](
            q,
            k,
            v,
            q_out,
            k_pool_l,
            v_pool_l,
            block_table,
            cos_table,
            sin_table,
            start_pos,
            q_norm,
            k_norm,
            xs,
            n_q,
            n_qh,
            n_kvh,
            xs.shape[-1],
            xs.stride(0),
            eps,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *q_out.stride()[:3],
            *k_pool_l.stride()[:3],
            block_table.shape[1],
            cos_table.stride(0),
            D=dim,
            BLOCK_D=block_d,
            BLOCK_HQ=block_hq,
            BLOCK_HK=triton.next_power_of_2(n_kvh),
            HAS_NORM=has_norm,
            ROW_NORM=row_norm,
            BLOCK_X=min(triton.next_power_of_2(xs.shape[-1]), 4096),
            PAGE=k_pool_l.shape[1],
            PDL=pdl,
            num_warps=4 if block_hq * block_d <= 2048 else 8,
            launch_pdl=pdl,
        )
    return q_out


def rope_qk_write_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    eps: float = 1e-6,
    rms_of: Tensor | None = None,
) -> Tensor:
    """RoPE on q and k, k and v stored in the paged cache -> rotated q (Triton on CUDA, torch otherwise)."""
    fn = rope_qk_write_kv_triton if use_triton(q) else rope_qk_write_kv_torch
    return fn(q, k, v, cos_table, sin_table, start_pos, k_pool_l, v_pool_l, block_table, q_norm, k_norm, eps, rms_of)


# --------------------------------------------------------------------------------------------------
# silu_mul
# --------------------------------------------------------------------------------------------------


def silu_mul_torch(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``gate_up [..., 2I]`` (gate first) -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul_triton(gate_up: Tensor, *, block: int = _SILU_BLOCK) -> Tensor:
    """Triton version of :func:`silu_mul_torch`: a (row, chunk) grid, one read and one write."""
    two_i = gate_up.shape[-1]
    assert two_i % 2 == 0
    inter = two_i // 2
    g2 = _rows(gate_up)
    n_rows = g2.shape[0]
    out = torch.empty((n_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(block, triton.next_power_of_2(max(inter, 1)))
    if n_rows > 0 and inter > 0:
        pdl = pdl_enabled(g2)
        _silu_mul_kernel[(n_rows, triton.cdiv(inter, block))](
            g2, out, inter, g2.stride(0), out.stride(0), BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl
        )
    return out.reshape(*gate_up.shape[:-1], inter)


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` over the two halves of the last dim (Triton on CUDA, torch otherwise)."""
    fn = silu_mul_triton if use_triton(gate_up) else silu_mul_torch
    return fn(gate_up)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x, w, out, N, stride_x, stride_o, eps, BLOCK: tl.constexpr, SINGLE: tl.constexpr, PDL: tl.constexpr
    ):
        pdl_begin(PDL)
        row = tl.program_id(0).to(tl.int64)
        x_row = x + row * stride_x
        o_row = out + row * stride_o
        cols = tl.arange(0, BLOCK)
        if SINGLE:
            m = cols < N
            v = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
            inv = tl.rsqrt(tl.sum(v * v, axis=0) / N + eps)
            y = (v * inv).to(x.dtype.element_ty).to(tl.float32)
            y = y * tl.load(w + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(o_row + cols, y.to(out.dtype.element_ty), mask=m)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, N, BLOCK):
                c = off + cols
                v = tl.load(x_row + c, mask=c < N, other=0.0).to(tl.float32)
                acc += v * v
            inv = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
            for off in range(0, N, BLOCK):
                c = off + cols
                m = c < N
                v = tl.load(x_row + c, mask=m, other=0.0).to(tl.float32)
                y = (v * inv).to(x.dtype.element_ty).to(tl.float32)
                y = y * tl.load(w + c, mask=m, other=0.0).to(tl.float32)
                tl.store(o_row + c, y.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_heads(
        src,
        s_h,
        dst,
        d_h,
        n_heads,
        nw,
        c,
        s,
        d,
        d_rot,
        d_mask,
        eps,
        ok,
        rstd,
        D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_NORM: tl.constexpr,
        ROW_NORM: tl.constexpr,
    ):
        """Rotate the [n_heads, D] heads of one token at ``src`` into ``dst`` (see the module doc);
        nothing is stored unless ``ok``."""
        h = tl.arange(0, BLOCK_H)[:, None]
        m = (h < n_heads) & d_mask[None, :]
        x = tl.load(src + h * s_h + d[None, :], mask=m, other=0.0).to(tl.float32)
        # rotate_half reads the other half of the same head: a second (cached) gather load
        xr = tl.load(src + h * s_h + d_rot[None, :], mask=m, other=0.0).to(tl.float32)
        if ROW_NORM:
            x = (x * rstd).to(src.dtype.element_ty).to(tl.float32)
            xr = (xr * rstd).to(src.dtype.element_ty).to(tl.float32)
        if HAS_NORM:
            inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
            w = tl.load(nw + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            wr = tl.load(nw + d_rot, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            x = ((x * inv).to(src.dtype.element_ty).to(tl.float32) * w).to(dst.dtype.element_ty).to(tl.float32)
            xr = ((xr * inv).to(src.dtype.element_ty).to(tl.float32) * wr).to(dst.dtype.element_ty).to(tl.float32)
        rot = tl.where(d[None, :] < D // 2, -xr, xr)
        # the model dtype's roundings: each product, then the sum (as torch computes x*cos + rot*sin)
        a = (x * c[None, :]).to(dst.dtype.element_ty).to(tl.float32)
        b = (rot * s[None, :]).to(dst.dtype.element_ty).to(tl.float32)
        tl.store(dst + h * d_h + d[None, :], (a + b).to(dst.dtype.element_ty), mask=m & ok)

    @triton.jit
    def _rope_qk_kernel(
        q,
        k,
        v,
        q_out,
        k_pool,
        v_pool,
        bt,
        cos,
        sin,
        start_pos,
        q_norm,
        k_norm,
        xs,
        n_q,
        n_qh,
        n_kvh,
        n_x,
        s_x,
        eps,
        sq_r,
        sq_t,
        sq_h,
        sk_r,
        sk_t,
        sk_h,
        sv_r,
        sv_t,
        sv_h,
        soq_r,
        soq_t,
        soq_h,
        s_pp,
        s_ps,
        s_ph,
        max_pages,
        s_pos,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        HAS_NORM: tl.constexpr,
        ROW_NORM: tl.constexpr,
        BLOCK_X: tl.constexpr,
        PAGE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_begin(PDL)
        pid = tl.program_id(0)
        r = (pid // n_q).to(tl.int64)
        t = (pid % n_q).to(tl.int64)
        rstd = 1.0
        if ROW_NORM:
            # the inverse RMS of this token's layer input (its norm weight is in the QKV weights)
            cols = tl.arange(0, BLOCK_X)
            acc = tl.zeros([BLOCK_X], dtype=tl.float32)
            for off in range(0, n_x, BLOCK_X):
                xv = tl.load(xs + pid.to(tl.int64) * s_x + off + cols, mask=off + cols < n_x, other=0.0).to(tl.float32)
                acc += xv * xv
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_x + eps)
        pos = tl.load(start_pos + r).to(tl.int64) + t
        d = tl.arange(0, BLOCK_D)
        d_mask = d < D
        d_rot = tl.where(d < D // 2, d + D // 2, d - D // 2)
        c = tl.load(cos + pos * s_pos + d, mask=d_mask, other=0.0).to(tl.float32)
        s = tl.load(sin + pos * s_pos + d, mask=d_mask, other=0.0).to(tl.float32)
        _rope_heads(
            q + r * sq_r + t * sq_t,
            sq_h,
            q_out + r * soq_r + t * soq_t,
            soq_h,
            n_qh,
            q_norm,
            c,
            s,
            d,
            d_rot,
            d_mask,
            eps,
            pos >= 0,
            rstd,
            D,
            BLOCK_HQ,
            HAS_NORM,
            ROW_NORM,
        )
        # the token's slot in its page; a missing page (pool exhausted) is skipped, never written
        col = pos // PAGE
        page = tl.load(bt + r * max_pages + col, mask=col < max_pages, other=-1).to(tl.int64)
        ok = page >= 0
        slot = page * s_pp + (pos % PAGE) * s_ps
        _rope_heads(
            k + r * sk_r + t * sk_t,
            sk_h,
            k_pool + slot,
            s_ph,
            n_kvh,
            k_norm,
            c,
            s,
            d,
            d_rot,
            d_mask,
            eps,
            ok,
            rstd,
            D,
            BLOCK_HK,
            HAS_NORM,
            ROW_NORM,
        )
        h = tl.arange(0, BLOCK_HK)[:, None]
        m = (h < n_kvh) & d_mask[None, :] & ok
        x = tl.load(v + r * sv_r + t * sv_t + h * sv_h + d[None, :], mask=m)
        if ROW_NORM:
            x = (x.to(tl.float32) * rstd).to(v.dtype.element_ty)
        tl.store(v_pool + slot + h * s_ph + d[None, :], x.to(v_pool.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(gate_up, out, n_inter, stride_g, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_begin(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_inter
        g = tl.load(gate_up + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gate_up + row * stride_g + n_inter + cols, mask=m, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32)  # F.silu rounds here
        tl.store(out + row * stride_o + cols, (act * u).to(out.dtype.element_ty), mask=m)
