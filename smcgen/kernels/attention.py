"""Paged KV attention: causal GQA attention over the page pool, and the K/V write's torch twin.

The Triton K/V write is fused into RoPE (``fused_ops.rope_qk_write_kv``); ``write_kv_torch`` here
is its reference and the twin path's write.

One layer's pool view is ``[n_pages, page_size, Hkv, D]``; row r's token at position p lives in page
``block_table[r, p // page_size]``, slot ``p % page_size``. Query t of row r sits at position
``start_pos[r] + t`` and sees keys at positions <= its own. Query head h uses kv head h // G with
G = Hq // Hkv (transformers' ``repeat_kv`` grouping).

Pages of -1 (only after the pool ran out, when ``status`` is set and the run fails anyway) are
never dereferenced out of bounds: the Triton kernels mask them, the torch twins clamp them to
page 0 (contents are then undefined, no crash).

Why one long module: the Triton kernels, their torch twin and the dispatcher of one op stay
together, so each kernel is read beside the reference its tests compare it with.
"""

from __future__ import annotations

import math

import torch

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

__all__ = [
    "HAS_TRITON",
    "cascade_attention",
    "cascade_attention_torch",
    "cascade_attention_triton",
    "paged_attention",
    "paged_attention_torch",
    "paged_attention_triton",
    "write_kv_torch",
]


_LOG2E = 1.0 / math.log(2.0)
#: head dims the Triton attention kernel takes; others fall back to the torch twin
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


#: fewest keys a KV split covers (``_num_splits``)
MIN_KEYS_PER_SPLIT = 256
#: key tile of the decode configuration (at most 16 packed queries): a split covers whole tiles,
#: so splits finer than this tile would leave the extra ones empty
DECODE_BLOCK_N = 128
#: decode grids with fewer (row, kv head) programs than SMs (AR, a few particles) take this
#: narrower key tile and split as finely, so more SMs stream their short contexts: +1.1% on the
#: 8B's AR steps on an H100, and it lost 2% where the grid already filled the SMs (8 x 8)
SMALL_GRID_BLOCK_N = 64


def _sms(device: torch.device) -> int:
    """The device's SM count; 4 for the interpreter (small, but still exercises splits and merges)."""
    return sm_count(device) if device.type == "cuda" else 4


