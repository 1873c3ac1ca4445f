"""Setting up a :class:`~smcgen.samplers.native.NativeSMC` run: cutting the batch into segments, sizing
and building the paged KV caches, and prefilling the prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from smcgen.core.device_memory import free_gpu_bytes
from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native_prefill import PREFILL_GRAPH_MAX_TOKENS, PrefillBuffers, prefill_rows
from smcgen.samplers.native_state import (
    _CycleState,
    _Segment,
)

#: Pools are sized for a bucket of prompt lengths (the next power of two, at least this many
#: tokens), so the run an engine keeps (state, pools, captured cycle) serves every later prompt of
#: the same bucket: a new prompt length no longer pays new pools, a warm-up and a capture. Nothing
#: in a captured cycle depends on the prompt's length but the pools' sizes and the block tables'
#: width: positions, shared-prefix lengths and the attention's key ranges are read on the device.
PROMPT_BUCKET_FLOOR = 64


def prompt_bucket(prompt_len: int) -> int:
    """The bucket of a prompt length: the next power of two, at least ``PROMPT_BUCKET_FLOOR``."""
    return max(PROMPT_BUCKET_FLOOR, 1 << (prompt_len - 1).bit_length())


class RunSetup:
    """Run set-up of :class:`~smcgen.samplers.native.NativeSMC` (a mixin)."""

    def _pool_prompt_len(self, prompt_len: int, limit: int) -> int:
        """The prompt length a run's pools are sized for: ``prompt_len``'s bucket (see
        ``PROMPT_BUCKET_FLOOR``), capped where a longer prompt would not fit the context."""
        bucket = prompt_bucket(prompt_len)
        context = min(m.max_positions for m in (self.target, self.draft) if m is not None)
        T = self.block + 1
        # the longest prompt with this limit (unsupported_reason's two bounds)
        longest = min(context - limit, context + 1 - -(-limit // T) * T)
        return max(prompt_len, min(bucket, longest))

    def _positions_written(self, prompt_len: int, max_new_tokens: int | None = None) -> int:
        """Positions the target's cache of a row holds at the end: all but the last token of the
        prompt and of every whole cycle of K+1 tokens (the draft's cache, one behind, is sized
        from this through ``_make_cache``'s ``lag``)."""
        T = self.block + 1
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        return prompt_len - 1 + -(-limit // T) * T

    # ------------------------------------------------------------------------------ setup

    def _make_cache(
        self, model: NativeCausalLM, segments: list[_Segment], pool_lens: list[int], lag: int, share: float
    ) -> PagedKVCache:
        """A cache sized for the worst case of these segments (their needs add up) with prompts of
        any length up to ``pool_lens`` (one per segment, each at least its prompt's length); on CUDA
        checked against free memory. ``lag``: how many fewer prompt tokens this model's cache holds
        (the target 1, the draft 2)."""
        lengths = [self._positions_written(p, g.limit) for g, p in zip(segments, pool_lens)]
        max_pages = -(-max(lengths) // self.page_size)
        # a prompt shorter than the one the pool is sized for needs at most one more page per row (its
        # partial last prompt page is each row's own): with it the sizing covers every shorter prompt
        slack = [g.n_rows for g in segments]
        available, where = 1 << 62, "in the pool"
        if self.device.type == "cuda":
            free = free_gpu_bytes(self.device)
            per_page = PagedKVCache.bytes_per_page(
                model.n_layers, model.n_kv_heads, model.head_dim, self.page_size, model.dtype
            )
            available = int(free * self.kv_memory_fraction * share // per_page)
            who = "the draft" if model is self.draft else "the target"
            where = f"for {who} in {share * self.kv_memory_fraction:.0%} of {free / 2**30:.1f} GiB free GPU memory"
        N = self.config.n_particles
        if len(segments) == 1:
            g = segments[0]
            needed = slack[0] + PagedKVCache.check_budget(
                g.n_rows,
                g.n_groups,
                max(pool_lens[0] - lag, 1),
                lengths[0],
                self.page_size,
                available - slack[0],
                where,
            )
        else:
            # each segment's worst case, summed (a segment's prompt pages are shared only inside it)
            needed = sum(
                PagedKVCache.pages_needed(g.n_rows, g.n_groups, max(p - lag, 1), n, self.page_size) + extra
                for g, p, n, extra in zip(segments, pool_lens, lengths, slack)
            )
            if needed > available:
                raise ValueError(
                    f"KV cache too small: {needed} pages of {self.page_size} tokens needed in the worst case "
                    f"({sum(g.n_groups for g in segments)} request(s) x {N} particles, prompts of "
                    f"{min(g.prompt_len for g in segments)}..{max(g.prompt_len for g in segments)} tokens, "
                    f"up to {max(lengths)} tokens per row), {available} available {where}; give the cache more "
                    f"memory or run fewer requests at once"
                )
        n_rows = sum(g.n_rows for g in segments)
        return model.make_cache(needed, n_rows, max_pages, self.page_size)

    def _make_caches(
        self, segments: list[_Segment], pool_lens: list[int], share_t: float
    ) -> tuple[PagedKVCache, PagedKVCache | None]:
        """The target's and the draft's caches (:meth:`_make_cache`); ``share_t``: the target's share of
        the memory (by the two models' KV bytes per token)."""
        tcache = self._make_cache(self.target, segments, pool_lens, 1, share_t)
        if self.draft is None:
            return tcache, None
        return tcache, self._make_cache(self.draft, segments, pool_lens, 2, 1.0 - share_t)

    # -------------------------------------------------------------------------------- run

    @torch.inference_mode()
    def _segments(
        self,
        prompts: list[list[int]],
        seeds: Sequence[int | None] | None,
        limits: Sequence[int] | None,
    ) -> tuple[list[int], list[_Segment]]:
        """The batch order of the prompts (segments contiguous) and the segments."""
        n, N = len(prompts), self.config.n_particles
        for name, values in (("seeds", seeds), ("max_new_tokens", limits)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
        if limits is not None:
            for m in limits:
                if not isinstance(m, int) or m < 1:
                    raise ValueError(f"max_new_tokens must be integers >= 1, got {m!r}")
        if seeds is None and limits is None:
            by_length: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                by_length.setdefault(len(p), []).append(i)
            parts = [
                (idx, self.config.seed, stream, self.config.max_new_tokens)
                for stream, idx in enumerate(by_length.values())
            ]
        else:
            parts = [
                (
                    [i],
                    seeds[i] if seeds is not None else self.config.seed,
                    0,
                    limits[i] if limits is not None else self.config.max_new_tokens,
                )
                for i in range(n)
            ]
        order, segments, g0 = [], [], 0
        for idx, seed, stream, limit in parts:
            if seed is None:
                seed = random.SystemRandom().getrandbits(62)
            # another segment of the same seed: a key far from it (Philox streams of distinct keys are independent)
            key = (int(seed) + stream * 0x9E3779B97F4A7C15) % (2**62)
            segments.append(_Segment(g0, g0 + len(idx), N, len(prompts[idx[0]]), int(limit), key))
            order += idx
            g0 += len(idx)
        return order, segments

    def _pads_prefill(self, segments: list[_Segment], pool_lens: list[int]) -> bool:
        """Whether a run pads its prompts to ``pool_lens`` (samplers/native_prefill.py):
        ``pad_prefill`` when set, else where its cycle is captured on CUDA and the padded prompts
        take at most ``PREFILL_GRAPH_MAX_TOKENS``."""
        if self.pad_prefill is not None:
            return bool(self.pad_prefill)
        padded = sum(g.n_groups * n for g, n in zip(segments, pool_lens))
        return self.cuda_graph and self.device.type == "cuda" and padded <= PREFILL_GRAPH_MAX_TOKENS

    def _prefill(self, s: _CycleState, prompts: list[list[int]]) -> None:
        """Prefill every segment's prompts (one batched forward per segment, each prompt into its
        own pages) and share each prompt's pages with its group.

        A segment's B prompts go into its first B rows (a ``rows`` view of the cache); one resample
        of the segment's rows then makes row b*N + i a copy of row b: full pages shared, partial
        last page copied. The prompts may be padded to the lengths the pools are sized for
        (``_pads_prefill``); a kept state then records the prefill as a CUDA graph on its second
        run, which later runs replay (samplers/native_prefill.py).
        """
        N = self.config.n_particles
        pad = self._pads_prefill(s.segments, s.pool_lens)
        lengths = s.pool_lens if pad else [g.prompt_len for g in s.segments]
        buffers = s.prefill
        if buffers is None or buffers.lengths != lengths:
            buffers = s.prefill = PrefillBuffers(self, s, lengths)
        # a graph only where the run captures its cycle (cuda_graph=False means no graphs at all)
        buffers.run(self, s, prompts, capture=pad and self.cuda_graph and self.device.type == "cuda")
        for i, g in enumerate(s.segments):
            self._set_pending(s, i, buffers.ids[i], g.prompt_len)
        # each group's rows now hold the same prompt K/V (resampling stays inside a group): cascade
        # attention may read it once per request (NativeCausalLM.cascade), each at its own length
        for cache, unfed in ((s.tcache, 1), (s.dcache, 2)):
            if cache is not None:
                cache.share_prefixes(N, [g.prompt_len - unfed for g in s.segments for _ in range(g.n_groups)])

    def _prefill_segment(self, s: _CycleState, i: int, prompts: list[list[int]]) -> None:
        """Prefill segment ``i``'s prompts (all of one length) into its first rows' own pages, share
        them with each group's rows and set the segment's pending tokens and position (a request
        slot's prefill: ``_prefill`` does a whole run's)."""
        N = self.config.n_particles
        dev = self.device
        g = s.segments[i]
        P = len(prompts[0])
        ids = torch.tensor(prompts, dtype=torch.long, device=dev)
        owner = torch.arange(g.n_groups, device=dev).repeat_interleave(N)
        zero = torch.zeros(g.n_groups, dtype=torch.int32, device=dev)
        for model, cache, n_fed in ((self.target, s.tcache, P - 1), (self.draft, s.dcache, P - 2)):
            if model is None or cache is None or n_fed == 0:
                continue
            prefill_rows(model, cache, g, ids, n_fed, n_fed, owner, zero)
        self._set_pending(s, i, ids, P)

    def _set_pending(self, s: _CycleState, i: int, ids: torch.Tensor, P: int) -> None:
        """Segment ``i``'s pending tokens (the last one or two of its prompts ``ids[:, :P]``, which
        the first cycle feeds) in every row of each group, and its position."""
        g = s.segments[i]
        tail = 2 if self.draft is not None else 1
        s.pending[g.r0 : g.r1].copy_(ids[:, P - tail : P].repeat_interleave(self.config.n_particles, dim=0))
        s.pos[i : i + 1].fill_(P - 1)

    # ------------------------------------------------------------------------------ cycle


__all__ = ["RunSetup"]
