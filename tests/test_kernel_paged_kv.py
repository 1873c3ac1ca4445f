"""Page bookkeeping kernels: reserve_pages / resample_pages, Triton against the torch twin.

Every Triton result must equal the twin's whole state exactly (block table, refcounts, free stack,
free_top, status and both pools). Independently of the twin, the state is checked against the
invariant (refcounts = references, free pages = the stack, partial pages owned) and every row's
logical K/V content is read back through its block table and compared with a dense reference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch

from smcgen.kernels import paged_kv
from smcgen.kernels.attention import write_kv_torch

N_LAYERS, N_KV_HEADS, HEAD_DIM = 2, 2, 4


@dataclass
class State:
    """The paged-cache tensors the kernels update in place."""

    block_table: torch.Tensor
    refcount: torch.Tensor
    free_stack: torch.Tensor
    free_top: torch.Tensor
    status: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor

    def clone(self) -> State:
        return State(*(getattr(self, f.name).clone() for f in fields(self)))


def new_state(n_rows: int, max_pages: int, n_pages: int, page_size: int, device, seed: int = 0) -> State:
    """Empty table, a shuffled free stack (so page ids are not trivially ordered), random pools."""
    g = torch.Generator().manual_seed(seed)
    pool_shape = (N_LAYERS, n_pages, page_size, N_KV_HEADS, HEAD_DIM)
    return State(
        block_table=torch.full((n_rows, max_pages), -1, dtype=torch.int32, device=device),
        refcount=torch.zeros(n_pages, dtype=torch.int32, device=device),
        free_stack=torch.randperm(n_pages, generator=g).to(torch.int32).to(device),
        free_top=torch.tensor([n_pages], dtype=torch.int32, device=device),
        status=torch.zeros(1, dtype=torch.int32, device=device),
        k_pool=torch.randn(pool_shape, generator=g).to(device),
        v_pool=torch.randn(pool_shape, generator=g).to(device),
    )


def assert_same(a: State, b: State) -> None:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y), f"{f.name} differs:\n{x}\n{y}"


def n_tok(n: int, device) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32, device=device)


def reserve(impl: str, s: State, n: int, page_size: int) -> None:
    fn = getattr(paged_kv, f"reserve_pages_{impl}")
    fn(s.block_table, s.refcount, s.free_stack, s.free_top, s.status, n_tok(n, s.refcount.device), page_size)


def resample(impl: str, s: State, anc: torch.Tensor, n: int, page_size: int) -> None:
    fn = getattr(paged_kv, f"resample_pages_{impl}")
    dev = s.refcount.device
    fn(
        anc.to(dev),
        s.block_table,
        s.refcount,
        s.free_stack,
        s.free_top,
        s.status,
        n_tok(n, dev),
        s.k_pool,
        s.v_pool,
        page_size,
    )


def both(op, s: State, *args) -> State:
    """Run ``op`` with the twin on ``s`` and with Triton on a copy; demand identical states."""
    t = s.clone()
    op("torch", s, *args)
    op("triton", t, *args)
    assert_same(s, t)
    return s


def write_tokens(s: State, rows: torch.Tensor, start: int, n_new: int, page_size: int, seed: int):
    """Random K/V for positions [start, start + n_new) of ``rows`` (all layers); returns them [L, 2, r, T, H, D]."""
    g = torch.Generator().manual_seed(seed)
    dev = s.refcount.device
    data = torch.randn(N_LAYERS, 2, len(rows), n_new, N_KV_HEADS, HEAD_DIM, generator=g).to(dev)
    table = s.block_table[rows.to(dev)]
    pos = torch.full((len(rows),), start, dtype=torch.int32, device=dev)
    for layer in range(N_LAYERS):
        write_kv_torch(data[layer, 0], data[layer, 1], s.k_pool[layer], s.v_pool[layer], table, pos)
    return data


def content(s: State, n: int, page_size: int) -> torch.Tensor:
    """Every row's K and V at positions < n read through its block table: [R, L, 2, n, H, D] (CPU)."""
    bt = s.block_table.long().cpu()
    pos = torch.arange(n)
    pages = bt[:, pos // page_size]
    assert (pages >= 0).all(), "a position below n_tokens has no page"
    kv = torch.stack([s.k_pool.cpu(), s.v_pool.cpu()], 1)  # [L, 2, P, page, H, D]
    return kv[:, :, pages, (pos % page_size)[None, :]].permute(2, 0, 1, 3, 4, 5)


def check_invariants(s: State, n: int, page_size: int) -> None:
    """Refcounts = references, free pages = stack content (no leak, no double free), owned partial pages."""
    bt = s.block_table.long().cpu()
    rc = s.refcount.long().cpu()
    n_pages = rc.numel()
    refs = torch.bincount(bt[bt >= 0], minlength=n_pages)
    assert torch.equal(rc, refs), f"refcount != references\n{rc}\n{refs}"
    top = int(s.free_top.item())
    assert 0 <= top <= n_pages
    free = s.free_stack.long().cpu()[:top]
    assert free.unique().numel() == top, "a page is on the free stack twice"
    assert set(free.tolist()) == set(torch.nonzero(rc == 0).flatten().tolist()), "free stack != unreferenced pages"
    for p in torch.nonzero(rc > 0).flatten().tolist():  # a page holds the same positions in every row
        assert len(set(torch.nonzero(bt == p)[:, 1].tolist())) == 1, f"page {p} at two logical indices"
    first_owned = n // page_size  # the partial page and every page after it belong to one row
    owned = bt[:, first_owned:]
    assert (rc[owned[owned >= 0]] == 1).all(), "a partial (or future) page is shared"


def group_ancestors(kind: str, n_rows: int, n_groups: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "identity":
        return torch.arange(n_rows)
    if kind == "zeros":
        return torch.zeros(n_rows, dtype=torch.long)
    if kind == "permutation":
        return torch.randperm(n_rows, generator=g)
    if kind == "duplicates":
        return torch.randint(0, n_rows, (n_rows,), generator=g)
    if kind == "swap":
        a = torch.arange(n_rows)
        a[0], a[1] = 1, 0
        return a
    # within-request ancestry: sorted draws from each group, like systematic resampling
    n = n_rows // n_groups
    local = torch.randint(0, n, (n_groups, n), generator=g).sort(dim=1).values
    return (local + torch.arange(n_groups)[:, None] * n).flatten()


# --------------------------------------------------------------------------------------------------
# reserve_pages
# --------------------------------------------------------------------------------------------------


def test_reserve_fills_missing_pages_in_row_major_order(device):
    ps = 4
    s = new_state(n_rows=5, max_pages=6, n_pages=40, page_size=ps, device=device)
    both(reserve, s, 7, ps)  # 2 pages per row
    check_invariants(s, 7, ps)
    bt = s.block_table.cpu()
    assert (bt[:, :2] >= 0).all() and (bt[:, 2:] == -1).all()
    stack = s.free_stack.cpu()
    assert bt[:, :2].flatten().tolist() == stack[30:40].flip(0).tolist()  # k-th missing entry takes top - 1 - k
    assert s.free_top.item() == 30 and s.status.item() == 0
    before = s.clone()
    both(reserve, s, 8, ps)  # nothing missing: unchanged
    assert_same(s, before)
    # holes: some rows already hold later pages, others not
    s.block_table[1, 2] = s.free_stack[29]
    s.refcount[s.free_stack[29].long()] = 1
    s.free_top -= 1
    both(reserve, s, 16, ps)
    check_invariants(s, 16, ps)
    assert s.free_top.item() == 29 - 9 and (s.block_table[:, :4] >= 0).all()
    both(reserve, s, 0, ps)
    check_invariants(s, 16, ps)


def test_reserve_exhaustion_sets_status_and_keeps_state_consistent(device):
    ps = 4
    s = new_state(n_rows=3, max_pages=4, n_pages=7, page_size=ps, device=device)
    both(reserve, s, 12, ps)  # needs 9 pages, 7 exist
    assert s.status.item() == 1 and s.free_top.item() == 0
    bt = s.block_table.cpu()
    assert (bt >= 0).sum().item() == 7 and (bt[2, 1:3] == -1).all() and (bt[:2, :3] >= 0).all()
    check_invariants(s, 12, ps)
    # status is never cleared; a later call that needs nothing leaves it set
    both(reserve, s, 4, ps)
    assert s.status.item() == 1


# --------------------------------------------------------------------------------------------------
# resample_pages
# --------------------------------------------------------------------------------------------------


def prepared_state(n_rows: int, n_groups: int, n: int, ps: int, device, seed: int):
    """A state with shared full pages: prefix of n - ps - 1 tokens resampled with duplicates, then extended."""
    max_pages = -(-(n + 2 * ps) // ps)
    s = new_state(n_rows, max_pages, n_pages=n_rows * max_pages + 8, page_size=ps, device=device, seed=seed)
    n0 = max(n - ps - 1, 1)
    reserve("torch", s, n0, ps)
    rows = torch.arange(n_rows)
    write_tokens(s, rows, 0, n0, ps, seed)
    resample("torch", s, group_ancestors("within", n_rows, n_groups, seed + 1), n0, ps)
    reserve("torch", s, n + ps, ps)  # also a future page beyond n, as the engine reserves ahead
    write_tokens(s, rows, n0, n - n0, ps, seed + 2)
    check_invariants(s, n, ps)
    return s


@pytest.mark.parametrize("kind", ["identity", "zeros", "permutation", "duplicates", "swap", "within"])
@pytest.mark.parametrize(("n", "ps"), [(10, 4), (12, 4), (21, 16)])
def test_resample_kinds(device, kind, n, ps):
    n_rows, n_groups = 9, 3
    s = prepared_state(n_rows, n_groups, n, ps, device, seed=n + ps)
    anc = group_ancestors(kind, n_rows, n_groups, seed=7)
    before = s.clone()
    want = content(s, n, ps)[anc]
    both(resample, s, anc, n, ps)
    assert s.status.item() == 0
    check_invariants(s, n, ps)
    assert torch.equal(content(s, n, ps), want), "a row's K/V differs from its ancestor's"
    if kind == "identity":
        assert_same(s, before)
    bt = s.block_table.cpu()
    if n % ps:
        part = bt[:, n // ps]
        assert part.unique().numel() == n_rows, "partial last pages shared"
        old_part = before.block_table.cpu()[:, n // ps]
        moved = anc != torch.arange(n_rows)
        assert torch.equal(part[~moved], old_part[~moved])  # unmoved rows keep their partial page
    assert torch.equal(bt[:, : n // ps], before.block_table.cpu()[anc, : n // ps])  # full pages shared
    assert torch.equal(bt[:, -(-n // ps) :], before.block_table.cpu()[:, -(-n // ps) :])  # future pages kept


def test_resample_exhaustion_sets_status_consistently(device):
    ps, n = 4, 6  # one full and one partial page per row
    s = new_state(n_rows=4, max_pages=2, n_pages=9, page_size=ps, device=device)
    reserve("torch", s, n, ps)
    write_tokens(s, torch.arange(4), 0, n, ps, 3)
    assert s.free_top.item() == 1
    anc = torch.tensor([1, 0, 3, 2])  # all four rows need a copy-on-write page, one page is free
    both(resample, s, anc, n, ps)
    assert s.status.item() == 1
    check_invariants(s, n, ps)
    assert (s.block_table[:, 1] == -1).sum().item() == 3  # rows without a page are marked, not aliased


def test_repeated_decode_cycles_keep_invariants(device):
    """Prompt shared from row 0 of each request, then cycles of reserve + write + resample."""
    n_groups, n_per, ps, step = 2, 4, 4, 3
    n_rows = n_groups * n_per
    prompt, cycles = 6, 6
    max_len = prompt + step * cycles
    max_pages = -(-max_len // ps)
    s = new_state(n_rows, max_pages, n_pages=n_rows * max_pages, page_size=ps, device=device, seed=5)
    ref = torch.zeros(n_rows, N_LAYERS, 2, max_len, N_KV_HEADS, HEAD_DIM)
    both(reserve, s, prompt, ps)
    firsts = torch.arange(n_groups) * n_per
    data = write_tokens(s, firsts, 0, prompt, ps, 11)
    ref[firsts, :, :, :prompt] = data.permute(2, 0, 1, 3, 4, 5).cpu()
    share = firsts.repeat_interleave(n_per)
    both(resample, s, share, prompt, ps)
    ref = ref[share]
    n = prompt
    check_invariants(s, n, ps)
    assert torch.equal(content(s, n, ps), ref[:, :, :, :n])
    for cycle in range(cycles):
        both(reserve, s, n + step, ps)
        data = write_tokens(s, torch.arange(n_rows), n, step, ps, 100 + cycle)
        ref[:, :, :, n : n + step] = data.permute(2, 0, 1, 3, 4, 5).cpu()
        n += step
        kind = "identity" if cycle == 2 else "within"
        anc = group_ancestors(kind, n_rows, n_groups, seed=cycle)
        both(resample, s, anc, n, ps)
        ref = ref[anc]
        assert s.status.item() == 0
        check_invariants(s, n, ps)
        assert torch.equal(content(s, n, ps), ref[:, :, :, :n])
    # the pool holds exactly the live pages: everything else is free
    live = s.block_table[s.block_table >= 0].unique().numel()
    assert s.free_top.item() == s.refcount.numel() - live


def test_dispatchers_run_the_twin_on_cpu():
    ps = 4
    s = new_state(n_rows=3, max_pages=3, n_pages=12, page_size=ps, device="cpu")
    t = s.clone()
    paged_kv.reserve_pages(s.block_table, s.refcount, s.free_stack, s.free_top, s.status, n_tok(6, "cpu"), ps)
    reserve("torch", t, 6, ps)
    assert_same(s, t)
    anc = torch.tensor([2, 2, 0])
    paged_kv.resample_pages(
        anc, s.block_table, s.refcount, s.free_stack, s.free_top, s.status, n_tok(6, "cpu"), s.k_pool, s.v_pool, ps
    )
    resample("torch", t, anc, 6, ps)
    assert_same(s, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_cuda_graph_capture_and_replay(device, impl):
    """reserve + resample captured once and replayed with new device-side ancestors and lengths."""
    if device.type != "cuda":
        pytest.skip("runs with SMCGEN_TEST_DEVICE=cuda")
    ps, n_rows, n_groups = 4, 8, 2
    s = prepared_state(n_rows, n_groups, 10, ps, device, seed=3)
    expect = s.clone()
    n = n_tok(10, device)
    anc = torch.arange(n_rows, device=device)
    reserve_fn = getattr(paged_kv, f"reserve_pages_{impl}")
    resample_fn = getattr(paged_kv, f"resample_pages_{impl}")

    def step(st: State, a: torch.Tensor, n_t: torch.Tensor) -> None:
        resample_fn(
            a, st.block_table, st.refcount, st.free_stack, st.free_top, st.status, n_t, st.k_pool, st.v_pool, ps
        )
        reserve_fn(st.block_table, st.refcount, st.free_stack, st.free_top, st.status, n_t + ps, ps)

    step(s, anc, n)  # compile outside the capture (identity: no change)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(s, anc, n)
    for i, kind in enumerate(["within", "identity", "zeros", "permutation"]):
        a = group_ancestors(kind, n_rows, n_groups, seed=i).to(device)
        anc.copy_(a)
        n.fill_(10 + i)
        graph.replay()
        step(expect, a, n_tok(10 + i, device))  # eager twin of the same step
        assert_same(s, expect)
        check_invariants(s, 10 + i, ps)
