"""How :class:`~smcgen.samplers.native.NativeSMC` scores potentials: device potentials inside the cycle,
the final factors at the end, and the bad-value flags a captured cycle raises instead of syncing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smcgen.potentials.base import (
    SequenceBatch,
    checked_scores,
    score_particles,
    scoring_error,
)
from smcgen.potentials.token import TokenPotential
from smcgen.samplers.native_state import (
    _CycleState,
)
from smcgen.samplers.run import AllParticlesDeadError
from smcgen.samplers.step import (
    NonFiniteError,
    bad_values,
)


class PotentialSteps:
    """Potential scoring of :class:`~smcgen.samplers.native.NativeSMC` (a mixin)."""

    def _flag(self, s: _CycleState, source: int, bad: Tensor) -> None:
        """Remember on the device that ``self._sources[source:]`` (one per entry of ``bad``) produced
        NaN / +inf, and the first cycle each did."""
        bad = bad.reshape(-1)
        end = source + bad.numel()
        first = s.bad_step[source:end]
        first.copy_(torch.where(bad & (first < 0), s.cycle.amax(), first))  # request slots: the furthest slot's
        s.bad[source:end].logical_or_(bad)

    def _check_flags(self, s: _CycleState) -> None:
        """Raise for the first source flagged NaN / +inf during the run (one read, after the last cycle)."""
        bad = s.bad.cpu()
        if bool(bad.any()):
            steps = s.bad_step.cpu()
            i = int(bad.nonzero()[0])
            raise NonFiniteError(self._sources[i], int(steps[i]) + 1)

    def _device_scores(self, s: _CycleState, p: TokenPotential, finished: Tensor) -> Tensor:
        """A device potential's scores ``[R]`` (float32) on the run's tokens, checked for shape (no sync)."""
        try:
            new = p.log_potential(s.history, s.lengths, finished)
            if not isinstance(new, Tensor) or new.shape != (s.R,):
                shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(f"potential {p.name} returned {shape} scores for {s.R} particles; expected [{s.R}]")
        except Exception as err:
            raise scoring_error(p, err, self._step) from err
        return new.to(device=self.device, dtype=torch.float32)

    def _start_potentials(self, s: _CycleState, prompts: list[list[int]]) -> None:
        """Every potential's score of the empty continuation enters the weights (as the generic engine does)."""
        N = self.config.n_particles
        start = torch.zeros(s.R, dtype=torch.float32, device=self.device)
        nothing = torch.zeros(s.R, dtype=torch.bool, device=self.device)
        self._step = 0
        for i, p in enumerate(self.device_potentials):
            s0 = self._device_scores(s, p, nothing)
            if bool(bad_values(s0)):
                raise NonFiniteError(f"potential {p.name}", 0)
            s.device_prev[i].copy_(s0)
            start += s0
        if self.host_potential is not None:
            s0 = torch.cat(
                [
                    score_particles(self.host_potential, [[]], [False], prompt, self.tokenizer).expand(N)
                    for prompt in prompts
                ]
            )
            s.host_start = s0
            start += s0.to(self.device, torch.float32)
        if bool(torch.isneginf(start).any()):
            raise AllParticlesDeadError("the potentials give the empty continuation weight zero")
        s.log_w.add_(start.view(s.B, N))

    def _apply_end_potential(self, s: _CycleState, p: TokenPotential) -> None:
        """An end-only device potential's complete score of every particle (after the last cycle)."""
        self._step = int(s.cycle)
        final = self._device_scores(s, p, torch.ones_like(s.done))
        if bool(bad_values(final)):
            raise NonFiniteError(f"potential {p.name}", int(s.cycle))
        s.log_w.add_(final.view(s.B, -1))

    def _apply_final_factor(self, s: _CycleState, prompt: list[int]) -> None:
        """The guide's factor of every finished particle (a grammar: 0 when its text is in the
        language, else -inf); without twists along the way, which the masked draws make unneeded."""
        assert self.mask is not None
        N = self.config.n_particles
        lengths = s.lengths.cpu().tolist()
        hist = s.history.cpu().tolist()
        # rows= lets the grammar reuse each particle's matcher instead of re-parsing its whole text
        batch = SequenceBatch(
            [h[:n] for h, n in zip(hist, lengths)], prompt, self.tokenizer, rows=list(range(len(hist)))
        )
        try:
            final = checked_scores(self.mask, self.mask.log_complete(batch), len(batch))
        except Exception as err:
            raise scoring_error(self.mask, err, int(s.cycle)) from err
        final = final.to(device=self.device, dtype=s.log_w.dtype)
        s.log_w.add_(final.view(-1, N))


__all__ = ["PotentialSteps"]
