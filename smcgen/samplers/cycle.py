"""The SMC cycle over any runner: propose, score, weigh, resample, until every particle is done.

One cycle is the same whatever computes the logits: the runner proposes a block (a proposal's
draft; nothing in plain SMC), scores it under the target (drafted tokens' alpha * log p, plus a bonus
token drawn from the target and its log-normalizer), the step math of :mod:`smcgen.samplers.step`
turns that into weights, lengths and done flags, the potentials add their increments, and the
groups whose ESS fell are resampled, the runner following the ancestors. A runner is anything with
the three methods of :class:`CycleRunner`; the generic engine (:mod:`smcgen.samplers.generic`) is
this cycle over a target runner (transformers, or the native paged model) and a proposal.

This driver reads a few values back per cycle (all done? a dead group? resample at all?) and scores
potentials on the host; the native engine's captured cycle runs the same step functions without
those reads (see docs/architecture.md, "The one step").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.core.resampling import Resampler, effective_sample_size
from smcgen.potentials.base import Potential, SequenceBatch, checked_scores, score_particles, scoring_error
from smcgen.samplers.run import AllParticlesDeadError, BatchRun, dead_group_error
from smcgen.samplers.step import (
    BlockAdvance,
    NonFiniteError,
    advance,
    bad_values,
    global_rows,
    next_block_size,
    potential_increment,
    resample_gate,
    reset_weights,
    token_weights,
)


@dataclass
class Particles:
    """The state of B groups of N particles between cycles (device tensors).

    ``seq`` ``[R, P + t]`` holds the prompt and every generated position (padding after a
    particle finished, so all rows have one length), ``lengths`` the tokens each particle really
    generated, ``done`` whether it finished, ``log_w`` ``[B, N]`` the unnormalized log-weights and
    ``dead`` ``[B]`` the groups whose particles all reached weight zero (``on_dead="flag"``).
    """

    seq: Tensor
    prompt: list[int]
    lengths: Tensor
    done: Tensor
    log_w: Tensor
    dead: Tensor

    @classmethod
    def start(cls, prompt: list[int], n_groups: int, n_particles: int, device: torch.device) -> Particles:
        """Every particle at the prompt, weight one, nothing generated."""
        R = n_groups * n_particles
        seq = torch.tensor(prompt, device=device).expand(R, -1).clone()
        return cls(
            seq=seq,
            prompt=prompt,
            lengths=torch.zeros(R, dtype=torch.long, device=device),
            done=torch.zeros(R, dtype=torch.bool, device=device),
            log_w=torch.zeros(n_groups, n_particles, dtype=torch.float64, device=device),
            dead=torch.zeros(n_groups, dtype=torch.bool, device=device),
        )

    @property
    def generated(self) -> Tensor:
        """``[R, t]`` the generated positions (tokens, then padding once a particle finished)."""
        return self.seq[:, len(self.prompt) :]

    def partial(self, rows: Tensor | slice) -> list[list[int]]:
        """The token ids the particles of ``rows`` generated so far."""
        return [r[:n] for r, n in zip(self.generated[rows].tolist(), self.lengths[rows].tolist())]


class Scored(NamedTuple):
    """What a runner's :meth:`CycleRunner.score` returns for a block of ``k`` drafted tokens."""

    block: Tensor  # [R, k (+1)] the drafted tokens, then the bonus token when one was drawn
    log_p: Tensor  # [R, k] alpha * log p_tau of each drafted token under the target
    bonus_log_norm: Tensor | None  # [R] the bonus draw's weight log sum_v p_tau(v)^alpha (masked: allowed v)


