"""Linear layers of the native decoder with their neighbours fused in, for skinny (decode) batches.

``fused_linear(x, weight, bias=None, *, norm_weight=None, eps=1e-6, residual=None, gated=False)``
computes, over the rows of ``x [..., K]`` and a ``weight [N, K]`` in nn.Linear layout::

    a = rms_norm(x) * norm_weight      if norm_weight is given   (RMSNorm prologue)
    y = a @ weight.T + bias
    y = silu(y[:, :N/2]) * y[:, N/2:]  if gated                  (SiLU-gated MLP: gate rows first)
    y = y + residual                   if residual is given      (residual add epilogue)

Why: a draft step of SMC-SD multiplies only N (one token per particle) rows by every weight, so
each GEMM is a pure weight stream; cuBLAS streams the small matrices of a 1B draft at ~2.2 of
~3 TB/s (notes/performance.md 3.3) and every neighbour op (norm, SiLU-mul, residual add, split-K
reduce) is one more short kernel per layer, paid K times per cycle. The Triton kernel here reads
each weight tile once for all rows (M <= ``MAX_SKINNY_ROWS``), with the norm, bias, gating and
residual folded into its prologue and epilogue: four kernels per layer for the linear work
instead of seven or more.

Three versions with one signature:

- ``fused_linear_torch``: the reference formulas (the native model's numerics: norm in fp32 cast
  back before the weight multiply, every op rounded to the dtype as transformers does);
- ``fused_linear_composed``: cuBLAS for the GEMM with the other fused kernels around it (the
  residual enters cuBLAS as ``addmm``'s C operand); for batches too wide for the skinny kernel;
- ``fused_linear_triton``: the skinny kernel. Its numerics differ from the twin only in rounding:
  the RMS scale is applied to the fp32 accumulator after the dot (the norm weight is folded into
  the input before it), so a single pass over K suffices; gating and the residual add reproduce the
  twin's roundings on the fp32 results.

``fused_linear`` dispatches: the skinny kernel on CUDA for ``rows <= max_rows``, the composed
path otherwise (whose ops fall back to their torch twins on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smcgen.kernels._triton import HAS_TRITON, sm_count, tl, triton, use_triton
from smcgen.kernels.fused_ops import (
    _rms_norm_torch,
    add_rms_norm,
    silu_mul,
    silu_mul_torch,
)

__all__ = [
    "MAX_SKINNY_ROWS",
    "fused_linear",
    "fused_linear_composed",
    "fused_linear_torch",
    "fused_linear_triton",
    "skinny_plan",
]

#: the most rows the skinny kernel takes (one program holds all rows' accumulators)
MAX_SKINNY_ROWS = 128


def _check(
    x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, gated: bool
) -> int:
    """Validate shapes; return the output width."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {k}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if gated and n % 2:
        raise ValueError(
            f"gated needs an even weight height (gate rows then up rows), got {n}"
        )
    n_out = n // 2 if gated else n
    if residual is not None and residual.shape != (*x.shape[:-1], n_out):
        raise ValueError(
            f"residual must have shape {(*x.shape[:-1], n_out)}, got {tuple(residual.shape)}"
        )
    return n_out


def fused_linear_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    gated: bool = False,
) -> Tensor:
    """Reference: ``[residual +] [silu_mul](rms_norm?(x) @ weight.T + bias)`` with the model's roundings."""
    _check(x, weight, bias, residual, gated)
    if norm_weight is not None:
        x = _rms_norm_torch(x, norm_weight, eps)
    y = F.linear(x, weight, bias)
    if gated:
        y = silu_mul_torch(y)
    return y if residual is None else y + residual


