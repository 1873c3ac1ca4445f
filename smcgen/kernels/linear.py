"""Linear layers of the native decoder with their neighbours fused in, for skinny (decode) batches.

``fused_linear(x, weight, bias=None, *, norm_weight=None, eps=1e-6, residual=None, gated=False,
accumulate=False)`` computes, over the rows of ``x [..., K]`` and a ``weight [N, K]`` in nn.Linear
layout::

    a = rms_norm(x) * norm_weight      if norm_weight is given   (RMSNorm prologue)
    y = a @ weight.T + bias
    y = silu(y[:, :N/2]) * y[:, N/2:]  if gated                  (SiLU-gated MLP: gate rows first)
    y = y + residual                   if residual is given      (residual add epilogue)

and with ``accumulate`` writes y into ``residual`` in place instead of a new tensor. A weight in
``torch.float8_e4m3fn`` or ``torch.int8`` comes with ``weight_scale`` [N] (fp32, one per weight
row): the GEMM then uses W = weight * weight_scale[:, None] (weight-only quantization, see
``quantize_fp8`` / ``quantize_int8``), applied to the fp32 accumulator, so the weight streams at
one byte per element. int8 keeps 7 bits of each row's range where e4m3 keeps 3 mantissa bits: on
SmolLM2 the int8 copy of a draft moved its next-token distributions ~7x less (KL) than fp8.

Why: a draft step of SMC-SD multiplies only N (one token per particle) rows by every weight, so
each GEMM is a pure weight stream; cuBLAS streams the small matrices of a 1B draft at ~2.2 of
~3 TB/s (BENCHMARKS.md, native engine history) and every neighbour op (norm, SiLU-mul, residual add, split-K
reduce) is one more short kernel per layer, paid K times per cycle. The Triton kernel here reads
each weight tile once for all rows (M <= ``MAX_SKINNY_ROWS``), with the norm, bias, gating and
residual folded into its prologue and epilogue, and multiplies weight tile x rows (the weight
rows as the MMA's tall operand, ``SWAP_AB``). On the H100 (BENCHMARKS.md, fifth measurement) it
beats cuBLAS plus the separate kernels on every linear layer of Llama-8B / 1B shapes at 1-16 rows
(the LM head at 3.0 TB/s), so the native model runs every decode-sized layer in it.

Three versions with one signature:

- ``fused_linear_torch``: the reference formulas (the native model's numerics: norm in fp32 cast
  back before the weight multiply, every op rounded to the dtype as transformers does);
- ``fused_linear_composed``: cuBLAS for the GEMM with the other fused kernels around it (the
  residual enters cuBLAS as ``addmm``'s C operand); for batches too wide for the skinny kernel;
- ``fused_linear_triton``: the skinny kernel. Its numerics differ from the twin only in rounding:
  the RMS scale is applied to the fp32 accumulator after the dot (the norm weight is folded into
  the input before it), so a single pass over K suffices; gating and the residual add reproduce the
  twin's roundings on the fp32 results.

``fused_linear`` dispatches: the skinny kernel on CUDA for ``rows <= max_rows`` when its grid
has at least ``MIN_GRID_FRACTION`` of the SMs' count of programs (0 by default), the composed path
otherwise (whose ops fall back to their torch twins on the CPU).

Why one long module: the Triton kernels, their torch twin and the dispatcher of one op stay
together, so each kernel is read beside the reference its tests compare it with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smcgen.kernels._triton import (
    HAS_TRITON,
    pdl_enabled,
    pdl_release,
    pdl_wait,
    sm_count,
    tl,
    triton,
    use_triton,
)
from smcgen.kernels.fused_ops import rms_norm, rms_norm_torch, silu_mul, silu_mul_torch

__all__ = [
    "FP8",
    "INT8",
    "MAX_SKINNY_ROWS",
    "QUANTIZED_DTYPES",
    "fused_linear",
    "fused_linear_composed",
    "fused_linear_torch",
    "fused_linear_triton",
    "quantize_fp8",
    "quantize_int8",
    "skinny_plan",
    "skinny_split",
]

#: the most rows the skinny kernel takes (one program holds all rows' accumulators). It ran at
#: half cuBLAS's speed on 72-row batches (128-row tiles, H100 sweep in BENCHMARKS.md)
MAX_SKINNY_ROWS = 64
#: the weight dtype of weight-only fp8 layers (``quantize_fp8``)
FP8 = torch.float8_e4m3fn
#: the weight dtype of weight-only int8 layers (``quantize_int8``)
INT8 = torch.int8
#: one-byte weight dtypes the kernels take with a per-row ``weight_scale``
QUANTIZED_DTYPES = (FP8, INT8)
_INT8_MAX = 127.0
#: the skinny kernel multiplies weight tile x rows (the weight tile as the MMA's tall operand)
#: instead of rows x weight tile: half the MMA instructions for <= 8 rows, and on the H100 8-15%
#: faster per forward of the 8B at 1 row and the 1B at 8 (BENCHMARKS.md, fifth measurement)
SWAP_AB = True
_FP8_MAX = 448.0  # largest finite e4m3fn value


@torch.no_grad()
def quantize_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(fp8 weight, fp32 scale [N]) with ``weight ~ q.float() * scale[:, None]``, one scale per row.

    Each row's largest magnitude maps to e4m3's largest finite value; all-zero rows get scale 1.
    Weight-only: activations stay in the model's dtype, and the kernels convert each fp8 tile to it
    before the dot (exact, e4m3 is a subset of bf16 and fp16).
    """
    w = weight.float()
    scale = w.abs().amax(dim=1) / _FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w / scale[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(FP8)
    return q, scale


@torch.no_grad()
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight, fp32 scale [N]) with ``weight ~ q.float() * scale[:, None]``, one scale per row.

    Symmetric: each row's largest magnitude maps to 127, values round to the nearest step; all-zero
    rows get scale 1. The kernels convert each int8 tile to the activations' dtype before the dot
    (exact: every integer up to 127 is a bf16 / fp16 value).
    """
    w = weight.float()
    scale = w.abs().amax(dim=1) / _INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(INT8)
    return q, scale


def _dequantized(x: Tensor, weight: Tensor, weight_scale: Tensor | None) -> Tensor:
    """``weight`` in x's dtype, scaled back when it is quantized (the reference and composed paths)."""
    if weight_scale is None:
        return weight
    return (weight.float() * weight_scale.float()[:, None]).to(x.dtype)


