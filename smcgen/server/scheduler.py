"""The server's request queue: bounded; continuous batching on the native engine, simple batching else.

On the native engine (with ``Engine.continuous``) every request that is not streamed goes straight
to the engine's :class:`~smcgen.continuous.ContinuousBatcher`: it joins the running batch between
two SMC cycles when a request slot and its KV pages are free and leaves it when its particles have
finished, so a short request never waits for a long one; the queue bound counts the requests the
batcher holds. Otherwise (the generic engine, or ``continuous=False``):

Requests wait in a FIFO queue of at most ``max_queue`` entries (beyond that, :class:`QueueFull`:
the server answers 503). One worker takes the oldest request plus every request already waiting
(up to ``max_batch`` in all; 1 when the Engine runs the generic engine, which would run them one
after another anyway) and hands them to ``Engine.run_requests`` in one call, which runs the
requests whose settings agree (config up to seed and token limit, grammar) as one native batch,
prompts of every length together. Each request keeps its own random stream in the batch, so a
seeded request's output does not depend on other traffic. This is batching at
request granularity: a batch runs to its end before the next one starts. A request whose client
went away while it waited is skipped (or, continuous, cancelled before it joins).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from smcgen.core.result import SMCResult
from smcgen.engine import Engine, Request, batch_key
from smcgen.server.metrics import ServerMetrics


class QueueFull(RuntimeError):
    """The request queue is full; the client should retry later."""


@dataclass
class _Job:
    request: Request
    future: asyncio.Future = field(repr=False)
    #: a streamed request's per-step watcher (it runs in a batch of its own)
    on_step: Callable[[list[list[int]], list[bool]], None] | None = field(default=None, repr=False)


class Scheduler:
    """Runs resolved requests on one :class:`Engine` from a bounded queue (start with :meth:`start`)."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queue: int = 256, max_batch: int = 8):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        # the generic engine runs a batch's requests one after another: batching gains nothing there and
        # would hold every answer until the whole batch is done, so it takes one request at a time
        self.max_batch = max_batch if engine.engine_reason is None else 1
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        # the engine runs in one thread of its own, so the event loop keeps answering /health and /metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smcgen-engine")
        #: requests join and leave the native batch between cycles (the engine's batcher)
        self.continuous = engine.engine_reason is None and engine.continuous
        self._busy_seen = 0.0

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        waiting = self._queue.qsize() if self._queue is not None else 0
        return waiting + (self.engine.batcher.depth if self.continuous else 0)

    def submit(
        self, request: Request, on_step: Callable[[list[list[int]], list[bool]], None] | None = None
    ) -> asyncio.Future:
        """Queue a request; the future resolves to its :class:`SMCResult`. Raises :class:`QueueFull`.

        ``on_step`` (streaming) is called from the engine's thread after every step of the request
        (see :meth:`Engine.run_requests`)."""
        assert self._queue is not None, "call start() first"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if self.depth >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
        try:
            self._queue.put_nowait(_Job(request, future, on_step))
        except asyncio.QueueFull:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later") from None
        self.metrics.queue_depth = self.depth
        return future

    def _key(self, job: _Job) -> Any:
        # seeded requests batch too: each keeps its own random stream, so its output is the same
        # whatever else is queued; a streamed request is watched step by step and runs alone
        if job.on_step is not None:
            return ("stream", id(job))
        return batch_key(job.request)

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < self.max_batch and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            self.metrics.queue_depth = self.depth
            if self.continuous:
                for job in jobs:
                    if job.future.done():
                        continue
                    self._join(job)  # a streamed one too: the batcher calls its watcher after each cycle
                continue
            groups: dict[Any, list[_Job]] = {}
            for job in jobs:
                if not job.future.done():  # done: cancelled because its client disconnected
                    groups.setdefault(self._key(job), []).append(job)
            for group in groups.values():
                await self._run_jobs(group)

    async def _run_jobs(self, group: list[_Job]) -> None:
        """One ``Engine.run_requests`` call for ``group`` in the engine's thread."""
        live = [j for j in group if not j.future.done()]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            results: list[SMCResult] = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.run_requests, [j.request for j in live], False, live[0].on_step
            )
        except Exception as err:  # noqa: BLE001 - an engine error fails this group only; the worker goes on
            for j in live:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        self.metrics.batch_done(time.perf_counter() - t0, results)
        for j, r in zip(live, results):
            if not j.future.done():
                j.future.set_result(r)

    def _join(self, job: _Job) -> None:
        """Hand ``job`` to the engine's continuous batcher; its result settles the job's future on
        the event loop, and cancelling the job (its client left) cancels it if it has not joined yet."""
        loop = asyncio.get_running_loop()
        batcher = self.engine.batcher
        cf = batcher.submit(job.request, on_step=job.on_step)

        def settle(_: Any) -> None:  # on the event loop
            if job.future.done():
                return
            if cf.cancelled():
                job.future.cancel()
                return
            err = cf.exception()
            if err is not None:
                job.future.set_exception(err)
                return
            # the batcher's working seconds since the last answer: tokens / busy seconds stays a rate
            busy = batcher.stats["busy_s"]
            self.metrics.batch_done(max(busy - self._busy_seen, 1e-9), [cf.result()])
            self._busy_seen = busy
            self.metrics.queue_depth = self.depth
            job.future.set_result(cf.result())

        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(settle, f))
        job.future.add_done_callback(lambda f: cf.cancel() if f.cancelled() else None)
