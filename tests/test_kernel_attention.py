"""Paged attention: paged_attention, Triton against the torch twin, and the K/V write's twin.

(The Triton K/V write is fused into RoPE: tests/test_kernel_fused_ops.py checks it against
``write_kv_torch``.)

The twin itself is checked against a dense per-row reference (contiguous K/V, repeat_kv GQA,
causal mask by absolute position). Shapes cover head_dim 64/128, page sizes 16 and 8, GQA groups
1, 4, 7 (Qwen2-0.5B: 14 query / 2 kv heads), 8, T = 1 (draft), 5..33 (verify) and a prefill-sized
T, rows at different start positions whose block tables share pages, and several KV splits.
"""

from __future__ import annotations

import pytest
import torch

from smcgen.kernels import attention
from smcgen.kernels.attention import (
    paged_attention,
    paged_attention_torch,
    paged_attention_triton,
    write_kv_torch,
)


def make_cache(n_rows, max_pages, ps, n_kvh, dim, device, dtype=torch.float32, seed=0, shared=2):
    """Pools and a block table; rows share their first ``shared`` pages (as after resampling)."""
    g = torch.Generator().manual_seed(seed)
    n_pages = n_rows * max_pages + 3
    k_pool = torch.randn(n_pages, ps, n_kvh, dim, generator=g).to(device, dtype)
    v_pool = torch.randn(n_pages, ps, n_kvh, dim, generator=g).to(device, dtype)
    perm = torch.randperm(n_pages, generator=g)[: n_rows * max_pages].view(n_rows, max_pages)
    perm[:, :shared] = perm[0, :shared].clone()
    return k_pool, v_pool, perm.to(torch.int32).to(device)