def _check(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    gated: bool,
    accumulate: bool = False,
    weight_scale: Tensor | None = None,
) -> int:
    """Validate shapes; return the output width."""
    if (weight.dtype in QUANTIZED_DTYPES) != (weight_scale is not None):
        raise ValueError(
            "weight_scale must be given exactly when the weight is float8_e4m3fn or int8 (see quantize_fp8, quantize_int8)"
        )
    if weight_scale is not None and weight_scale.shape != (weight.shape[0],):
        raise ValueError(f"weight_scale must have shape ({weight.shape[0]},), got {tuple(weight_scale.shape)}")
    if accumulate and (residual is None or not residual.is_contiguous()):
        raise ValueError("accumulate=True writes the result into residual, which must be given and contiguous")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {k}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if gated and n % 2:
        raise ValueError(f"gated needs an even weight height (gate rows then up rows), got {n}")
    n_out = n // 2 if gated else n
    if residual is not None and residual.shape != (*x.shape[:-1], n_out):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], n_out)}, got {tuple(residual.shape)}")
    return n_out


def _add_residual(y: Tensor, residual: Tensor | None, accumulate: bool) -> Tensor:
    """``y + residual`` (rounded once, as the model adds), into ``residual`` itself when accumulating."""
    if residual is None:
        return y
    return residual.copy_(y + residual) if accumulate else y + residual


def fused_linear_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    gated: bool = False,
    accumulate: bool = False,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """Reference: ``[residual +] [silu_mul](rms_norm?(x) @ weight.T + bias)`` with the model's roundings.

    ``accumulate``: the result is written into ``residual`` (in place) and returned. An fp8 / int8
    ``weight`` with ``weight_scale``: the product in fp32, scaled per weight row, plus the bias,
    rounded once to x's dtype (what the kernel computes).
    """
    _check(x, weight, bias, residual, gated, accumulate, weight_scale)
    if norm_weight is not None:
        x = rms_norm_torch(x, norm_weight, eps)
    if weight_scale is not None:
        y = F.linear(x.float(), weight.float()) * weight_scale.float()
        y = (y + bias.float() if bias is not None else y).to(x.dtype)
    else:
        y = F.linear(x, weight, bias)
    if gated:
        y = silu_mul_torch(y)
    return _add_residual(y, residual, accumulate)


