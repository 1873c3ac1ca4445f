"""One cycle of :class:`~smcgen.samplers.native.NativeSMC`: K draft steps, the target verify, the
weights, the resample and the KV bookkeeping, written so a whole cycle can be captured as one CUDA
graph (every tensor preallocated, every changing value on the device).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from smcgen.core.resampling import (
    effective_sample_size,
    graph_safe,
)
from smcgen.kernels.weighting import smc_weight_update
from smcgen.samplers.native_host_guide import host_guided_cycle
from smcgen.samplers.native_state import (
    _CycleState,
    _PhiloxUniforms,
)
from smcgen.samplers.step import (
    advance,
    bad_values,
    global_rows,
    masked_log_q,
    potential_increment,
    resample_gate,
    reset_weights,
    token_weights,
)


class CycleSteps:
    """The cycle of :class:`~smcgen.samplers.native.NativeSMC` (a mixin: the engine's state lives there)."""

    def _cycle(self, s: _CycleState) -> None:
        """One cycle on device tensors only (what the CUDA graph records), unless a grammar masks it.

        With a grammar, the draft's tokens and the bonus token are drawn from the masked
        distributions (the host computes each mask from the tokens so far), the draft's log q is the
        masked one, and the bonus weighs in with the masked log-normalizer.
        """
        cfg = self.config
        K, T = self.block, self.block + 1
        pos = s.pos[s.seg_of_row]  # [R] int32: tokens in each row's target cache (per segment)
        masked = self.mask is not None
        host_masked = self._host_guide
        if host_masked and self.host_guide_pieces:
            return host_guided_cycle(self, s)
        # a device guide: each row's automaton state after the tokens drawn so far (no host sync)
        state = s.guide_state

        self._reserve(s)
        drafted: list[Tensor] = []
        log_q: list[Tensor] = []
        if host_masked:
            # the continuation so far on the host (kept there across cycles), extended by each
            # drafted token (eager path: syncs)
            host_tokens = [s.host_history]
        if self.draft is not None:
            feed, start = s.pending, pos - 1
            for k in range(K):
                # the mask is requested (token ids read) before the forward and computed after its
                # launch, so on a GPU the host builds it while the device runs the draft
                pending = self.mask.request_bitmask(torch.cat(host_tokens, dim=1), 0) if host_masked else None
                logits = self.draft(feed, start, s.dcache, last_only=True)
                allowed = self._allowed(pending, state)
                tok, lp, ln = self._sample(s, logits, 1.0 / cfg.draft_temperature, 1.0, allowed, self.draft)
                drafted.append(tok)
                if state is not None:
                    state = self.dfa.step(state, tok)
                if host_masked:
                    host_tokens.append(tok[:, None].cpu())
                if masked:
                    # a row with no allowed token is a dead end: weight zero, never NaN
                    log_q.append(masked_log_q(lp, ln))
                else:
                    log_q.append(lp - ln)
                feed = tok[:, None]
                # step 0 fed two tokens at pos-1 and pos; step k >= 1 feeds one at pos + k
                start = pos + (k + 1)
            y = torch.stack(drafted, dim=1)
            verify_in = torch.cat([s.pending[:, 1:], y], dim=1)
        else:
            y = s.pending[:, :0]
            verify_in = s.pending
        pending = self.mask.request_bitmask(torch.cat(host_tokens, dim=1), 0) if host_masked else None
        logits = self.target(verify_in, pos, s.tcache)  # [R, T, V]
        scale = 1.0 / cfg.target_temperature
        allowed = self._allowed(pending, state)
        bonus, _, bonus_norm = self._sample(s, logits[:, K], scale, cfg.alpha, allowed, self.target)
        anc = self._weigh(s, logits, y, log_q, bonus, bonus_norm)
        if host_masked:
            anc_host = anc.cpu()
            self.mask.reorder(anc_host)
            # the device history after the cycle is (history, block)[anc]: copy only this cycle's block
            done_w = s.host_history.shape[1]
            s.host_history = torch.cat([s.host_history[anc_host], s.history[:, done_w : done_w + T].cpu()], dim=1)

    def _reserve(self, s: _CycleState) -> None:
        """This cycle's KV pages: T positions past each segment's in the target, K in the draft."""
        K = self.block
        for i, view in enumerate(s.tviews):
            view.reserve(s.pos[i : i + 1] + K + 1)
        if self.draft is not None:
            for i, view in enumerate(s.dviews):
                view.reserve(s.pos[i : i + 1] + K)

    def _weigh(
        self, s: _CycleState, logits: Tensor, y: Tensor, log_q: list[Tensor], bonus: Tensor, bonus_norm: Tensor
    ) -> Tensor:
        """The drafted tokens ``y``' target log-probabilities from the verify ``logits``, the NaN
        flags, the importance weights and :meth:`_finish`; returns the ancestors."""
        K = self.block
        # bonus_norm is exactly 0 unmasked at alpha = 1 (fused_sample's contract), so Z_hat does not
        # drift; a masked bonus weighs in with log sum_{allowed v} p(v)^alpha
        if K > 0:
            cfg = self.config
            log_p = self.target.token_logprobs(logits[:, :K], y, 1.0 / cfg.target_temperature, cfg.alpha)
            q = torch.stack(log_q, dim=1)
            # NaN logits show as NaN log-probabilities (+inf log q is a masked dead end, not an error);
            # one flag update for both models keeps the captured cycle's extra kernels few
            nan_t = torch.isnan(torch.cat([log_p, bonus_norm[:, None]], dim=1)).any()
            self._flag(s, 0, torch.stack([nan_t, torch.isnan(q).any()]))
        else:
            log_p = q = bonus_norm.new_zeros(s.R, 0)
            self._flag(s, 0, torch.isnan(bonus_norm).any())
        return self._finish(s, y, bonus, token_weights(log_p, q, bonus_norm))

    def _sample(
        self, s: _CycleState, logits: Tensor, scale: float, alpha: float, allowed: Tensor | None, model: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``fused_sample`` of each segment's rows from the segment's own Philox stream (its key and
        offset), so a request's draws do not depend on what else runs in the batch. ``model.sample``
        draws (a tensor-parallel target reduces across its vocabulary shards); offsets advance by the
        full vocabulary, whatever width of logits this rank holds."""
        V = model.vocab_size
        parts = []
        for i, g in enumerate(s.segments):
            rows = slice(g.r0, g.r1)
            mine = allowed[rows] if allowed is not None else None
            parts.append(model.sample(logits[rows], scale, alpha, s.seed[i : i + 1], s.offset[i : i + 1], mine))
            s.offset[i : i + 1].add_(g.n_rows * V)
        if len(parts) == 1:
            return parts[0]
        tok, lp, ln = (torch.cat(x) for x in zip(*parts))
        return tok, lp, ln

    def _allowed(self, pending: Any, state: Tensor | None) -> Tensor | None:
        """The next-token bitmask of every row: the host guide's (collected after the forward's
        launch), a gather from the device guide's automaton, or None unguided."""
        if pending is not None:
            return pending.result().to(self.device)
        return self.dfa.masks(state) if state is not None else None

    def _finish(self, s: _CycleState, y: Tensor, bonus: Tensor, token_w: Tensor) -> Tensor:
        """Record the block, add the weights, resample and update the caches (device only).

        Returns the ancestors (global row ids) of the resampling step (identity when none).
        """
        cfg = self.config
        K, T = self.block, self.block + 1
        block = torch.cat([y, bonus[:, None]], dim=1)

        # [R, T] positions of this block in each row's continuation (one cycle counter per run, or
        # per request slot when requests join between cycles: NativeSlots)
        gen_idx = s.cycle[s.cycle_of_row][:, None] * T + s.arange_t
        limit = cfg.max_new_tokens if s.limits is None else s.limits
        in_budget = gen_idx < (limit if s.limits is None else limit[:, None])
        adv = advance(block, token_w, s.done, s.lengths, s.eos, limit, self.pad_id, in_budget)
        s.history.scatter_(1, gen_idx, adv.block)
        s.lengths.copy_(adv.lengths)
        inc = adv.inc
        # device potentials see the block: complete scores for rows that just finished
        for i, p in enumerate(self.device_potentials):
            new = self._device_scores(s, p, adv.done)
            self._flag(s, 2 + i, bad_values(new))
            p_inc, prev = potential_increment(new, s.device_prev[i], ~s.done)
            s.device_prev[i].copy_(prev)
            inc = inc + p_inc
        s.done.copy_(adv.done)
        if self.host_potential is not None:
            # host potentials' increments of an earlier cycle, consumed once
            inc = inc + s.host_inc
            s.host_inc.zero_()
        # a NaN / +inf was flagged where it arose; the weights get a zero there, so resampling and
        # log Z never see NaN, and the run raises when it ends (a device flag: no sync here)
        inc = torch.where(torch.isnan(inc) | torch.isposinf(inc), torch.full_like(inc, -math.inf), inc)

        # no resampling once every particle has finished (at the latest the last cycle, where every
        # row reaches max_new_tokens): it would only add noise to the final weights; decided on
        # the device, so graphs keep it
        inc = inc.view(s.B, -1).float()
        if s.tap is not None:  # a traced run: the block and the weights before the resample decision
            s.tap.take(adv.block, adv.valid, s.log_w, inc)
        parts = []
        for i, g in enumerate(s.segments):
            groups = slice(g.g0, g.g1)
            if self.resampler is None:
                allow = (~s.done[g.r0 : g.r1].all()).to(torch.int32).reshape(1)
                anc, ess, resampled, _ = smc_weight_update(
                    s.log_w[groups], inc[groups], cfg.ess_threshold, s.seed[i : i + 1], s.offset[i : i + 1], allow
                )
                s.offset[i : i + 1].add_(g.n_groups)
            else:
                anc, ess, resampled = self._torch_resample(s, i, inc[groups])
            parts.append((anc + g.r0 if g.r0 else anc, ess, resampled))
        anc, ess, resampled = parts[0] if len(parts) == 1 else (torch.cat(x) for x in zip(*parts))
        at = (s.cycle[s.cycle_of_group], s.group_ids)  # each group's row of the histories
        s.ess_history.index_put_(at, ess)
        if s.tap is not None:
            s.tap.anc.copy_(anc)
        s.resampled_history.index_put_(at, resampled)

        if s.guide_state is not None:
            # the kept block (pads, i.e. EOS, where a position does not count) moves the automaton
            # exactly as the host guide's matchers follow the history
            s.guide_state.copy_(self.dfa.fold(s.guide_state, adv.block)[anc])
        s.history.copy_(s.history[anc])
        s.lengths.copy_(s.lengths[anc])
        s.done.copy_(s.done[anc])
        if K > 0:
            s.pending.copy_(torch.stack([y[:, -1], bonus], dim=1)[anc])
        else:
            s.pending.copy_(bonus[anc][:, None])
        if self.device_potentials:
            s.device_prev.copy_(s.device_prev[:, anc])
        if self.host_potential is not None:
            s.last_anc.copy_(anc)
        for i, g in enumerate(s.segments):
            local = anc[g.r0 : g.r1] - g.r0 if g.r0 else anc[g.r0 : g.r1]
            s.tviews[i].resample(local, s.pos[i : i + 1] + T)
            if self.draft is not None:
                s.dviews[i].resample(local, s.pos[i : i + 1] + K)
        s.all_done.copy_(s.done.all().reshape(1))
        s.done_history.index_put_(at, s.done.view(s.B, -1).all(dim=1))
        # a segment whose particles have all finished keeps its position: its rows take no more pages
        # and stay inside the context while longer requests of the batch go on (its worst case, which
        # sized the pool, ends with its own limit)
        live = torch.zeros_like(s.pos).index_add_(0, s.seg_of_row, (~s.done).to(s.pos.dtype)) > 0
        s.pos.add_(live.to(s.pos.dtype) * T)
        s.cycle.add_(1)
        if s.slot_mode:  # an idle slot's counter stops at the histories' spare last row
            s.cycle.clamp_(max=s.max_cycle)
        return anc

    def _torch_resample(self, s: _CycleState, i: int, inc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Segment ``i``'s weight update with a torch resampler (any scheme but the fused systematic
        one): the same gate as the kernel; dead groups keep their -inf weights and are not resampled.
        ``inc``: the segment's increments [groups, N]; the ancestors are the segment's own row ids."""
        assert self.resampler is not None
        g = s.segments[i]
        log_w = s.log_w[g.g0 : g.g1]
        log_w.add_(inc)
        lw = log_w.double()
        dead = torch.isneginf(lw).all(dim=1)
        ess = effective_sample_size(lw).float()
        want = resample_gate(ess, self.config.ess_threshold, self.config.n_particles, s.done[g.r0 : g.r1].all(), dead)
        # a dead group's weights would be NaN in the resampler: give it uniform ones, its result is unused;
        # the built-in schemes draw from the segment's Philox stream (graph-safe), a user one from a generator
        source = (
            _PhiloxUniforms(s.seed[i : i + 1], s.offset[i : i + 1]) if graph_safe(self.resampler) else s.generators[i]
        )
        local = self.resampler.ancestors(torch.where(dead[:, None], torch.zeros_like(lw), lw), source)
        keep = torch.arange(lw.shape[1], device=lw.device).expand_as(local)
        anc = global_rows(torch.where(want[:, None], local.to(lw.device), keep))
        log_w.copy_(reset_weights(lw, want).float())
        return anc, ess, want

    def _warm_up(self, s: _CycleState) -> None:
        """One cycle that leaves the run as it was: Triton compiles, cuBLAS picks its kernels.

        It runs on a snapshot of the state, restored afterwards, with every row marked finished,
        so it resamples nothing. The KV pools are not in the snapshot: a resampling would free a
        row's partial page and copy another row's into a page popped from the free list, possibly
        the one just freed, which after the restore is live again with the other row's keys and
        values in it (another request's prompt tail; measured on an H100 and reproduced on the
        CPU: a request in a mixed batch drew differently than alone). Without resampling the
        warm-up writes only slots the run's first cycle writes again before reading them.
        """
        snapshot = s.snapshot()
        s.done.fill_(True)
        self._cycle(s)
        s.restore(snapshot)

    def _capture(self, s: _CycleState) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (:meth:`_warm_up`), then record one cycle."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._warm_up(s)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._cycle(s)
        return graph  # capturing runs nothing: the state is still the restored one


__all__ = ["CycleSteps"]
