"""A whole decoder layer of a decode-sized step in one kernel launch: the five kernels' work in one grid.

``decode_layer_triton(h, weights, cos_table, sin_table, start_pos, k_pool_l, v_pool_l, block_table,
n_heads=..., n_kv_heads=..., scale=..., eps=...)`` returns the layer's output residual stream for
the rows of ``h [R, T, hidden]`` (R * T <= ``MAX_ROWS``) and writes the new tokens' K/V into the
layer's pages, computing exactly what the native model's five decode kernels compute one after
another::

    q = qkv_rope_write_kv(h, ...)            # phase 0: projection, RoPE, K/V write (one item per head)
    att = paged_attention(q, ...)            # phase 1: (row x kv head, KV split, query block) items
    h1 = h + att @ o.T                       # phase 2: the skinny kernel's (column tile, K split) items
    act = silu_mul(rms_norm(h1) @ gate_up.T) # phase 3: the same, gated, post-attention norm in front
    out = h1 + act @ down.T                  # phase 4: the same, residual add

Why: a draft step of SMC-SD on a small model is a chain of short kernels (five per layer); on an
H100 each took 5.7-7.3 us of device time while the whole layer's weights stream in about 1.3 us,
so a step of the 135M SmolLM2 cost 0.74 of a target step where its bytes would allow far less
(BENCHMARKS.md, sixteenth session). Here one persistent grid of at most one program per SM runs
the five phases, each program taking the phase's work items in turn, and waits at a grid-wide
barrier between phases instead of ending one kernel and starting the next.

The work items are the five kernels' programs themselves, run by the same ``@triton.jit`` helpers
(``qkv_rope.qkv_rope_head``, ``attention.paged_attention_tile``, ``linear.skinny_linear_tile``) with
the same tile plans, so the math is one definition: on the CPU interpreter the fused layer's outputs
equal the five launches' bit for bit (tests/test_kernel_decode_layer.py). Two launch settings differ:
one warp count and pipeline depth for all phases, and in one launch on a GPU the attention's KV
splits capped at one item per SM (past ~1,500 keys its own choice would split finer).

The barrier needs every program resident at once: the grid never exceeds the SM count, and on
the interpreter (which runs programs one after another) the one-launch form runs one program. The
counter buffer's first slot is the barrier's; the last program to leave re-zeroes it, so the next
launch starts from zero. ``one_launch=False`` runs the phases as five launches of the same kernel
without barriers (tests use it to run several programs per phase on the interpreter).

The native model uses it only when asked (``NativeCausalLM.fused_layers``) until it has been timed
on a GPU (BENCHMARKS.md, seventeenth session).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from smcgen.kernels import attention, linear, qkv_rope
from smcgen.kernels._triton import HAS_TRITON, pdl_enabled, pdl_release, pdl_wait, require_triton, sm_count, tl, triton

__all__ = ["MAX_ROWS", "DecodeLayerWeights", "decode_layer_torch", "decode_layer_triton"]

#: the most token rows (R * T) one fused layer takes: one program holds all rows of a tile, as the
#: skinny kernel does at decode sizes
MAX_ROWS = 16
#: the default of ``decode_layer_triton(prefetch=...)``: each program asks L2 for the weight tiles of
#: all its phases when it starts, before waiting on the previous kernel (weights are constants), so
#: with PDL the loads overlap the previous layer. Off: untimed (prefetches for the separate kernels
#: lost on an H100, BENCHMARKS.md third and sixth measurements, but those streamed Llama-8B and
#: Llama-3.2-1B layers, far larger than L2)
PREFETCH_WEIGHTS = False


class DecodeLayerWeights(NamedTuple):
    """One decoder layer's weights in the native model's fused layout (``runners.native.weights``).

    ``*_scale``: the per-row scales of int8 / fp8 weights (None for weights in the activations'
    dtype). ``input_norm`` is None when its weight is folded into ``qkv`` (the 1/RMS scale is then
    applied after the projection, ``NativeCausalLM.fold_input_norms``).
    """

    qkv: Tensor
    o: Tensor
    gate_up: Tensor
    down: Tensor
    post_norm: Tensor
    input_norm: Tensor | None = None
    qkv_bias: Tensor | None = None
    o_bias: Tensor | None = None
    gate_up_bias: Tensor | None = None
    down_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    qkv_scale: Tensor | None = None
    o_scale: Tensor | None = None
    gate_up_scale: Tensor | None = None
    down_scale: Tensor | None = None


def decode_layer_torch(
    h: Tensor,
    weights: DecodeLayerWeights,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    scale: float,
    eps: float,
) -> Tensor:
    """Reference: the layer as the native model's torch twins compute it (a new output tensor)."""
    w = weights
    q = qkv_rope.qkv_rope_write_kv_torch(
        h, w.qkv, cos_table, sin_table, start_pos, k_pool_l, v_pool_l, block_table,
        n_heads=n_heads, n_kv_heads=n_kv_heads, bias=w.qkv_bias, norm_weight=w.input_norm,
        row_norm=w.input_norm is None, q_norm=w.q_norm, k_norm=w.k_norm, eps=eps, weight_scale=w.qkv_scale,
    )  # fmt: skip
    att = attention.paged_attention_torch(q, k_pool_l, v_pool_l, block_table, start_pos, scale)
    n_rows, n_new = h.shape[:2]
    h1 = linear.fused_linear_torch(att.reshape(n_rows, n_new, -1), w.o, w.o_bias, residual=h, weight_scale=w.o_scale)
    act = linear.fused_linear_torch(
        h1, w.gate_up, w.gate_up_bias, norm_weight=w.post_norm, eps=eps, gated=True, weight_scale=w.gate_up_scale
    )
    return linear.fused_linear_torch(act, w.down, w.down_bias, residual=h1, weight_scale=w.down_scale)


