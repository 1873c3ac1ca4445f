"""Request slots on the native engine: requests join and leave a running batch between cycles.

:class:`NativeSlots` keeps ``n_slots`` slots of N particle rows each over one :class:`NativeSMC`
and one shared paged KV pool per model. Every cycle runs all ``n_slots * N`` rows (so one captured
CUDA graph serves every mix of requests; on the CPU the kernels' torch twins run the same code);
each slot is one segment of the cycle with its own position, cycle counter, token limit and Philox
stream (key = the request's seed, counter from 0 at admission). A request therefore draws exactly
what it draws run alone with the same seed, whenever it joins.

Between cycles the host (one sync per cycle) hands back the slots whose particles have all
finished, releases their pages to the pool, and prefills a waiting request into a free slot.
Admission is checked against the pool: every occupied slot holds a budget of its worst case
(:meth:`PagedKVCache.pages_needed`, the bound a whole-batch run is sized by) and an idle slot a
few pages for the dummy block its rows keep computing; a request is admitted only when its worst
case fits beside those budgets, so a running request never runs out of pages.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from smcgen.core.device_memory import free_gpu_bytes
from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.samplers.native import NativeSMC
from smcgen.samplers.native_state import _CycleState, _Segment, _sync
from smcgen.samplers.run import BatchRun
from smcgen.samplers.step import NonFiniteError


def slots_reason(engine: NativeSMC) -> str | None:
    """Why ``engine``'s requests cannot run in request slots (None when they can)."""
    if engine.host_potential is not None or engine.device_potentials or engine.end_potentials:
        return "potentials are scored over the whole batch's history (no per-slot start scores yet)"
    if engine.mask is not None and (engine.dfa is None or not engine.dfa.complete_is_exact):
        return "the guide's masks or final factor are computed on the host"
    return None


@dataclass
class _Occupant:
    """The request in a slot: its limit, its page budget, when it joined and the cycles it ran."""

    limit: int
    pages: int
    joined: float
    cycles: int = 0