def fused_linear_composed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    gated: bool = False,
    accumulate: bool = False,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """cuBLAS GEMM between the fused elementwise kernels (Triton on CUDA, torch twins on the CPU).

    ``accumulate``: the result goes into ``residual`` in place, which also spares ``addmm`` the
    copy of its C operand into a fresh output (a device memcpy per call otherwise). An fp8 / int8
    weight is dequantized to x's dtype for the GEMM (a temporary copy: this path is for wide
    batches such as a prefill, the skinny kernel streams one-byte weights directly).
    """
    _check(x, weight, bias, residual, gated, accumulate, weight_scale)
    weight = _dequantized(x, weight, weight_scale)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if residual is not None and bias is None and not gated:
        # the residual as addmm's C operand: added in cuBLAS's epilogue, no separate add kernel
        lead = x.shape[:-1]
        r2 = residual.reshape(-1, residual.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if accumulate:
            r2.addmm_(x2, weight.t())
            return residual
        return torch.addmm(r2, x2, weight.t()).reshape(*lead, weight.shape[0])
    y = F.linear(x, weight, bias)
    if gated:
        y = silu_mul(y)
    return _add_residual(y, residual, accumulate)


def skinny_plan(
    rows: int, n_out: int, k: int, gated: bool, device: torch.device, elem_bytes: int = 2, one_byte: bool = False
) -> tuple[int, ...]:
    """Launch plan ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K, SWAP)`` of the skinny kernel.

    ``one_byte``: fp8 or int8 weights (int8 takes fp8's plan: its sweep found that plan best
    or within 6% for the layers the drafts quantize, BENCHMARKS.md sixth measurement).

    From the H100 sweeps (benchmarks/skinny_gemm.py --sweep, BENCHMARKS.md): all rows in one M
    block, 64 output columns per program, four warps. With ``SWAP_AB`` (the default) the weight
    tile is the MMA's tall operand: rows padded to 16 (to 8 for fp8 weights at <= 8 rows, whose
    converted tiles ran fastest against an 8-wide operand; fp8 over 8 rows keeps the unswapped
    order), 256-deep K steps in four stages (three for the gated kernel's two weight tiles), K
    split four ways when that still fits one wave of programs (a 1B model's down projection: 32
    column tiles; the 8B's 64 tiles ran faster unsplit), 128 deep then. The last program of a
    split tile sums the partials and runs the epilogue; fp8 weights also split when their column
    tiles fill less than half the SMs (a 1B model's QKV and O). Without SWAP_AB, the earlier rule.
    """
    # the interpreter (CPU) has no SMs to count; plan as for an H100 so tests take the GPU's branches
    sms = sm_count(device) if device.type == "cuda" else 132
    block_n = 64
    tiles = triton.cdiv(n_out, block_n)
    swap = SWAP_AB and (not one_byte or rows <= 8)
    if swap:
        block_m = max(8 if one_byte else 16, triton.next_power_of_2(rows))
        # fp8 QKV and O of a 1B model (48 and 32 column tiles) also ran faster split four ways
        split = 4 if (one_byte and tiles < sms // 2) or (k >= 8192 and 4 * tiles <= sms) else 1
        # deeper than 128 only while the stages fit shared memory: 64-row blocks hold 4x the
        # activations of 16-row ones, gated steps two weight tiles
        deep = 64 if block_m > 32 else (128 if split > 1 or (gated and block_m > 16) else 256)
    else:
        block_m = max(16, triton.next_power_of_2(rows))
        # gated (two weight tiles per step): 128 deep ran best for the 8B's K = 4096 at M = 1, 256 for
        # the 1B's K = 2048 at M = 8 (0.445 against 0.478 ms at 128: H100 sweep of 2026-11-25)
        deep = 64 if block_m > 32 else (128 if gated and (k > 2048 or block_m > 16) else 256)
        split = 4 if (k >= 8192 or one_byte) and tiles < sms // 2 else 1
    # fp32 activations take twice the bytes of bf16 per K step: half as deep
    deep = deep * 2 // elem_bytes
    block_k = min(deep, max(16, triton.next_power_of_2(k)))
    num_stages = 3 if gated or block_m > 32 else 4
    return block_m, block_n, block_k, 4, num_stages, split, swap


def skinny_split(plan: tuple[int, ...], n_out: int, k: int, gated: bool) -> tuple[int, int, int, int]:
    """``(tiles, k_per, split, slot)`` of a skinny launch: column tiles, K per split (a multiple of
    BLOCK_K), the split count without empty splits, and the fp32 scratch slot per (split, tile):
    the partial accumulator(s) and the partial sum of squares (0 when unsplit)."""
    block_m, block_n, block_k, _, _, split, _ = plan
    tiles = triton.cdiv(n_out, block_n)
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per)
    slot = (2 if gated else 1) * block_m * block_n + block_m if split > 1 else 0
    return tiles, k_per, split, slot


def fused_linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    gated: bool = False,
    plan: tuple[int, ...] | None = None,
    counters: Tensor | None = None,
    accumulate: bool = False,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """The skinny Triton kernel (rows <= ``MAX_SKINNY_ROWS``); ``accumulate``: result into ``residual``.

    ``plan`` overrides :func:`skinny_plan`. ``counters`` is an int32 buffer of zeros with at least
    one slot per column tile, used by split-K programs to elect the one that reduces; the kernel
    leaves it zeroed, so a caller (the native model) keeps one across calls instead of paying a
    memset per call.
    """
    n_out = _check(x, weight, bias, residual, gated, accumulate, weight_scale)
    k = weight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows > MAX_SKINNY_ROWS:
        raise ValueError(f"the skinny kernel takes at most {MAX_SKINNY_ROWS} rows, got {rows}")
    if weight.stride(-1) != 1:
        raise ValueError("weight must have unit stride along K")
    if accumulate:
        # each output element is read (as the residual) and then written by the same program
        out = r2 = residual.view(rows, n_out)
    else:
        out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
        r2 = residual.reshape(rows, n_out).contiguous() if residual is not None else out
    if rows == 0:
        return out.reshape(*lead, n_out)
    block_m, block_n, block_k, warps, stages, split, swap = plan or skinny_plan(
        rows, n_out, k, gated, x.device, x.element_size(), weight_scale is not None
    )
    if block_m < rows:
        raise ValueError(f"plan's BLOCK_M {block_m} is below the {rows} rows")
    tiles, k_per, split, slot = skinny_split((block_m, block_n, block_k, warps, stages, split, swap), n_out, k, gated)
    if split > 1:
        ws = torch.empty(split * tiles * slot, dtype=torch.float32, device=x.device)
        if counters is None or counters.numel() < tiles:
            counters = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    else:
        ws, counters = out, out
    pdl = pdl_enabled(x)
    _skinny_linear_kernel[(tiles, split)](
        x2,
        weight,
        weight_scale if weight_scale is not None else x2,
        bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        r2,
        out,
        ws,
        counters,
        rows,
        n_out,
        k,
        k_per,
        x2.stride(0),
        weight.stride(0),
        r2.stride(0),
        out.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        HAS_SCALE=weight_scale is not None,
        HAS_NORM=norm_weight is not None,
        HAS_RES=residual is not None,
        GATED=gated,
        EVEN_N=n_out % block_n == 0,
        EVEN_K=k % block_k == 0,
        IEEE=x.dtype == torch.float32,
        SPLIT=split,
        SLOT=slot,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SWAP=bool(swap),
        PDL=pdl,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=pdl,
    )
    return out.reshape(*lead, n_out)


#: the skinny kernel takes a layer only if its grid has at least this fraction of the SMs' count
#: of programs (see ``_fills_the_gpu``). 0: every decode-sized layer, since with the swapped
#: operand order and PDL the narrow grids (a 1B model's O: 32 column tiles, a 0.6B model's 16) ran
#: faster in the kernel than on cuBLAS (H100, N=8 K=8: Llama pair +0.7%, Qwen3 pair +2.4%); it was
#: 0.25 before
MIN_GRID_FRACTION = 0.0


def _fills_the_gpu(plan: tuple[int, ...], n_out: int, device: torch.device) -> bool:
    """Whether ``plan`` launches at least ``MIN_GRID_FRACTION`` of the SMs' count of programs.

    A knob for narrow grids (a 0.6B model's 1024-wide outputs: 16 column tiles): with the unswapped
    operand order and no PDL they lost to cuBLAS in the H100 sweep, so the rule once asked for a
    quarter of the SMs; now the default fraction is 0 and every shape qualifies. The CPU
    interpreter has no SMs, so there every shape qualifies too (the tests exercise the kernel).
    """
    if device.type != "cuda":
        return True
    _, block_n, _, _, _, split, _ = plan
    return triton.cdiv(n_out, block_n) * split >= MIN_GRID_FRACTION * sm_count(device)


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
    counters: Tensor | None = None,
    accumulate: bool = False,
    weight_scale: Tensor | None = None,
) -> Tensor:
    """Norm + linear + gating + residual: the skinny kernel for ``rows <= max_rows`` on CUDA, else composed.

    ``counters``: see :func:`fused_linear_triton` (unused by the composed path). ``accumulate``:
    the result is written into ``residual`` (in place) and returned. An fp8 / int8 weight (with
    ``weight_scale``) takes the skinny kernel on any grid up to ``MAX_SKINNY_ROWS`` rows, whatever
    ``max_rows`` says: the composed path would dequantize it first.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    kwargs = {
        "norm_weight": norm_weight,
        "eps": eps,
        "residual": residual,
        "gated": gated,
        "accumulate": accumulate,
        "weight_scale": weight_scale,
    }
    quantized = weight_scale is not None  # fp8 or int8: planned alike
    if quantized and use_triton(x) and rows > MAX_SKINNY_ROWS:
        return _quantized_in_row_chunks(x, weight, bias, counters, **kwargs)
    if use_triton(x) and rows <= (MAX_SKINNY_ROWS if quantized else min(max_rows, MAX_SKINNY_ROWS)):
        n_out = weight.shape[0] // 2 if gated else weight.shape[0]
        plan = skinny_plan(rows, n_out, weight.shape[1], gated, x.device, x.element_size(), quantized)
        if quantized or _fills_the_gpu(plan, n_out, x.device):
            return fused_linear_triton(x, weight, bias, plan=plan, counters=counters, **kwargs)
    return fused_linear_composed(x, weight, bias, **kwargs)


def _quantized_in_row_chunks(
    x: Tensor, weight: Tensor, bias: Tensor | None, counters: Tensor | None, **kwargs
) -> Tensor:
    """A quantized (fp8 / int8) layer over more rows than the skinny kernel takes: the kernel on row blocks in turn.

    Each block streams the weight again, one byte per element, which costs what one bf16 pass
    would; the composed path would first write a dequantized copy of the weight.
    """
    k = weight.shape[1]
    n_out = weight.shape[0] // 2 if kwargs["gated"] else weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    residual = kwargs.pop("residual")
    r2 = residual.reshape(-1, n_out) if residual is not None else None
    outs = []
    for lo in range(0, x2.shape[0], MAX_SKINNY_ROWS):
        part = slice(lo, lo + MAX_SKINNY_ROWS)
        res = r2[part] if r2 is not None else None
        outs.append(fused_linear_triton(x2[part], weight, bias, residual=res, counters=counters, **kwargs))
    if kwargs["accumulate"]:
        return residual  # each block wrote its rows of it
    return torch.cat(outs).reshape(*lead, n_out)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _epilogue(
        acc,
        acc_up,
        sumsq,
        ws_scale,
        b,
        res,
        out,
        offs_m,
        offs_n,
        M,
        N,
        K,
        stride_r,
        stride_o,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        GATED: tl.constexpr,
    ):
        m_mask = offs_m < M
        n_mask = offs_n < N
        if HAS_SCALE:  # one-byte weights: each weight row's scale, on the fp32 sums
            acc = acc * tl.load(ws_scale + offs_n, mask=n_mask, other=0.0)[None, :]
            if GATED:
                acc_up = acc_up * tl.load(ws_scale + N + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_NORM:
            rstd = 1.0 / tl.sqrt(sumsq / K + eps)
            acc = acc * rstd[:, None]
            acc_up = acc_up * rstd[:, None]
        if HAS_BIAS:
            acc += tl.load(b + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(b + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        dt = out.dtype.element_ty
        y = acc.to(dt)
        if GATED:
            # the twin's roundings: gate and up rounded, silu(gate) rounded, product rounded
            gate = y.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dt)
            y = (silu.to(tl.float32) * acc_up.to(dt).to(tl.float32)).to(dt)
        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            r = tl.load(res + offs_m[:, None] * stride_r + offs_n[None, :], mask=mask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(out + offs_m[:, None] * stride_o + offs_n[None, :], y, mask=mask)

    @triton.jit
    def _mma(xk, wk, acc, IEEE: tl.constexpr, SWAP: tl.constexpr):
        """``acc += xk @ wk.T`` ([rows, cols]), or its transpose ``wk @ xk.T`` ([cols, rows]) when SWAP."""
        # (each branch assigns: Triton compiles the code after a constexpr branch's return too)
        if SWAP:
            if IEEE:
                acc = tl.dot(wk, tl.trans(xk), acc, input_precision="ieee")
            else:
                acc = tl.dot(wk, tl.trans(xk), acc)
        else:
            if IEEE:
                acc = tl.dot(xk, tl.trans(wk), acc, input_precision="ieee")
            else:
                acc = tl.dot(xk, tl.trans(wk), acc)
        return acc

    @triton.jit
    def _stream_weights(
        x_ptrs,
        w_ptrs,
        up_off,
        g,
        offs_k,
        m_mask,
        n_mask,
        k_lo,
        k_hi,
        HAS_NORM: tl.constexpr,
        SUMSQ: tl.constexpr,
        GATED: tl.constexpr,
        EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        SWAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """The skinny kernel's main loop: ``(acc, acc_up, sumsq)``, the fp32 products [BLOCK_M, BLOCK_N]
        of the rows at ``x_ptrs`` with the weight tile at ``w_ptrs`` (and, when GATED, with the one
        ``up_off`` elements further) over K in [k_lo, k_hi), and the rows' sums of squares (HAS_NORM
        or SUMSQ). HAS_NORM multiplies the rows by the norm weight ``g`` before the dot."""
        if SWAP:  # the weight tile as the MMA's tall operand, the few rows as its narrow one
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                xk = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
            else:
                k_mask = (k0 + offs_k) < k_hi
                xk = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_NORM or SUMSQ:
                xf = xk.to(tl.float32)
                sumsq += tl.sum(xf * xf, axis=1)
            if HAS_NORM:
                if EVEN_K:
                    gk = tl.load(g + k0 + offs_k)
                else:
                    gk = tl.load(g + k0 + offs_k, mask=k_mask, other=0.0)
                xk = (xf * gk.to(tl.float32)[None, :]).to(xk.dtype)
            if EVEN_K and EVEN_N:
                wk = tl.load(w_ptrs + k0)
            elif EVEN_K:
                wk = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0)
            else:
                wk = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            wk = wk.to(xk.dtype)  # fp8 / int8 -> the activations' dtype (exact); a no-op otherwise
            acc = _mma(xk, wk, acc, IEEE, SWAP)
            if GATED:
                up_ptrs = w_ptrs + up_off + k0
                if EVEN_K and EVEN_N:
                    uk = tl.load(up_ptrs)
                elif EVEN_K:
                    uk = tl.load(up_ptrs, mask=n_mask[:, None], other=0.0)
                else:
                    uk = tl.load(up_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                uk = uk.to(xk.dtype)
                acc_up = _mma(xk, uk, acc_up, IEEE, SWAP)
        if SWAP:
            acc = tl.trans(acc)
            acc_up = tl.trans(acc_up)
        return acc, acc_up, sumsq

    @triton.jit
    def skinny_linear_tile(
        pid_n,
        pid_k,
        n_tiles,
        x,
        w,
        w_scale,
        b,
        g,
        res,
        out,
        ws,
        counters,
        M,
        N,
        K,
        K_PER,
        stride_x,
        stride_w,
        stride_r,
        stride_o,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        GATED: tl.constexpr,
        EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        SPLIT: tl.constexpr,
        SLOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One (column tile ``pid_n`` of ``n_tiles``, K split ``pid_k``) program of the skinny
        kernel; ``kernels.decode_layer`` runs the same work items inside its layer kernel."""
        # Program (tile, split): all M rows x BLOCK_N output columns over one K_PER-wide share of
        # K, streaming its weight rows once. N is the output width; when GATED the up rows sit N
        # rows below the gate rows. K_PER is a multiple of BLOCK_K, so only the K tail is ragged.
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        k_lo = pid_k * K_PER
        k_hi = tl.minimum(k_lo + K_PER, K)
        x_ptrs = x + offs_m[:, None] * stride_x + offs_k[None, :]
        w_ptrs = w + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
        pdl_wait(PDL)
        acc, acc_up, sumsq = _stream_weights(
            x_ptrs, w_ptrs, N * stride_w, g, offs_k, m_mask, n_mask, k_lo, k_hi,
            HAS_NORM, False, GATED, EVEN_N, EVEN_K, IEEE, SWAP, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        pdl_release(PDL)  # the weight stream is done: the next kernel may launch
        if SPLIT == 1:
            _epilogue(
                acc,
                acc_up,
                sumsq,
                w_scale,
                b,
                res,
                out,
                offs_m,
                offs_n,
                M,
                N,
                K,
                stride_r,
                stride_o,
                eps,
                HAS_BIAS,
                HAS_SCALE,
                HAS_NORM,
                HAS_RES,
                GATED,
            )
        else:
            # Park the partials in this (split, tile) slot; the tile's last program to arrive
            # (counted with an acq_rel atomic after a CTA barrier, so every thread's stores are
            # ordered before it) sums all slots, runs the epilogue and re-zeroes the counter.
            tile_m = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            slot = ws + (pid_k * n_tiles + pid_n).to(tl.int64) * SLOT
            tl.store(slot + tile_m, acc)
            if GATED:
                tl.store(slot + BLOCK_M * BLOCK_N + tile_m, acc_up)
            if HAS_NORM:
                tl.store(slot + (2 if GATED else 1) * BLOCK_M * BLOCK_N + offs_m, sumsq)
            tl.debug_barrier()
            arrived = tl.atomic_add(counters + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                tl.debug_barrier()
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for s in range(SPLIT):
                    part = ws + (s * n_tiles + pid_n).to(tl.int64) * SLOT
                    acc += tl.load(part + tile_m, cache_modifier=".cg")
                    if GATED:
                        acc_up += tl.load(part + BLOCK_M * BLOCK_N + tile_m, cache_modifier=".cg")
                    if HAS_NORM:
                        sumsq += tl.load(part + (2 if GATED else 1) * BLOCK_M * BLOCK_N + offs_m, cache_modifier=".cg")
                _epilogue(
                    acc,
                    acc_up,
                    sumsq,
                    w_scale,
                    b,
                    res,
                    out,
                    offs_m,
                    offs_n,
                    M,
                    N,
                    K,
                    stride_r,
                    stride_o,
                    eps,
                    HAS_BIAS,
                    HAS_SCALE,
                    HAS_NORM,
                    HAS_RES,
                    GATED,
                )
                tl.atomic_xchg(counters + pid_n, 0)

    @triton.jit
    def _skinny_linear_kernel(
        x,
        w,
        w_scale,
        b,
        g,
        res,
        out,
        ws,
        counters,
        M,
        N,
        K,
        K_PER,
        stride_x,
        stride_w,
        stride_r,
        stride_o,
        eps,
        HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        GATED: tl.constexpr,
        EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        SPLIT: tl.constexpr,
        SLOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP: tl.constexpr,
        PDL: tl.constexpr,
    ):
        skinny_linear_tile(
            tl.program_id(0), tl.program_id(1), tl.num_programs(0),
            x, w, w_scale, b, g, res, out, ws, counters, M, N, K, K_PER,
            stride_x, stride_w, stride_r, stride_o, eps,
            HAS_BIAS, HAS_SCALE, HAS_NORM, HAS_RES, GATED, EVEN_N, EVEN_K, IEEE,
            SPLIT, SLOT, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, PDL,
        )  # fmt: skip
