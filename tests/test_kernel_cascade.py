"""Cascade attention: the shared prefix once per group, each row's suffix apart, merged by LSE.

Checked against the plain paged attention (the twin and, in the interpreter or on the GPU, the
Triton kernel) on caches whose groups of rows share their prefix the way the engine's do: full
pages shared, the partial page copied per row, suffix pages of each row its own. Shapes cover the
draft (T = 1, 2), the verify (T = 9), GQA groups 1 / 4 / 7, several groups, prefixes that end
mid-page and at a page boundary, one and several splits of each half, and queries inside the prefix.
"""

from __future__ import annotations

import pytest
import torch

from smcgen.kernels.attention import (
    cascade_attention,
    cascade_attention_torch,
    cascade_attention_triton,
    paged_attention_torch,
    prefix_tile,
)


def shared_cache(n_groups, group, prefix, max_pages, ps, n_kvh, dim, device, dtype=torch.float32, seed=0):
    """Pools and a block table where each group's rows hold the same K/V below ``prefix``."""
    g = torch.Generator().manual_seed(seed)
    n_rows = n_groups * group
    n_pages = n_rows * max_pages + 2
    k_pool = torch.randn(n_pages, ps, n_kvh, dim, generator=g)
    v_pool = torch.randn(n_pages, ps, n_kvh, dim, generator=g)
    table = torch.randperm(n_pages, generator=g)[: n_rows * max_pages].view(n_rows, max_pages).clone()
    full, part = divmod(prefix, ps)
    for b in range(n_groups):
        rows = slice(b * group, (b + 1) * group)
        table[rows, :full] = table[b * group, :full].clone()  # full prefix pages shared
        if part:  # the partial page: each row its own copy of the same prefix slots
            lead = table[b * group, full]
            for r in range(b * group + 1, (b + 1) * group):
                k_pool[table[r, full], :part] = k_pool[lead, :part]
                v_pool[table[r, full], :part] = v_pool[lead, :part]
    return k_pool.to(device, dtype), v_pool.to(device, dtype), table.to(torch.int32).to(device)


CASES = [
    # groups, group, T, Hq, Hkv, D, page, max_pages, prefix, suffix splits, prefix splits
    (1, 4, 1, 8, 2, 64, 16, 6, 40, None, None),  # draft step, G=4, prefix ends mid-page
    (2, 3, 2, 8, 2, 64, 16, 5, 32, 1, 3),  # the draft's first step (T=2), two groups, page boundary
    (1, 4, 9, 32, 8, 128, 16, 4, 37, 2, 2),  # verify, Llama-3-8B heads
    (1, 4, 9, 32, 8, 128, 16, 4, 37, 1, 2),  # ... an odd slot count for the big tile's 2-slot merge steps
    (2, 2, 9, 14, 2, 64, 8, 8, 21, 3, 4),  # Qwen2-0.5B grouping (G=7), page size 8
    (1, 8, 5, 4, 4, 64, 16, 4, 17, None, None),  # G=1, 40 packed rows per kv head
]


