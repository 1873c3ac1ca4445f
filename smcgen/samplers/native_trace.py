"""Step-by-step traces of native runs: what :class:`~smcgen.trace.TraceRecorder` records per cycle.

The cycle itself never leaves the device: when a run is traced, its ``_finish`` also copies the
block each row gained (tokens and which of them count), the log-weights before the resample
decision and the ancestors into a :class:`CycleTap` of preallocated device buffers (so a CUDA graph
captures those copies too). After each cycle is enqueued, :class:`TraceFeed` queues copies of the
tap and of the cycle's ESS and resample flags into one of two host slots (pinned memory on a GPU),
and reads the slot when the run loop has waited for that cycle anyway (its all-done flag). Tracing
therefore adds device-to-host copies per cycle but neither a sync nor a change of the run's lag:
a traced run draws the same tokens and gets the same weights as an untraced one. The host work
per cycle (indexing, the recorder's copies) does make the run slower; tracing is for looking at a
run, not for timing it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smcgen.samplers.native_state import _CycleState


class CycleTap:
    """Device buffers one traced cycle fills: ``block`` / ``valid`` ``[R, T]``, ``log_w`` ``[B, N]``
    (before resampling) and ``anc`` ``[R]`` (global row ids, identity where no group resampled)."""

    def __init__(self, s: _CycleState, width: int):
        dev, N = s.log_w.device, s.log_w.shape[1]
        self.block = torch.zeros(s.R, width, dtype=torch.long, device=dev)
        self.valid = torch.zeros(s.R, width, dtype=torch.bool, device=dev)
        self.log_w = torch.zeros(s.B, N, dtype=torch.float32, device=dev)
        self.anc = torch.arange(s.R, dtype=torch.long, device=dev)

    def take(self, block: Tensor, valid: Tensor, log_w: Tensor, inc: Tensor) -> None:
        """The block and the weights the resample decision sees: ``log_w + inc`` in float32, the
        very sum the weight update forms."""
        self.block.copy_(block)
        self.valid.copy_(valid)
        torch.add(log_w, inc, out=self.log_w)


class TraceFeed:
    """Feeds a recorder (``record(block, valid, log_weights, ess, ancestors)``, e.g.
    :class:`~smcgen.trace.TraceRecorder`) from a native run, one call per cycle.

    ``order[j]``: the caller's index of the run's group j (``NativeSMC.run`` sorts groups into
    segments); the recorder sees groups, rows and ancestors in the caller's order. A group that
    did not resample in the last cycle has that step recorded with the run's final log-weights, so
    its trace ends on the weights of the result, factors applied after the last cycle included (a
    grammar's completion, end potentials, host potentials' last scores); one that did (its last
    particles still running were resampled away) keeps the weights its resampling saw.
    """

    def __init__(self, recorder: Any, order: list[int]):
        self.recorder = recorder
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        self.back = back  # caller's group i is the run's group back[i]
        self.state: _CycleState | None = None
        self.slots: list[dict[str, Tensor]] = []
        self.taken = 0  # cycles read from the slots so far
        self.pending: list[Any] | None = None  # the last cycle read, recorded once the next one comes
        self.pending_resampled = torch.zeros(len(order), dtype=torch.bool)

    def attach(self, s: _CycleState, width: int) -> None:
        """Give the run's state its tap (before a CUDA graph is captured, so the graph copies into it)."""
        s.tap = CycleTap(s, width)
        self.state = s
        pin = s.log_w.device.type == "cuda"
        like = {"block": s.tap.block, "valid": s.tap.valid, "log_w": s.tap.log_w, "anc": s.tap.anc}
        like |= {"ess": s.ess_history[0], "resampled": s.resampled_history[0]}
        self.slots = [
            {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in like.items()} for _ in range(2)
        ]

    def snapshot(self, c: int) -> None:
        """Queue copies of cycle ``c``'s tap (right after the cycle is enqueued, before the next)."""
        s = self.state
        assert s is not None and s.tap is not None
        slot = self.slots[c % 2]
        for k in ("block", "valid", "log_w", "anc"):
            slot[k].copy_(getattr(s.tap, k), non_blocking=True)
        slot["ess"].copy_(s.ess_history[c], non_blocking=True)
        slot["resampled"].copy_(s.resampled_history[c], non_blocking=True)

    def after_cycle(self, c: int) -> None:
        """Read cycle ``c`` (its copies must have arrived: the loop waited for the cycle)."""
        slot, back = self.slots[c % 2], self.back
        B, N = slot["log_w"].shape
        rows = (back[:, None] * N + torch.arange(N)).reshape(-1)
        ancestors, resampled = None, slot["resampled"][back]
        if bool(resampled.any()):
            # global row ids of the run's groups -> each caller's group's own particle indices
            local = slot["anc"].view(B, N) - (torch.arange(B) * N)[:, None]
            ancestors = local[back]
        step = [slot["block"][rows], slot["valid"][rows], slot["log_w"][back], slot["ess"][back], ancestors]
        if self.pending is not None:
            self.recorder.record(*self.pending)
        self.pending, self.pending_resampled, self.taken = step, resampled, c + 1

    def finish(self, n_cycles: int, final_log_w: Tensor) -> None:
        """After the run (device synced): read the cycles not read yet and record the last one with
        the run's final log-weights ``[B, N]`` (the run's group order)."""
        for c in range(self.taken, n_cycles):
            self.after_cycle(c)
        if self.pending is not None:
            final = final_log_w.detach().float().cpu()[self.back]
            self.pending[2] = torch.where(self.pending_resampled[:, None], self.pending[2], final)
            self.recorder.record(*self.pending)
            self.pending = None


__all__ = ["CycleTap", "TraceFeed"]
