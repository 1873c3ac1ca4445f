"""The typed result of one SMC generation."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    ``method``: ``"smc"`` or ``"sd"`` (standard speculative decoding: uniform weights, ``log_z`` is
    NaN because SD estimates no normalizing constant, ``acceptance_rate`` the kept fraction of drafts).
    ``mean_ess_fraction`` and ``weight_variance`` say how far the draft is from the target.
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
        if self.acceptance_rate is not None:
            ess_part = f"method: sd | draft tokens kept {self.acceptance_rate:.2f}"
        return (
            f"engine: {self.engine} | particles: {self.n_particles} | steps: {self.n_steps} | resamples: {self.n_resamples} | {ess_part}\n"
            f"log Z_hat: {self.log_z:.3f} | {len(self.token_ids)} tokens in {self.elapsed_s:.2f} s "
            f"({self.tokens_per_second:.1f} tok/s)"
        )
