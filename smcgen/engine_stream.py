"""Watching a running request: :class:`TextStream` (``Engine.stream``) and the per-step hooks that feed it
from either engine."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor

from smcgen.core.result import SMCResult
from smcgen.engine_requests import Request
from smcgen.streaming import StablePrefix

if TYPE_CHECKING:
    from smcgen.engine import Engine


class TextStream:
    """Iterator of text deltas of one running request (from :meth:`~smcgen.engine.Engine.stream`).

    The request runs in a thread of its own; each step's newly stable text (the live particles'
    common prefix) is queued and handed out by ``next()``; the last delta is the rest of the final
    answer. An error of the run is raised by ``next()``. ``result`` is the :class:`SMCResult` once
    the iteration has ended (None before).
    """

    def __init__(self, engine: Engine, request: Request, on_dead: str):
        self.result: SMCResult | None = None
        self._prefix = StablePrefix(engine.target.tokenizer)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._ended = False

        def on_step(sequences: list[list[int]], alive: list[bool]) -> None:
            delta = self._prefix.update(sequences, alive)
            if delta:
                self._queue.put(("text", delta))

        def work() -> None:
            try:
                res = engine.run_group([request], progress=False, on_dead=on_dead, on_step=on_step)[0]
                self._queue.put(("done", res))
            except BaseException as err:  # noqa: BLE001 - handed to the reader, raised by next()
                self._queue.put(("error", err))

        self._thread = threading.Thread(target=work, name="smcgen-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "text":
            return value
        self._ended = True
        self._thread.join()
        if kind == "error":
            raise value
        self.result = value
        rest = self._prefix.finish(value.text)
        if rest:
            return rest
        raise StopIteration


def _native_watcher(on_step: Callable[[list[list[int]], list[bool]], None], n: int) -> Callable[..., None]:
    """``NativeSMC.run``'s per-cycle hook for :meth:`~smcgen.engine.Engine.run_group`'s ``on_step`` (request 0)."""

    def watch(tokens: Tensor, lengths: Tensor, log_w: Tensor) -> None:
        rows = [row[:k] for row, k in zip(tokens[:n].tolist(), lengths[:n].tolist())]
        on_step(rows, [bool(w > float("-inf")) for w in log_w[0].tolist()])

    return watch


class _StepWatcher:
    """A recorder for the generic engine's step loop (as :class:`~smcgen.trace.TraceRecorder`) that keeps request
    0's particles' tokens through resampling and calls ``on_step(sequences, alive)`` every step."""

    def __init__(self, on_step: Callable[[list[list[int]], list[bool]], None], n: int):
        self.on_step, self.n = on_step, n
        self.rows: list[list[int]] = [[] for _ in range(n)]

    def record(self, block: Tensor, valid: Tensor, log_weights: Tensor, ess: Tensor, ancestors: Tensor | None) -> None:
        n = self.n
        for r, (toks, ok) in enumerate(zip(block[:n].tolist(), valid[:n].tolist())):
            self.rows[r] += [t for t, v in zip(toks, ok) if v]
        alive = [bool(w > float("-inf")) for w in log_weights[0].tolist()]
        if ancestors is not None:
            anc = ancestors[0].tolist()  # group 0's rows are 0..n-1: local ids are row ids
            self.rows = [list(self.rows[a]) for a in anc]
            alive = [alive[a] for a in anc]
        self.on_step(self.rows, alive)


__all__ = ["TextStream"]
