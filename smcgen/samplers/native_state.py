"""The native engine's per-run state: request segments (rows that share a prompt length, a token
limit and a random stream), the tensors one captured cycle reads and writes, and the host-side
scoring of host potentials one cycle behind the device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smcgen.kernels.philox import philox_uniform
from smcgen.potentials.base import (
    score_particles,
    scoring_error,
)
from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.samplers.run import BatchRun
from smcgen.samplers.step import (
    potential_increment,
)

if TYPE_CHECKING:
    from smcgen.samplers.native import NativeSMC


@dataclass(frozen=True)
class _Segment:
    """Groups ``g0:g1`` of a batch (rows ``r0:r1``) that share one prompt length, one token limit
    and one random stream (``seed``: its Philox key); each segment keeps its own position."""

    g0: int
    g1: int
    n_particles: int
    prompt_len: int
    limit: int
    seed: int

    @property
    def n_groups(self) -> int:
        return self.g1 - self.g0

    @property
    def r0(self) -> int:
        return self.g0 * self.n_particles

    @property
    def r1(self) -> int:
        return self.g1 * self.n_particles

    @property
    def n_rows(self) -> int:
        return self.r1 - self.r0


class _CycleState:
    """Every device tensor a cycle reads or writes, allocated once per run (static addresses)."""

    def __init__(
        self,
        engine: NativeSMC,
        prompts: list[list[int]],
        segments: list[_Segment],
        n_cycles: int,
        tcache: PagedKVCache,
        dcache: PagedKVCache | None,
        pool_lens: list[int] | None = None,
    ):
        cfg = engine.config
        dev = engine.device
        self.B = len(prompts)
        self.R = self.B * cfg.n_particles
        T = engine.block + 1
        self.tcache, self.dcache = tcache, dcache
        self.segments = segments
        # each segment's rows of the caches (views sharing the pools and page bookkeeping)
        self.tviews = [tcache.rows(g.r0, g.r1) for g in segments]
        self.dviews = [dcache.rows(g.r0, g.r1) for g in segments] if dcache is not None else []
        i64 = {"dtype": torch.long, "device": dev}
        self.seg_of_row = torch.tensor([i for i, g in enumerate(segments) for _ in range(g.n_rows)], **i64)
        # each row's token limit, or None when every row has the config's
        limits = [g.limit for g in segments for _ in range(g.n_rows)]
        same = all(m == cfg.max_new_tokens for m in limits)
        self.limits = None if same else torch.tensor(limits, **i64)
        self.history = torch.empty((self.R, n_cycles * T), **i64)
        self.lengths = torch.empty(self.R, **i64)
        self.done = torch.empty(self.R, dtype=torch.bool, device=dev)
        self.all_done = torch.empty(1, dtype=torch.bool, device=dev)
        self.pending = torch.zeros(self.R, 2 if engine.draft is not None else 1, **i64)
        self.log_w = torch.empty(self.B, cfg.n_particles, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(len(segments), dtype=torch.int32, device=dev)
        self.cycle = torch.empty(1, **i64)
        # which cycle counter each row and group reads: one for the run (NativeSlots: one per slot)
        self.cycle_of_row = torch.zeros(self.R, **i64)
        self.cycle_of_group = torch.zeros(self.B, **i64)
        self.group_ids = torch.arange(self.B, **i64)
        self.max_cycle = n_cycles
        self.arange_t = torch.arange(T, **i64)
        self.eos = torch.tensor(engine.eos_ids, **i64).reshape(-1)
        # each segment's Philox key and offset
        self.seed = torch.empty(len(segments), **i64)
        self.offset = torch.empty(len(segments), **i64)
        self.ess_history = torch.empty(n_cycles, self.B, dtype=torch.float32, device=dev)
        self.resampled_history = torch.empty(n_cycles, self.B, dtype=torch.bool, device=dev)
        # whether each group's particles had all finished after each cycle
        self.done_history = torch.empty(n_cycles, self.B, dtype=torch.bool, device=dev)
        # potentials: each device potential's last score per row, the host potentials' pending
        # increment (added by the next cycle), the last cycle's ancestors
        self.device_prev = torch.empty(len(engine.device_potentials), self.R, dtype=torch.float32, device=dev)
        self.host_inc = torch.empty(self.R, dtype=torch.float64, device=dev)
        self.last_anc = torch.empty(self.R, **i64)
        # a device guide's automaton state per row (after the kept history)
        self.guide_state = engine.dfa.initial(self.R, dev) if engine.dfa is not None else None
        # NaN / +inf flags per source (the models, each device potential) and the first cycle of each
        self.bad = torch.empty(len(engine._sources), dtype=torch.bool, device=dev)
        self.bad_step = torch.empty(len(engine._sources), **i64)
        #: a host-guided run's pieces (samplers/native_host_guide.py), made by its first cycle; the
        #: recorded ones of an earlier run of this state are replayed again (``start``)
        self.host_guided: Any = None
        #: the prompt lengths the caches are sized for (one per segment: a bucket's, or the prompt's
        #: own when the bucket did not fit; default: the prompts') and the prefill's buffers and
        #: graph (samplers/native_prefill.py), kept with the state
        self.pool_lens = list(pool_lens) if pool_lens is not None else [g.prompt_len for g in segments]
        self.prefill: Any = None
        self.start(engine, segments)

    def start(self, engine: NativeSMC, segments: list[_Segment]) -> None:
        """Set every tensor to a run's start, in place (their addresses stay: a captured cycle of an
        earlier run of the same shape replays over them). ``segments`` may differ from the last
        run's only in their seeds; the prefill then writes the prompts, positions and pending tokens."""
        assert [(g.g0, g.g1, g.limit) for g in segments] == [(g.g0, g.g1, g.limit) for g in self.segments]
        self.segments = segments
        #: guided runs: the history's filled columns on the host, updated a block per cycle
        self.host_history = torch.zeros(self.R, 0, dtype=torch.long)
        self.history.fill_(engine.pad_id)
        self.lengths.zero_()
        self.done.zero_()
        self.all_done.zero_()
        self.log_w.zero_()
        self.cycle.zero_()
        self.cycle_of_row.zero_()
        self.cycle_of_group.zero_()
        #: request slots (NativeSlots): finished slots keep their position, counters stop at max_cycle
        self.slot_mode = False
        self.seed.copy_(torch.tensor([g.seed for g in segments], dtype=torch.long))
        self.offset.zero_()
        self.ess_history.zero_()
        self.resampled_history.zero_()
        self.done_history.zero_()
        self.device_prev.zero_()
        self.host_inc.zero_()
        self.host_start: Tensor | None = None
        torch.arange(self.R, out=self.last_anc)
        if self.guide_state is not None:
            self.guide_state.copy_(engine.dfa.initial(self.R, self.guide_state.device))
        #: a traced run's per-cycle copies (samplers/native_trace.py CycleTap); None: not traced
        self.tap: Any = None
        if self.host_guided is not None and not self.host_guided.restart():
            self.host_guided = None
        self.bad.zero_()
        self.bad_step.fill_(-1)
        # a torch resampler's randomness (eager runs only), one per segment
        self.generators = [torch.Generator(device=self.history.device) for _ in segments]
        for gen, g in zip(self.generators, segments):
            gen.manual_seed(g.seed + 1)

    def _tensors(self) -> list[Tensor]:
        caches = [c for c in (self.tcache, self.dcache) if c is not None]
        out = [
            self.history,
            self.lengths,
            self.done,
            self.all_done,
            self.pending,
            self.log_w,
            self.pos,
            self.cycle,
            self.offset,
            self.ess_history,
            self.resampled_history,
            self.done_history,
            self.device_prev,
            self.host_inc,
            self.last_anc,
            self.bad,
            self.bad_step,
        ]
        if self.guide_state is not None:
            out.append(self.guide_state)
        for c in caches:
            out += [c.block_table, c.refcount, c.free_stack, c.free_top, c.status, c.high_water]
        return out

    def snapshot(self) -> list[Tensor]:
        """Copies of the mutable state (KV pools excluded: a warm-up only writes slots it will rewrite)."""
        return [t.clone() for t in self._tensors()]

    def restore(self, snapshot: list[Tensor]) -> None:
        for t, saved in zip(self._tensors(), snapshot):
            t.copy_(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reordered(run: BatchRun, order: list[int]) -> BatchRun:
    """``run`` (groups in batch order, ``order[j]`` the caller's index of group j) in the callers' order."""
    if order == sorted(order):
        return run
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return BatchRun(
        tokens=run.tokens[back],
        lengths=run.lengths[back],
        log_weights=run.log_weights[back],
        log_z=run.log_z[back],
        ess_history=run.ess_history[:, back],
        resampled=run.resampled[:, back],
        elapsed_s=run.elapsed_s,
        dead=run.dead[back] if run.dead is not None else None,
    )


def _as_prompts(prompt_ids: Sequence[int] | Sequence[Sequence[int]], n_groups: int | None) -> list[list[int]]:
    """One prompt repeated ``n_groups`` times, or a list of prompts (then ``n_groups`` must be None/len)."""
    items = list(prompt_ids)
    if (
        items
        and isinstance(items[0], (list, tuple, Tensor))
        and not (isinstance(items[0], Tensor) and items[0].dim() == 0)
    ):
        prompts = [[int(t) for t in p] for p in items]
        if n_groups not in (None, len(prompts)):
            raise ValueError(f"n_groups={n_groups} but {len(prompts)} prompts were given")
        return prompts
    groups = 1 if n_groups is None else n_groups
    if groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {groups}")
    prompt = [int(t) for t in items]
    return [list(prompt) for _ in range(groups)]


class _PhiloxUniforms:
    """Uniforms from a segment's counter-based Philox stream (key and offset on the device): what
    the built-in resamplers draw from on the native engine, so a CUDA graph captures them."""

    def __init__(self, seed: Tensor, offset: Tensor):
        self.seed, self.offset = seed, offset

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        u = philox_uniform(self.seed, self.offset + torch.arange(n, device=self.offset.device))
        self.offset.add_(n)
        return u.view(shape)


class _HostScorer:
    """Host potentials on the native engine, scored one cycle late so the device never waits.

    After cycle c the host queues copies of the tokens, lengths, done flags and ancestors (pinned
    memory on a GPU); while the device runs cycle c + 1 it scores cycle c's particles (complete for
    finished ones), and its increment log Psi(new) - log Psi(previous) goes to the device, permuted
    by cycle c + 1's ancestors, where cycle c + 2 adds it before its resampling decision. The
    intermediate targets then carry the twist of the tokens one cycle back, which telescopes like
    any twist; :meth:`finish` adds what is left after the last cycle (the final complete scores),
    so the weights at the end are the ones the unlagged step gives. With ``lag = 0`` (a guided run,
    where every cycle waits on the host anyway) each cycle is scored right after it.
    """

    def __init__(self, engine: NativeSMC, s: _CycleState, prompts: list[list[int]], lag: int):
        assert engine.host_potential is not None and s.host_start is not None
        self.engine, self.s, self.lag = engine, s, lag
        self.potential = engine.host_potential
        self.prompts = [tuple(p) for p in prompts]
        self.N = engine.config.n_particles
        pin = engine.device.type == "cuda"
        R, W = s.R, s.history.shape[1]
        self.hist = torch.zeros(2, R, W, dtype=torch.long, pin_memory=pin)
        self.lengths = torch.zeros(2, R, dtype=torch.long, pin_memory=pin)
        self.done = torch.zeros(2, R, dtype=torch.bool, pin_memory=pin)
        self.anc = torch.zeros(2, R, dtype=torch.long, pin_memory=pin)
        self.staged = torch.zeros(2, R, dtype=torch.float64, pin_memory=pin)
        self.delta_dev = torch.zeros(R, dtype=torch.float64, device=engine.device)
        # the last scores and done flags, in the order of the last scored snapshot
        self.prev = s.host_start.clone()
        self.prev_done = torch.zeros(R, dtype=torch.bool)

    def snapshot(self, c: int) -> None:
        """Queue copies of cycle c's state (read by :meth:`score` once the cycle's event passed)."""
        i, s = c % 2, self.s
        self.hist[i].copy_(s.history, non_blocking=True)
        self.lengths[i].copy_(s.lengths, non_blocking=True)
        self.done[i].copy_(s.done, non_blocking=True)
        self.anc[i].copy_(s.last_anc, non_blocking=True)

    def _delta(self, c: int) -> Tensor:
        """Cycle c's increments (its row order), with the potentials' row states following its ancestors."""
        i = c % 2
        anc = self.anc[i].clone()
        self.prev, self.prev_done = self.prev[anc], self.prev_done[anc]
        self.potential.reorder(anc)
        active = ~self.prev_done & ~torch.isneginf(self.prev)
        rows = active.nonzero().squeeze(-1).tolist()
        new = self.prev.clone()
        if rows:
            hist_rows, lengths, done = self.hist[i].tolist(), self.lengths[i].tolist(), self.done[i]
            # one batched call per distinct prompt (usually one: n_groups runs of a prompt)
            by_prompt: dict[tuple[int, ...], list[int]] = {}
            for r in rows:
                by_prompt.setdefault(self.prompts[r // self.N], []).append(r)
            for prompt, mine in by_prompt.items():
                tokens = [hist_rows[r][: lengths[r]] for r in mine]
                try:
                    new[mine] = score_particles(
                        self.potential, tokens, done[mine].tolist(), list(prompt), self.engine.tokenizer, mine
                    )
                except Exception as err:
                    raise scoring_error(self.potential, err, c + 1) from err
        delta, self.prev = potential_increment(new, self.prev, active)
        self.prev_done = self.done[i].clone()
        return delta

    def score(self, c: int) -> None:
        """Score cycle c and queue its increment for the next cycle the device has not started."""
        delta = self._delta(c)
        staged = self.staged[c % 2]
        staged.copy_(delta)
        self.delta_dev.copy_(staged, non_blocking=True)
        s = self.s
        # lag 1: cycle c + 1 already reordered the rows; its ancestors are in last_anc (stream order)
        s.host_inc.copy_(self.delta_dev[s.last_anc] if self.lag else self.delta_dev)

    def finish(self, last: int, seen: int, ready: list[Any] | None) -> None:
        """After the last cycle: the increment still pending and the scores of the cycles not yet
        scored (the final, complete ones) go straight into the weights."""
        s = self.s
        s.log_w.add_(s.host_inc.view(s.B, -1).float())
        s.host_inc.zero_()
        for c in range(seen + 1, last + 1):
            if ready is not None:
                ready[c % 2].synchronize()
            s.log_w.add_(self._delta(c).to(s.log_w.device).view(s.B, -1).float())
