"""Device-side page bookkeeping for the paged KV cache: reserving pages and resampling rows.

State (all device tensors, updated in place, see the spec's "Memory layout"):
``block_table`` [R, max_pages] int32 (-1 = no page), ``refcount`` [n_pages] int32, ``free_stack``
[n_pages] int32 with ``free_top`` [1] int32 (free pages are ``free_stack[:free_top]``, pop takes
``free_stack[free_top - 1]``), ``status`` [1] int32 (set to 1 when the pool runs out, never cleared).

Invariant kept by both ops: a page sits at the same logical index in every row that references it;
a row's partial last page is owned by that row alone (refcount 1); full pages may be shared and
their refcount is the number of rows referencing them; the free pages are exactly the pages with
refcount 0, each once on the stack.

Both ops have a torch twin and a Triton version that produce bit-identical state: they pop and push
pages in the same deterministic order (documented on each function). Nothing syncs with the host
and no shape depends on data, so both run inside a CUDA graph.

Why one long module: the Triton kernels, their torch twin and the dispatcher of one op stay
together, so each kernel is read beside the reference its tests compare it with.
"""

from __future__ import annotations

import torch

from smcgen.kernels._triton import HAS_TRITON, tl, triton, use_triton

__all__ = [
    "HAS_TRITON",
    "resample_pages",
    "resample_pages_torch",
    "resample_pages_triton",
    "reserve_pages",
    "reserve_pages_torch",
    "reserve_pages_triton",
]