def dense_reference(q, k_pool, v_pool, block_table, start_pos, scale):
    """Per row: contiguous K/V of positions < start + T, repeat_kv, causal softmax attention."""
    n_rows, n_q, n_qh, _ = q.shape
    ps, n_kvh = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32)
    for r in range(n_rows):
        start = int(start_pos[r])
        pos = torch.arange(start + n_q)
        pages = block_table[r].long().cpu()[pos // ps]
        keys = k_pool.cpu().float()[pages, pos % ps].repeat_interleave(n_qh // n_kvh, dim=1)
        vals = v_pool.cpu().float()[pages, pos % ps].repeat_interleave(n_qh // n_kvh, dim=1)
        scores = torch.einsum("thd,shd->hts", q[r].cpu().float(), keys) * scale
        mask = pos[None, :] <= start + torch.arange(n_q)[:, None]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[r] = torch.einsum("hts,shd->thd", probs, vals)
    return out


def random_starts(n_rows, n_q, max_pages, ps, seed):
    g = torch.Generator().manual_seed(seed)
    hi = max_pages * ps - n_q
    starts = torch.randint(0, hi + 1, (n_rows,), generator=g)
    starts[0] = hi  # one row at the end of its table
    if n_rows > 1:
        starts[1] = 0  # one row starting at position 0
    return starts.to(torch.int32)


CASES = [
    # R, T, Hq, Hkv, D, page, max_pages, splits
    (3, 1, 8, 2, 64, 16, 4, None),  # draft step, G=4
    (2, 5, 8, 2, 64, 16, 3, 2),
    (3, 9, 14, 2, 64, 16, 3, 3),  # Qwen2-0.5B grouping, G=7
    (2, 17, 8, 1, 64, 8, 6, 4),  # G=8, page size 8
    (2, 33, 4, 4, 64, 16, 4, 2),  # G=1, T=33
    (2, 9, 32, 8, 128, 16, 2, None),  # Llama-3-8B heads, D=128
    (1, 1, 7, 1, 128, 8, 9, 5),  # G=7, many splits, some beyond the context
    (1, 200, 4, 1, 64, 16, 14, 1),  # prefill-sized: several query blocks, no split
]


@pytest.mark.parametrize(("n_rows", "n_q", "n_qh", "n_kvh", "dim", "ps", "max_pages", "splits"), CASES)
def test_paged_attention_matches_twin_and_reference(device, n_rows, n_q, n_qh, n_kvh, dim, ps, max_pages, splits):
    k_pool, v_pool, table = make_cache(n_rows, max_pages, ps, n_kvh, dim, device, seed=n_q + dim)
    start = random_starts(n_rows, n_q, max_pages, ps, seed=n_q).to(device)
    q = torch.randn(n_rows, n_q, n_qh, dim, generator=torch.Generator().manual_seed(1)).to(device)
    scale = dim**-0.5
    twin = paged_attention_torch(q, k_pool, v_pool, table, start, scale)
    ref = dense_reference(q, k_pool, v_pool, table, start, scale)
    torch.testing.assert_close(twin.cpu(), ref, rtol=1e-5, atol=1e-5)
    out = paged_attention_triton(q, k_pool, v_pool, table, start, scale, num_splits=splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=2e-5)
    # the caller's counters: twice on the same buffer, left zeroed each time
    counters = torch.zeros(64, dtype=torch.int32, device=device)
    for _ in range(2):
        fused = paged_attention_triton(q, k_pool, v_pool, table, start, scale, num_splits=splits, counters=counters)
        torch.testing.assert_close(fused.cpu(), ref, rtol=1e-5, atol=2e-5)
        assert int(counters.abs().sum()) == 0, "the kernel must leave its counters zeroed"


def test_too_few_counters_get_a_fresh_buffer(device):
    k_pool, v_pool, table = make_cache(3, 4, 16, 2, 64, device, seed=3)
    start = random_starts(3, 2, 4, 16, seed=2).to(device)
    q = torch.randn(3, 2, 8, 64, generator=torch.Generator().manual_seed(1)).to(device)
    ref = dense_reference(q, k_pool, v_pool, table, start, 0.125)
    counters = torch.zeros(5, dtype=torch.int32, device=device)  # 3 rows x 2 kv heads = 6 tiles
    out = paged_attention_triton(q, k_pool, v_pool, table, start, 0.125, num_splits=3, counters=counters)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=2e-5)
    assert int(counters.abs().sum()) == 0, "a buffer too small must not be used"


@pytest.mark.parametrize("max_block_m", [attention.IEEE_MAX_BLOCK_M, 128])
def test_paged_attention_prefill_query_blocks(device, monkeypatch, max_block_m):
    """T=256 with G=2: 512 packed fp32 queries in blocks of the fp32 cap (the default) or of 128 rows;
    2 splits exercise the merge too."""
    monkeypatch.setattr(attention, "IEEE_MAX_BLOCK_M", max_block_m)
    tiles = []
    real = attention._launch_config
    monkeypatch.setattr(attention, "_launch_config", lambda *a: tiles.append(real(*a)[0]) or real(*a))
    n_q, ps, max_pages = 256, 16, 17
    k_pool, v_pool, table = make_cache(1, max_pages, ps, 1, 64, device, seed=3, shared=0)
    start = torch.tensor([5], dtype=torch.int32, device=device)
    q = torch.randn(1, n_q, 2, 64, generator=torch.Generator().manual_seed(2)).to(device)
    twin = paged_attention_torch(q, k_pool, v_pool, table, start, 0.125)
    out = paged_attention_triton(q, k_pool, v_pool, table, start, 0.125, num_splits=2)
    torch.testing.assert_close(out, twin, rtol=1e-5, atol=2e-5)
    assert tiles == [max_block_m]  # fp32 queries took the cap's tiles
    tiles.clear()
    paged_attention_triton(q.bfloat16(), k_pool.bfloat16(), v_pool.bfloat16(), table, start, 0.125, num_splits=2)
    assert tiles == [128]  # half precision keeps the tall tiles


def test_a_prefill_key_bound_sizes_the_splits_not_the_table(device, monkeypatch):
    """A prefill from position 0 passes its length as ``max_keys``: the split count (a compile-time
    constant) then follows the prompt, whatever the page table's capacity, and the output is the same."""
    n_q, ps, max_pages = 40, 16, 64  # a table for 1,024 keys, a 40-token prompt
    k_pool, v_pool, table = make_cache(1, max_pages, ps, 1, 64, device, seed=8, shared=0)
    start = torch.zeros(1, dtype=torch.int32, device=device)
    q = torch.randn(1, n_q, 2, 64, generator=torch.Generator().manual_seed(8)).to(device)
    splits = []
    real = attention._num_splits
    monkeypatch.setattr(attention, "_num_splits", lambda *a, **kw: splits.append(real(*a, **kw)) or splits[-1])
    twin = paged_attention_torch(q, k_pool, v_pool, table, start, 0.125)
    for bound in (None, n_q):
        out = paged_attention_triton(q, k_pool, v_pool, table, start, 0.125, max_keys=bound)
        torch.testing.assert_close(out, twin, rtol=1e-5, atol=2e-5)
    assert splits[0] > 1 and splits[1] == 1  # 1,024 keys split; 40 keys are fewer than one split's share


def test_paged_attention_ignores_unwritten_garbage_and_missing_pages(device):
    """NaN/inf in slots past the last query never leak; a row without pages returns zeros."""
    n_rows, n_q, ps, max_pages = 3, 5, 16, 3
    k_pool, v_pool, table = make_cache(n_rows, max_pages, ps, 2, 64, device, seed=4, shared=0)
    start = torch.tensor([7, 20, 0], dtype=torch.int32, device=device)
    for r in range(n_rows):  # poison every slot at or past start + T in the row's pages
        last = int(start[r]) + n_q
        for p in range(last, max_pages * ps):
            page = table[r, p // ps].long()
            k_pool[page, p % ps] = float("nan")
            v_pool[page, p % ps] = float("inf")
    table[2] = -1
    q = torch.randn(n_rows, n_q, 8, 64, generator=torch.Generator().manual_seed(5)).to(device)
    twin = paged_attention_torch(q, k_pool, v_pool, table, start, 0.1)
    assert torch.isfinite(twin).all() and (twin[2] == 0).all()
    out = paged_attention_triton(q, k_pool, v_pool, table, start, 0.1, num_splits=2)
    torch.testing.assert_close(out, twin, rtol=1e-5, atol=2e-5)
    ref = dense_reference(q[:2], k_pool, v_pool, table[:2], start[:2], 0.1)
    torch.testing.assert_close(out[:2].cpu(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_half_precision(device, dtype):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's CPU interpreter mishandles bf16 tl.dot (numpy has no bf16); runs on CUDA")
    n_rows, n_q, ps, max_pages = 2, 9, 16, 3
    k_pool, v_pool, table = make_cache(n_rows, max_pages, ps, 2, 64, device, dtype=dtype, seed=6)
    start = random_starts(n_rows, n_q, max_pages, ps, seed=6).to(device)
    q = torch.randn(n_rows, n_q, 8, 64, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    twin = paged_attention_torch(q, k_pool, v_pool, table, start, 0.125)
    out = paged_attention_triton(q, k_pool, v_pool, table, start, 0.125, num_splits=2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), twin.float(), rtol=2e-2, atol=2e-2)


def test_num_splits_heuristic_depends_only_on_shapes():
    cpu = torch.device("cpu")
    assert attention._num_splits(1, 16, 16, cpu) == 1  # short context: nothing to split
    assert attention._num_splits(1, 4096, 16, cpu) == 16  # one decode program: 16 splits of 256 keys
    assert attention._num_splits(2, 4096, 64, cpu) == 4  # heavier tiles aim at fewer programs
    assert attention._num_splits(64, 4096, 64, cpu) == 1  # enough programs already
    assert attention._num_splits(1, 10**6, 16, cpu) == 16
    assert attention._num_splits(1, 256, 16, cpu, min_keys=64) == 4  # finer splits where asked


def test_small_decode_grids_take_narrow_key_tiles():
    cpu = torch.device("cpu")  # the interpreter plans for 4 SMs
    assert attention._decode_tile(1, cpu) == (attention.SMALL_GRID_BLOCK_N, attention.SMALL_GRID_BLOCK_N)
    assert attention._decode_tile(4, cpu) == (attention.DECODE_BLOCK_N, attention.MIN_KEYS_PER_SPLIT)


@pytest.mark.parametrize(
    ("n_q", "ps", "dtype"), [(1, 16, torch.float32), (7, 8, torch.bfloat16), (33, 16, torch.float16)]
)
def test_write_kv_twin_stores_at_the_slots(device, n_q, ps, dtype):
    n_rows, n_kvh, dim, max_pages = 3, 2, 64, 6
    k_pool, v_pool, table = make_cache(n_rows, max_pages, ps, n_kvh, dim, device, dtype=dtype, seed=8, shared=0)
    start = random_starts(n_rows, n_q, max_pages, ps, seed=9).to(device)
    g = torch.Generator().manual_seed(10)
    qkv = torch.randn(n_rows, n_q, 3 * n_kvh, dim, generator=g).to(device)  # fp32 input, non-contiguous views
    k, v = qkv[:, :, n_kvh : 2 * n_kvh], qkv[:, :, 2 * n_kvh :]
    before = k_pool.clone()
    write_kv_torch(k, v, k_pool, v_pool, table, start)
    assert int((k_pool != before).any(-1).any(-1).sum()) <= n_rows * n_q  # nothing beyond the new slots
    pos = start.long()[:, None] + torch.arange(n_q, device=device)
    page = table.long().gather(1, pos // ps)
    assert torch.equal(k_pool[page, pos % ps], k.to(dtype)) and torch.equal(v_pool[page, pos % ps], v.to(dtype))


def test_write_kv_twin_skips_missing_pages_and_positions_past_the_table(device):
    """As the Triton kernels do: a -1 page (pool exhausted) and a position past the block table are
    not written; every other position is."""
    n_kvh, dim, ps = 2, 16, 4
    k_pool = torch.zeros(8, ps, n_kvh, dim, device=device)
    v_pool = torch.zeros_like(k_pool)
    table = torch.tensor([[0, 1, -1], [2, 3, 4]], dtype=torch.int32, device=device)
    start = torch.tensor([7, 10], dtype=torch.int32, device=device)  # row 0: 7 on page 1, 8-9 on the -1 page
    k = torch.randn(2, 3, n_kvh, dim, device=device)  # row 1: 10, 11 on page 4, 12 past the 3-page table
    write_kv_torch(k, k + 1, k_pool, v_pool, table, start)
    assert torch.equal(k_pool[1, 3], k[0, 0]) and torch.equal(v_pool[1, 3], k[0, 0] + 1)
    assert torch.equal(k_pool[4, 2], k[1, 0]) and torch.equal(k_pool[4, 3], k[1, 1])
    assert int((k_pool != 0).any(-1).any(-1).sum()) == 3, "only the three slots on existing pages"


def test_write_kv_twin_skips_the_same_positions_inside_a_cuda_graph(device):
    """Capture forbids the data-dependent selection, so the twin takes another path there: it must
    write and skip exactly the same slots as outside a capture."""
    if device.type != "cuda":
        pytest.skip("runs with SMCGEN_TEST_DEVICE=cuda")
    n_kvh, dim, ps = 2, 16, 4
    table = torch.tensor([[0, 1, -1], [2, 3, 4]], dtype=torch.int32, device=device)
    start = torch.tensor([7, 10], dtype=torch.int32, device=device)
    k = torch.randn(2, 3, n_kvh, dim, device=device)
    pools = [torch.randn(8, ps, n_kvh, dim, device=device) for _ in range(2)]
    want = [p.clone() for p in pools]
    write_kv_torch(k, k + 1, *want, table, start)
    write_kv_torch(k, k + 1, *[p.clone() for p in pools], table, start)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        write_kv_torch(k, k + 1, *pools, table, start)
    graph.replay()
    assert torch.equal(pools[0], want[0]) and torch.equal(pools[1], want[1])


def test_dispatcher_runs_the_twin_on_cpu():
    k_pool, v_pool, table = make_cache(2, 3, 4, 1, 16, "cpu", seed=12)
    start = torch.tensor([1, 4], dtype=torch.int32)
    q = torch.randn(2, 3, 4, 16)
    assert torch.equal(
        paged_attention(q, k_pool, v_pool, table, start, 0.25),
        paged_attention_torch(q, k_pool, v_pool, table, start, 0.25),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_follows_device_positions(device):
    """write_kv_torch + paged_attention captured once, replayed with new start positions (no host sync)."""
    if device.type != "cuda":
        pytest.skip("runs with SMCGEN_TEST_DEVICE=cuda")
    n_rows, n_q, ps, max_pages = 4, 9, 16, 8
    k_pool, v_pool, table = make_cache(n_rows, max_pages, ps, 2, 128, device, dtype=torch.bfloat16, seed=13)
    start = torch.zeros(n_rows, dtype=torch.int32, device=device)
    q = torch.randn(n_rows, n_q, 8, 128, device=device, dtype=torch.bfloat16)
    kv = torch.randn(n_rows, n_q, 2, 128, device=device, dtype=torch.bfloat16)
    write_kv_torch(kv, kv, k_pool, v_pool, table, start)
    paged_attention(q, k_pool, v_pool, table, start, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        write_kv_torch(kv, kv, k_pool, v_pool, table, start)
        out = paged_attention(q, k_pool, v_pool, table, start, 0.1)
    for s in (0, 17, 60):
        start.fill_(s)
        graph.replay()
        want = paged_attention_torch(q, k_pool, v_pool, table, start, 0.1)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dim", [8, 24])
def test_head_dims_the_kernel_lacks_run_the_twin(device, dim):
    """A tiny model's head dim (8) or a non-power of two must not reach the kernel's assertion."""
    k_pool, v_pool, table = make_cache(2, 3, 16, 2, dim, device, seed=dim)
    start = random_starts(2, 3, 3, 16, seed=dim).to(device)
    q = torch.randn(2, 3, 4, dim, generator=torch.Generator().manual_seed(dim)).to(device)
    got = paged_attention(q, k_pool, v_pool, table, start, dim**-0.5)
    want = dense_reference(q, k_pool, v_pool, table, start, dim**-0.5)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