@pytest.mark.parametrize(
    ("n_groups", "group", "n_q", "n_qh", "n_kvh", "dim", "ps", "max_pages", "prefix", "splits", "psplits"), CASES
)
def test_cascade_matches_paged_attention(
    device, n_groups, group, n_q, n_qh, n_kvh, dim, ps, max_pages, prefix, splits, psplits
):
    k_pool, v_pool, table = shared_cache(n_groups, group, prefix, max_pages, ps, n_kvh, dim, device, seed=n_q)
    n_rows = n_groups * group
    gen = torch.Generator().manual_seed(n_q + dim)
    # every query past the prefix (as in the engine), rows at different positions
    start = prefix + torch.randint(0, max_pages * ps - n_q - prefix + 1, (n_rows,), generator=gen)
    start[0] = prefix
    start = start.to(torch.int32).to(device)
    q = torch.randn(n_rows, n_q, n_qh, dim, generator=gen).to(device)
    plen = torch.full((n_groups,), prefix, dtype=torch.int32, device=device)
    scale = dim**-0.5
    ref = paged_attention_torch(q, k_pool, v_pool, table, start, scale)
    twin = cascade_attention_torch(q, k_pool, v_pool, table, start, scale, plen, group)
    torch.testing.assert_close(twin, ref, rtol=1e-5, atol=1e-5)
    counters = torch.zeros(64, dtype=torch.int32, device=device)
    for _ in range(2):  # the same counters twice: the kernel leaves them zeroed
        out = cascade_attention_triton(
            q,
            k_pool,
            v_pool,
            table,
            start,
            scale,
            plen,
            group,
            prefix,
            num_splits=splits,
            prefix_splits=psplits,
            counters=counters,
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
        assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("prefix_block_m", [32, 64])
def test_smaller_prefix_tiles_agree(device, prefix_block_m):
    """The prefix kernel's query tile is a tuning knob (fewer registers, more programs): the verify's
    144 packed queries per kv head in 5 or 3 tiles give the same attention; a tile that is not a
    power of two in 16..128 is refused by name."""
    n_groups, group, n_q, n_qh, n_kvh, dim, ps, max_pages, prefix = 1, 4, 9, 32, 8, 128, 16, 4, 37
    k_pool, v_pool, table = shared_cache(n_groups, group, prefix, max_pages, ps, n_kvh, dim, device, seed=5)
    gen = torch.Generator().manual_seed(11)
    start = torch.tensor([prefix, prefix + 3, prefix + 9, prefix + 1], dtype=torch.int32).to(device)
    q = torch.randn(n_groups * group, n_q, n_qh, dim, generator=gen).to(device)
    plen = torch.full((n_groups,), prefix, dtype=torch.int32, device=device)
    ref = paged_attention_torch(q, k_pool, v_pool, table, start, dim**-0.5)
    out = cascade_attention_triton(
        q, k_pool, v_pool, table, start, dim**-0.5, plen, group, prefix, prefix_splits=2, prefix_block_m=prefix_block_m
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="prefix_block_m must be 16, 32, 64 or 128"):
        cascade_attention_triton(q, k_pool, v_pool, table, start, 0.1, plen, group, prefix, prefix_block_m=48)


@pytest.mark.parametrize("adjacent", [True, False])
def test_either_prefix_grid_order_agrees(device, monkeypatch, adjacent):
    """The prefix kernel's query tiles launched side by side (L2 sharing) or as the slowest grid axis:
    two groups, 2 kv heads x 4 query tiles (sizes with a common factor, so a decode that mixes up
    kv head and tile goes wrong) and 3 splits give the same result; the merge counters used are
    exactly one per (group, kv head, tile), left zeroed, and the slots past them untouched."""
    from smcgen.kernels import attention

    monkeypatch.setattr(attention, "prefix_tiles_adjacent", lambda n_groups, block_m: adjacent)
    # 4 rows x 8 queries x 4 query heads per kv head = 128 packed queries: 4 tiles of 32
    n_groups, group, n_q, n_qh, n_kvh, dim, ps, max_pages, prefix = 2, 4, 8, 8, 2, 64, 16, 5, 50
    k_pool, v_pool, table = shared_cache(n_groups, group, prefix, max_pages, ps, n_kvh, dim, device, seed=3)
    gen = torch.Generator().manual_seed(7)
    start = (prefix + torch.randint(0, 12, (n_groups * group,), generator=gen)).to(torch.int32).to(device)
    q = torch.randn(n_groups * group, n_q, n_qh, dim, generator=gen).to(device)
    plen = torch.full((n_groups,), prefix, dtype=torch.int32, device=device)
    ref = paged_attention_torch(q, k_pool, v_pool, table, start, dim**-0.5)
    used = n_groups * n_kvh * 4
    counters = torch.zeros(used + 8, dtype=torch.int32, device=device)
    counters[used:] = 1000  # a slot index past the tiles would disturb these
    for _ in range(2):
        out = cascade_attention_triton(
            q, k_pool, v_pool, table, start, dim**-0.5, plen, group, prefix,
            prefix_splits=3, prefix_block_m=32, counters=counters,
        )  # fmt: skip
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
        assert int(counters[:used].abs().sum()) == 0
        assert (counters[used:] == 1000).all()


def test_prefix_grid_order_rule(monkeypatch):
    """Side by side for one group and for 64-row tiles; the draft's small tiles of several groups
    keep the old order; the module switch turns the new order off everywhere."""
    from smcgen.kernels import attention

    assert attention.prefix_tiles_adjacent(1, 16) and attention.prefix_tiles_adjacent(8, 64)
    assert not attention.prefix_tiles_adjacent(8, 16)
    monkeypatch.setattr(attention, "PREFIX_TILES_ADJACENT", False)
    assert not attention.prefix_tiles_adjacent(1, 64)


def test_prefix_tiles_split_every_group_in_two_or_more():
    """The default prefix query tile (measured on an H100: lighter programs win on the small prefix
    grid) is a power of two in 16..64 that leaves every (group, kv head) at least two query tiles."""
    assert (prefix_tile(288), prefix_tile(32), prefix_tile(16), prefix_tile(8)) == (64, 16, 16, 16)
    for packed in range(17, 2049):
        tile = prefix_tile(packed)
        assert tile in (16, 32, 64) and -(-packed // tile) >= 2, packed


def test_queries_inside_the_prefix_stay_causal(device):
    """A query at a position below the prefix length sees only the keys up to it (never the engine's
    case, but the kernels must not leak later prefix keys into it)."""
    k_pool, v_pool, table = shared_cache(1, 2, 40, 4, 16, 1, 64, device, seed=5)
    start = torch.tensor([30, 35], dtype=torch.int32, device=device)  # queries at 30..38 < 40
    q = torch.randn(2, 9, 4, 64, generator=torch.Generator().manual_seed(2)).to(device)
    plen = torch.tensor([40], dtype=torch.int32, device=device)
    ref = paged_attention_torch(q, k_pool, v_pool, table, start, 0.125)
    twin = cascade_attention_torch(q, k_pool, v_pool, table, start, 0.125, plen, 2)
    torch.testing.assert_close(twin, ref, rtol=1e-5, atol=1e-5)
    out = cascade_attention_triton(q, k_pool, v_pool, table, start, 0.125, plen, 2, 40, prefix_splits=2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


def test_per_group_prefix_lengths(device):
    """Groups with prefixes of different lengths (the lengths live on the device)."""
    k_pool, v_pool, table = shared_cache(2, 2, 16, 5, 16, 2, 64, device, seed=7)
    # group 1 shares only its first 16 tokens, group 0 the same 16 (the cache's sharing)
    plen = torch.tensor([16, 9], dtype=torch.int32, device=device)
    start = torch.tensor([20, 33, 18, 60], dtype=torch.int32, device=device)
    q = torch.randn(4, 3, 8, 64, generator=torch.Generator().manual_seed(3)).to(device)
    ref = paged_attention_torch(q, k_pool, v_pool, table, start, 0.125)
    twin = cascade_attention_torch(q, k_pool, v_pool, table, start, 0.125, plen, 2)
    torch.testing.assert_close(twin, ref, rtol=1e-5, atol=1e-5)
    out = cascade_attention_triton(q, k_pool, v_pool, table, start, 0.125, plen, 2, 9, prefix_splits=2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("plen", [[0, 0], [0, 9], [40, 16]])
def test_split_sizes_from_another_prompt_stay_exact(device, plen):
    """A kept run's captured cycle replays for prompts of other lengths with the split counts sized
    for the first one (``min_prefix`` 24 here): each split's key range comes from the lengths on the
    device, so shorter prefixes (none at all included: a two-token prompt leaves the draft's cache no
    shared prefix) and longer ones attend exactly as the plain kernel does."""
    prefix = max(plen)
    k_pool, v_pool, table = shared_cache(2, 2, prefix, 5, 16, 2, 64, device, seed=11)
    plen_t = torch.tensor(plen, dtype=torch.int32, device=device)
    start = torch.tensor([prefix + 1, prefix + 7, prefix, prefix + 20], dtype=torch.int32, device=device)
    q = torch.randn(4, 2, 8, 64, generator=torch.Generator().manual_seed(5)).to(device)
    ref = paged_attention_torch(q, k_pool, v_pool, table, start, 0.125)
    out = cascade_attention_triton(q, k_pool, v_pool, table, start, 0.125, plen_t, 2, 24, prefix_splits=3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cascade_half_precision(device, dtype):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's CPU interpreter mishandles bf16 tl.dot (numpy has no bf16); runs on CUDA")
    k_pool, v_pool, table = shared_cache(1, 4, 48, 5, 16, 2, 64, device, dtype=dtype, seed=9)
    start = torch.tensor([48, 50, 60, 70], dtype=torch.int32, device=device)
    q = torch.randn(4, 9, 8, 64, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    plen = torch.tensor([48], dtype=torch.int32, device=device)
    ref = paged_attention_torch(q.float(), k_pool.float(), v_pool.float(), table, start, 0.125)
    out = cascade_attention_triton(q, k_pool, v_pool, table, start, 0.125, plen, 4, 48, prefix_splits=2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_bad_groups_are_refused():
    q = torch.zeros(6, 1, 4, 16)
    pool = torch.zeros(4, 16, 2, 16)
    table = torch.zeros(6, 2, dtype=torch.int32)
    start = torch.zeros(6, dtype=torch.int32)
    with pytest.raises(ValueError, match="group must divide"):
        cascade_attention(q, pool, pool, table, start, 0.25, torch.zeros(1, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="one entry per group"):
        cascade_attention(q, pool, pool, table, start, 0.25, torch.zeros(1, dtype=torch.int32), 3)


def test_dispatcher_runs_the_twin_on_cpu():
    k_pool, v_pool, table = shared_cache(1, 2, 20, 3, 16, 1, 16, "cpu", seed=1)
    start = torch.tensor([20, 25], dtype=torch.int32)
    q = torch.randn(2, 2, 2, 16, generator=torch.Generator().manual_seed(0))
    plen = torch.tensor([20], dtype=torch.int32)
    out = cascade_attention(q, k_pool, v_pool, table, start, 0.25, plen, 2, 20)
    torch.testing.assert_close(out, cascade_attention_torch(q, k_pool, v_pool, table, start, 0.25, plen, 2))
