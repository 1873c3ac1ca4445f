"""Paged, refcounted KV cache shared by the particles of the native runner.

One pool of pages per model holds every layer's keys and values:
``k_pool``/``v_pool`` [n_layers, n_pages, page_size, n_kv_heads, head_dim]. Row ``r`` of the
batch keeps its token at position ``p`` in page ``block_table[r, p // page_size]``, slot
``p % page_size``. Full pages may be shared by many rows (their refcount says how many); a row's
partial last page is always its own, so appending never disturbs another row.

All bookkeeping lives on the device and is changed only by the kernels in
``smcgen.kernels.paged_kv``: ``reserve`` and ``resample`` never read anything back to the host,
so they can sit inside a CUDA graph. Running out of pages sets ``status``; the host learns of it
from ``check_status`` after the run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from smcgen.kernels.paged_kv import resample_pages, reserve_pages

# Knobs a user can turn when the pool is too small, named in every sizing error.
_KNOBS = (
    "give the cache more pages (a larger memory fraction / n_pages) or need fewer: "
    "fewer particles or requests, a shorter prompt or fewer new tokens"
)


@dataclass(frozen=True)
class SharedPrefix:
    """Rows ``g*group .. g*group + group - 1`` (group g) share their first ``lengths[g]`` tokens.

    ``lengths`` is an int32 device tensor (one entry per group; a CUDA graph reads it where it
    lies), ``min_length`` its smallest entry on the host, for sizing kernels and for the automatic
    choice of cascade attention.
    """

    group: int
    lengths: Tensor
    min_length: int


@dataclass
class PagedKVCache:
    """Pool tensors plus the block table and page bookkeeping of ``n_rows`` particle rows.

    Construct with the sizes; the tensors are allocated on ``device`` (pools zeroed, every
    block-table entry -1, every page free). ``n_rows`` is the width of the batch that
    ``NativeCausalLM.forward`` runs; ``max_pages`` bounds one row's length at
    ``max_pages * page_size`` tokens.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    page_size: int
    n_pages: int
    n_rows: int
    max_pages: int
    dtype: torch.dtype = torch.bfloat16
    device: torch.device | str = "cpu"

    k_pool: Tensor = field(init=False, repr=False)
    v_pool: Tensor = field(init=False, repr=False)
    block_table: Tensor = field(init=False, repr=False)
    refcount: Tensor = field(init=False, repr=False)
    free_stack: Tensor = field(init=False, repr=False)
    free_top: Tensor = field(init=False, repr=False)
    status: Tensor = field(init=False, repr=False)
    high_water: Tensor = field(init=False, repr=False)
    #: the prompt prefix each group of rows holds in common (``share_prefix``), or None
    shared_prefix: SharedPrefix | None = field(init=False, repr=False, default=None)
    _prefix_lengths: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_kv_heads", "head_dim", "page_size", "n_pages", "n_rows", "max_pages"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PagedKVCache: {name} must be >= 1, got {getattr(self, name)}")
        self.device = torch.device(self.device)
        shape = (self.n_layers, self.n_pages, self.page_size, self.n_kv_heads, self.head_dim)
        # Zeroed, not empty: attention reads whole pages and masks the unwritten slots by position,
        # and 0 * NaN from uninitialized memory would still poison the weighted sum of values.
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        i32 = {"dtype": torch.int32, "device": self.device}
        self.block_table = torch.full((self.n_rows, self.max_pages), -1, **i32)
        self.refcount = torch.zeros(self.n_pages, **i32)
        # Pop order is free_stack[free_top - 1], so the stack is reversed to hand out page 0 first
        # (only cosmetic: it makes block tables easy to read in tests and debugging).
        self.free_stack = torch.arange(self.n_pages - 1, -1, -1, **i32)
        self.free_top = torch.full((1,), self.n_pages, **i32)
        self.status = torch.zeros(1, **i32)
        # Largest n_tokens ever reserved: lets check_status say how many pages were missing.
        self.high_water = torch.zeros(1, **i32)
        self.shared_prefix = None

    # ----------------------------------------------------------------------------- sizing

    @staticmethod
    def pages_needed(n_rows: int, n_requests: int, prompt_len: int, max_len: int, page_size: int) -> int:
        """Worst-case pages for ``n_rows`` rows split evenly over ``n_requests`` requests.

        ``prompt_len``: the shortest prompt (its full pages are stored once per request and
        shared by that request's rows); ``max_len``: the most tokens any row ever holds (prompt,
        new tokens and any look-ahead such as a verify block). The worst case is that rows share
        nothing beyond the prompt. One extra page per row covers the copy-on-write page a row
        takes during a resample before its old partial page returns to the pool (also the
        prefill's: the prompt is written once per request, then shared with the request's rows).
        """
        if n_requests < 1 or n_rows < n_requests:
            raise ValueError(f"pages_needed: need 1 <= n_requests <= n_rows, got {n_requests} and {n_rows}")
        if max_len < prompt_len:
            raise ValueError(f"pages_needed: max_len ({max_len}) < prompt_len ({prompt_len})")
        shared = prompt_len // page_size
        per_row = math.ceil(max_len / page_size)
        return n_requests * shared + n_rows * (per_row - shared) + n_rows

    @staticmethod
    def bytes_per_page(n_layers: int, n_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        """Bytes one page takes in the K and V pools together (all layers)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * page_size * n_kv_heads * head_dim * itemsize

    @classmethod
    def check_budget(
        cls,
        n_rows: int,
        n_requests: int,
        prompt_len: int,
        max_len: int,
        page_size: int,
        available: int,
        where: str = "in the pool",
    ) -> int:
        """Worst-case pages a run of this shape needs (:meth:`pages_needed`); ValueError naming
        both counts when more than ``available`` (``where`` says where those pages are)."""
        needed = cls.pages_needed(n_rows, n_requests, prompt_len, max_len, page_size)
        if needed > available:
            raise ValueError(
                f"KV cache too small: {needed} pages of {page_size} tokens needed in the worst case "
                f"({n_requests} request(s) x {n_rows // n_requests} particles, prompt {prompt_len}, "
                f"up to {max_len} tokens per row), {available} available {where}; {_KNOBS}"
            )
        return needed

    # ------------------------------------------------------------------- device operations

    def _count(self, n_tokens: Tensor | int) -> Tensor:
        """``n_tokens`` as the [1] int32 device tensor the kernels read (graph-safe when given so)."""
        if isinstance(n_tokens, Tensor):
            return n_tokens.to(device=self.device, dtype=torch.int32).reshape(1)
        return torch.full((1,), int(n_tokens), dtype=torch.int32, device=self.device)

    def reserve(self, n_tokens: Tensor | int) -> None:
        """Give every row pages for positions < ``n_tokens`` (call before a forward that writes them)."""
        n = self._count(n_tokens)
        torch.maximum(self.high_water, n, out=self.high_water)
        reserve_pages(self.block_table, self.refcount, self.free_stack, self.free_top, self.status, n, self.page_size)

    def resample(self, ancestors: Tensor, n_tokens: Tensor | int) -> None:
        """Row r continues row ``ancestors[r]``'s first ``n_tokens`` tokens (shared pages, CoW partial page)."""
        n = self._count(n_tokens)
        resample_pages(
            ancestors.to(device=self.device, dtype=torch.int64),
            self.block_table,
            self.refcount,
            self.free_stack,
            self.free_top,
            self.status,
            n,
            self.k_pool,
            self.v_pool,
            self.page_size,
        )

    def share_prefix(self, group: int, length: int) -> None:
        """Declare that rows ``g*group .. g*group + group - 1`` hold the same first ``length`` tokens.

        True after a prefill shared with the group by ``resample`` (and kept by every later
        resample, which draws ancestors inside a group only): the prefix's positions then hold the
        same keys and values in every row of the group (full pages shared, the partial page copied),
        so cascade attention may read them once from the group's first row. ``length`` 0 clears it.
        """
        if length <= 0:
            self._clear_prefix()
            return
        if group < 1 or self.n_rows % group:
            raise ValueError(f"share_prefix: group must divide the cache's {self.n_rows} rows, got {group}")
        if length > self.max_pages * self.page_size:
            raise ValueError(f"share_prefix: length {length} is past a row's {self.max_pages * self.page_size} slots")
        self.share_prefixes(group, [int(length)] * (self.n_rows // group))

    def share_prefixes(self, group: int, lengths: list[int]) -> None:
        """:meth:`share_prefix` with one length per group (requests of different prompt lengths in
        one batch); a group of length 0 shares nothing."""
        if group < 1 or self.n_rows % group or len(lengths) != self.n_rows // group:
            raise ValueError(
                f"share_prefixes: need one length per group of {group} of the cache's {self.n_rows} rows, "
                f"got {len(lengths)} lengths"
            )
        if max(lengths) > self.max_pages * self.page_size:
            raise ValueError(
                f"share_prefixes: length {max(lengths)} is past a row's {self.max_pages * self.page_size} slots"
            )
        if max(lengths) <= 0:
            self._clear_prefix()
            return
        host = torch.tensor([max(0, int(n)) for n in lengths], dtype=torch.int32)
        # one lengths tensor per cache, written in place: a cycle captured over an earlier run of
        # the same shape reads it where it lies (a new tensor would leave the graph a freed one)
        if self._prefix_lengths is None or self._prefix_lengths.shape != host.shape:
            self._prefix_lengths = torch.empty_like(host, device=self.device)
        self._prefix_lengths.copy_(host)
        self.shared_prefix = SharedPrefix(group, self._prefix_lengths, max(0, min(int(n) for n in lengths)))

    def _clear_prefix(self) -> None:
        """No shared prefix. A cycle captured over an earlier run that declared one still reads its
        lengths tensor (a kept run serves prompts of several lengths): zero it, so that cycle's
        cascade attention finds nothing shared and attends to each row's own keys."""
        self.shared_prefix = None
        if self._prefix_lengths is not None:
            self._prefix_lengths.zero_()

    def rows(self, start: int, stop: int) -> PagedKVCache:
        """A view of rows ``start:stop`` that shares the pool and bookkeeping with this cache.

        Lets a prompt be prefilled in one row (``cache.rows(0, 1)``) and then shared with every
        row by ``cache.resample(zeros, prompt_len)``, instead of reserving pages for all rows.
        """
        if not 0 <= start < stop <= self.n_rows:
            raise ValueError(f"rows({start}, {stop}) outside the cache's {self.n_rows} rows")
        view = copy.copy(self)
        view.block_table = self.block_table[start:stop]
        view.n_rows = stop - start
        view.shared_prefix = None  # the groups need not line up with the view's rows
        view._prefix_lengths = None  # nor write the whole cache's lengths in place
        return view

    def reset(self) -> None:
        """Free every page and clear the block table and status (between runs; no host sync).

        Call it on the whole cache, not on a ``rows`` view (a view would clear only its rows'
        block-table entries while freeing every page)."""
        self.block_table.fill_(-1)
        self.refcount.zero_()
        torch.arange(self.n_pages - 1, -1, -1, out=self.free_stack)
        self.free_top.fill_(self.n_pages)
        self.status.zero_()
        self.high_water.zero_()
        self.shared_prefix = None

    def release(self, start: int, stop: int) -> None:
        """Give back the pages of rows ``start:stop`` and clear their block-table entries (between
        runs or cycles, when those rows' request has left: continuous batching).

        Each page's refcount drops by the number of these rows that held it; pages no row holds any
        more go back on the free stack (in ascending order), pages other rows still share stay.
        Reads the number of freed pages back to the host."""
        if not 0 <= start < stop <= self.block_table.shape[0]:
            raise ValueError(f"release({start}, {stop}) outside the cache's {self.block_table.shape[0]} rows")
        rows = self.block_table[start:stop]
        held = rows[rows >= 0].long()
        if held.numel():
            drop = torch.bincount(held, minlength=self.n_pages).to(self.refcount.dtype)
            self.refcount.sub_(drop)
            freed = ((drop > 0) & (self.refcount == 0)).nonzero().squeeze(-1).to(self.free_stack.dtype)
            top = int(self.free_top.item())
            self.free_stack[top : top + freed.numel()] = freed
            self.free_top.add_(freed.numel())
        rows.fill_(-1)

    def free_pages(self) -> int:
        """Pages on the free stack (host read)."""
        return int(self.free_top.item())

    # ----------------------------------------------------------------------- host checks

    def pages_in_use(self) -> int:
        """Pages referenced by at least one row (host read)."""
        return int((self.refcount > 0).sum().item())

    def check_status(self) -> None:
        """Host read after a run: raise RuntimeError if the pool ran out at any point."""
        if int(self.status.item()) == 0:
            return
        # Entries still -1 below the largest reserved length are the pages that could not be had.
        n_cols = min(self.max_pages, -(-int(self.high_water.item()) // self.page_size))
        missing = int((self.block_table[:, :n_cols] < 0).sum().item()) if n_cols > 0 else 0
        in_use = self.pages_in_use()
        raise RuntimeError(
            f"KV page pool ran out: about {in_use + max(missing, 1)} pages of {self.page_size} tokens were needed "
            f"({in_use} in use, at least {max(missing, 1)} more could not be allocated), {self.n_pages} available; "
            f"{_KNOBS}. The results of this run are not valid."
        )