def _on_gpu(device: torch.device) -> bool:
    """Whether the kernel runs compiled on a GPU (all programs at once) rather than in the
    interpreter (one program after another)."""
    return device.type == "cuda"


class _Linear(NamedTuple):
    """One skinny-kernel phase's launch geometry (``linear.skinny_plan`` and its split-K)."""

    plan: tuple[int, ...]
    tiles: int
    k_per: int
    split: int
    slot: int

    @property
    def items(self) -> int:
        return self.tiles * self.split


def _linear(rows: int, weight: Tensor, gated: bool, x: Tensor, weight_scale: Tensor | None) -> _Linear:
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    k = weight.shape[1]
    plan = linear.skinny_plan(rows, n_out, k, gated, x.device, x.element_size(), weight_scale is not None)
    tiles, k_per, split, slot = linear.skinny_split(plan, n_out, k, gated)
    return _Linear(plan, tiles, k_per, split, slot)


def decode_layer_triton(
    h: Tensor,
    weights: DecodeLayerWeights,
    cos_table: Tensor,
    sin_table: Tensor,
    start_pos: Tensor,
    k_pool_l: Tensor,
    v_pool_l: Tensor,
    block_table: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    scale: float,
    eps: float,
    counters: Tensor | None = None,
    max_keys: int | None = None,
    one_launch: bool = True,
    programs: int | None = None,
    attention_splits: int | None = None,
    prefetch: bool | None = None,
) -> Tensor:
    """The layer in one launch (``one_launch``) or in five launches of the same kernel; returns a new
    [R, T, hidden] tensor and writes the tokens' K/V into the pools.

    ``counters``: an int32 buffer of zeros that the kernel leaves zeroed, one slot for the barrier
    and one per attention and linear tile (a big enough one is allocated when missing or short).
    ``max_keys``: see ``attention.paged_attention_triton``. ``programs`` (tests): the grid size, default one program
    per SM up to the largest phase's item count, one on the interpreter for ``one_launch``.
    ``attention_splits`` (tests): the attention's KV split count instead of its own choice.
    ``prefetch`` (None: ``PREFETCH_WEIGHTS``): L2 prefetches of each program's weight tiles at its
    start, where each program takes one item a phase on a GPU (the interpreter has no prefetch).
    """
    require_triton()
    w = weights
    n_rows, n_new, hidden = h.shape
    rows = n_rows * n_new
    if rows > MAX_ROWS:
        raise ValueError(f"the fused decoder layer takes at most {MAX_ROWS} token rows, got {rows}")
    dim = qkv_rope._check(
        h, w.qkv, k_pool_l, v_pool_l, cos_table, n_heads, n_kv_heads, w.qkv_bias, w.input_norm,
        w.input_norm is None, w.q_norm, w.k_norm, w.qkv_scale,
    )  # fmt: skip
    q_size = n_heads * dim
    inter = w.gate_up.shape[0] // 2
    for name, k, gated, n_out in (
        ("o", q_size, False, hidden),
        ("gate_up", hidden, True, inter),
        ("down", inter, False, hidden),
    ):
        try:
            got = linear._check(
                h.new_empty(0, k), getattr(w, name), getattr(w, f"{name}_bias"), None, gated, False,
                getattr(w, f"{name}_scale"),
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"weights.{name}: {err}") from None
        if got != n_out:
            raise ValueError(f"weights.{name} must have {n_out} output rows, got {got}")
    if dim not in attention.TRITON_HEAD_DIMS:
        raise ValueError(f"the fused decoder layer needs a head width in {attention.TRITON_HEAD_DIMS}, got {dim}")
    qkv_rope.check_launch(n_rows, start_pos, block_table, k_pool_l, v_pool_l, cos_table, sin_table)
    if start_pos.dtype != torch.int32:  # the model's positions; another dtype would compile another variant
        raise ValueError(f"start_pos must be int32, got {start_pos.dtype}")
    for name in ("qkv", "o", "gate_up", "down"):
        if getattr(w, name).stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along K")
    w = w._replace(**{k: v.contiguous() for k, v in w._asdict().items() if v is not None and v.dim() == 1})
    dev, dt = h.device, h.dtype
    ieee = dt == torch.float32
    x = h.reshape(rows, hidden).contiguous()
    has_qk_norm = w.q_norm is not None
    q_dtype = torch.promote_types(dt, w.q_norm.dtype) if has_qk_norm else dt
    q_dtype = torch.promote_types(q_dtype, cos_table.dtype)
    if q_dtype != dt:
        raise ValueError(f"the rotated queries would be {q_dtype}, the activations are {dt}: use one dtype")
    out = torch.empty((rows, hidden), dtype=dt, device=dev)
    if rows == 0:
        return out.reshape(n_rows, n_new, hidden)

    # phase 0: the QKV + RoPE kernel's plan (qkv_rope_write_kv_triton)
    a_m, _, a_k, _, _, _, a_swap = linear.skinny_plan(
        rows, w.qkv.shape[0], hidden, False, dev, h.element_size(), w.qkv_scale is not None
    )
    a_k = min(a_k, max(16, triton.next_power_of_2(hidden)))
    a_items = n_heads + 2 * n_kv_heads
    # phase 1: paged attention's plan (attention.paged_attention_triton)
    _, page_size, _, _ = k_pool_l.shape
    max_pages = block_table.shape[1]
    group = n_heads // n_kv_heads
    packed = group * n_new
    b_m, b_n, _, _ = attention._launch_config(packed, dim, ieee)
    n_qblocks = triton.cdiv(packed, b_m)
    row_heads = n_rows * n_kv_heads
    min_keys = None
    if b_m <= 16:
        b_n, min_keys = attention._decode_tile(row_heads * n_qblocks, dev)
    interpreted = not _on_gpu(dev)
    n_splits = attention_splits
    if n_splits is None:
        capacity = max_pages * page_size if max_keys is None else min(max_pages * page_size, max_keys)
        n_splits = attention._num_splits(row_heads * n_qblocks, capacity, b_m, dev, min_keys)
        if one_launch and not interpreted:
            # at most one attention item per SM, so the phase is one round of the grid and programs
            # take one item each (ONE_ITEM) where the linear phases allow: attention's own choice
            # (one split per 64 keys of capacity, up to 32) passes one item per SM from ~1,472 keys
            # for SmolLM2's 2 rows (23 splits, 138 items; 2,048 keys: 192)
            n_splits = max(1, min(n_splits, sm_count(dev) // (row_heads * n_qblocks)))
    b_items = row_heads * n_splits * n_qblocks
    # phases 2-4: the skinny kernel's plans (linear.fused_linear_triton)
    lo = _linear(rows, w.o, False, x, w.o_scale)
    lg = _linear(rows, w.gate_up, True, x, w.gate_up_scale)
    ld = _linear(rows, w.down, False, x, w.down_scale)

    q = torch.empty((n_rows, n_new, n_heads, dim), dtype=dt, device=dev)
    att = torch.empty_like(q)
    h1 = torch.empty((rows, hidden), dtype=dt, device=dev)
    act = torch.empty((rows, inter), dtype=dt, device=dev)
    # fp32 scratch: the attention's split partials, then each linear phase's split-K partials
    part_o_n = rows * n_heads * n_splits * dim if n_splits > 1 else 0
    part_lse_n = rows * n_heads * n_splits if n_splits > 1 else 0
    sizes = (
        part_o_n,
        part_lse_n,
        lo.split * lo.tiles * lo.slot,
        lg.split * lg.tiles * lg.slot,
        ld.split * ld.tiles * ld.slot,
    )
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    scratch = torch.empty(max(sum(sizes), 1), dtype=torch.float32, device=dev)
    # counters: [barrier | attention tiles | o tiles | gate_up tiles | down tiles]
    c_sizes = (1, row_heads * n_qblocks, lo.tiles, lg.tiles, ld.tiles)
    c_offsets = [sum(c_sizes[:i]) for i in range(len(c_sizes))]
    if counters is None or counters.numel() < sum(c_sizes):
        counters = torch.zeros(sum(c_sizes), dtype=torch.int32, device=dev)

    items = (a_items, b_items, lo.items, lg.items, ld.items)
    if programs is None:
        programs = 1 if (interpreted and one_launch) else max(items)
        if not interpreted:
            programs = min(programs, sm_count(dev))
    if one_launch and interpreted and programs != 1:
        raise ValueError("the interpreter runs programs one after another: one launch takes programs=1")
    if one_launch and not interpreted and programs > sm_count(dev):
        raise ValueError(f"one launch waits at grid barriers: programs must be <= {sm_count(dev)} (the SM count)")
    pdl = pdl_enabled(h)
    one_item = programs >= max(items)
    prefetch = PREFETCH_WEIGHTS if prefetch is None else prefetch
    launches = [(0, 4)] if one_launch else [(p, p) for p in range(5)]
    k_strides = k_pool_l.stride()
    for first, last in launches:
        _decode_layer_kernel[(programs,)](
            x, w.qkv, w.qkv_scale if w.qkv_scale is not None else x,
            w.qkv_bias if w.qkv_bias is not None else w.qkv,
            w.input_norm if w.input_norm is not None else w.qkv,
            cos_table, sin_table, start_pos, block_table, q, k_pool_l, v_pool_l,
            w.q_norm if has_qk_norm else cos_table, w.k_norm if has_qk_norm else cos_table,
            att, scratch[offsets[0]:], scratch[offsets[1]:],
            w.o, w.o_scale if w.o_scale is not None else x, w.o_bias if w.o_bias is not None else w.o,
            h1, scratch[offsets[2]:],
            w.gate_up, w.gate_up_scale if w.gate_up_scale is not None else x,
            w.gate_up_bias if w.gate_up_bias is not None else w.gate_up, w.post_norm, act, scratch[offsets[3]:],
            w.down, w.down_scale if w.down_scale is not None else x,
            w.down_bias if w.down_bias is not None else w.down, out, scratch[offsets[4]:],
            counters,
            c_offsets[1], c_offsets[2], c_offsets[3], c_offsets[4],
            rows, hidden, n_new, n_heads, n_kv_heads, q_size, inter,
            w.qkv.stride(0), w.o.stride(0), w.gate_up.stride(0), w.down.stride(0),
            cos_table.stride(0), k_strides[0], k_strides[1], k_strides[2], max_pages,
            scale * attention._LOG2E, n_qblocks, lo.k_per, lg.k_per, ld.k_per,
            lo.tiles, lg.tiles, ld.tiles, eps,
            FIRST=first, LAST=last, ONE_ITEM=one_item, PREFETCH=prefetch and one_item and not interpreted,
            HAS_NORM=w.input_norm is not None, ROW_NORM=w.input_norm is None, QK_NORM=has_qk_norm,
            A_BIAS=w.qkv_bias is not None, A_SCALE=w.qkv_scale is not None, A_EVEN_K=hidden % a_k == 0,
            A_SWAP=bool(a_swap), A_M=a_m, A_K=a_k,
            IEEE=ieee, D=dim, PAGE=page_size, G=group,
            B_M=b_m, B_N=b_n, NSPLIT=n_splits, NSPLIT_P2=triton.next_power_of_2(n_splits),
            **_linear_constexprs("O", lo, w.o_bias, w.o_scale, hidden, q_size),
            **_linear_constexprs("GU", lg, w.gate_up_bias, w.gate_up_scale, inter, hidden),
            **_linear_constexprs("DN", ld, w.down_bias, w.down_scale, hidden, inter),
            PDL=pdl,
            num_warps=4,
            num_stages=3,
            launch_pdl=pdl,
        )  # fmt: skip
    return out.reshape(n_rows, n_new, hidden)


def _linear_constexprs(prefix: str, geo: _Linear, bias, weight_scale, n_out: int, k: int) -> dict:
    block_m, block_n, block_k, _, _, _, swap = geo.plan
    return {
        f"{prefix}_BIAS": bias is not None,
        f"{prefix}_SCALE": weight_scale is not None,
        f"{prefix}_EVEN_N": n_out % block_n == 0,
        f"{prefix}_EVEN_K": k % block_k == 0,
        f"{prefix}_SPLIT": geo.split,
        f"{prefix}_SLOT": geo.slot,
        f"{prefix}_M": block_m,
        f"{prefix}_N": block_n,
        f"{prefix}_K": block_k,
        f"{prefix}_SWAP": bool(swap),
    }


if HAS_TRITON:
    from smcgen.kernels.attention import paged_attention_tile
    from smcgen.kernels.linear import skinny_linear_tile
    from smcgen.kernels.qkv_rope import qkv_rope_head

    #: reads of the barrier counter after which a waiting program gives up (each takes an L2 round
    #: trip, ~0.5-1 us: about 10 s)
    _SPIN_LIMIT = tl.constexpr(1 << 24)

    @triton.jit
    def _trap():
        """Abort the launch (PTX ``trap``): the host sees a launch failure at its next sync."""
        tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def grid_sync(bar, target):
        """Wait until ``target`` arrivals have been counted on ``bar`` (this program's included).

        CUDA's cooperative grid sync in Triton: a CTA barrier, so every thread's stores come before
        the arrival; the arrival an acq_rel atomic at GPU scope; the wait an acquire read by one
        thread (an atomic add of 0, which Triton emits as an acquire load, the value broadcast);
        then a CTA barrier, so the whole program's later loads see the other programs' stores.

        Slot ``bar`` must hold 0 when the launch starts (a non-zero one lets programs through
        early: wrong results, not a hang), and every program of the grid must be resident at once;
        the wrapper keeps the grid within the SM count, which holds without MPS thread limits or
        another persistent kernel beside it. A wait past ``_SPIN_LIMIT`` reads (seconds) traps, so
        a grid that breaks that rule fails the launch instead of hanging the GPU."""
        tl.debug_barrier()
        seen = tl.atomic_add(bar, 1, sem="acq_rel", scope="gpu") + 1
        spins = 0
        while seen < target:
            seen = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
            spins += 1
            if spins > _SPIN_LIMIT:  # some program never arrived (not resident): fail, do not hang
                _trap()
        tl.debug_barrier()

    @triton.jit
    def _prefetch_l2(ptrs, mask):
        """``prefetch.global.L2`` of the lines at ``ptrs`` where ``mask`` (a hint: no data comes back)."""
        addr = tl.where(mask, ptrs.to(tl.uint64, bitcast=True), 0)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u64 p, $1, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l",
            [addr],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _prefetch_tile(w, row0, row_end, k_lo, k_hi, stride, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """L2 prefetch of weight rows [row0, row0 + BLOCK_N) (below row_end) over columns [k_lo, k_hi):
        one address per 128-byte line."""
        LINE: tl.constexpr = 128 // (w.dtype.element_ty.primitive_bitwidth // 8)
        PER_STEP: tl.constexpr = max(BLOCK_K // LINE, 1)
        rows = row0 + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, PER_STEP) * LINE
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ptrs = w + rows[:, None].to(tl.int64) * stride + (k0 + cols)[None, :]
            _prefetch_l2(ptrs, (rows[:, None] < row_end) & ((k0 + cols)[None, :] < k_hi))

    @triton.jit
    def _prefetch_weights(
        pid, qkv, o, gu, dn, H, n_heads_all, QS, INTER, s_qkv, s_o, s_gu, s_dn,
        o_tiles, gu_tiles, dn_tiles, o_kper, gu_kper, dn_kper,
        D: tl.constexpr, A_K: tl.constexpr, O_N: tl.constexpr, O_K: tl.constexpr, O_SPLIT: tl.constexpr,
        GU_N: tl.constexpr, GU_K: tl.constexpr, GU_SPLIT: tl.constexpr,
        DN_N: tl.constexpr, DN_K: tl.constexpr, DN_SPLIT: tl.constexpr,
    ):  # fmt: skip
        """The weight tiles program ``pid`` streams in phases 0, 2, 3 and 4 (one item a phase), into L2."""
        if pid < n_heads_all:
            _prefetch_tile(qkv, pid * D, (pid + 1) * D, 0, H, s_qkv, D, A_K)
        if pid < o_tiles * O_SPLIT:
            lo = (pid // o_tiles) * o_kper
            _prefetch_tile(o, (pid % o_tiles) * O_N, H, lo, tl.minimum(lo + o_kper, QS), s_o, O_N, O_K)
        if pid < gu_tiles * GU_SPLIT:
            lo = (pid // gu_tiles) * gu_kper
            hi = tl.minimum(lo + gu_kper, H)
            n0 = (pid % gu_tiles) * GU_N
            _prefetch_tile(gu, n0, INTER, lo, hi, s_gu, GU_N, GU_K)  # gate rows
            _prefetch_tile(gu, INTER + n0, 2 * INTER, lo, hi, s_gu, GU_N, GU_K)  # up rows
        if pid < dn_tiles * DN_SPLIT:
            lo = (pid // dn_tiles) * dn_kper
            _prefetch_tile(dn, (pid % dn_tiles) * DN_N, H, lo, tl.minimum(lo + dn_kper, INTER), s_dn, DN_N, DN_K)

    @triton.jit
    def _qkv_phase(
        pid, n_prog, x, qkv, qkv_scale, qkv_bias, input_norm, cos, sin, start_pos, bt, q, k_pool, v_pool,
        q_norm, k_norm, M, H, T, n_qh, n_kvh, s_qkv, s_pos, s_pp, s_ps, s_ph, max_pages, eps,
        A_BIAS: tl.constexpr, A_SCALE: tl.constexpr, HAS_NORM: tl.constexpr, ROW_NORM: tl.constexpr,
        QK_NORM: tl.constexpr, A_EVEN_K: tl.constexpr, IEEE: tl.constexpr, A_SWAP: tl.constexpr,
        A_M: tl.constexpr, D: tl.constexpr, A_K: tl.constexpr, PAGE: tl.constexpr, ONE_ITEM: tl.constexpr,
    ):  # fmt: skip
        """Phase 0: ``qkv_rope_head`` for heads pid, pid + n_prog, ... (ONE_ITEM: head pid only; the
        one-item form of the kernel compiles to 140-141 registers a thread for sm_90 against 152-156
        with the loops, benchmarks/decode_layer_registers.py)."""
        if ONE_ITEM:
            if pid < n_qh + 2 * n_kvh:
                qkv_rope_head(
                    pid, x, qkv, qkv_scale, qkv_bias, input_norm, cos, sin, start_pos, bt, q, k_pool, v_pool,
                    q_norm, k_norm, M, H, T, n_qh, n_kvh, H, s_qkv, s_pos, D, s_pp, s_ps, s_ph, max_pages, eps,
                    A_BIAS, A_SCALE, HAS_NORM, ROW_NORM, QK_NORM, A_EVEN_K, IEEE, A_SWAP, A_M, D, A_K, PAGE, False,
                )  # fmt: skip
        else:
            for head in range(pid, n_qh + 2 * n_kvh, n_prog):
                qkv_rope_head(
                    head, x, qkv, qkv_scale, qkv_bias, input_norm, cos, sin, start_pos, bt, q, k_pool, v_pool,
                    q_norm, k_norm, M, H, T, n_qh, n_kvh, H, s_qkv, s_pos, D, s_pp, s_ps, s_ph, max_pages, eps,
                    A_BIAS, A_SCALE, HAS_NORM, ROW_NORM, QK_NORM, A_EVEN_K, IEEE, A_SWAP, A_M, D, A_K, PAGE, False,
                )  # fmt: skip

    @triton.jit
    def _attention_phase(
        pid, n_prog, q, k_pool, v_pool, bt, start_pos, att, part_o, part_lse, counters, qk_scale,
        n_rows, T, n_qh, n_kvh, max_pages, n_qblocks, s_pp, s_ps, s_ph,
        G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, B_M: tl.constexpr, B_N: tl.constexpr,
        NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr, IEEE: tl.constexpr, ONE_ITEM: tl.constexpr,
    ):  # fmt: skip
        """Phase 1: ``paged_attention_tile`` for the (row x kv head, split, query block) items."""
        per_rh = NSPLIT * n_qblocks
        n_items = n_rows * n_kvh * per_rh
        s_r = T * n_qh * D  # q and att: contiguous [R, T, Hq, D]
        if ONE_ITEM:
            if pid < n_items:
                rem = pid % per_rh
                paged_attention_tile(
                    pid // per_rh, rem // n_qblocks, rem % n_qblocks, n_qblocks,
                    q, k_pool, v_pool, bt, start_pos, att, part_o, part_lse, counters, start_pos, qk_scale, T,
                    n_kvh, max_pages, 1, s_r, n_qh * D, D, s_pp, s_ps, s_ph, s_pp, s_ps, s_ph, s_r, n_qh * D, D,
                    G, D, PAGE, B_M, B_N, NSPLIT, NSPLIT_P2, IEEE, False,
                )  # fmt: skip
        else:
            for item in range(pid, n_items, n_prog):
                rem = item % per_rh
                paged_attention_tile(
                    item // per_rh, rem // n_qblocks, rem % n_qblocks, n_qblocks,
                    q, k_pool, v_pool, bt, start_pos, att, part_o, part_lse, counters, start_pos, qk_scale, T,
                    n_kvh, max_pages, 1, s_r, n_qh * D, D, s_pp, s_ps, s_ph, s_pp, s_ps, s_ph, s_r, n_qh * D, D,
                    G, D, PAGE, B_M, B_N, NSPLIT, NSPLIT_P2, IEEE, False,
                )  # fmt: skip

    @triton.jit
    def _linear_phase(
        pid, n_prog, n_tiles, x, w, w_scale, b, g, res, out, ws, counters, M, N, K, K_PER, s_w, eps,
        HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr,
        GATED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
        SPLIT: tl.constexpr, SLOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SWAP: tl.constexpr, ONE_ITEM: tl.constexpr,
    ):  # fmt: skip
        """Phases 2-4: ``skinny_linear_tile`` for the (column tile, K split) items; x, res and out are
        contiguous rows of K, N and N."""
        if ONE_ITEM:
            if pid < n_tiles * SPLIT:
                skinny_linear_tile(
                    pid % n_tiles, pid // n_tiles, n_tiles, x, w, w_scale, b, g, res, out, ws, counters,
                    M, N, K, K_PER, K, s_w, N, N, eps, HAS_BIAS, HAS_SCALE, HAS_NORM, HAS_RES, GATED,
                    EVEN_N, EVEN_K, IEEE, SPLIT, SLOT, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, False,
                )  # fmt: skip
        else:
            for item in range(pid, n_tiles * SPLIT, n_prog):
                skinny_linear_tile(
                    item % n_tiles, item // n_tiles, n_tiles, x, w, w_scale, b, g, res, out, ws, counters,
                    M, N, K, K_PER, K, s_w, N, N, eps, HAS_BIAS, HAS_SCALE, HAS_NORM, HAS_RES, GATED,
                    EVEN_N, EVEN_K, IEEE, SPLIT, SLOT, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, False,
                )  # fmt: skip

    @triton.jit
    def _decode_layer_kernel(
        x, qkv, qkv_scale, qkv_bias, input_norm, cos, sin, start_pos, bt, q, k_pool, v_pool, q_norm, k_norm,
        att, part_o, part_lse,
        o, o_scale, o_bias, h1, o_ws,
        gu, gu_scale, gu_bias, post_norm, act, gu_ws,
        dn, dn_scale, dn_bias, out, dn_ws,
        counters, c_attn, c_o, c_gu, c_dn,
        M, H, T, n_qh, n_kvh, QS, INTER,
        s_qkv, s_o, s_gu, s_dn, s_pos, s_pp, s_ps, s_ph, max_pages,
        qk_scale, n_qblocks, o_kper, gu_kper, dn_kper, o_tiles, gu_tiles, dn_tiles, eps,
        FIRST: tl.constexpr, LAST: tl.constexpr,
        HAS_NORM: tl.constexpr, ROW_NORM: tl.constexpr, QK_NORM: tl.constexpr,
        A_BIAS: tl.constexpr, A_SCALE: tl.constexpr, A_EVEN_K: tl.constexpr, A_SWAP: tl.constexpr,
        A_M: tl.constexpr, A_K: tl.constexpr,
        IEEE: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, G: tl.constexpr,
        B_M: tl.constexpr, B_N: tl.constexpr, NSPLIT: tl.constexpr, NSPLIT_P2: tl.constexpr,
        O_BIAS: tl.constexpr, O_SCALE: tl.constexpr, O_EVEN_N: tl.constexpr, O_EVEN_K: tl.constexpr,
        O_SPLIT: tl.constexpr, O_SLOT: tl.constexpr, O_M: tl.constexpr, O_N: tl.constexpr, O_K: tl.constexpr,
        O_SWAP: tl.constexpr,
        GU_BIAS: tl.constexpr, GU_SCALE: tl.constexpr, GU_EVEN_N: tl.constexpr, GU_EVEN_K: tl.constexpr,
        GU_SPLIT: tl.constexpr, GU_SLOT: tl.constexpr, GU_M: tl.constexpr, GU_N: tl.constexpr, GU_K: tl.constexpr,
        GU_SWAP: tl.constexpr,
        DN_BIAS: tl.constexpr, DN_SCALE: tl.constexpr, DN_EVEN_N: tl.constexpr, DN_EVEN_K: tl.constexpr,
        DN_SPLIT: tl.constexpr, DN_SLOT: tl.constexpr, DN_M: tl.constexpr, DN_N: tl.constexpr, DN_K: tl.constexpr,
        DN_SWAP: tl.constexpr,
        ONE_ITEM: tl.constexpr,
        PREFETCH: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        # Phases FIRST..LAST of the layer; each program takes items pid, pid + P, ... of a phase (only
        # item pid when ONE_ITEM: the grid covers every phase) and waits for every program at the
        # grid barrier (counter slot 0) before the next phase.
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        if PREFETCH:  # weights only (constants): allowed before the wait
            _prefetch_weights(
                pid, qkv, o, gu, dn, H, n_qh + 2 * n_kvh, QS, INTER, s_qkv, s_o, s_gu, s_dn,
                o_tiles, gu_tiles, dn_tiles, o_kper, gu_kper, dn_kper,
                D, A_K, O_N, O_K, O_SPLIT, GU_N, GU_K, GU_SPLIT, DN_N, DN_K, DN_SPLIT,
            )  # fmt: skip
        pdl_wait(PDL)
        if FIRST <= 0 and 0 <= LAST:  # QKV projection, RoPE, K/V write: one item per head
            _qkv_phase(
                pid, n_prog, x, qkv, qkv_scale, qkv_bias, input_norm, cos, sin, start_pos, bt, q, k_pool, v_pool,
                q_norm, k_norm, M, H, T, n_qh, n_kvh, s_qkv, s_pos, s_pp, s_ps, s_ph, max_pages, eps,
                A_BIAS, A_SCALE, HAS_NORM, ROW_NORM, QK_NORM, A_EVEN_K, IEEE, A_SWAP, A_M, D, A_K, PAGE, ONE_ITEM,
            )  # fmt: skip
        if FIRST <= 0 and 1 <= LAST:
            grid_sync(counters, n_prog)
        pdl_release(PDL)  # every program is resident (past a barrier, or this is one phase's launch)
        if FIRST <= 1 and 1 <= LAST:  # attention: (row x kv head, split, query block) items
            _attention_phase(
                pid, n_prog, q, k_pool, v_pool, bt, start_pos, att, part_o, part_lse, counters + c_attn, qk_scale,
                M // T, T, n_qh, n_kvh, max_pages, n_qblocks, s_pp, s_ps, s_ph,
                G, D, PAGE, B_M, B_N, NSPLIT, NSPLIT_P2, IEEE, ONE_ITEM,
            )  # fmt: skip
        if FIRST <= 1 and 2 <= LAST:
            grid_sync(counters, 2 * n_prog)
        if FIRST <= 2 and 2 <= LAST:  # o projection + residual: (column tile, K split) items
            _linear_phase(
                pid, n_prog, o_tiles, att, o, o_scale, o_bias, o, x, h1, o_ws, counters + c_o, M, H, QS, o_kper,
                s_o, eps, O_BIAS, O_SCALE, False, True, False, O_EVEN_N, O_EVEN_K, IEEE, O_SPLIT, O_SLOT,
                O_M, O_N, O_K, O_SWAP, ONE_ITEM,
            )  # fmt: skip
        if FIRST <= 2 and 3 <= LAST:
            grid_sync(counters, 3 * n_prog)
        if FIRST <= 3 and 3 <= LAST:  # post-attention norm + gate/up + SiLU gating
            _linear_phase(
                pid, n_prog, gu_tiles, h1, gu, gu_scale, gu_bias, post_norm, h1, act, gu_ws, counters + c_gu,
                M, INTER, H, gu_kper, s_gu, eps, GU_BIAS, GU_SCALE, True, False, True, GU_EVEN_N, GU_EVEN_K, IEEE,
                GU_SPLIT, GU_SLOT, GU_M, GU_N, GU_K, GU_SWAP, ONE_ITEM,
            )  # fmt: skip
        if FIRST <= 3 and 4 <= LAST:
            grid_sync(counters, 4 * n_prog)
        if FIRST <= 4 and 4 <= LAST:  # down projection + residual
            _linear_phase(
                pid, n_prog, dn_tiles, act, dn, dn_scale, dn_bias, dn, h1, out, dn_ws, counters + c_dn, M, H, INTER,
                dn_kper, s_dn, eps, DN_BIAS, DN_SCALE, False, True, False, DN_EVEN_N, DN_EVEN_K, IEEE, DN_SPLIT,
                DN_SLOT, DN_M, DN_N, DN_K, DN_SWAP, ONE_ITEM,
            )  # fmt: skip
        if FIRST < LAST:
            # leave: the last program out re-zeroes the barrier (every other one is past its waits)
            tl.debug_barrier()
            left = tl.atomic_add(counters, 1, sem="acq_rel", scope="gpu")
            if left == (LAST - FIRST + 1) * n_prog - 1:
                tl.atomic_xchg(counters, 0)
