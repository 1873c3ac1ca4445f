"""Continuous batching: an :class:`~smcgen.engine.Engine`'s requests join and leave a running
native batch between SMC cycles, so a long request does not hold the short ones beside it.

:class:`ContinuousBatcher` owns one thread and a FIFO queue. Its loop, between two cycles:

1. admits waiting requests into free request slots (:class:`~smcgen.samplers.native_slots.NativeSlots`)
   while their worst-case KV pages fit beside the running requests' (a request that can never fit
   gets a ``ValueError`` naming the page counts; one that fits later waits at the head of the queue,
   which keeps the order first come, first served);
2. runs one cycle of every slot;
3. hands each request whose particles have all finished back through its future, releasing its
   slot and pages.

Requests share the slots when their settings agree up to seed and token limit (as
:func:`~smcgen.engine.batch_key` says); a request with other settings waits until the running
ones have left, and the slots are rebuilt for it. A request the slots cannot run (the generic
engine, host potentials, a guide whose masks come from the host) runs on its own, through the
engine's whole-batch path, once nothing runs in the slots. The slots' engine lock is held for
one cycle at a time, so other calls on the Engine interleave between cycles.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from smcgen.core.result import SMCResult
from smcgen.engine_requests import Request, batch_key
from smcgen.samplers.native_slots import NativeSlots, slots_reason

if TYPE_CHECKING:
    from smcgen.engine import Engine

logger = logging.getLogger("smcgen")

#: the longest prompt a default slot pool is sized for (longer ones are admitted when they fit)
DEFAULT_PROMPT_BUDGET = 1024

#: seconds the loop's thread waits for work before it ends (a later submit starts another)
IDLE_EXIT_S = 30.0


@dataclass
class _Job:
    request: Request
    future: Future = field(repr=False)
    queued: float = field(default_factory=time.perf_counter)
    #: (slot key, native engine), None (runs without the slots), or not yet decided
    plan: Any = field(default=False, repr=False)
    #: a streamed request's watcher: ``on_step(sequences, alive)`` after each of its cycles
    on_step: Callable[[list[list[int]], list[bool]], None] | None = field(default=None, repr=False)


class ContinuousBatcher:
    """Runs submitted requests of ``engine`` with continuous batching (see the module docstring).

    It calls only the Engine's public members: ``lock``, ``config``, ``stats``, ``native_for``,
    ``run_group`` and ``result``.

    ``n_slots``: requests that run at once (the batch is ``n_slots x n_particles`` rows every
    cycle); ``kv_pages``: pages of each model's KV pool (default: ``n_slots`` requests of
    ``DEFAULT_PROMPT_BUDGET`` prompt tokens at the largest limit asked, within the engine's GPU
    memory fraction). ``stats`` counts admissions, cycles, finished requests, the times the head
    of the queue waited for pages, the slot rebuilds, the seconds the loop worked (busy_s) and of
    those the seconds in prefills (prefill_s, launch time: the next cycle's sync waits for them) and in
    cycles (cycle_s).
    """

    def __init__(self, engine: Engine, n_slots: int = 8, kv_pages: int | None = None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {n_slots!r}")
        if kv_pages is not None and (isinstance(kv_pages, bool) or not isinstance(kv_pages, int) or kv_pages < 1):
            raise ValueError(f"kv_pages must be an integer >= 1 or None, got {kv_pages!r}")
        self.engine = engine
        self.n_slots = n_slots
        self.kv_pages = kv_pages
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: dict[int, _Job] = {}
        self.slots: NativeSlots | None = None
        self._slots_key: Any = None
        self._thread: threading.Thread | None = None
        self.stats = {
            "admitted": 0,
            "cycles": 0,
            "finished": 0,
            "waited_for_pages": 0,
            "slot_builds": 0,
            "busy_s": 0.0,
            "prefill_s": 0.0,
            "cycle_s": 0.0,
        }
        #: the order in which requests finished (their futures' ids; for tests and metrics)
        self.finished_order: list[int] = []

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a slot)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in a slot now."""
        return len(self._running)

    def submit(self, request: Request, on_step: Callable[[list[list[int]], list[bool]], None] | None = None) -> Future:
        """Queue a resolved request; the future resolves to its :class:`SMCResult` (``dead`` flagged,
        never raised) or to the error that stopped it. Cancel the future to drop a waiting request.

        ``on_step(sequences, alive)`` (streaming) is called from the batcher's thread after each
        cycle of the request: its particles' tokens so far and whether each has weight above zero."""
        job = _Job(request, Future(), on_step=on_step)
        with self._cv:
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="smcgen-continuous", daemon=True)
                self._thread.start()
            self._cv.notify()
        return job.future

    # ---------------------------------------------------------------------------------- loop

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._queue and not self._running:
                    self._cv.wait(IDLE_EXIT_S)
                    if not self._queue and not self._running:
                        self._thread = None
                        return
            try:
                t0 = time.perf_counter()
                alone = self._admit()
                if alone:
                    self._run_alone(alone)
                elif self._running:
                    self._cycle()
                self.stats["busy_s"] += time.perf_counter() - t0
            except BaseException as err:  # noqa: BLE001 - the running requests get the error; the loop goes on
                self._fail_running(err)

    def _plan(self, request: Request) -> tuple[Any, Any] | None:
        """(slot key, native engine) for a request the slots can run, None for one that runs alone."""
        e, cfg = self.engine, request.config
        with e.lock:
            if request.grammar is None:  # one native engine serves every limit (the slots hold one per request)
                cfg = cfg.model_copy(update={"max_new_tokens": e.config.max_new_tokens})
            native = e.native_for(cfg, request.grammar, rows=cfg.n_particles * self.n_slots)
            if native is None:
                return None
            limit = request.config.max_new_tokens
            if slots_reason(native) is not None or native.unsupported_reason(len(request.ids), limit):
                return None
        return batch_key(request), native

    def can_run(self, request: Request) -> bool:
        """Whether ``request`` runs in the request slots (else :meth:`submit` runs it on its own)."""
        return self._plan(request) is not None

    def _fits_key(self, key: Any, limit: int) -> bool:
        return self.slots is not None and key == self._slots_key and limit <= self.slots.max_new_tokens

    def _admit(self) -> list[_Job] | None:
        """Admit queued requests into free slots while they fit; returns jobs to run without the
        slots (the head of the queue and the queued requests right behind it with its settings, up
        to ``n_slots``: one whole-batch run, once the slots are empty) or None."""
        while True:
            with self._cv:
                if not self._queue:
                    return None
                job = self._queue[0]
            if job.future.cancelled():
                self._pop(job)
                continue
            q = job.request
            limit = q.config.max_new_tokens
            try:
                if job.plan is False:  # decided once: the head may wait many cycles
                    job.plan = self._plan(q)
                plan = job.plan
                if plan is None:
                    if self._running:
                        return None  # first come, first served: it waits for the slots to empty
                    return self._take_group(job)
                key, native = plan
                if not self._fits_key(key, limit):
                    if self._running:
                        return None
                    self._build(key, native, q)
                assert self.slots is not None
                problem = self.slots.problem(len(q.ids), limit)
                if problem is not None:
                    raise ValueError(problem)
            except Exception as err:  # noqa: BLE001 - this request cannot run (engine, slots): it fails alone
                self._pop(job)
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(err)
                continue
            if not self.slots.free_slots():
                return None
            if not self.slots.fits(len(q.ids), limit):
                self.stats["waited_for_pages"] += 1  # a free slot, but not the pages for this request's worst case
                return None
            self._pop(job)
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                t0 = time.perf_counter()
                with self.engine.lock:
                    slot = self.slots.admit(q.ids, q.config.seed, limit)
                self.stats["prefill_s"] += time.perf_counter() - t0
            except Exception as err:  # noqa: BLE001 - this request's prefill failed; the slots stay as they were
                job.future.set_exception(err)
                continue
            self._running[slot] = job
            self.stats["admitted"] += 1

    def _take_group(self, head: _Job) -> list[_Job]:
        """Pop ``head`` and the queued jobs right behind it that share its settings and cannot run
        in the slots either (at most ``n_slots`` in all): they run as one whole batch."""
        self._pop(head)
        group = [head] if head.future.set_running_or_notify_cancel() else []
        key = batch_key(head.request)
        while len(group) < self.n_slots and head.on_step is None:  # a watched request runs alone
            with self._cv:
                nxt = self._queue[0] if self._queue else None
            if nxt is None or nxt.on_step is not None or batch_key(nxt.request) != key:
                break
            if nxt.plan is False:
                try:
                    nxt.plan = self._plan(nxt.request)
                except Exception:  # noqa: BLE001 - it fails when it reaches the head, alone
                    break
            if nxt.plan is not None:
                break
            self._pop(nxt)
            if nxt.future.set_running_or_notify_cancel():
                group.append(nxt)
        return group

    def _build(self, key: Any, native: Any, request: Request) -> None:
        """New slots for ``key`` (the old ones, empty, are dropped first to give back their pools)."""
        self.slots, self._slots_key = None, None
        cap = max(request.config.max_new_tokens, self.engine.config.max_new_tokens)
        with self.engine.lock:  # the native engine is shared with the Engine's own calls
            native.config = request.config
            self.slots = NativeSlots(
                native, self.n_slots, cap, kv_pages=self.kv_pages, max_prompt_len=DEFAULT_PROMPT_BUDGET
            )
        self._slots_key = key
        self.stats["slot_builds"] += 1

    def _pop(self, job: _Job) -> None:
        with self._cv:
            if self._queue and self._queue[0] is job:
                self._queue.popleft()

    def _cycle(self) -> None:
        """One cycle of every slot; finished requests' results go to their futures."""
        assert self.slots is not None
        e = self.engine
        with e.lock:
            t0 = time.perf_counter()
            finished = self.slots.step()  # ends with the cycle's one sync: its time is the cycle's
            self.stats["cycle_s"] += time.perf_counter() - t0
            self.stats["cycles"] += 1
            watched = [(j.on_step, self.slots.watch(i)) for i, j in self._running.items() if j.on_step is not None]
            done = []
            for slot in finished:
                job = self._running.pop(slot)
                try:
                    done.append((job, self.slots.collect(slot)))
                except Exception as err:  # noqa: BLE001 - this request's copy-out failed: its error alone
                    job.future.set_exception(err)
                finally:
                    self.slots.retire(slot)
            e.stats["requests"] += len(done)
            e.stats["native_requests"] += len(done)
        for on_step, (sequences, alive) in watched:
            try:
                on_step(sequences, alive)
            except Exception as err:  # noqa: BLE001 - a failing watcher is logged; its request goes on
                logger.warning("smcgen: a streamed request's watcher failed: %s", err)
        native = self.slots.engine
        for job, run in done:
            q = job.request
            try:
                res: SMCResult = e.result(run, 0, q.config, q.grammar, "native", native.guide_reason)
            except Exception as err:  # noqa: BLE001 - e.g. a decoding error: this request's only
                job.future.set_exception(err)
                continue
            self.stats["finished"] += 1
            self.finished_order.append(id(job.future))
            job.future.set_result(res)

    def _run_alone(self, jobs: list[_Job]) -> None:
        """Requests the slots cannot run (one setting): the engine's whole-batch path."""
        try:
            results = self.engine.run_group(
                [j.request for j in jobs], progress=False, on_dead="flag", on_step=jobs[0].on_step
            )
        except Exception as err:  # noqa: BLE001 - handed to the callers through their futures
            for job in jobs:
                job.future.set_exception(err)
            return
        for job, res in zip(jobs, results):
            self.stats["finished"] += 1
            self.finished_order.append(id(job.future))
            job.future.set_result(res)

    def _fail_running(self, err: BaseException) -> None:
        """An error in a cycle: every running request gets it, the slots start empty again."""
        logger.error(
            "smcgen: a continuous-batching cycle failed, its %d running request(s) fail: %s", self.running, err
        )
        jobs = list(self._running.values())
        self._running.clear()
        try:
            if self.slots is not None:
                with self.engine.lock:
                    self.slots.reset()
        finally:  # the slots are empty before anyone hears of the failure
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)


__all__ = ["ContinuousBatcher"]