class NativeSlots:
    """``n_slots`` request slots of N particles over ``engine`` and one KV pool of ``kv_pages`` pages.

    ``max_new_tokens`` bounds every admitted request's limit (the history's width). ``kv_pages``
    (default: ``n_slots`` requests of ``max_prompt_len`` tokens at that limit; on CUDA at most what
    ``engine.kv_memory_fraction`` of free GPU memory holds) sizes each model's pool. Use
    :meth:`problem` / :meth:`fits` / :meth:`admit` between :meth:`step` calls, and :meth:`collect`
    then :meth:`retire` for each finished slot :meth:`step` returns.
    """

    def __init__(
        self,
        engine: NativeSMC,
        n_slots: int,
        max_new_tokens: int,
        kv_pages: int | None = None,
        max_prompt_len: int | None = None,
    ):
        reason = slots_reason(engine)
        if reason is not None:
            raise ValueError(f"request slots cannot run this engine: {reason}")
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.engine = engine
        self.config = engine.config
        self.n_slots = n_slots
        self.max_new_tokens = max_new_tokens
        N, T, ps = self.config.n_particles, engine.block + 1, engine.page_size
        self.n_particles = N
        self.n_cycles = -(-max_new_tokens // T)
        context = min(m.max_positions for m in (engine.target, engine.draft) if m is not None)
        # an idle (or finished) slot's rows keep computing a dummy block at positions 0..T: their own
        # pages, no prompt shared (the pool's worst-case bound with an empty prompt)
        self.idle_pages = PagedKVCache.pages_needed(N, 1, 0, T + 1, ps)
        if kv_pages is None:
            prompt = max_prompt_len if max_prompt_len is not None else max(2, context - max_new_tokens)
            kv_pages = n_slots * self.request_pages(min(prompt, context), max_new_tokens)
            kv_pages = min(kv_pages, self._pages_in_memory())
        if kv_pages < self.idle_pages * n_slots:
            raise ValueError(
                f"kv_pages={kv_pages} is smaller than the {self.idle_pages * n_slots} pages {n_slots} idle slots hold"
            )
        self.kv_pages = int(kv_pages)
        max_pages = min(-(-(context + T) // ps), self.kv_pages)  # a row never holds more than the pool
        R = n_slots * N
        tcache = engine.target.make_cache(self.kv_pages, R, max_pages, ps)
        dcache = engine.draft.make_cache(self.kv_pages, R, max_pages, ps) if engine.draft is not None else None
        segments = [_Segment(i, i + 1, N, 1, max_new_tokens, 0) for i in range(n_slots)]
        # one spare row per history: a finished or idle slot's cycle counter stops there
        s = _CycleState(engine, [[0]] * n_slots, segments, self.n_cycles + 1, tcache, dcache)
        s.slot_mode, s.max_cycle = True, self.n_cycles
        i64 = {"dtype": torch.long, "device": engine.device}
        s.cycle = torch.full((n_slots,), self.n_cycles, **i64)
        s.cycle_of_row = s.seg_of_row.clone()
        s.cycle_of_group = torch.arange(n_slots, **i64)
        s.limits = torch.full((R,), max_new_tokens, **i64)
        s.done.fill_(True)
        s.pos.fill_(1)  # the draft's first step reads position pos - 1
        self.state = s
        self.caches = [c for c in (tcache, dcache) if c is not None]
        self.occupants: list[_Occupant | None] = [None] * n_slots
        self._graph: torch.cuda.CUDAGraph | None = None
        #: cycles run and requests admitted since built
        self.cycles = 0
        self.admitted = 0

    # ----------------------------------------------------------------------------- admission

    def request_pages(self, prompt_len: int, limit: int) -> int:
        """Worst-case pages of one request in one model's pool (as a whole-batch run sizes it)."""
        e = self.engine
        return PagedKVCache.pages_needed(
            self.n_particles, 1, max(prompt_len - 1, 1), e._positions_written(prompt_len, limit), e.page_size
        )

    def _pages_in_memory(self) -> int:
        """Pages one pool may take on CUDA (the target's share of the memory fraction); unbounded elsewhere."""
        e = self.engine
        if e.device.type != "cuda":
            return 1 << 40
        free = free_gpu_bytes(e.device)
        per_page = sum(
            PagedKVCache.bytes_per_page(m.n_layers, m.n_kv_heads, m.head_dim, e.page_size, m.dtype)
            for m in (e.target, e.draft)
            if m is not None
        )
        return int(free * e.kv_memory_fraction // per_page)

    def free_slots(self) -> list[int]:
        """Indices of the slots that hold no request, lowest first (admission fills the first)."""
        return [i for i, o in enumerate(self.occupants) if o is None]

    def active(self) -> int:
        """Slots that hold a request (running, or finished and not yet retired)."""
        return self.n_slots - len(self.free_slots())

    def budget_in_use(self) -> int:
        """Pages promised: each occupant's worst case plus each idle slot's dummy block."""
        return sum(o.pages if o is not None else self.idle_pages for o in self.occupants)

    def problem(self, prompt_len: int, limit: int) -> str | None:
        """Why a request can never run in these slots (None: it can, now or once others leave)."""
        reason = self.engine.unsupported_reason(prompt_len, limit)
        if reason is not None:
            return reason
        if limit > self.max_new_tokens:
            return f"max_new_tokens={limit} is above these slots' limit of {self.max_new_tokens}"
        need = self.request_pages(prompt_len, limit)
        room = self.kv_pages - (self.n_slots - 1) * self.idle_pages
        if need > room:
            return (
                f"KV cache too small: the request needs {need} pages of {self.engine.page_size} tokens in the worst "
                f"case ({self.n_particles} particles, prompt {prompt_len}, {limit} new tokens), the slots' pool "
                f"has {room} for one request; give the pool more pages (kv_pages) or ask for fewer tokens"
            )
        return None

    def fits(self, prompt_len: int, limit: int) -> bool:
        """Whether a request can join now: a free slot and its worst case beside the running ones'."""
        if not self.free_slots():
            return False
        need = self.request_pages(prompt_len, limit)
        return self.budget_in_use() - self.idle_pages + need <= self.kv_pages

    @torch.no_grad()
    def admit(self, prompt: list[int], seed: int | None, limit: int) -> int:
        """Prefill ``prompt`` into a free slot (between cycles); returns the slot. Raises ValueError
        for a request :meth:`problem` refuses and RuntimeError when it does not :meth:`fits` now."""
        problem = self.problem(len(prompt), limit)
        if problem is not None:
            raise ValueError(problem)
        if not self.fits(len(prompt), limit):
            raise RuntimeError("no free slot or not enough free KV pages for this request now; wait for one to finish")
        slot = self.free_slots()[0]
        e, s, N = self.engine, self.state, self.n_particles
        g = s.segments[slot]
        if seed is None:
            seed = random.SystemRandom().getrandbits(62)
        key = int(seed) % (2**62)  # the key a request alone with this seed gets
        for cache in self.caches:
            cache.release(g.r0, g.r1)  # the idle rows' dummy pages
        rows = slice(g.r0, g.r1)
        s.history[rows].fill_(e.pad_id)
        s.lengths[rows].zero_()
        s.done[rows].fill_(False)
        s.limits[rows].fill_(int(limit))
        s.log_w[slot].zero_()
        s.cycle[slot] = 0
        s.seed[slot] = key
        s.offset[slot] = 0
        s.ess_history[:, slot].zero_()
        s.resampled_history[:, slot].fill_(False)
        s.done_history[:, slot].fill_(False)
        if s.guide_state is not None:
            s.guide_state[rows].copy_(e.dfa.initial(N, e.device))
        s.generators[slot].manual_seed(key + 1)
        try:
            e._prefill_segment(s, slot, [list(prompt)])
        except BaseException:
            self._idle(slot)  # the slot stays free and its rows finished: the running requests are untouched
            raise
        self.occupants[slot] = _Occupant(int(limit), self.request_pages(len(prompt), limit), time.perf_counter())
        self.admitted += 1
        return slot

    # --------------------------------------------------------------------------------- cycles

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Run one cycle over every slot; returns the occupied slots whose particles have all finished.

        Raises :class:`NonFiniteError` / RuntimeError when a model produced NaN / the pool ran out
        (then every running request's state is suspect: :meth:`reset`)."""
        e, s = self.engine, self.state
        e.config = self.config  # a shared engine may have been handed another request's seed or limit
        e._step = self.cycles + 1
        if e.cuda_graph:
            if self._graph is None:
                self._graph = e._capture(s)
            self._graph.replay()
        else:
            e._cycle(s)
        # the cycle's one sync: each slot finished?, each pool ran out?, a NaN / +inf anywhere?
        flags = torch.cat(
            [s.done.view(self.n_slots, -1).all(dim=1)] + [c.status.bool() for c in self.caches] + [s.bad.any()[None]]
        ).cpu()
        self.cycles += 1
        finished = flags[: self.n_slots]
        if bool(flags[self.n_slots :].any()):
            for cache in self.caches:
                cache.check_status()
            e._check_flags(s)
        out = []
        for i, occ in enumerate(self.occupants):
            if occ is not None:
                occ.cycles += 1
                if bool(finished[i]):
                    out.append(i)
        return out

    def watch(self, slot: int) -> tuple[list[list[int]], list[bool]]:
        """The particles of ``slot`` so far (streaming): each one's tokens and whether its weight is
        above zero (one small copy to the host)."""
        occ = self.occupants[slot]
        if occ is None:
            raise ValueError(f"slot {slot} holds no request")
        s = self.state
        g = s.segments[slot]
        width = min(occ.cycles * (self.engine.block + 1), occ.limit)
        alive = s.log_w[slot] > float("-inf")
        # one copy: each row's tokens so far, then its length and whether it is alive
        packed = torch.cat([s.history[g.r0 : g.r1, :width], s.lengths[g.r0 : g.r1, None], alive[:, None]], dim=1)
        rows = packed.tolist()
        return [r[: r[width]] for r in rows], [bool(r[width + 1]) for r in rows]

    def collect(self, slot: int) -> BatchRun:
        """The finished request of ``slot`` as a run of one group (call before :meth:`retire`)."""
        occ = self.occupants[slot]
        if occ is None:
            raise ValueError(f"slot {slot} holds no request")
        e, s, N = self.engine, self.state, self.n_particles
        g = s.segments[slot]
        log_w = s.log_w[slot : slot + 1].clone()
        if s.guide_state is not None:
            # the automaton's end state decides membership (as a whole-batch run's end does)
            log_w.add_(e.dfa.log_complete(s.guide_state[g.r0 : g.r1]).view(1, N))
        _sync(e.device)
        n = occ.cycles
        return BatchRun.from_log_weights(
            s.history[g.r0 : g.r1, : occ.limit].reshape(1, N, occ.limit).cpu(),
            s.lengths[g.r0 : g.r1].view(1, N).cpu(),
            log_w.double().cpu(),
            s.ess_history[:n, slot : slot + 1].cpu(),
            s.resampled_history[:n, slot : slot + 1].cpu(),
            time.perf_counter() - occ.joined,
            torch.isneginf(log_w).all(dim=1).cpu(),
        )

    def retire(self, slot: int) -> None:
        """Free ``slot``: its pages go back to the pool; its rows idle (finished) until the next admission."""
        self._idle(slot)
        self.occupants[slot] = None

    def _idle(self, slot: int) -> None:
        """``slot``'s pages back to the pool, its rows finished: they compute a dummy block until admitted."""
        s = self.state
        g = s.segments[slot]
        for cache in self.caches:
            cache.release(g.r0, g.r1)
        s.done[g.r0 : g.r1].fill_(True)
        s.log_w[slot].zero_()
        s.pos[slot] = 1
        s.cycle[slot] = self.n_cycles

    def reset(self) -> None:
        """Drop every request (after an error): all slots idle, every page free, flags cleared."""
        for i in range(self.n_slots):
            if self.occupants[i] is not None:
                self.retire(i)
        for cache in self.caches:
            cache.reset()
        self.state.bad.zero_()
        self.state.bad_step.fill_(-1)

    def pages_free(self) -> int:
        """Free pages in the target's pool now (host read)."""
        return self.caches[0].free_pages()


__all__ = ["NativeSlots", "NonFiniteError", "slots_reason"]