def fused_linear_composed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    gated: bool = False,
) -> Tensor:
    """cuBLAS GEMM between the fused elementwise kernels (Triton on CUDA, torch twins on the CPU)."""
    _check(x, weight, bias, residual, gated)
    if norm_weight is not None:
        x, _ = add_rms_norm(x, None, norm_weight, eps)
    if residual is not None and bias is None and not gated:
        # the residual as addmm's C operand: added in cuBLAS's epilogue, no separate add kernel
        lead = x.shape[:-1]
        out = torch.addmm(
            residual.reshape(-1, residual.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            weight.t(),
        )
        return out.reshape(*lead, weight.shape[0])
    y = F.linear(x, weight, bias)
    if gated:
        y = silu_mul(y)
    return y if residual is None else y + residual


def skinny_plan(
    rows: int, n_out: int, k: int, gated: bool, device: torch.device
) -> tuple[int, int, int, int, int]:
    """Launch plan ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of the skinny kernel.

    All rows sit in one M block. The column block shrinks until the grid covers the SMs about
    twice (a weight stream needs many loads in flight); the K block is as deep as registers allow
    for the row block.
    """
    block_m = max(16, triton.next_power_of_2(rows))
    # the interpreter (CPU) has no SMs to fill; plan as for an H100 so tests take the GPU's branches
    target = 2 * (sm_count(device) if device.type == "cuda" else 132)
    block_n = 64
    while block_n > 16 and triton.cdiv(n_out, block_n) < target:
        block_n //= 2
    block_k = 256 if block_m <= 32 else 128
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    num_stages = 3 if gated or block_m >= 64 else 4
    return block_m, block_n, block_k, 4, num_stages


def fused_linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    gated: bool = False,
    plan: tuple[int, int, int, int, int] | None = None,
) -> Tensor:
    """The skinny Triton kernel (rows <= ``MAX_SKINNY_ROWS``); ``plan`` overrides :func:`skinny_plan`."""
    n_out = _check(x, weight, bias, residual, gated)
    k = weight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows > MAX_SKINNY_ROWS:
        raise ValueError(
            f"the skinny kernel takes at most {MAX_SKINNY_ROWS} rows, got {rows}"
        )
    if weight.stride(-1) != 1:
        raise ValueError("weight must have unit stride along K")
    out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*lead, n_out)
    r2 = residual.reshape(rows, n_out).contiguous() if residual is not None else out
    block_m, block_n, block_k, warps, stages = plan or skinny_plan(
        rows, n_out, k, gated, x.device
    )
    grid = (triton.cdiv(n_out, block_n),)
    _skinny_linear_kernel[grid](
        x2,
        weight,
        bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        r2,
        out,
        rows,
        n_out,
        k,
        x2.stride(0),
        weight.stride(0),
        r2.stride(0),
        out.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        HAS_NORM=norm_weight is not None,
        HAS_RES=residual is not None,
        GATED=gated,
        EVEN_N=n_out % block_n == 0,
        EVEN_K=k % block_k == 0,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out.reshape(*lead, n_out)


def fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    gated: bool = False,
    max_rows: int = MAX_SKINNY_ROWS,
) -> Tensor:
    """Norm + linear + gating + residual: the skinny kernel for ``rows <= max_rows`` on CUDA, else composed."""
    rows = x.numel() // max(x.shape[-1], 1)
    kwargs = {
        "norm_weight": norm_weight,
        "eps": eps,
        "residual": residual,
        "gated": gated,
    }
    if use_triton(x) and rows <= min(max_rows, MAX_SKINNY_ROWS):
        return fused_linear_triton(x, weight, bias, **kwargs)
    return fused_linear_composed(x, weight, bias, **kwargs)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _skinny_linear_kernel(
        x,
        w,
        b,
        g,
        res,
        out,
        M,
        N,
        K,
        stride_x,
        stride_w,
        stride_r,
        stride_o,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        GATED: tl.constexpr,
        EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program: all M rows x BLOCK_N output columns, streaming its weight rows once over K.
        # N is the output width; when GATED the up rows sit N rows below the gate rows.
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_ptrs = x + offs_m[:, None] * stride_x + offs_k[None, :]
        w_ptrs = w + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                xk = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
            else:
                k_mask = (k0 + offs_k) < K
                xk = tl.load(
                    x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0
                )
            if HAS_NORM:
                xf = xk.to(tl.float32)
                sumsq += tl.sum(xf * xf, axis=1)
                if EVEN_K:
                    gk = tl.load(g + k0 + offs_k)
                else:
                    gk = tl.load(g + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0)
                xk = (xf * gk.to(tl.float32)[None, :]).to(w.dtype.element_ty)
            if EVEN_K and EVEN_N:
                wk = tl.load(w_ptrs + k0)
            elif EVEN_K:
                wk = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0)
            else:
                wk = tl.load(
                    w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0
                )
            if IEEE:
                acc = tl.dot(xk, tl.trans(wk), acc, input_precision="ieee")
            else:
                acc = tl.dot(xk, tl.trans(wk), acc)
            if GATED:
                up_ptrs = w_ptrs + N * stride_w + k0
                if EVEN_K and EVEN_N:
                    uk = tl.load(up_ptrs)
                elif EVEN_K:
                    uk = tl.load(up_ptrs, mask=n_mask[:, None], other=0.0)
                else:
                    uk = tl.load(
                        up_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0
                    )
                if IEEE:
                    acc_up = tl.dot(xk, tl.trans(uk), acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(xk, tl.trans(uk), acc_up)
        if HAS_NORM:
            rstd = 1.0 / tl.sqrt(sumsq / K + eps)
            acc = acc * rstd[:, None]
            acc_up = acc_up * rstd[:, None]
        if HAS_BIAS:
            acc += tl.load(b + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(b + N + offs_n, mask=n_mask, other=0.0).to(
                    tl.float32
                )[None, :]
        dt = out.dtype.element_ty
        y = acc.to(dt)
        if GATED:
            # the twin's roundings: gate and up rounded, silu(gate) rounded, product rounded
            gate = y.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dt)
            y = (silu.to(tl.float32) * acc_up.to(dt).to(tl.float32)).to(dt)
        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            r = tl.load(
                res + offs_m[:, None] * stride_r + offs_n[None, :], mask=mask, other=0.0
            )
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(out + offs_m[:, None] * stride_o + offs_n[None, :], y, mask=mask)
