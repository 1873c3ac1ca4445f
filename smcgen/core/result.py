"""The typed result of one SMC generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smcgen.trace import Trace


@dataclass(frozen=True)
class SMCResult:
    """What :func:`smcgen.generate` and :class:`smcgen.Engine` return for one prompt.

    ``text``/``token_ids``: the answer, one particle drawn by its final weight.
    ``sequences``/``log_weights``: every particle's generated ids and normalized log-weight
    (``texts`` holds their decoded text when ``return_all_particles`` is set); ``alive[i]`` is False
    for a particle of weight zero (ruled out, e.g. cut-off JSON under a grammar: its text is not an
    answer). ``posterior``: the distinct texts of the live particles with their merged normalized
    weights, largest first; ``argmax_text`` is the first. ``log_z``: log of the unbiased estimate
    of the target's normalizing constant Z. ``ess_history``: ESS after each step (before
    resampling); ``n_resamples``: resampling count.
    ``engine``: which engine ran it, ``"native"`` (GPU engine) or ``"generic"``;
    ``engine_reason``: why the generic engine ran it (None when the native one did).
    ``dead``: every particle reached weight zero (``on_dead="flag"``, and every request of
    ``Engine.batch``): ``text`` is the longest partial output, not a draw from the target, and
    ``log_z`` is ``-inf``.
    ``parsed``: with a structured ``guide=`` / ``grammar=`` the answer parsed as its type (pydantic
    object, Enum member, JSON value); None otherwise and for a dead result.
    ``output_format``: ``"json"`` when a JSON schema constrained the output, else None.
    ``trace``: the step-by-step record (:class:`smcgen.trace.Trace`) when ``generate(trace=True)``.
    ``method``: ``"smc"`` or ``"sd"`` (standard speculative decoding: uniform weights, ``log_z`` is
    None because SD estimates no normalizing constant, ``acceptance_rate`` the kept fraction of drafts).
    ``mean_ess_fraction`` and ``weight_variance`` say how far the draft is from the target.
    """

    text: str
    token_ids: list[int]
    sequences: list[list[int]]
    log_weights: list[float]
    log_z: float | None
    ess_history: list[float]
    n_resamples: int
    n_steps: int
    elapsed_s: float
    n_particles: int
    texts: list[str] = field(default_factory=list)
    engine: str = "generic"
    engine_reason: str | None = None
    dead: bool = False
    parsed: Any = None
    trace: Trace | None = None
    alive: list[bool] = field(default_factory=list)
    posterior: list[tuple[str, float]] = field(default_factory=list)
    output_format: str | None = None

    @property
    def n_alive(self) -> int:
        """Particles with non-zero final weight."""
        return sum(self.alive) if self.alive else len(self.sequences)

    @property
    def live_texts(self) -> list[str]:
        """``texts`` without the particles of weight zero (needs ``return_all_particles``)."""
        if not self.alive:
            return list(self.texts)
        return [t for t, a in zip(self.texts, self.alive) if a]

    @property
    def argmax_text(self) -> str:
        """The text with the largest posterior mass (particles with the same text pooled)."""
        return self.posterior[0][0] if self.posterior else self.text

    method: str = "smc"
    acceptance_rate: float | None = None

    @property
    def mean_ess_fraction(self) -> float | None:
        """Mean ESS/N over the steps: how well the proposal (the draft) matches the target; 1 is a
        perfect match. None for speculative decoding, whose rows carry no weights."""
        return sum(self.ess_history) / (len(self.ess_history) * self.n_particles) if self.ess_history else None

    @property
    def weight_variance(self) -> float | None:
        """Mean over steps of the variance of the normalized particle weights (mean 1), N/ESS - 1: the
        draft's chi-square distance from the target as the run saw it (0: no mismatch)."""
        if not self.ess_history:
            return None
        return sum(self.n_particles / max(e, 1e-12) - 1.0 for e in self.ess_history) / len(self.ess_history)

    @property
    def tokens_per_second(self) -> float:
        """Tokens of the answer (the one particle returned) per second of wall time.

        The engine generated ``n_particles`` times as many: see :attr:`particle_tokens_per_second`."""
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def particle_tokens(self) -> int:
        """Tokens generated over all particles (what the engine computed, resampled copies included)."""
        return sum(len(s) for s in self.sequences)

    @property
    def particle_tokens_per_second(self) -> float:
        """Tokens of every particle per second of wall time: the engine's throughput."""
        return self.particle_tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def summary(self) -> str:
        """A short human-readable report (particles, ESS, resampling, speed: answer and all particles)."""
        ess = self.ess_history
        ess_part = (
            f"ESS min {min(ess):.2f} / mean {sum(ess) / len(ess):.2f} / final {ess[-1]:.2f} of {self.n_particles}"
            if ess
            else "ESS n/a"
        )
        alive = f" | alive: {self.n_alive} of {self.n_particles}" if self.alive else ""
        why = f" ({self.engine_reason})" if self.engine_reason else ""
        if self.acceptance_rate is not None:
            ess_part = f"method: sd | draft tokens kept {self.acceptance_rate:.2f}"
        return (
            f"engine: {self.engine}{why} | particles: {self.n_particles} | steps: {self.n_steps} | "
            f"resamples: {self.n_resamples} | {ess_part}{alive}\n"
            f"log Z_hat: {'n/a' if self.log_z is None else f'{self.log_z:.3f}'} | answer: {len(self.token_ids)} tokens in {self.elapsed_s:.2f} s "
            f"({self.tokens_per_second:.1f} tok/s) | all particles: {self.particle_tokens} tokens "
            f"({self.particle_tokens_per_second:.1f} tok/s)"
        )