def _num_splits(n_programs: int, max_keys: int, block_m: int, device: torch.device, min_keys: int | None = None) -> int:
    """KV splits per (row, kv head, query block), from the call's shapes only.

    ``max_keys`` = max_pages * page_size is the table's capacity, so a captured graph stays valid;
    the kernel divides each row's *actual* key range by the split count, so splits past the real
    context exit at once. Aim (measured on an H100, bf16, 4k context) at ~2 programs per SM for
    query tiles of 64+ rows and ~4 per SM for the light decode tiles, with >= ``min_keys``
    (default ``MIN_KEYS_PER_SPLIT``) keys per split and at most 32 splits; a grid that already
    fills the GPU (large N, prefill) gets no split.
    """
    target = (2 if block_m >= 64 else 4) * _sms(device)
    min_keys = min_keys or MIN_KEYS_PER_SPLIT
    return max(1, min(target // max(n_programs, 1), max_keys // min_keys, 32))


def _decode_tile(n_programs: int, device: torch.device) -> tuple[int, int]:
    """(key tile, fewest keys per split) of a decode grid of ``n_programs`` unsplit programs."""
    if n_programs < _sms(device) and SMALL_GRID_BLOCK_N < DECODE_BLOCK_N:
        return SMALL_GRID_BLOCK_N, SMALL_GRID_BLOCK_N
    return DECODE_BLOCK_N, MIN_KEYS_PER_SPLIT


def prefix_tile(packed: int) -> int:
    """The prefix kernel's query tile for ``packed`` = group * G * T queries per kv head: half of
    next_power_of_2(packed), in 16..64, so every (group, kv head) with more than 16 packed queries gets at
    least two query tiles.

    The prefix grid is small (requests x kv heads) and latency-bound, so more, lighter programs win:
    on an H100 at a 4,096-token prefix, 64-row tiles took the 8B verify's prefix kernel from 72.7 to
    55.4 us (288 packed queries) and 16-row tiles the 1B draft step's from 15.7 to 12.7 us (32)."""
    return min(max(16, triton.next_power_of_2(packed) // 2), 64)


#: False: the prefix kernel's grid in the order before 2026-12-07 everywhere (side-by-side timing);
#: True: the order :func:`prefix_tiles_adjacent` picks
PREFIX_TILES_ADJACENT = True


def prefix_tiles_adjacent(n_groups: int, block_m: int) -> bool:
    """Whether the prefix kernel launches the programs of one (group, split) side by side, every kv
    head and query tile of ``block_m`` rows on grid axis 0, instead of the query tile as the slowest
    axis: for one group, and for tiles of 64+ rows. The query tiles of a kv head read the same keys,
    and side by side they share them in L2: on an H100 the 8B verify's cascade kernels took 411-420
    instead of 431-438 us at 8 x 8 and 4,096 tokens, 1,410-1,422 instead of 1,515-1,532 at 16,384.
    The draft's 16-row tiles of several groups went the other way (57 against 68 us at 8 x 8)."""
    return PREFIX_TILES_ADJACENT and (n_groups == 1 or block_m >= 64)


#: the tallest query tile for fp32 queries, whose dots run as IEEE fp32 FMA loops (no tensor cores).
#: With 128-row tiles the embedded SmolLM2's 64-token fp32 prompt ran as 6 programs a layer; with 32
#: rows (24 programs) the attention of a one-token call (30 prompt and 30 decode calls) took 0.55 ms
#: on an H100 against 10.3 (BENCHMARKS.md, sixteenth session; why so much was not isolated)
IEEE_MAX_BLOCK_M = 32


def _launch_config(packed: int, dim: int, ieee: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``packed`` = G*T queries per kv head; ``ieee``:
    fp32 queries, whose tiles stop at ``IEEE_MAX_BLOCK_M`` rows."""
    block_m = min(max(16, triton.next_power_of_2(packed)), IEEE_MAX_BLOCK_M if ieee else 128)
    if block_m <= 16:  # decode: few queries, wide key tiles keep more bytes in flight
        return block_m, DECODE_BLOCK_N, 4, 2
    if block_m >= 128:  # big verify / prefill: narrow key tiles keep registers in check
        return block_m, 32, 4, 3
    return block_m, 64, 4, 3


# --------------------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------------------


def _slots(block_table: torch.Tensor, start_pos: torch.Tensor, n_q: int, page_size: int):
    """(page, slot, ok) [R, T] of the positions start_pos[r] + t; ``ok`` is False where the position
    lies past the block table or its page is missing (-1), and page is clamped to 0 there."""
    pos = start_pos.long()[:, None] + torch.arange(n_q, device=start_pos.device)[None, :]
    col = pos // page_size
    inside = col < block_table.shape[1]
    page = block_table.long().gather(1, col.clamp(max=block_table.shape[1] - 1))
    ok = inside & (page >= 0)
    return page.clamp(min=0), pos % page_size, ok


def write_kv_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool_l: torch.Tensor,
    v_pool_l: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: torch.Tensor,
) -> None:
    """Store k, v [R, T, Hkv, D] at positions start_pos[r] + t of each row (torch twin, in place).

    A position past the block table or on a missing page (-1: pool exhausted) is skipped, never
    written, as the Triton kernels do. Inside a CUDA graph capture, which forbids the selection's
    data-dependent shape, such a position instead rewrites its clamped slot with that slot's own
    contents: a no-op unless a valid write of the same call lands there too, which needs an
    exhausted pool (the run then fails anyway) or a caller writing past its block table."""
    page, slot, ok = _slots(block_table, start_pos, k.shape[1], k_pool_l.shape[1])
    if k.is_cuda and torch.cuda.is_current_stream_capturing():
        keep = ok[..., None, None]
        for new, pool in ((k, k_pool_l), (v, v_pool_l)):
            pool[page, slot] = torch.where(keep, new.to(pool.dtype), pool[page, slot])
        return
    k_pool_l[page[ok], slot[ok]] = k[ok].to(k_pool_l.dtype)
    v_pool_l[page[ok], slot[ok]] = v[ok].to(v_pool_l.dtype)


# --------------------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------------------


def paged_attention_torch(
    q: torch.Tensor,
    k_pool_l: torch.Tensor,
    v_pool_l: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention of q [R, T, Hq, D] over each row's pages (torch twin; fp32 math).

    Gathers all ``max_pages`` pages of a row into contiguous K/V (static shapes), masks keys by
    absolute position (and missing pages) and returns [R, T, Hq, D] in q's dtype.
    """
    n_rows, n_q, n_qh, dim = q.shape
    _, page_size, n_kvh, _ = k_pool_l.shape
    group = n_qh // n_kvh
    max_pages = block_table.shape[1]
    n_keys = max_pages * page_size
    pages = block_table.long().clamp(min=0)
    keys = k_pool_l[pages].reshape(n_rows, n_keys, n_kvh, dim).float().permute(0, 2, 1, 3)  # [R, Hkv, S, D]
    vals = v_pool_l[pages].reshape(n_rows, n_keys, n_kvh, dim).float().permute(0, 2, 1, 3)
    qg = q.float().reshape(n_rows, n_q, n_kvh, group, dim).permute(0, 2, 3, 1, 4)  # [R, Hkv, G, T, D]
    scores = torch.einsum("rhgtd,rhsd->rhgts", qg, keys) * scale
    qpos = start_pos.long()[:, None] + torch.arange(n_q, device=q.device)[None, :]  # [R, T]
    kpos = torch.arange(n_keys, device=q.device)
    page_ok = (block_table >= 0).repeat_interleave(page_size, dim=1)  # [R, S]
    visible = (kpos[None, None, :] <= qpos[:, :, None]) & page_ok[:, None, :]  # [R, T, S]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no visible key gets zeros
    # slots past the last query were never written (may hold NaN): 0 * NaN must not reach the output
    written = (kpos[None, :] < qpos[:, -1:] + 1) & page_ok  # [R, S]
    vals = vals.masked_fill(~written[:, None, :, None], 0.0)
    out = torch.einsum("rhgts,rhsd->rhgtd", probs, vals)
    return out.permute(0, 3, 1, 2, 4).reshape(n_rows, n_q, n_qh, dim).to(q.dtype)


def paged_attention_triton(
    q: torch.Tensor,
    k_pool_l: torch.Tensor,
    v_pool_l: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    counters: torch.Tensor | None = None,
    max_keys: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`paged_attention_torch` (GQA-packed, split-KV, fp32 online softmax).

    Grid (row x kv head, KV split, query block): a program takes the packed G*T queries of one kv
    head (query block of up to 128 packed rows, 32 for fp32 queries: ``IEEE_MAX_BLOCK_M``; t-major so
    a block covers consecutive positions),
    reads each K/V page once for all of them and keeps an online softmax in fp32 over its share of
    the row's visible keys. With several splits, the last split program of each tile to finish
    merges the partial outputs by log-sum-exp in the same kernel; it elects itself on ``counters``,
    an int32 buffer of zeros with a slot per (row, kv head, query block) that the kernel leaves
    zeroed, so a caller (the native model) keeps one across calls instead of paying a memset per
    call (one is allocated when it is missing or too small). ``num_splits`` (keyword, for tests and
    tuning) overrides :func:`_num_splits`. ``max_keys``: a bound on any row's visible keys that the
    caller knows (a prefill from position 0), so the split count follows the prompt, not the page
    table's capacity (the count is a compile-time constant: an uncaptured call per prompt length
    would otherwise compile a kernel variant each).
    """
    n_rows, n_q, n_qh, dim = q.shape
    _, page_size, n_kvh, _ = k_pool_l.shape
    assert n_qh % n_kvh == 0 and dim in TRITON_HEAD_DIMS
    group = n_qh // n_kvh
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_pool_l.stride(-1) == 1 and v_pool_l.stride(-1) == 1 and block_table.is_contiguous()
    max_pages = block_table.shape[1]
    packed = group * n_q
    ieee = q.dtype == torch.float32
    block_m, block_n, num_warps, num_stages = _launch_config(packed, dim, ieee)
    n_qblocks = triton.cdiv(packed, block_m)
    n_programs = n_rows * n_kvh * n_qblocks
    min_keys = None
    if block_m <= 16:
        block_n, min_keys = _decode_tile(n_programs, q.device)
    if num_splits is None:
        capacity = max_pages * page_size if max_keys is None else min(max_pages * page_size, max_keys)
        num_splits = _num_splits(n_programs, capacity, block_m, q.device, min_keys)
    out = torch.empty_like(q)
    split = num_splits > 1
    pdl = pdl_enabled(q)
    if split:
        part_o = torch.empty((n_rows, n_q, n_qh, num_splits, dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n_rows, n_q, n_qh, num_splits), dtype=torch.float32, device=q.device)
        n_tiles = n_rows * n_kvh * n_qblocks
        if counters is None or counters.numel() < n_tiles:
            counters = torch.zeros(n_tiles, dtype=torch.int32, device=q.device)
    else:  # the kernel writes the output directly
        part_o = part_lse = counters = out
    _paged_attention_kernel[(n_rows * n_kvh, num_splits, n_qblocks)](
        q,
        k_pool_l,
        v_pool_l,
        block_table,
        start_pos,
        out,
        part_o,
        part_lse,
        counters,
        start_pos,  # prefix_len: unread without CASCADE
        scale * _LOG2E,
        n_q,
        n_kvh,
        max_pages,
        1,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_pool_l.stride(0),
        k_pool_l.stride(1),
        k_pool_l.stride(2),
        v_pool_l.stride(0),
        v_pool_l.stride(1),
        v_pool_l.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        G=group,
        D=dim,
        PAGE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NSPLIT=num_splits,
        NSPLIT_P2=triton.next_power_of_2(num_splits),
        IEEE=ieee,
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    return out


def paged_attention(
    q: torch.Tensor,
    k_pool_l: torch.Tensor,
    v_pool_l: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
    counters: torch.Tensor | None = None,
    max_keys: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention over paged K/V -> [R, T, Hq, D] (Triton on CUDA, torch otherwise).

    Head dims the Triton kernel does not take (below 16: its dot products need 16-wide tiles, or
    not a power of two) run the torch twin, on CUDA too: it is graph-safe, only slower.
    ``counters``, ``max_keys``: see :func:`paged_attention_triton` (unused by the twin).
    """
    if use_triton(q) and q.shape[-1] in TRITON_HEAD_DIMS:
        return paged_attention_triton(
            q, k_pool_l, v_pool_l, block_table, start_pos, scale, counters=counters, max_keys=max_keys
        )
    return paged_attention_torch(q, k_pool_l, v_pool_l, block_table, start_pos, scale)


# --------------------------------------------------------------------------------------------------
# cascade_attention: the group's shared prefix once, each row's suffix apart, merged by LSE
# --------------------------------------------------------------------------------------------------

#: fewest prefix keys a split of the prefix kernel covers, per packed query of its tile: each
#: split writes a [BLOCK_M, D] fp32 partial that the merge reads back, so a split must read several
#: times more K/V than that (BLOCK_M = 128: 512 keys; the draft's 32-row tiles: 128 keys)
PREFIX_KEYS_PER_QUERY = 4
#: most partial slots (suffix splits + prefix splits) one query merges
MAX_SLOTS = 48
#: partial outputs the prefix kernel's merge loads per loop step: all unrolled (0) spilled
#: registers (ptxas, sm_90), one at a time waits out a memory latency per slot. Small tiles (the
#: draft's 32 x 64) load 8 at a time, big ones (the verify's 128 x 128, on 8 warps) 2
MERGE_PER_ITER_SMALL = 8
MERGE_PER_ITER_BIG = 2
#: packed queries x head dim from which a prefix tile counts as big (8 warps, MERGE_PER_ITER_BIG)
BIG_TILE = 128 * 128
#: most splits of the suffix kernel: a suffix holds only the generated tokens (hundreds), and each
#: split adds a partial to merge
SUFFIX_MAX_SPLITS = 4


def _check_groups(n_rows: int, group: int, prefix_len: torch.Tensor) -> None:
    if group < 1 or n_rows % group:
        raise ValueError(f"cascade attention: group must divide the {n_rows} rows, got {group}")
    if prefix_len.numel() != n_rows // group:
        raise ValueError(
            f"cascade attention: prefix_len needs one entry per group ({n_rows // group}), got {prefix_len.numel()}"
        )


def cascade_attention_torch(
    q: torch.Tensor,
    k_pool_l: torch.Tensor,
    v_pool_l: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
    prefix_len: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """:func:`paged_attention_torch` for rows that share a prefix (torch twin; fp32 math).

    Rows ``g*group .. g*group + group - 1`` hold the same keys and values at positions
    < ``prefix_len[g]``. The prefix is gathered once per group (from its first row's pages) and all
    the group's queries attend to it in one batched product; each row's own keys
    [prefix_len, position] are attended apart; the two halves are merged by their log-sum-exp.
    """
    n_rows, n_q, n_qh, dim = q.shape
    _check_groups(n_rows, group, prefix_len)
    _, page_size, n_kvh, _ = k_pool_l.shape
    n_groups, hg = n_rows // group, n_qh // n_kvh
    max_pages = block_table.shape[1]
    n_keys = max_pages * page_size
    kpos = torch.arange(n_keys, device=q.device)
    qpos = start_pos.long()[:, None] + torch.arange(n_q, device=q.device)[None, :]  # [R, T]
    plen = prefix_len.long().repeat_interleave(group)  # [R]
    qg = q.float().reshape(n_rows, n_q, n_kvh, hg, dim).permute(0, 2, 3, 1, 4)  # [R, Hkv, G, T, D]

    def gather(pool, pages, rows):  # -> [rows, Hkv, S, D]
        return pool[pages].reshape(rows, n_keys, n_kvh, dim).float().permute(0, 2, 1, 3)

    # prefix: the group's first row's pages, every query of the group in one product per kv head
    lead = block_table[::group].long()
    lead_ok = (lead >= 0).repeat_interleave(page_size, dim=1)  # [B, S]
    pk, pv = gather(k_pool_l, lead.clamp(min=0), n_groups), gather(v_pool_l, lead.clamp(min=0), n_groups)
    in_prefix = lead_ok & (kpos[None, :] < prefix_len.long()[:, None])  # [B, S]
    pv = pv.masked_fill(~in_prefix[:, None, :, None], 0.0)
    qb = qg.reshape(n_groups, group, n_kvh, hg, n_q, dim).permute(0, 2, 1, 3, 4, 5)  # [B, Hkv, N, G, T, D]
    s_pre = torch.einsum("bhngtd,bhsd->bhngts", qb, pk) * scale
    vis_pre = in_prefix.view(n_groups, 1, 1, 1, 1, n_keys) & (
        kpos.view(1, 1, 1, 1, 1, -1) <= qpos.view(n_groups, 1, group, 1, n_q, 1)
    )
    s_pre = s_pre.masked_fill(~vis_pre, float("-inf"))
    s_pre = s_pre.permute(0, 2, 1, 3, 4, 5).reshape(n_rows, n_kvh, hg, n_q, n_keys)  # [R, Hkv, G, T, S]

    # suffix: each row's own keys at positions [prefix_len, position]
    pages = block_table.long()
    page_ok = (pages >= 0).repeat_interleave(page_size, dim=1)  # [R, S]
    sk, sv = gather(k_pool_l, pages.clamp(min=0), n_rows), gather(v_pool_l, pages.clamp(min=0), n_rows)
    own = page_ok & (kpos[None, :] >= plen[:, None]) & (kpos[None, :] < qpos[:, -1:] + 1)  # [R, S] written
    sv = sv.masked_fill(~own[:, None, :, None], 0.0)
    s_suf = torch.einsum("rhgtd,rhsd->rhgts", qg, sk) * scale
    vis_suf = own[:, None, :] & (kpos[None, None, :] <= qpos[:, :, None])  # [R, T, S]
    s_suf = s_suf.masked_fill(~vis_suf[:, None, None], float("-inf"))

    # the merge: each half's softmax weighted by its share of the total mass
    lse = torch.stack([s_pre.logsumexp(-1), s_suf.logsumexp(-1)])  # [2, R, Hkv, G, T]
    total = lse.logsumexp(0)
    w = torch.exp(lse - total).nan_to_num(0.0)  # a query with no visible key gets zeros
    o_pre = torch.einsum(
        "rhgts,rhsd->rhgtd", torch.softmax(s_pre, -1).nan_to_num(0.0), pv.repeat_interleave(group, dim=0)
    )
    o_suf = torch.einsum("rhgts,rhsd->rhgtd", torch.softmax(s_suf, -1).nan_to_num(0.0), sv)
    out = w[0][..., None] * o_pre + w[1][..., None] * o_suf
    return out.permute(0, 3, 1, 2, 4).reshape(n_rows, n_q, n_qh, dim).to(q.dtype)


def cascade_attention_triton(
    q: torch.Tensor,
    k_pool_l: torch.Tensor,
    v_pool_l: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
    prefix_len: torch.Tensor,
    group: int,
    min_prefix: int = 0,
    *,
    num_splits: int | None = None,
    prefix_splits: int | None = None,
    prefix_block_m: int | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`cascade_attention_torch`: two kernels, no extra memset.

    The suffix kernel (``_paged_attention_kernel`` with CASCADE: each row's keys from
    ``prefix_len`` on) writes its splits' partial outputs and log-sum-exps to slots 0..S-1; the
    prefix kernel reads each prefix K/V tile once for the GROUP * T * G packed queries of a group
    and kv head, writes its splits' partials to the slots after them, and the last of a tile's
    split programs to finish merges every slot into ``out``. ``min_prefix`` (the shortest prefix,
    a host int) sizes the splits; ``prefix_len`` [groups] int32 on the device holds the lengths
    (a captured graph reads them where they lie). ``num_splits`` / ``prefix_splits`` (tests and
    tuning) override the suffix's and the prefix's split counts, ``prefix_block_m`` (a power of two
    in 16..128) the prefix kernel's packed query rows per program; ``counters``: see
    :func:`paged_attention_triton` (a slot per group x kv head x prefix query block).
    """
    n_rows, n_q, n_qh, dim = q.shape
    _check_groups(n_rows, group, prefix_len)
    _, page_size, n_kvh, _ = k_pool_l.shape
    assert n_qh % n_kvh == 0 and dim in TRITON_HEAD_DIMS
    hg = n_qh // n_kvh
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_pool_l.stride(-1) == 1 and v_pool_l.stride(-1) == 1 and block_table.is_contiguous()
    prefix_len = prefix_len.to(torch.int32).contiguous()
    max_pages = block_table.shape[1]
    n_groups = n_rows // group
    dev = q.device

    # suffix: the plain kernel's tiling, split by the longest suffix the table can hold
    block_m, block_n, num_warps, num_stages = _launch_config(hg * n_q, dim)
    n_qblocks = triton.cdiv(hg * n_q, block_m)
    n_programs = n_rows * n_kvh * n_qblocks
    min_keys = None
    if block_m <= 16:
        block_n, min_keys = _decode_tile(n_programs, dev)
    suffix_keys = max(max_pages * page_size - max(min_prefix, 0), 1)
    if num_splits is None:
        num_splits = min(_num_splits(n_programs, suffix_keys, block_m, dev, min_keys), SUFFIX_MAX_SPLITS)
    # prefix: the group's packed queries in tiles of prefix_tile() rows (two or more), split to fill the GPU
    if prefix_block_m is not None and (prefix_block_m not in (16, 32, 64, 128)):
        raise ValueError(f"prefix_block_m must be 16, 32, 64 or 128, got {prefix_block_m!r}")
    pm, pn, p_warps, p_stages = _launch_config(prefix_block_m or prefix_tile(group * hg * n_q), dim)
    big = pm * dim >= BIG_TILE
    if big:  # 128 x 128 fp32 accumulators on 4 warps spilled 6 KB a thread, 1 KB on 8 (ptxas, sm_90)
        p_warps = 8
    p_qblocks = triton.cdiv(group * hg * n_q, pm)
    p_programs = n_groups * n_kvh * p_qblocks
    if prefix_splits is None:
        per_split = max(MIN_KEYS_PER_SPLIT // 2, PREFIX_KEYS_PER_QUERY * pm)
        prefix_splits = _num_splits(p_programs, max(min_prefix, 1), pm, dev, per_split)
        prefix_splits = max(1, min(prefix_splits, MAX_SLOTS - num_splits))
    n_slots = num_splits + prefix_splits

    out = torch.empty_like(q)
    part_o = torch.empty((n_rows, n_q, n_qh, n_slots, dim), dtype=torch.float32, device=dev)
    part_lse = torch.empty((n_rows, n_q, n_qh, n_slots), dtype=torch.float32, device=dev)
    n_tiles = p_programs
    if prefix_splits > 1 and (counters is None or counters.numel() < n_tiles):
        counters = torch.zeros(n_tiles, dtype=torch.int32, device=dev)
    elif counters is None:
        counters = part_lse  # unread with one prefix split
    pdl = pdl_enabled(q)
    ieee = q.dtype == torch.float32
    common = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_pool_l.stride(0),
        k_pool_l.stride(1),
        k_pool_l.stride(2),
        v_pool_l.stride(0),
        v_pool_l.stride(1),
        v_pool_l.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    _paged_attention_kernel[(n_rows * n_kvh, num_splits, n_qblocks)](
        q, k_pool_l, v_pool_l, block_table, start_pos, out, part_o, part_lse, counters, prefix_len,
        scale * _LOG2E, n_q, n_kvh, max_pages, group, *common,
        G=hg, D=dim, PAGE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, NSPLIT=num_splits,
        NSPLIT_P2=triton.next_power_of_2(num_splits), IEEE=ieee, PDL=pdl, CASCADE=True, NSLOT=n_slots,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    adjacent = prefix_tiles_adjacent(n_groups, pm)
    p_grid = (n_kvh * p_qblocks, prefix_splits, n_groups) if adjacent else (n_groups * n_kvh, prefix_splits, p_qblocks)
    _prefix_attention_kernel[p_grid](
        q, k_pool_l, v_pool_l, block_table, start_pos, prefix_len, out, part_o, part_lse, counters,
        scale * _LOG2E, n_q, n_kvh, max_pages, group, *common,
        G=hg, D=dim, PAGE=page_size, BLOCK_M=pm, BLOCK_N=pn, NSPLIT=prefix_splits, SLOT0=num_splits,
        NSLOT=n_slots, NSLOT_P2=triton.next_power_of_2(n_slots), IEEE=ieee, PDL=pdl,
        MERGE_PER_ITER=MERGE_PER_ITER_BIG if big else MERGE_PER_ITER_SMALL, TILES_ADJACENT=adjacent,
        num_warps=p_warps, num_stages=p_stages, launch_pdl=pdl,
    )  # fmt: skip
    return out


def cascade_attention(
    q: torch.Tensor,
    k_pool_l: torch.Tensor,
    v_pool_l: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
    prefix_len: torch.Tensor,
    group: int,
    min_prefix: int = 0,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cascade attention -> [R, T, Hq, D] (Triton on CUDA, torch otherwise); same result as
    :func:`paged_attention` when the rows of each group hold the same K/V below ``prefix_len``."""
    if use_triton(q) and q.shape[-1] in TRITON_HEAD_DIMS:
        return cascade_attention_triton(
            q, k_pool_l, v_pool_l, block_table, start_pos, scale, prefix_len, group, min_prefix, counters=counters
        )
    return cascade_attention_torch(q, k_pool_l, v_pool_l, block_table, start_pos, scale, prefix_len, group)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _merge_partials(
        part_o,
        part_lse,
        row,
        m_ok,
        d,
        BLOCK_M: tl.constexpr,
        D: tl.constexpr,
        NSLOT: tl.constexpr,
        NSLOT_P2: tl.constexpr,
        PER_ITER: tl.constexpr = 0,
    ):
        """Merge the NSLOT partial outputs of packed rows ``row`` by their log-sum-exp (log2 units).

        Every slot's log-sum-exp in one load and (PER_ITER 0, for small tiles) every partial
        output's load unrolled: a loop over the slots would wait out one memory latency per slot.
        A large tile loads PER_ITER slots per loop step instead: each load is already wide, and
        fully unrolled ones spilled registers (ptxas, sm_90: 21 KB a thread at 128 x 128 and 10
        slots, against 1.6 KB for the kernel without its merge). A row with no visible key gets zeros.
        """
        sp = tl.arange(0, NSLOT_P2)
        lse_all = tl.load(
            part_lse + row[:, None] * NSLOT + sp[None, :],
            mask=m_ok[:, None] & (sp[None, :] < NSLOT),
            other=float("-inf"),
            cache_modifier=".cg",
        )
        m_all = tl.max(lse_all, 1)
        m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
        w_all = tl.exp2(lse_all - m_use[:, None])
        l_all = tl.sum(w_all, 1)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if PER_ITER == 0:
            for s_i in tl.static_range(NSLOT):
                w_s = tl.sum(tl.where(sp[None, :] == s_i, w_all, 0.0), 1)
                o_s = tl.load(
                    part_o + (row * NSLOT + s_i)[:, None] * D + d[None, :],
                    mask=m_ok[:, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
                acc += w_s[:, None] * o_s
        else:
            for s0 in range(0, NSLOT, PER_ITER):
                for j in tl.static_range(PER_ITER):
                    ok = m_ok & (s0 + j < NSLOT)
                    lse_s = tl.load(part_lse + row * NSLOT + s0 + j, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    o_s = tl.load(
                        part_o + (row * NSLOT + s0 + j)[:, None] * D + d[None, :],
                        mask=ok[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    acc += tl.exp2(lse_s - m_use)[:, None] * o_s
        return acc / tl.where(l_all > 0, l_all, 1.0)[:, None]

    @triton.jit
    def _prefix_attention_kernel(
        q,
        k_pool,
        v_pool,
        bt,
        start_pos,
        prefix_len,
        out,
        part_o,
        part_lse,
        counters,
        qk_scale,
        T,
        n_kvh,
        max_pages,
        GROUP,
        s_qr,
        s_qt,
        s_qh,
        s_kp,
        s_ks,
        s_kh,
        s_vp,
        s_vs,
        s_vh,
        s_or,
        s_ot,
        s_oh,
        G: tl.constexpr,
        D: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NSPLIT: tl.constexpr,
        SLOT0: tl.constexpr,
        NSLOT: tl.constexpr,
        NSLOT_P2: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr,
        MERGE_PER_ITER: tl.constexpr = 0,
        TILES_ADJACENT: tl.constexpr = False,
    ):
        """The shared-prefix half of cascade attention, and the merge of both halves.

        Program (group x kv head, prefix split, query block), launched as grid (kv head x query
        block, split, group) with TILES_ADJACENT (see :func:`prefix_tiles_adjacent`): the packed
        queries of every row of the group, m = (n * T + t) * G + g, against the group's prefix keys
        [0, prefix_len[group]) read from the group's first row's pages: each K/V tile is loaded once
        for all GROUP * T * G queries. The split's partial goes to slot SLOT0 + split (the suffix kernel, launched just
        before, filled slots 0 .. SLOT0 - 1); the tile's last program to arrive merges all NSLOT.
        """
        pdl_wait(PDL)
        if TILES_ADJACENT:
            n_qblocks = tl.num_programs(0) // n_kvh
            pid = tl.program_id(2) * n_kvh + tl.program_id(0) // n_qblocks
            qblock = tl.program_id(0) % n_qblocks
        else:
            pid, qblock, n_qblocks = tl.program_id(0), tl.program_id(2), tl.num_programs(2)
        grp = pid // n_kvh
        kvh = pid % n_kvh
        split = tl.program_id(1)
        m = qblock * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < GROUP * T * G
        rem = m % (T * G)
        leader = grp * GROUP
        r = leader + tl.where(m_ok, m // (T * G), 0)
        t = rem // G
        head = kvh * G + rem % G
        d = tl.arange(0, D)
        qpos = tl.load(start_pos + r) + t
        plen = tl.load(prefix_len + grp)
        chunk = tl.cdiv(tl.cdiv(plen, NSPLIT), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, plen)

        qt = tl.load(q + r[:, None] * s_qr + t[:, None] * s_qt + head[:, None] * s_qh + d[None, :], mask=m_ok[:, None])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            page = tl.load(bt + leader * max_pages + n // PAGE, mask=n < hi, other=-1).to(tl.int64)
            n_ok = (n < hi) & (page >= 0)
            slot = n % PAGE
            kt = tl.load(
                k_pool + (page * s_kp + slot * s_ks + kvh * s_kh)[None, :] + d[:, None], mask=n_ok[None, :], other=0.0
            )
            if IEEE:
                s = tl.dot(qt, kt.to(qt.dtype), input_precision="ieee")
            else:
                s = tl.dot(qt, kt.to(qt.dtype))
            # a query inside the prefix (never in the engine, which queries past the prompt) stays causal
            visible = n_ok[None, :] & (n[None, :] <= qpos[:, None])
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                v_pool + (page * s_vp + slot * s_vs + kvh * s_vh)[:, None] + d[None, :], mask=n_ok[:, None], other=0.0
            )
            if IEEE:
                pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        pdl_release(PDL)

        safe_l = tl.where(l_i > 0, l_i, 1.0)
        row = (r * T + t) * (n_kvh * G) + head
        tl.store(
            part_o + (row * NSLOT + SLOT0 + split)[:, None] * D + d[None, :], acc / safe_l[:, None], mask=m_ok[:, None]
        )
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse + row * NSLOT + SLOT0 + split, lse, mask=m_ok)
        tl.debug_barrier()
        last = True
        if NSPLIT > 1:  # the tile's last split program merges (see _paged_attention_kernel)
            tile = pid * n_qblocks + qblock
            arrived = tl.atomic_add(counters + tile, 1, sem="acq_rel")
            last = arrived == NSPLIT - 1
        if last:
            tl.debug_barrier()
            res = _merge_partials(part_o, part_lse, row, m_ok, d, BLOCK_M, D, NSLOT, NSLOT_P2, MERGE_PER_ITER)
            optr = out + r[:, None] * s_or + t[:, None] * s_ot + head[:, None] * s_oh + d[None, :]
            tl.store(optr, res.to(out.dtype.element_ty), mask=m_ok[:, None])
            if NSPLIT > 1:
                tl.atomic_xchg(counters + tile, 0)

    @triton.jit
    def paged_attention_tile(
        pid,
        split,
        qblock,
        n_qblocks,
        q,
        k_pool,
        v_pool,
        bt,
        start_pos,
        out,
        part_o,
        part_lse,
        counters,
        prefix_len,
        qk_scale,
        T,
        n_kvh,
        max_pages,
        GROUP,
        s_qr,
        s_qt,
        s_qh,
        s_kp,
        s_ks,
        s_kh,
        s_vp,
        s_vs,
        s_vh,
        s_or,
        s_ot,
        s_oh,
        G: tl.constexpr,
        D: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NSPLIT: tl.constexpr,
        NSPLIT_P2: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr,
        CASCADE: tl.constexpr = False,
        NSLOT: tl.constexpr = 1,
    ):
        """One program of ``_paged_attention_kernel``: (row x kv head ``pid``, KV split ``split``,
        query block ``qblock`` of ``n_qblocks``); ``kernels.decode_layer`` runs the same work items."""
        pdl_wait(PDL)
        r = pid // n_kvh
        kvh = pid % n_kvh
        # packed query row m = t * G + g: query t of head kvh * G + g
        m = qblock * BLOCK_M + tl.arange(0, BLOCK_M)
        t = m // G
        head = kvh * G + m % G
        m_ok = m < G * T
        d = tl.arange(0, D)
        start = tl.load(start_pos + r)
        qpos = start + t
        # keys this block can see: [0, position of its last query]; this split's share of them
        kv_end = start + tl.minimum(T - 1, (qblock * BLOCK_M + BLOCK_M - 1) // G) + 1
        if CASCADE:  # the suffix only: the group's shared prefix is the prefix kernel's
            kv_lo = tl.load(prefix_len + r // GROUP)
            span = tl.maximum(kv_end - kv_lo, 0)
        else:
            kv_lo = 0
            span = kv_end
        chunk = tl.cdiv(tl.cdiv(span, NSPLIT), BLOCK_N) * BLOCK_N
        lo = kv_lo + split * chunk
        hi = tl.minimum(lo + chunk, kv_end)

        qt = tl.load(q + r * s_qr + t[:, None] * s_qt + head[:, None] * s_qh + d[None, :], mask=m_ok[:, None])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            page = tl.load(bt + r * max_pages + n // PAGE, mask=n < hi, other=-1).to(tl.int64)
            n_ok = (n < hi) & (page >= 0)
            slot = n % PAGE
            kt = tl.load(
                k_pool + (page * s_kp + slot * s_ks + kvh * s_kh)[None, :] + d[:, None], mask=n_ok[None, :], other=0.0
            )
            if IEEE:
                s = tl.dot(qt, kt.to(qt.dtype), input_precision="ieee")
            else:
                s = tl.dot(qt, kt.to(qt.dtype))
            visible = n_ok[None, :] & (n[None, :] <= qpos[:, None])
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: avoid -inf - -inf
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                v_pool + (page * s_vp + slot * s_vs + kvh * s_vh)[:, None] + d[None, :], mask=n_ok[:, None], other=0.0
            )
            if IEEE:
                pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        pdl_release(PDL)  # the key/value stream is done: the next kernel may launch

        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        if CASCADE:  # a partial for the prefix kernel to merge (slots 0 .. NSPLIT - 1)
            row = (r * T + t) * (n_kvh * G) + head
            tl.store(part_o + (row * NSLOT + split)[:, None] * D + d[None, :], o, mask=m_ok[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
            tl.store(part_lse + row * NSLOT + split, lse, mask=m_ok)
        elif NSPLIT > 1:
            row = (r * T + t) * (n_kvh * G) + head
            tl.store(part_o + (row * NSPLIT + split)[:, None] * D + d[None, :], o, mask=m_ok[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
            tl.store(part_lse + row * NSPLIT + split, lse, mask=m_ok)
            # The tile's last split program to arrive merges all splits (an acq_rel atomic after
            # a CTA barrier orders every thread's partial stores before the count) and re-zeroes
            # the counter for the next launch.
            tile = pid * n_qblocks + qblock
            tl.debug_barrier()
            arrived = tl.atomic_add(counters + tile, 1, sem="acq_rel")
            if arrived == NSPLIT - 1:
                tl.debug_barrier()
                res = _merge_partials(part_o, part_lse, row, m_ok, d, BLOCK_M, D, NSPLIT, NSPLIT_P2)
                optr = out + r * s_or + t[:, None] * s_ot + head[:, None] * s_oh + d[None, :]
                tl.store(optr, res.to(out.dtype.element_ty), mask=m_ok[:, None])
                tl.atomic_xchg(counters + tile, 0)
        else:
            optr = out + r * s_or + t[:, None] * s_ot + head[:, None] * s_oh + d[None, :]
            tl.store(optr, o.to(out.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _paged_attention_kernel(
        q,
        k_pool,
        v_pool,
        bt,
        start_pos,
        out,
        part_o,
        part_lse,
        counters,
        prefix_len,
        qk_scale,
        T,
        n_kvh,
        max_pages,
        GROUP,
        s_qr,
        s_qt,
        s_qh,
        s_kp,
        s_ks,
        s_kh,
        s_vp,
        s_vs,
        s_vh,
        s_or,
        s_ot,
        s_oh,
        G: tl.constexpr,
        D: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NSPLIT: tl.constexpr,
        NSPLIT_P2: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr,
        CASCADE: tl.constexpr = False,
        NSLOT: tl.constexpr = 1,
    ):
        paged_attention_tile(
            tl.program_id(0),
            tl.program_id(1),
            tl.program_id(2),
            tl.num_programs(2),
            q,
            k_pool,
            v_pool,
            bt,
            start_pos,
            out,
            part_o,
            part_lse,
            counters,
            prefix_len,
            qk_scale,
            T,
            n_kvh,
            max_pages,
            GROUP,
            s_qr,
            s_qt,
            s_qh,
            s_kp,
            s_ks,
            s_kh,
            s_vp,
            s_vs,
            s_vh,
            s_or,
            s_ot,
            s_oh,
            G,
            D,
            PAGE,
            BLOCK_M,
            BLOCK_N,
            NSPLIT,
            NSPLIT_P2,
            IEEE,
            PDL,
            CASCADE,
            NSLOT,
        )