class CycleRunner(Protocol):
    """What one cycle asks of a runner: a model (or two) with a KV cache per particle row."""

    def propose(self, particles: Particles, n_tokens: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draft ``n_tokens`` (>= 1) per row: ``(tokens [R, n], log q [R, n])``."""
        ...

    def score(
        self, particles: Particles, drafted: Tensor, log_q: Tensor, with_bonus: bool, generator: torch.Generator
    ) -> Scored:
        """Score ``drafted`` (``[R, k]``, k >= 0) under the target, drawing a bonus token when ``with_bonus``."""
        ...

    def reorder(self, rows: Tensor) -> None:
        """Make row i a copy of row ``rows[i]`` (resampling ancestors, global row ids)."""
        ...


@dataclass(frozen=True)
class CycleSettings:
    """The sizes and thresholds of one run's cycles (from :class:`~smcgen.core.config.SMCConfig`).

    ``block_size`` is the drafted tokens per cycle (0: the target proposes the bonus token only);
    ``adaptive`` halves or doubles it between cycles (:func:`~smcgen.samplers.step.next_block_size`).
    """

    n_particles: int
    max_new_tokens: int
    block_size: int
    adaptive: bool
    ess_threshold: float
    eos: Tensor  # 1-D ids that end a particle (possibly empty)
    pad_id: int


class HostPotentials:
    """A potential scored on the host every cycle: its last score per row and its increments."""

    def __init__(self, potential: Potential, prompt: list[int], decoder: Any, n_rows: int):
        self.potential, self.prompt, self.decoder = potential, prompt, decoder
        potential.start(prompt, n_rows)
        empty = SequenceBatch([[]], prompt, decoder)
        s0 = float(checked_scores(potential, potential.log_prefix(empty), 1)[0])
        if s0 == -math.inf:
            raise AllParticlesDeadError("the potentials give the empty continuation weight zero")
        #: the score of each row's prefix (CPU), what the next increment is taken from
        self.prev = torch.full((n_rows,), s0, dtype=torch.float64)

    @property
    def initial(self) -> float:
        """The empty continuation's score, every particle's starting log-weight."""
        return float(self.prev[0])

    def increments(self, p: Particles, new_done: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """``(rows, delta)``: the rows still running before this cycle (device) and their increments
        log Psi(after) - log Psi(before), complete scores for the rows that just finished."""
        rows_dev = (~p.done).nonzero().squeeze(-1)
        rows = rows_dev.cpu()
        if not rows.numel():
            return rows_dev, torch.zeros(0, dtype=torch.float64, device=rows_dev.device)
        try:
            new = score_particles(
                self.potential,
                p.partial(rows_dev),
                new_done[rows_dev].tolist(),
                self.prompt,
                self.decoder,
                rows.tolist(),
            )
        except Exception as err:
            raise scoring_error(self.potential, err, step) from err
        active = torch.ones_like(new, dtype=torch.bool)  # only running rows were scored
        delta, self.prev[rows] = potential_increment(new, self.prev[rows], active)
        return rows_dev, delta.to(rows_dev.device)

    def reorder(self, rows: Tensor) -> None:
        """Follow the resampling ancestors (``rows`` on the CPU)."""
        self.prev = self.prev[rows]
        self.potential.reorder(rows)


class Cycle:
    """The SMC cycle over ``runner``: :meth:`step` runs one, :meth:`run` runs them to the end.

    ``potentials`` (None: none) add their increments on the host; ``on_dead`` says what a group
    whose particles all reach weight zero does ("raise": :class:`AllParticlesDeadError`; "flag": it
    stops where it is); ``recorder`` gets ``record(block, valid, log_weights, ess, ancestors)`` once
    per cycle (the weights before resampling, ancestors None when no group resampled).
    """

    def __init__(
        self,
        runner: CycleRunner,
        settings: CycleSettings,
        resampler: Resampler,
        generator: torch.Generator,
        potentials: HostPotentials | None = None,
        on_dead: str = "raise",
        recorder: Any | None = None,
    ):
        self.runner, self.settings, self.resampler = runner, settings, resampler
        self.generator, self.potentials, self.on_dead, self.recorder = generator, potentials, on_dead, recorder
        self.block_size = settings.block_size  # the adaptive policy changes it between cycles
        self.n_steps = 0
        self.ess_history: list[Tensor] = []
        self.resampled_history: list[Tensor] = []

    def step(self, p: Particles) -> Tensor:
        """One cycle on ``p`` (updated in place); returns the block it added (padding where not valid)."""
        s = self.settings
        self.n_steps += 1
        step = self.n_steps
        B, N = p.log_w.shape
        remaining = s.max_new_tokens - p.generated.shape[1]
        k = min(self.block_size, remaining)
        if k > 0:
            drafted, log_q = self.runner.propose(p, k, self.generator)
            drafted, log_q = drafted.to(p.seq.device), log_q.to(p.seq.device)
        else:
            drafted = p.seq.new_empty(p.seq.shape[0], 0)
            log_q = torch.zeros(p.seq.shape[0], 0, dtype=torch.float64, device=p.seq.device)
        scored = self.runner.score(p, drafted, log_q, remaining > k, self.generator)
        token_w = token_weights(scored.log_p, log_q, scored.bonus_log_norm)

        done_before = p.done
        adv = advance(scored.block, token_w, p.done, p.lengths, s.eos, s.max_new_tokens, s.pad_id)
        inc = adv.inc
        # the models' numbers are checked where they enter the weights (NaN logits name the model)
        if bool(bad_values(inc)):
            bad_q = bool(bad_values(-log_q)) if k > 0 else False
            raise NonFiniteError("the proposal" if bad_q else "the target model's logits", step)
        p.seq = torch.cat([p.seq, adv.block], dim=1)
        p.lengths = adv.lengths
        if self.potentials is not None:
            rows, delta = self.potentials.increments(p, adv.done, step)
            inc[rows] += delta
        p.done = adv.done
        p.log_w += inc.view(B, N)
        if s.adaptive:  # decided from this cycle's weights, before the next block is drafted
            self.block_size = next_block_size(self.block_size, s.block_size, inc.view(B, N), ~done_before.view(B, N))

        dead = torch.isneginf(p.log_w).all(dim=1) & ~p.dead
        if bool(dead.any()):
            groups = dead.nonzero().squeeze(-1).tolist()
            if self.on_dead == "raise":
                first = slice(groups[0] * N, (groups[0] + 1) * N)
                potential = self.potentials.potential if self.potentials is not None else None
                raise dead_group_error(groups, p.partial(first), p.done[first].tolist(), potential, step)
            p.dead |= dead
            p.done |= p.dead.repeat_interleave(N)  # frozen where they died
        self._resample(p, adv)
        return adv.block

    def _resample(self, p: Particles, adv: BlockAdvance) -> None:
        """The resample gate and, for the groups it opens, new ancestors for every part of the run."""
        B, N = p.log_w.shape
        ess = effective_sample_size(p.log_w)  # 0 for dead groups
        self.ess_history.append(ess)  # kept on the device: stacked and copied once at the end
        want = resample_gate(ess, self.settings.ess_threshold, N, p.done.all(), p.dead)
        self.resampled_history.append(want)
        ancestors, seen = None, (p.log_w.clone() if self.recorder is not None else None)
        if bool(want.any()):
            groups = want.nonzero().squeeze(-1)
            ancestors = torch.arange(N, device=p.log_w.device).expand(B, N).clone()
            ancestors[groups] = self.resampler.ancestors(p.log_w[groups], self.generator).to(p.log_w.device)
            rows = global_rows(ancestors)
            p.seq, p.done, p.lengths = p.seq[rows], p.done[rows], p.lengths[rows]
            self.runner.reorder(rows)
            if self.potentials is not None:
                self.potentials.reorder(rows.cpu())
            p.log_w = reset_weights(p.log_w, want)
        if self.recorder is not None:
            self.recorder.record(adv.block, adv.valid, seen, ess, ancestors)

    def run(self, p: Particles, progress: bool = False, t_start: float | None = None) -> BatchRun:
        """Cycles until every particle is done; the run's result (``t_start``: when its clock started)."""
        t_start = time.perf_counter() if t_start is None else t_start
        limit = self.settings.max_new_tokens
        bar = tqdm(total=limit, disable=not progress, desc="smc", unit="tok", leave=False)
        while not bool(p.done.all()):
            block = self.step(p)
            bar.update(min(block.shape[1], limit - bar.n))
        bar.close()
        if p.seq.device.type == "cuda":
            torch.cuda.synchronize(p.seq.device)
        B, N = p.log_w.shape
        width = p.generated.shape[1]
        return BatchRun.from_log_weights(
            p.generated.reshape(B, N, width),
            p.lengths.view(B, N),
            p.log_w,
            torch.stack(self.ess_history) if self.ess_history else torch.zeros(0, B),
            torch.stack(self.resampled_history) if self.resampled_history else torch.zeros(0, B, dtype=torch.bool),
            time.perf_counter() - t_start,
            p.dead,
        )


__all__ = ["Cycle", "CycleRunner", "CycleSettings", "HostPotentials", "Particles", "Scored"]