def _extended(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """int64 copy of ``t`` with one extra slot at the end: masked-out scatters go there (static shapes)."""
    return torch.cat([t.long(), torch.full((1,), fill, dtype=torch.long, device=t.device)])


# --------------------------------------------------------------------------------------------------
# reserve_pages
# --------------------------------------------------------------------------------------------------


def reserve_pages_torch(
    block_table: torch.Tensor,
    refcount: torch.Tensor,
    free_stack: torch.Tensor,
    free_top: torch.Tensor,
    status: torch.Tensor,
    n_tokens: torch.Tensor,
    page_size: int,
) -> None:
    """Give every row a page for each position < ``n_tokens`` it lacks (torch twin, in place).

    Missing entries ``(r, j)`` (``j < ceil(n_tokens / page_size)``, ``block_table[r, j] == -1``) are
    served in row-major order, the k-th one taking ``free_stack[free_top - 1 - k]`` with refcount 1.
    If the pool runs out, the entries that got no page stay -1 and ``status`` is set to 1.
    """
    n_rows, max_pages = block_table.shape
    n_pages = refcount.numel()
    dev = block_table.device
    need = (n_tokens.long() + page_size - 1) // page_size  # [1]
    cols = torch.arange(max_pages, device=dev)
    missing = ((cols[None, :] < need) & (block_table < 0)).reshape(-1)
    rank = torch.cumsum(missing.long(), 0) - 1
    top = free_top.long()
    ok = missing & (rank < top)
    page = free_stack.long()[(top - 1 - rank).clamp(0, n_pages - 1)]
    block_table.copy_(torch.where(ok, page, block_table.reshape(-1).long()).view(n_rows, max_pages))
    rc = _extended(refcount)
    rc.scatter_(0, torch.where(ok, page, n_pages), 1)
    refcount.copy_(rc[:n_pages])
    total = missing.long().sum().view(1)
    free_top.copy_(top - torch.minimum(total, top))
    status.copy_(torch.maximum(status, (total > top).to(status.dtype)))


def reserve_pages_triton(
    block_table: torch.Tensor,
    refcount: torch.Tensor,
    free_stack: torch.Tensor,
    free_top: torch.Tensor,
    status: torch.Tensor,
    n_tokens: torch.Tensor,
    page_size: int,
) -> None:
    """Triton version of :func:`reserve_pages_torch` (same page order, identical state).

    Three launches: per-row count of missing entries, one program turning the counts into
    row offsets (and updating ``free_top`` / ``status``), per-row assignment of the pages.
    """
    n_rows, max_pages = block_table.shape
    assert block_table.is_contiguous() and block_table.dtype == torch.int32
    counts = torch.empty(n_rows + 1, dtype=torch.int32, device=block_table.device)
    block_j = min(triton.next_power_of_2(max_pages), 256)
    _reserve_count_kernel[(n_rows,)](block_table, counts, n_tokens, max_pages, page_size, BLOCK_J=block_j)
    _reserve_offsets_kernel[(1,)](counts, free_top, status, n_rows, BLOCK_R=1024)
    _reserve_assign_kernel[(n_rows,)](
        block_table, refcount, free_stack, counts, n_tokens, n_rows, max_pages, page_size, BLOCK_J=block_j
    )


def reserve_pages(
    block_table: torch.Tensor,
    refcount: torch.Tensor,
    free_stack: torch.Tensor,
    free_top: torch.Tensor,
    status: torch.Tensor,
    n_tokens: torch.Tensor,
    page_size: int,
) -> None:
    """Ensure every row has pages for positions < ``n_tokens`` (Triton on CUDA, torch otherwise)."""
    fn = reserve_pages_triton if use_triton(block_table) else reserve_pages_torch
    fn(block_table, refcount, free_stack, free_top, status, n_tokens, page_size)


# --------------------------------------------------------------------------------------------------
# resample_pages
# --------------------------------------------------------------------------------------------------


def resample_pages_torch(
    ancestors: torch.Tensor,
    block_table: torch.Tensor,
    refcount: torch.Tensor,
    free_stack: torch.Tensor,
    free_top: torch.Tensor,
    status: torch.Tensor,
    n_tokens: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_size: int,
) -> None:
    """Make row r a copy of row ``ancestors[r]`` for positions < ``n_tokens`` (torch twin, in place).

    Steps, in this order (the Triton version follows them exactly):

    1. Full pages (index j < n_tokens // page_size): row r takes ``old[ancestors[r], j]``. With o[s]
       the number of rows taking row s as ancestor, every page of old row s changes its refcount
       by o[s] - 1. Pages that drop to 0 are pushed in ascending page id.
    2. Partial page (index n_tokens // page_size, if n_tokens % page_size != 0): each row with
       ancestors[r] != r pops a fresh page (in row order) and gets a copy of the ancestor's
       partial page, K and V, all layers. Pages pushed in step 1 are never copy sources (a source
       is a partial page, owned and referenced), so popping them is safe.
    3. The old partial pages of those rows (refcount 1) are pushed in row order, after the copy.

    Pages at indices beyond the partial page stay with their row (they are owned and get
    overwritten before they are read). ``ancestors == identity`` leaves every tensor bitwise
    unchanged. If the pool runs out, rows that got no copy keep -1 at the partial index and
    ``status`` is set to 1 (bookkeeping stays consistent).
    """
    n_rows, max_pages = block_table.shape
    n_pages = refcount.numel()
    dev = block_table.device
    rows = torch.arange(n_rows, device=dev)
    cols = torch.arange(max_pages, device=dev)
    anc = ancestors.long()
    old = block_table.long()
    n = n_tokens.long()
    n_full = n // page_size  # [1]
    has_part = (n % page_size != 0) & (n_full < max_pages)  # [1]
    jp = n_full.clamp(max=max_pages - 1)  # [1]
    moved = anc != rows
    offspring = torch.zeros(n_rows, dtype=torch.long, device=dev).scatter_add_(0, anc, torch.ones_like(anc))

    # 1. full pages: refcount[p] += sum over old rows s holding p of (o[s] - 1)
    full = (cols[None, :] < n_full) & (old >= 0)  # [R, MP]
    rc = _extended(refcount)
    delta = (offspring - 1)[:, None].expand(n_rows, max_pages)
    rc.scatter_add_(0, torch.where(full, old, n_pages).reshape(-1), torch.where(full, delta, 0).reshape(-1))
    dead_ref = torch.zeros(n_pages + 1, dtype=torch.bool, device=dev)
    dead_ref.scatter_(0, torch.where(full & (offspring == 0)[:, None], old, n_pages).reshape(-1), True)
    freed = dead_ref[:n_pages] & (rc[:n_pages] == 0)
    top = free_top.long()
    stack = _extended(free_stack)
    rank = torch.cumsum(freed.long(), 0) - 1
    stack.scatter_(0, torch.where(freed, top + rank, n_pages), torch.arange(n_pages, device=dev))
    top = top + freed.long().sum()

    # 2. copy-on-write of the partial page for rows that changed ancestor
    old_part = old.gather(1, jp.expand(n_rows)[:, None]).squeeze(1)  # [R]
    src = old_part[anc]
    need = moved & has_part & (src >= 0)
    rank = torch.cumsum(need.long(), 0) - 1
    ok = need & (rank < top)
    dst = stack[(top - 1 - rank).clamp(0, n_pages - 1)]
    rc.scatter_(0, torch.where(ok, dst, n_pages), 1)
    n_need = need.long().sum().view(1)
    status.copy_(torch.maximum(status, (n_need > top).to(status.dtype)))
    top = top - torch.minimum(n_need, top)
    # Static-shape copy of R pages: rows without a copy repeat the first real copy (identical
    # duplicate writes are deterministic) or, when there is none, copy page 0 onto itself.
    any_ok = ok.any()
    first = torch.argmax(ok.long()).view(1)  # gather, not dst[first]: a 0-d index would sync
    dst_c = torch.where(ok, dst, torch.where(any_ok, dst.gather(0, first), 0))
    src_c = torch.where(ok, src, torch.where(any_ok, src.gather(0, first), 0))
    k_pool[:, dst_c] = k_pool[:, src_c]
    v_pool[:, dst_c] = v_pool[:, src_c]

    # new block table
    new = torch.where(moved[:, None] & (cols[None, :] < n_full), old[anc], old)
    part_col = (cols[None, :] == jp) & has_part
    new = torch.where(moved[:, None] & part_col, torch.where(ok, dst, -1)[:, None], new)

    # 3. release the old partial pages of rows that changed ancestor
    dec = moved & has_part & (old_part >= 0)
    rc.scatter_add_(0, torch.where(dec, old_part, n_pages), -dec.long())
    freed = dec & (rc[old_part.clamp(min=0)] == 0)
    rank = torch.cumsum(freed.long(), 0) - 1
    stack.scatter_(0, torch.where(freed, top + rank, n_pages), old_part)
    top = top + freed.long().sum()

    block_table.copy_(new)
    refcount.copy_(rc[:n_pages])
    free_stack.copy_(stack[:n_pages])
    free_top.copy_(top)


def resample_pages_triton(
    ancestors: torch.Tensor,
    block_table: torch.Tensor,
    refcount: torch.Tensor,
    free_stack: torch.Tensor,
    free_top: torch.Tensor,
    status: torch.Tensor,
    n_tokens: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_size: int,
) -> None:
    """Triton version of :func:`resample_pages_torch` (same steps and page order, identical state).

    Launches, each gated on whether any row moved (identity exits at once in every kernel):
    offspring counts; full-page refcounts + gather of the new rows (parallel over rows x pages);
    marking freed full pages (parallel); pushing them in page order (one program); popping the
    copy-on-write pages in row order (one program); copying the partial pages (rows x layers);
    writing the new table rows (parallel); pushing the old partial pages (one program).
    """
    n_rows, max_pages = block_table.shape
    n_pages = refcount.numel()
    dev = block_table.device
    assert block_table.is_contiguous() and block_table.dtype == torch.int32
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape == v_pool.shape
    assert k_pool.shape[1] == n_pages and k_pool.shape[2] == page_size
    n_layers = k_pool.shape[0]
    page_elems = k_pool[0, 0].numel()
    # scratch: [0] moved flag, [1 : 1+R] offspring, then cow_dst, cow_src, old_part (R each)
    scratch = torch.zeros(1 + 4 * n_rows, dtype=torch.int32, device=dev)
    freed_flag = torch.zeros(n_pages, dtype=torch.int32, device=dev)
    new_rows = torch.empty(n_rows * max_pages, dtype=torch.int32, device=dev)
    block_j = min(triton.next_power_of_2(max_pages), 256)
    grid_rows = (n_rows, triton.cdiv(max_pages, block_j))
    _offspring_kernel[(1,)](ancestors, scratch, n_rows, BLOCK_R=1024)
    _full_refcount_kernel[grid_rows](
        ancestors, block_table, refcount, scratch, new_rows, n_tokens, n_rows, max_pages, page_size, BLOCK_J=block_j
    )
    _mark_freed_kernel[grid_rows](
        block_table, refcount, scratch, freed_flag, n_tokens, max_pages, page_size, BLOCK_J=block_j
    )
    _push_freed_kernel[(1,)](freed_flag, free_stack, free_top, scratch, n_pages, BLOCK_P=1024)
    _pop_cow_kernel[(1,)](
        ancestors,
        block_table,
        refcount,
        free_stack,
        free_top,
        status,
        scratch,
        n_tokens,
        n_rows,
        max_pages,
        page_size,
        BLOCK_R=1024,
    )
    block_e = min(triton.next_power_of_2(page_elems), 4096)
    _copy_pages_kernel[(n_rows, n_layers)](
        ancestors, k_pool, v_pool, scratch, n_rows, n_pages, page_elems, BLOCK_E=block_e
    )
    _write_rows_kernel[grid_rows](
        ancestors, block_table, scratch, new_rows, n_tokens, n_rows, max_pages, page_size, BLOCK_J=block_j
    )
    _push_old_partial_kernel[(1,)](
        ancestors, refcount, free_stack, free_top, scratch, n_tokens, n_rows, max_pages, page_size, BLOCK_R=1024
    )


def resample_pages(
    ancestors: torch.Tensor,
    block_table: torch.Tensor,
    refcount: torch.Tensor,
    free_stack: torch.Tensor,
    free_top: torch.Tensor,
    status: torch.Tensor,
    n_tokens: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_size: int,
) -> None:
    """Resample rows' pages by ``ancestors`` (Triton on CUDA, torch otherwise); see the torch twin."""
    fn = resample_pages_triton if use_triton(block_table) else resample_pages_torch
    fn(ancestors, block_table, refcount, free_stack, free_top, status, n_tokens, k_pool, v_pool, page_size)


# --------------------------------------------------------------------------------------------------
# Triton kernels. Sequential parts (stack pops/pushes) run in one program, blocked, so the page order
# is the deterministic one of the torch twin; everything per row or per page runs in parallel.
# Scratch of resample_pages: [0] "some row moved" flag, then offspring, cow_dst, cow_src, old_part
# (R entries each).
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _reserve_count_kernel(bt, counts, n_tokens, max_pages, page_size: tl.constexpr, BLOCK_J: tl.constexpr):
        r = tl.program_id(0)
        need = tl.minimum((tl.load(n_tokens) + page_size - 1) // page_size, max_pages)
        cnt = tl.zeros((), tl.int32)
        for j0 in range(0, need, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            m = j < need
            p = tl.load(bt + r * max_pages + j, mask=m, other=0)
            cnt += tl.sum((m & (p < 0)).to(tl.int32), 0)
        tl.store(counts + r, cnt)

    @triton.jit
    def _reserve_offsets_kernel(counts, free_top, status, n_rows, BLOCK_R: tl.constexpr):
        # counts[r] -> exclusive prefix (rank of row r's first missing entry); counts[R] = old top
        top = tl.load(free_top)
        run = tl.zeros((), tl.int32)
        for r0 in range(0, n_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = r < n_rows
            c = tl.load(counts + r, mask=m, other=0)
            tl.store(counts + r, run + tl.cumsum(c, 0) - c, mask=m)
            run += tl.sum(c, 0)
        tl.store(counts + n_rows, top)
        tl.store(free_top, top - tl.minimum(run, top))
        tl.store(status, 1, mask=run > top)

    @triton.jit
    def _reserve_assign_kernel(
        bt, refcount, stack, counts, n_tokens, n_rows, max_pages, page_size: tl.constexpr, BLOCK_J: tl.constexpr
    ):
        r = tl.program_id(0)
        need = tl.minimum((tl.load(n_tokens) + page_size - 1) // page_size, max_pages)
        top = tl.load(counts + n_rows)
        base = tl.load(counts + r)
        for j0 in range(0, need, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            m = j < need
            p = tl.load(bt + r * max_pages + j, mask=m, other=0)
            miss = (m & (p < 0)).to(tl.int32)
            rank = base + tl.cumsum(miss, 0) - 1
            ok = (miss != 0) & (rank < top)
            page = tl.load(stack + top - 1 - rank, mask=ok, other=-1)
            tl.store(bt + r * max_pages + j, page, mask=ok)
            tl.store(refcount + page, 1, mask=ok)
            base += tl.sum(miss, 0)

    @triton.jit
    def _offspring_kernel(anc, scratch, n_rows, BLOCK_R: tl.constexpr):
        moved = tl.zeros((), tl.int32)
        for r0 in range(0, n_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = r < n_rows
            a = tl.load(anc + r, mask=m, other=0)
            tl.atomic_add(scratch + 1 + a, 1, mask=m)
            moved += tl.sum((m & (a != r)).to(tl.int32), 0)
        tl.store(scratch, (moved > 0).to(tl.int32))

    @triton.jit
    def _full_refcount_kernel(
        anc,
        bt,
        refcount,
        scratch,
        new_rows,
        n_tokens,
        n_rows,
        max_pages,
        page_size: tl.constexpr,
        BLOCK_J: tl.constexpr,
    ):
        # refcount[p] += o[s] - 1 for the full pages p of old row s; gather the new full pages of row s
        if tl.load(scratch) != 0:
            s = tl.program_id(0)
            j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
            m = (j < tl.load(n_tokens) // page_size) & (j < max_pages)
            o = tl.load(scratch + 1 + s)
            p = tl.load(bt + s * max_pages + j, mask=m, other=-1)
            tl.atomic_add(refcount + p, o - 1, mask=m & (p >= 0) & (o != 1))
            a = tl.load(anc + s)
            moved = m & (a != s)
            g = tl.load(bt + a * max_pages + j, mask=moved, other=-1)
            tl.store(new_rows + s * max_pages + j, g, mask=moved)

    @triton.jit
    def _mark_freed_kernel(
        bt, refcount, scratch, freed_flag, n_tokens, max_pages, page_size: tl.constexpr, BLOCK_J: tl.constexpr
    ):
        # a full page reaching refcount 0 is held only by rows without offspring: they flag it
        s = tl.program_id(0)
        if (tl.load(scratch) != 0) & (tl.load(scratch + 1 + s) == 0):
            j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
            m = (j < tl.load(n_tokens) // page_size) & (j < max_pages)
            p = tl.load(bt + s * max_pages + j, mask=m, other=-1)
            valid = m & (p >= 0)
            rc = tl.load(refcount + p, mask=valid, other=1)
            tl.store(freed_flag + p, 1, mask=valid & (rc == 0))

    @triton.jit
    def _push_freed_kernel(freed_flag, stack, free_top, scratch, n_pages, BLOCK_P: tl.constexpr):
        # push the freed full pages in ascending page id
        if tl.load(scratch) != 0:
            top = tl.load(free_top)
            for p0 in range(0, n_pages, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                f = tl.load(freed_flag + p, mask=p < n_pages, other=0)
                tl.store(stack + top + tl.cumsum(f, 0) - 1, p, mask=f != 0)
                top += tl.sum(f, 0)
            tl.store(free_top, top)

    @triton.jit
    def _pop_cow_kernel(
        anc,
        bt,
        refcount,
        stack,
        free_top,
        status,
        scratch,
        n_tokens,
        n_rows,
        max_pages,
        page_size: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        # pop one page (in row order) for the partial page of every row that changed ancestor
        if tl.load(scratch) != 0:
            n = tl.load(n_tokens)
            n_full = n // page_size
            has_part = (n % page_size != 0) & (n_full < max_pages)
            jp = tl.minimum(n_full, max_pages - 1)
            top = tl.load(free_top)
            cnt = tl.zeros((), tl.int32)
            for r0 in range(0, n_rows, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                m = r < n_rows
                a = tl.load(anc + r, mask=m, other=0)
                old_part = tl.load(bt + r * max_pages + jp, mask=m, other=-1)
                src = tl.load(bt + a * max_pages + jp, mask=m, other=-1)
                need = (m & (a != r) & has_part & (src >= 0)).to(tl.int32)
                rank = cnt + tl.cumsum(need, 0) - 1
                ok = (need != 0) & (rank < top)
                d = tl.load(stack + top - 1 - rank, mask=ok, other=-1)
                tl.store(refcount + d, 1, mask=ok)
                tl.store(scratch + 1 + n_rows + r, d, mask=m)
                tl.store(scratch + 1 + 2 * n_rows + r, src, mask=m)
                tl.store(scratch + 1 + 3 * n_rows + r, old_part, mask=m)
                cnt += tl.sum(need, 0)
            tl.store(free_top, top - tl.minimum(cnt, top))
            tl.store(status, 1, mask=cnt > top)

    @triton.jit
    def _copy_pages_kernel(anc, k_pool, v_pool, scratch, n_rows, n_pages, page_elems, BLOCK_E: tl.constexpr):
        # one (row, layer) per program: K and V of the ancestor's partial page into the fresh page
        r = tl.program_id(0)
        if tl.load(anc + r) != r:
            d = tl.load(scratch + 1 + n_rows + r)
            if d >= 0:
                s = tl.load(scratch + 1 + 2 * n_rows + r)
                layer = tl.program_id(1).to(tl.int64) * n_pages
                src_off = (layer + s) * page_elems
                dst_off = (layer + d) * page_elems
                for e0 in range(0, page_elems, BLOCK_E):
                    e = e0 + tl.arange(0, BLOCK_E)
                    m = e < page_elems
                    tl.store(k_pool + dst_off + e, tl.load(k_pool + src_off + e, mask=m), mask=m)
                    tl.store(v_pool + dst_off + e, tl.load(v_pool + src_off + e, mask=m), mask=m)

    @triton.jit
    def _write_rows_kernel(
        anc, bt, scratch, new_rows, n_tokens, n_rows, max_pages, page_size: tl.constexpr, BLOCK_J: tl.constexpr
    ):
        r = tl.program_id(0)
        if tl.load(anc + r) != r:
            n = tl.load(n_tokens)
            n_full = n // page_size
            j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
            inside = j < max_pages
            m = inside & (j < n_full)
            tl.store(bt + r * max_pages + j, tl.load(new_rows + r * max_pages + j, mask=m), mask=m)
            d = tl.load(scratch + 1 + n_rows + r) + tl.zeros_like(j)
            tl.store(bt + r * max_pages + j, d, mask=inside & (j == n_full) & (n % page_size != 0))

    @triton.jit
    def _push_old_partial_kernel(
        anc,
        refcount,
        stack,
        free_top,
        scratch,
        n_tokens,
        n_rows,
        max_pages,
        page_size: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        # after the copies: release the old partial pages of rows that changed ancestor, in row order
        n = tl.load(n_tokens)
        has_part = (n % page_size != 0) & (n // page_size < max_pages)
        if (tl.load(scratch) != 0) & has_part:
            top = tl.load(free_top)
            for r0 in range(0, n_rows, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                m = r < n_rows
                a = tl.load(anc + r, mask=m, other=0)
                old_part = tl.load(scratch + 1 + 3 * n_rows + r, mask=m, other=-1)
                dec = m & (a != r) & (old_part >= 0)
                prev = tl.atomic_add(refcount + old_part, -1, mask=dec)
                freed = (dec & (prev == 1)).to(tl.int32)
                tl.store(stack + top + tl.cumsum(freed, 0) - 1, old_part, mask=freed != 0)
                top += tl.sum(freed, 0)
            tl.store(free_top, top)
