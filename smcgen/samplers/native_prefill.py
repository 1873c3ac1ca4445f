"""The prefill of a :class:`~smcgen.samplers.native.NativeSMC` run, from static buffers; on CUDA its
prompts are padded to the length their KV pools are sized for, so that one CUDA graph serves every
prompt of those buckets.

An eager prefill of a small model is bound by the host: a forward issues a few hundred launches
whatever the prompt (SmolLM2-135M: 17-33 ms a model on an H100, BENCHMARKS.md), a third of a
short request's wall time once the decode cycles replay as a graph. Padded to its pools' length,
a prompt's prefill has the shapes of every other prompt of the bucket; the buffers here are
static, so the graph captured on the kept run's second use replays for each later one.

Why the padding changes nothing the run reads, up to rounding (the GEMMs have another height, so
a padded run may differ in the last bits from an unpadded one): attention is causal, so the
prompt's positions never see the pad tokens; the pads' keys and values land on positions past the prompt, in pages
of the rows that were prefilled, and every such position is written again by a cycle before any
query reaches it. Only the prompt's own positions are shared with each group's rows (``resample``
by the real lengths, read from the device). The pools, sized for a prompt as long as the padded
one plus a page of slack a row (``RunSetup._make_cache``), hold the pages the pads take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from smcgen.runners.native.kv_cache import PagedKVCache
    from smcgen.runners.native.model import NativeCausalLM
    from smcgen.samplers.native import NativeSMC
    from smcgen.samplers.native_state import _CycleState, _Segment

#: a run pads its prompts when they take at most this many tokens in all once padded (each
#: request's prompt to its pools' length): padding costs at most this many tokens of compute, which
#: a long prompt's prefill (bound by the device, not the host) would not win back
PREFILL_GRAPH_MAX_TOKENS = 1024


def prefill_rows(
    model: NativeCausalLM,
    cache: PagedKVCache,
    g: _Segment,
    ids: Tensor,
    n: int,
    fed: Tensor | int,
    owner: Tensor,
    zero: Tensor,
) -> None:
    """Feed ``ids[:, :n]`` (one prompt per request of segment ``g``) into the segment's first rows'
    own pages, then make row b*N + i a copy of row b's first ``fed`` tokens: full pages shared,
    the partial last page copied (``fed``: a device count inside a graph)."""
    view = cache.rows(g.r0, g.r0 + g.n_groups)
    view.reserve(n)
    # max_keys: the fed length, not the page table's capacity, sizes the KV splits (request slots
    # size their tables for the whole context; each capacity would compile a variant)
    model(ids[:, :n], zero, view, last_only=True, max_keys=n)
    cache.rows(g.r0, g.r1).resample(owner, fed)


class PrefillBuffers:
    """Static buffers of a run's prefill (the prompts, padded to ``lengths``, one per segment; each
    segment's real lengths; the rows each prompt is copied to) and, once recorded, its CUDA graph.

    Made for one run state and one set of lengths (the pools' when the run pads, else the prompts'
    own), kept with that state: a kept run replays its graph for any prompts of the same buckets."""

    def __init__(self, engine: NativeSMC, s: _CycleState, lengths: list[int]):
        dev = engine.device
        N = engine.config.n_particles
        self.lengths = list(lengths)
        self.ids = [
            torch.full((g.n_groups, n), engine.pad_id, dtype=torch.long, device=dev)
            for g, n in zip(s.segments, self.lengths)
        ]
        # per segment, the prompt tokens the target's and the draft's caches really hold (P-1, P-2):
        # the pages shared with each group's rows (read on the device, so a graph serves any length)
        self.fed = torch.zeros(len(s.segments), 2, dtype=torch.int32, device=dev)
        self.owner = [torch.arange(g.n_groups, device=dev).repeat_interleave(N) for g in s.segments]
        self.zero = [torch.zeros(g.n_groups, dtype=torch.int32, device=dev) for g in s.segments]
        self.graph: torch.cuda.CUDAGraph | None = None
        #: whether these buffers prefilled eagerly once (Triton compiled their shapes): only then record
        self.ran = False

    def load(self, prompts: list[list[int]], s: _CycleState, pad_id: int) -> None:
        """Write this run's prompts (padded with ``pad_id``) and lengths into the buffers."""
        fed = []
        for i, g in enumerate(s.segments):
            part = prompts[g.g0 : g.g1]
            host = torch.full(tuple(self.ids[i].shape), pad_id, dtype=torch.long)
            host[:, : g.prompt_len] = torch.tensor(part, dtype=torch.long)
            self.ids[i].copy_(host)
            fed.append([max(g.prompt_len - 1, 0), max(g.prompt_len - 2, 0)])
        self.fed.copy_(torch.tensor(fed, dtype=torch.int32))

    def forward(self, engine: NativeSMC, s: _CycleState) -> None:
        """Each segment's (padded) prompts into its first rows' pages, then the real prompt shared
        with each group's rows (what a graph records)."""
        models = ((engine.target, s.tcache), (engine.draft, s.dcache))
        for i, g in enumerate(s.segments):
            for j, (model, cache) in enumerate(models):
                # the target's cache holds all but the prompt's last token, the draft's all but two
                n = self.lengths[i] - 1 - j
                if model is None or cache is None or n <= 0:
                    continue
                prefill_rows(model, cache, g, self.ids[i], n, self.fed[i, j : j + 1], self.owner[i], self.zero[i])

    def run(self, engine: NativeSMC, s: _CycleState, prompts: list[list[int]], capture: bool) -> None:
        """Prefill ``prompts``: replay the graph if there is one; else record it first when
        ``capture`` (padded prompts on CUDA: every prompt of the buckets has these shapes) and these
        buffers ran eagerly once (Triton compiles outside the capture), so a kept state records on
        its second run; else run eagerly."""
        self.load(prompts, s, engine.pad_id)
        if self.graph is None and capture and self.ran:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.forward(engine, s)
            self.graph = graph  # recording ran nothing: the replay below prefills
        if self.graph is not None:
            self.graph.replay()
        else:
            self.forward(engine, s)
            self.ran = True


__all__ = ["PREFILL_GRAPH_MAX_TOKENS", "PrefillBuffers", "prefill_rows"]
