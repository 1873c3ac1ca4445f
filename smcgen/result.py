"""The typed result of one SMC generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smcgen.trace import Trace


@dataclass(frozen=True)
class SMCResult:
    """What :func:`smcgen.generate` returns for one prompt.

    ``text``/``token_ids``: the answer, one particle drawn by its final weight.
    ``sequences``/``log_weights``: every particle's generated ids and normalized log-weight
    (``texts`` holds their decoded text when ``return_all_particles`` is set).
    ``log_z``: log of the unbiased estimate of the target's normalizing constant Z.
    ``ess_history``: ESS after each step (before resampling); ``n_resamples``: resampling count.
    ``engine``: which engine ran it, ``"native"`` (GPU engine) or ``"generic"``;
    ``engine_reason``: why the generic engine ran it (None when the native one did).
    ``dead``: every particle reached weight zero (``generate(on_dead="flag")``): ``text`` is the
    longest partial output, not a draw from the target, and ``log_z`` is ``-inf``.
    ``parsed``: with a structured ``grammar=`` the answer parsed as its type (pydantic object,
    Enum member, JSON value); None otherwise.
    ``trace``: the step-by-step record (:class:`smcgen.trace.Trace`) when ``generate(trace=True)``.
    """

    text: str
    token_ids: list[int]
    sequences: list[list[int]]
    log_weights: list[float]
    log_z: float
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

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens of the answer per second of wall time."""
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def summary(self) -> str:
        """A short human-readable report (particles, ESS, resampling, speed)."""
        ess = self.ess_history
        ess_part = (
            f"ESS min {min(ess):.2f} / mean {sum(ess) / len(ess):.2f} / final {ess[-1]:.2f} of {self.n_particles}"
            if ess
            else "ESS n/a"
        )
        return (
            f"engine: {self.engine} | particles: {self.n_particles} | steps: {self.n_steps} | resamples: {self.n_resamples} | {ess_part}\n"
            f"log Z_hat: {self.log_z:.3f} | {len(self.token_ids)} tokens in {self.elapsed_s:.2f} s "
            f"({self.tokens_per_second:.1f} tok/s)"
        )
