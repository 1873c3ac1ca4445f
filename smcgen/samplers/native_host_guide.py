"""A host-guided native cycle in pieces: device work captured as CUDA graphs, masks from the host.

A guide without a token automaton (a recursive grammar, a JSON Schema's nested rules) computes
each next-token mask on the CPU from the tokens drawn so far, so the native engine's cycle cannot
be one CUDA graph: every drafted token goes to the host and its mask comes back. This module cuts
the cycle where the host must take part and captures the device work between the cuts once:

- ``draft[k]``: the k-th draft forward (step 0 also reserves the cycle's KV pages);
- ``pick[k]``: the k-th draft token drawn from the masked draft distribution;
- ``verify``: the target forward over the K+1 positions;
- ``finish``: the masked bonus token, the importance weights, resampling and the KV bookkeeping.

The host's work overlaps the device's: a token is copied out as soon as ``pick[k]`` is enqueued and
``draft[k+1]`` (or ``verify``) is launched before the host waits for it, so the next mask is
computed while the forward runs; the next cycle's first draft forward is launched before the host
reorders the guide's matchers after resampling. On a GPU the run's first cycle runs eagerly (the
warm-up) and the pieces are recorded after it, once per run. The operations and their order are those of the
engine's eager host-guided cycle (``NativeSMC._cycle``), so a seed draws the same tokens and
weights (tests/test_host_guide_pieces.py). On the CPU the pieces run eagerly, one after the other.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from smcgen.core.resampling import graph_safe
from smcgen.core.sampling import bitmask_width
from smcgen.samplers.step import masked_log_q

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from smcgen.samplers.native import NativeSMC
    from smcgen.samplers.native_state import _CycleState


class HostGuidedCycle:
    """One run's host-guided cycle as pieces (see the module docstring), replayed from CUDA graphs
    on a GPU (``graphs=True``), run eagerly otherwise. Made per run state by :func:`host_guided_cycle`."""

    def __init__(self, engine: NativeSMC, s: _CycleState, graphs: bool):
        # proxies: the engine keeps its last run's state, which holds these pieces; no reference
        # cycle, so dropping the kept run frees its pools at once
        self.engine, self.s = weakref.proxy(engine), weakref.proxy(s)
        self.K = engine.block
        dev = engine.device
        width = bitmask_width(engine.target.vocab_size)
        pin = dev.type == "cuda"
        # the mask of the step about to draw: written on the host, copied to the device before `pick`
        self.mask_host = torch.full((s.R, width), -1, dtype=torch.int32, pin_memory=pin)
        self.mask_dev = torch.full((s.R, width), -1, dtype=torch.int32, device=dev)
        self.tok_host = torch.zeros(s.R, dtype=torch.long, pin_memory=pin)
        self.anc_host = torch.zeros(s.R, dtype=torch.long, pin_memory=pin)
        self.block_host = torch.zeros(s.R, self.K + 1, dtype=torch.long, pin_memory=pin)
        self.copied = torch.cuda.Event() if pin else None
        # what the pieces leave for the later ones (static tensors once captured)
        self.pos: Tensor | None = None
        self.logits: list[Any] = [None] * max(self.K, 1)
        self.drafted: list[Any] = [None] * self.K
        self.log_q: list[Any] = [None] * self.K
        self.verify_logits: Tensor | None = None
        self.anc: Tensor | None = None
        self.graphs: dict[str, torch.cuda.CUDAGraph] | None = None
        # cycles run, and how many the run has at most (no first draft forward is launched past them)
        self.cycles, self.n_cycles = 0, s.history.shape[1] // (self.K + 1)
        #: seconds of the first cycle, eager, and of recording the pieces (0: not captured)
        self.warm_up_s = 0.0
        # the next cycle's first draft forward was launched before the host's reorder
        self._launched_ahead = False
        # on a GPU the first cycle runs eagerly (the warm-up: Triton compiles, cuBLAS picks kernels),
        # then the pieces are recorded; a warm-up on a restored snapshot would leave its own draws'
        # keys and values in KV slots the run reads (measured: different weights)
        self._to_capture = graphs

    def restart(self) -> bool:
        """Make the recorded pieces serve a new run over the same state (reset in place by
        ``_CycleState.start``); False when nothing was recorded (the caller makes new pieces)."""
        if self.graphs is None:
            return False
        self.cycles, self._launched_ahead, self.warm_up_s = 0, False, 0.0
        return True

    # ------------------------------------------------------------------ device pieces
    def _draft(self, k: int) -> None:
        e, s = self.engine, self.s
        if k == 0:
            self.pos = s.pos[s.seg_of_row]
            e._reserve(s)
            if e.draft is None:
                return
            # step 0 feeds the deferred bonus too: two tokens at pos - 1 and pos
            self.logits[0] = e.draft(s.pending, self.pos - 1, s.dcache, last_only=True)
        else:
            self.logits[k] = e.draft(self.drafted[k - 1][:, None], self.pos + k, s.dcache, last_only=True)

    def _pick(self, k: int) -> None:
        e, s = self.engine, self.s
        scale = 1.0 / e.config.draft_temperature
        tok, lp, ln = e._sample(s, self.logits[k], scale, 1.0, self.mask_dev, e.draft)
        self.drafted[k] = tok
        self.log_q[k] = masked_log_q(lp, ln)  # a dead end (nothing allowed) weighs zero, never NaN

    def _verify(self) -> None:
        e, s = self.engine, self.s
        assert self.pos is not None
        if self.K > 0:
            verify_in = torch.cat([s.pending[:, 1:], torch.stack(self.drafted, dim=1)], dim=1)
        else:
            verify_in = s.pending
        self.verify_logits = e.target(verify_in, self.pos, s.tcache)

    def _finish(self) -> None:
        e, s, K = self.engine, self.s, self.K
        cfg = e.config
        logits = self.verify_logits
        assert logits is not None
        scale = 1.0 / cfg.target_temperature
        bonus, _, bonus_norm = e._sample(s, logits[:, K], scale, cfg.alpha, self.mask_dev, e.target)
        y = torch.stack(self.drafted, dim=1) if K > 0 else s.pending[:, :0]
        self.anc = e._weigh(s, logits, y, self.log_q, bonus, bonus_norm)

    # ------------------------------------------------------------------ host side
    def _run(self, name: str, piece: Any, *args: int) -> None:
        if self.graphs is not None:
            self.graphs[name].replay()
        else:
            piece(*args)

    def _host_mask(self, host_tokens: list[Tensor]) -> None:
        """The guide's masks of every row after ``host_tokens``, onto the device before the next pick.

        The guide's rows have consumed all but the last token (the masks asked before, reordered
        with the particles), so it is fed that one column (``extend_bitmask``); a guide without
        that path, or whose rows are elsewhere, reads the rows' whole tokens."""
        guide = self.engine.mask
        length = sum(t.shape[1] for t in host_tokens)
        last = host_tokens[-1]
        if not (length and last.shape[1] and guide.extend_bitmask(last[:, -1], length, self.mask_host)):
            self.mask_host.copy_(guide.request_bitmask(torch.cat(host_tokens, dim=1), 0).result())
        self.mask_dev.copy_(self.mask_host, non_blocking=True)

    def _to_host(self, src: Tensor, dst: Tensor) -> Tensor:
        """Start copying ``src`` into the pinned ``dst``; :meth:`_wait` before reading it."""
        dst.copy_(src, non_blocking=True)
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(self.engine.device))
        return dst

    def _wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def cycle(self) -> None:
        """One cycle: device pieces in order, the guide's masks computed on the host between them
        (the first one on a GPU runs eagerly on a side stream, and the pieces are recorded after it)."""
        if not self._to_capture:
            self._cycle()
            return
        self._to_capture = False
        t0 = time.perf_counter()
        dev = self.engine.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self._cycle()
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)
        if self.cycles < self.n_cycles:
            self._record_or_run_eagerly()
        self.warm_up_s = time.perf_counter() - t0

    def _record_or_run_eagerly(self) -> None:
        try:
            self._record()
        except RuntimeError as err:
            # capturing runs nothing: the state is the first cycle's; run the pieces eagerly, and say so
            self.graphs = None
            why = f"capturing the cycle's pieces failed ({type(err).__name__}: {err}); they run eagerly"
            logger.warning("%s", why)
            if why not in (self.engine.guide_reason or ""):
                self.engine.guide_reason = f"{self.engine.guide_reason}; {why}"

    def _cycle(self) -> None:
        s = self.s
        host_tokens = [s.host_history]
        if not self._launched_ahead:
            self._run("draft0", self._draft, 0)
        self._launched_ahead = False
        for k in range(self.K):
            self._host_mask(host_tokens)  # overlaps draft[k] on a GPU
            self._run(f"pick{k}", self._pick, k)
            self._to_host(self.drafted[k], self.tok_host)
            # launch the next forward before waiting for the token: the host's mask work overlaps it
            if k + 1 < self.K:
                self._run(f"draft{k + 1}", self._draft, k + 1)
            else:
                self._run("verify", self._verify)
            self._wait()
            host_tokens.append(self.tok_host[:, None].clone())
        if self.K == 0:
            self._run("verify", self._verify)
        self._host_mask(host_tokens)  # overlaps verify
        self._run("finish", self._finish)
        assert self.anc is not None
        done_w = s.host_history.shape[1]
        T = self.K + 1
        self._to_host(self.anc, self.anc_host)
        self._to_host(s.history[:, done_w : done_w + T], self.block_host)
        self.cycles += 1
        if self.graphs is not None and self.cycles < self.n_cycles:
            # the next cycle's first draft forward needs nothing from the host: start it now (when
            # every particle has finished, the cycle it starts never runs and its pages go unused)
            self._run("draft0", self._draft, 0)
            self._launched_ahead = True
        self._wait()
        anc = self.anc_host.clone()
        self.engine.mask.reorder(anc)
        # the device history after the cycle is (history, block)[anc]: copy only this cycle's block
        s.host_history = torch.cat([s.host_history[anc], self.block_host.clone()], dim=1)

    # ------------------------------------------------------------------ capture
    @staticmethod
    def captures(engine: NativeSMC) -> bool:
        """The engine's pieces are captured as CUDA graphs: on a GPU with graphs on, unless a user
        resampler draws from a torch generator (not capturable, as for the whole cycle)."""
        safe = engine.resampler is None or graph_safe(engine.resampler)
        return engine.device.type == "cuda" and engine.host_guide_graphs and safe

    def _pieces(self) -> list[tuple[str, Any, tuple[int, ...]]]:
        out: list[tuple[str, Any, tuple[int, ...]]] = [("draft0", self._draft, (0,))]
        for k in range(self.K):
            out.append((f"pick{k}", self._pick, (k,)))
            out.append((f"draft{k + 1}", self._draft, (k + 1,)) if k + 1 < self.K else ("verify", self._verify, ()))
        if self.K == 0:
            out.append(("verify", self._verify, ()))
        out.append(("finish", self._finish, ()))
        return out

    def _record(self) -> None:
        """Record each piece into one shared memory pool, in replay order (a piece's outputs stay
        referenced, so a later piece never reuses their memory). Recording runs nothing."""
        pool = torch.cuda.graph_pool_handle()
        graphs: dict[str, torch.cuda.CUDAGraph] = {}
        for name, piece, args in self._pieces():
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name], pool=pool):
                piece(*args)
        self.graphs = graphs


def host_guided_cycle(engine: NativeSMC, s: _CycleState) -> None:
    """Run one host-guided cycle of ``s`` in pieces (captured on the first cycle when the engine
    uses CUDA graphs for host guides)."""
    pieces = s.host_guided
    if pieces is None:
        pieces = s.host_guided = HostGuidedCycle(engine, s, HostGuidedCycle.captures(engine))
    pieces.cycle()


__all__ = ["HostGuidedCycle", "host_guided_cycle"]
