"""The QKV projection with RoPE and the KV-cache write in its epilogue, for decode batches.

``qkv_rope_write_kv(x, weight, cos_table, sin_table, start_pos, k_pool_l, v_pool_l, block_table,
n_heads=..., n_kv_heads=..., ...)`` returns the rotated q [R, T, n_heads, D] and stores the rotated
k and v in the paged cache, exactly what the native model's two-step path computes::

    qkv = fused_linear(x, weight, bias, norm_weight=norm_weight, weight_scale=weight_scale)
    q, k, v = qkv.split(...)                                       # heads of D columns each
    q = rope_qk_write_kv(q, k, v, ..., q_norm, k_norm, rms_of=x if row_norm else None)

``row_norm``: the input norm's weight is folded into ``weight`` and the row's inverse RMS is
applied to the projection's output (``NativeCausalLM.fold_input_norms``); ``norm_weight``: an
unfolded input norm. Qwen3's per-head ``q_norm``/``k_norm`` and a QKV bias are supported.

Why: RoPE + KV write is one more short kernel per layer (~3 us on the H100, 128 of them per N=8
K=8 cycle with a 16-layer draft). Here the skinny kernel's program that projects one head also
rotates and stores it. A program must hold a whole head, so this runs where a head is one 64-wide
column tile, the skinny kernel's tile (head_dim 64, e.g. Llama-3.2-1B): wider tiles halve the
programs and stream slower (H100 sweep, BENCHMARKS.md).

Two versions with one signature: ``qkv_rope_write_kv_torch`` (the two-step path on the torch
twins) and ``qkv_rope_write_kv_triton``; ``qkv_rope_write_kv`` dispatches (Triton on CUDA up to
``MAX_SKINNY_ROWS`` rows with a 64-wide head, the two-step path otherwise).

Why one long module: the Triton kernels, their torch twin and the dispatcher of one op stay
together, so each kernel is read beside the reference its tests compare it with.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from smcgen.kernels import linear
from smcgen.kernels._triton import (
    HAS_TRITON,
    pdl_enabled,
    pdl_release,
    pdl_wait,
    tl,
    triton,
    use_triton,
)
from smcgen.kernels.fused_ops import rope_qk_write_kv, rope_qk_write_kv_torch
from smcgen.kernels.linear import fused_linear, fused_linear_torch, skinny_plan

__all__ = ["FUSED_HEAD_DIM", "check_launch", "qkv_rope_write_kv", "qkv_rope_write_kv_torch", "qkv_rope_write_kv_triton"]

#: the head width the Triton version takes: one program's column tile (the skinny kernel's 64)
FUSED_HEAD_DIM = 64


def _split_heads(qkv: Tensor, n_heads: int, n_kv_heads: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    r, t = qkv.shape[:2]
    q, k, v = qkv.split((n_heads * dim, n_kv_heads * dim, n_kv_heads * dim), dim=-1)
    return q.reshape(r, t, n_heads, dim), k.reshape(r, t, n_kv_heads, dim), v.reshape(r, t, n_kv_heads, dim)


def _check(
    x: Tensor,
    weight: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    cos_table: Tensor,
    n_heads: int,
    n_kv_heads: int,
    bias,
    norm_weight,
    row_norm,
    q_norm,
    k_norm,
    weight_scale,
) -> int:
    """Validate (errors name the parameter); return the head width D."""
    if x.dim() != 3:
        raise ValueError(f"x must be [rows, tokens, hidden], got {tuple(x.shape)}")
    linear._check(x, weight, bias, None, False, False, weight_scale)  # features, bias and scale shapes
    if k_pool_l.dim() != 4 or k_pool_l.shape != v_pool_l.shape:
        raise ValueError("k_pool_l and v_pool_l must both be [pages, page size, n_kv_heads, head dim]")
    dim = k_pool_l.shape[-1]
    if k_pool_l.shape[2] != n_kv_heads:
        raise ValueError(f"the pools hold {k_pool_l.shape[2]} kv heads, n_kv_heads is {n_kv_heads}")
    if weight.shape[0] != (n_heads + 2 * n_kv_heads) * dim:
        raise ValueError(f"weight has {weight.shape[0]} rows, expected (n_heads + 2 * n_kv_heads) * {dim}")
    if cos_table.shape[-1] != dim:
        raise ValueError(f"cos_table rows have {cos_table.shape[-1]} entries, the head dim is {dim}")
    if norm_weight is not None and row_norm:
        raise ValueError("give norm_weight (unfolded input norm) or row_norm (folded), not both")
    if row_norm and bias is not None:
        raise ValueError("row_norm (a folded input norm) would scale the bias too: unfold it and pass norm_weight")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    if q_norm is not None and (q_norm.shape != (dim,) or k_norm.shape != (dim,)):
        raise ValueError(f"q_norm and k_norm must have shape ({dim},)")
    return dim


def check_launch(
    n_rows: int,
    start_pos: Tensor,
    block_table: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
) -> None:
    """The layouts a Triton launch that writes the K/V pages needs (errors name the parameter);
    ``kernels.decode_layer`` checks the same."""
    if start_pos.shape != (n_rows,) or not start_pos.is_contiguous():
        raise ValueError(f"start_pos must be a contiguous [{n_rows}] tensor")
    if block_table.dim() != 2 or block_table.shape[0] != n_rows or not block_table.is_contiguous():
        raise ValueError(f"block_table must be a contiguous [{n_rows}, max pages] tensor")
    if k_pool_l.stride() != v_pool_l.stride() or k_pool_l.stride(-1) != 1:
        raise ValueError("k_pool_l and v_pool_l must share strides, unit along the head dim")
    if cos_table.shape != sin_table.shape or cos_table.stride() != sin_table.stride() or cos_table.stride(-1) != 1:
        raise ValueError("cos_table and sin_table must have one shape and strides, unit along the head dim")


def _two_step(
    project,
    rope,
    x,
    weight,
    cos_table,
    sin_table,
    start_pos,
    k_pool_l,
    v_pool_l,
    block_table,
    dim,
    n_heads,
    n_kv_heads,
    bias,
    norm_weight,
    row_norm,
    q_norm,
    k_norm,
    eps,
    weight_scale,
) -> Tensor:
    """The projection ``project`` (a fused_linear version), then ``rope`` (a rope_qk_write_kv version)."""
    qkv = project(x, weight, bias, norm_weight=norm_weight, eps=eps, weight_scale=weight_scale)
    q, k, v = _split_heads(qkv, n_heads, n_kv_heads, dim)
    return rope(
        q,
        k,
        v,
        cos_table,
        sin_table,
        start_pos,
        k_pool_l,
        v_pool_l,
        block_table,
        q_norm,
        k_norm,
        eps,
        x if row_norm else None,
    )


def qkv_rope_write_kv_torch(
    x: Tensor,
    weight: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    row_norm: bool = False,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    eps: float = 1e-6,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """Reference: the projection (``fused_linear_torch``), then ``rope_qk_write_kv_torch``."""
    dim = _check(
        x,
        weight,
        k_pool_l,
        v_pool_l,
        cos_table,
        n_heads,
        n_kv_heads,
        bias,
        norm_weight,
        row_norm,
        q_norm,
        k_norm,
        weight_scale,
    )
    return _two_step(
        fused_linear_torch,
        rope_qk_write_kv_torch,
        x,
        weight,
        cos_table,
        sin_table,
        start_pos,
        k_pool_l,
        v_pool_l,
        block_table,
        dim,
        n_heads,
        n_kv_heads,
        bias,
        norm_weight,
        row_norm,
        q_norm,
        k_norm,
        eps,
        weight_scale,
    )


def qkv_rope_write_kv_triton(
    x: Tensor,
    weight: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    row_norm: bool = False,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    eps: float = 1e-6,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """One launch: one program per head projects all rows onto it, rotates q and k heads and
    stores k and v in their page slots (a missing page is skipped, never written)."""
    dim = _check(
        x,
        weight,
        k_pool_l,
        v_pool_l,
        cos_table,
        n_heads,
        n_kv_heads,
        bias,
        norm_weight,
        row_norm,
        q_norm,
        k_norm,
        weight_scale,
    )
    n_rows, n_new, hidden = x.shape
    rows = n_rows * n_new
    if rows > linear.MAX_SKINNY_ROWS:
        raise ValueError(f"the fused QKV + RoPE kernel takes at most {linear.MAX_SKINNY_ROWS} rows, got {rows}")
    if dim != triton.next_power_of_2(dim) or dim < 16:
        raise ValueError(f"the fused QKV + RoPE kernel needs a power-of-two head width >= 16, got {dim}")
    if weight.stride(-1) != 1:
        raise ValueError("weight must have unit stride along K")
    check_launch(n_rows, start_pos, block_table, k_pool_l, v_pool_l, cos_table, sin_table)
    if bias is not None:
        bias = bias.contiguous()
    if q_norm is not None:
        q_norm, k_norm = q_norm.contiguous(), k_norm.contiguous()
    x2 = x.reshape(rows, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    has_qk_norm = q_norm is not None
    q_dtype = torch.promote_types(x.dtype, q_norm.dtype) if has_qk_norm else x.dtype
    q_out = torch.empty(
        (n_rows, n_new, n_heads, dim), dtype=torch.promote_types(q_dtype, cos_table.dtype), device=x.device
    )
    if rows == 0:
        return q_out
    # the skinny kernel's plan for this projection, less its split-K: a program must hold whole heads
    # (a one-byte QKV, planned split four ways there, keeps the plan's 128-deep K step)
    block_m, _, block_k, warps, stages, _, swap = skinny_plan(
        rows, weight.shape[0], hidden, False, x.device, x.element_size(), weight_scale is not None
    )
    block_k = min(block_k, max(16, triton.next_power_of_2(hidden)))
    pdl = pdl_enabled(x)
    _qkv_rope_kernel[(n_heads + 2 * n_kv_heads,)](
        x2,
        weight,
        weight_scale if weight_scale is not None else x2,
        bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        cos_table,
        sin_table,
        start_pos,
        block_table,
        q_out,
        k_pool_l,
        v_pool_l,
        q_norm if has_qk_norm else cos_table,
        k_norm if has_qk_norm else cos_table,
        rows,
        hidden,
        n_new,
        n_heads,
        n_kv_heads,
        x2.stride(0),
        weight.stride(0),
        cos_table.stride(0),
        q_out.stride(2),
        *k_pool_l.stride()[:3],
        block_table.shape[1],
        eps,
        HAS_BIAS=bias is not None,
        HAS_SCALE=weight_scale is not None,
        HAS_NORM=norm_weight is not None,
        ROW_NORM=row_norm,
        QK_NORM=has_qk_norm,
        EVEN_K=hidden % block_k == 0,
        IEEE=x.dtype == torch.float32,
        SWAP=bool(swap),
        BLOCK_M=block_m,
        D=dim,
        BLOCK_K=block_k,
        PAGE=k_pool_l.shape[1],
        PDL=pdl,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=pdl,
    )
    return q_out


def qkv_rope_write_kv(
    x: Tensor,
    weight: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    row_norm: bool = False,
    q_norm: Tensor | None = None,
    k_norm: Tensor | None = None,
    eps: float = 1e-6,
    weight_scale: Tensor | None = None,
    max_rows: int = linear.MAX_SKINNY_ROWS,
    counters: Tensor | None = None,
    fused: bool = True,
) -> Tensor:
    """The fused kernel on CUDA for ``rows <= max_rows`` (at most ``MAX_SKINNY_ROWS``) and 64-wide
    heads when ``fused``; otherwise the two-step path: ``fused_linear`` (with ``max_rows`` and
    ``counters``, see there) then ``rope_qk_write_kv``."""
    dim = _check(
        x,
        weight,
        k_pool_l,
        v_pool_l,
        cos_table,
        n_heads,
        n_kv_heads,
        bias,
        norm_weight,
        row_norm,
        q_norm,
        k_norm,
        weight_scale,
    )
    args = (x, weight, cos_table, sin_table, start_pos, k_pool_l, v_pool_l, block_table)
    rows = x.shape[0] * x.shape[1]
    if fused and use_triton(x) and rows <= min(max_rows, linear.MAX_SKINNY_ROWS) and dim == FUSED_HEAD_DIM:
        return qkv_rope_write_kv_triton(
            *args,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            bias=bias,
            norm_weight=norm_weight,
            row_norm=row_norm,
            q_norm=q_norm,
            k_norm=k_norm,
            eps=eps,
            weight_scale=weight_scale,
        )
    project = functools.partial(fused_linear, max_rows=max_rows, counters=counters)
    return _two_step(
        project,
        rope_qk_write_kv,
        *args,
        dim,
        n_heads,
        n_kv_heads,
        bias,
        norm_weight,
        row_norm,
        q_norm,
        k_norm,
        eps,
        weight_scale,
    )


if HAS_TRITON:
    from smcgen.kernels.linear import _stream_weights

    @triton.jit
    def _rotate(y, c, s, nw, eps, D: tl.constexpr, QK_NORM: tl.constexpr, SRC: tl.constexpr, DST: tl.constexpr):
        """RoPE of the [rows, D] heads ``y`` (fp32 values of dtype SRC) with the rows' cos/sin, after
        the per-head RMSNorm of weight ``nw`` when QK_NORM; the roundings of ``_rope_heads``."""
        if QK_NORM:
            inv = tl.rsqrt(tl.sum(y * y, axis=1) / D + eps)[:, None]
            w = tl.load(nw + tl.arange(0, D)).to(tl.float32)[None, :]
            y = ((y * inv).to(SRC).to(tl.float32) * w).to(DST).to(tl.float32)
        # rotate_half: [-second half, first half] of each head, by a split of the column axis
        lo, hi = tl.split(tl.permute(tl.reshape(y, (y.shape[0], 2, D // 2)), (0, 2, 1)))
        rot = tl.reshape(tl.permute(tl.join(-hi, lo), (0, 2, 1)), (y.shape[0], D))
        a = (y * c).to(DST).to(tl.float32)
        b = (rot * s).to(DST).to(tl.float32)
        return (a + b).to(DST)

    @triton.jit
    def qkv_rope_head(
        head,
        x,
        w,
        w_scale,
        b,
        g,
        cos,
        sin,
        start_pos,
        bt,
        q_out,
        k_pool,
        v_pool,
        q_norm,
        k_norm,
        M,
        K,
        T,
        n_qh,
        n_kvh,
        stride_x,
        stride_w,
        s_pos,
        s_oq,
        s_pp,
        s_ps,
        s_ph,
        max_pages,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        ROW_NORM: tl.constexpr,
        QK_NORM: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        SWAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        D: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PAGE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Head ``head`` of the fused [q heads | k heads | v heads] output for all M = R * T rows: one
        program of ``_qkv_rope_kernel``; ``kernels.decode_layer`` runs the same work items."""
        offs_m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        offs_n = head * D + d
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        x_ptrs = x + offs_m[:, None] * stride_x + offs_k[None, :]
        w_ptrs = w + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
        pdl_wait(PDL)
        acc, _, sumsq = _stream_weights(
            x_ptrs, w_ptrs, 0, g, offs_k, m_mask, offs_n >= 0, 0, K,
            HAS_NORM, ROW_NORM, False, True, EVEN_K, IEEE, SWAP, BLOCK_M, D, BLOCK_K,
        )  # fmt: skip
        pdl_release(PDL)
        # the projection's output as the two-step path rounds it (fused_linear's kernel epilogue)
        if HAS_SCALE:
            acc = acc * tl.load(w_scale + offs_n)[None, :]
        if HAS_NORM:
            acc = acc * (1.0 / tl.sqrt(sumsq / K + eps))[:, None]
        if HAS_BIAS:
            acc += tl.load(b + offs_n).to(tl.float32)[None, :]
        src = x.dtype.element_ty
        y = acc.to(src).to(tl.float32)
        if ROW_NORM:  # the folded input norm's 1/RMS, rounded as rope_qk_write_kv applies it
            y = (y * tl.rsqrt(sumsq / K + eps)[:, None]).to(src).to(tl.float32)
        r = (offs_m // T).to(tl.int64)
        pos = tl.load(start_pos + r, mask=m_mask, other=0).to(tl.int64) + offs_m % T
        col = pos // PAGE
        page = tl.load(bt + r * max_pages + col, mask=m_mask & (col < max_pages), other=-1).to(tl.int64)
        ok = (m_mask & (page >= 0))[:, None]
        slot = (page * s_pp + (pos % PAGE) * s_ps)[:, None] + d[None, :]
        if head >= n_qh + n_kvh:  # a v head: stored as projected
            tl.store(v_pool + slot + (head - n_qh - n_kvh) * s_ph, y.to(v_pool.dtype.element_ty), mask=ok)
        else:
            c = tl.load(cos + pos[:, None] * s_pos + d[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
            s = tl.load(sin + pos[:, None] * s_pos + d[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
            if head < n_qh:
                out = _rotate(y, c, s, q_norm, eps, D, QK_NORM, src, q_out.dtype.element_ty)
                tl.store(
                    q_out + (offs_m.to(tl.int64) * n_qh + head)[:, None] * s_oq + d[None, :], out, mask=m_mask[:, None]
                )
            else:
                out = _rotate(y, c, s, k_norm, eps, D, QK_NORM, src, k_pool.dtype.element_ty)
                tl.store(k_pool + slot + (head - n_qh) * s_ph, out, mask=ok)

    @triton.jit
    def _qkv_rope_kernel(
        x,
        w,
        w_scale,
        b,
        g,
        cos,
        sin,
        start_pos,
        bt,
        q_out,
        k_pool,
        v_pool,
        q_norm,
        k_norm,
        M,
        K,
        T,
        n_qh,
        n_kvh,
        stride_x,
        stride_w,
        s_pos,
        s_oq,
        s_pp,
        s_ps,
        s_ph,
        max_pages,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        ROW_NORM: tl.constexpr,
        QK_NORM: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        SWAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        D: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PAGE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # one program per head
        qkv_rope_head(
            tl.program_id(0),
            x,
            w,
            w_scale,
            b,
            g,
            cos,
            sin,
            start_pos,
            bt,
            q_out,
            k_pool,
            v_pool,
            q_norm,
            k_norm,
            M,
            K,
            T,
            n_qh,
            n_kvh,
            stride_x,
            stride_w,
            s_pos,
            s_oq,
            s_pp,
            s_ps,
            s_ph,
            max_pages,
            eps,
            HAS_BIAS,
            HAS_SCALE,
            HAS_NORM,
            ROW_NORM,
            QK_NORM,
            EVEN_K,
            IEEE,
            SWAP,
            BLOCK_M,
            D,
            BLOCK_K,
            PAGE,
            PDL,
        )
