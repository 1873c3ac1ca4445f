"""Batched resampling schemes for sequential Monte Carlo.

All functions work on log-weights of shape ``[B, N]``: ``B`` independent groups
(e.g. one per request) of ``N`` particles each. An entry of ``-inf`` marks a dead
particle, which must never be selected as an ancestor. Everything is vectorized
over rows and runs on whatever device the log-weights live on.

Cumulative sums are taken in float64 because SMC weights can span many orders of
magnitude; in float32 a long cumulative sum of uneven weights loses the small
particles entirely and drifts away from 1.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "RESAMPLERS",
    "MultinomialResampler",
    "Resampler",
    "ResidualResampler",
    "StratifiedResampler",
    "SystematicResampler",
    "ancestors_from_counts",
    "effective_sample_size",
    "get_resampler",
    "graph_safe",
    "log_mean_weight",
    "normalized_log_weights",
    "offspring_counts",
]

# Largest float64 strictly below 1. Uniform positions are clamped to it so that
# an inverse-CDF lookup can never run past the final cumulative value (which is
# exactly 1); `(i + U) / N` can round up to 1.0 even though U < 1.
_BELOW_ONE: float = math.nextafter(1.0, 0.0)


def _working_dtype(t: Tensor) -> torch.dtype:
    """Float dtype used for log-space arithmetic on ``t``.

    Half precision is upcast because logsumexp in fp16/bf16 is too coarse for
    ESS thresholds; float64 inputs keep their precision.
    """
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def normalized_log_weights(log_weights: Tensor) -> Tensor:
    """Normalize log-weights so that each row's weights sum to one.

    Args:
        log_weights: ``[..., N]`` unnormalized log-weights; ``-inf`` marks dead
            particles.

    Returns:
        Tensor of the same shape with ``logsumexp`` over the last dimension equal
        to 0 for every row. A row whose entries are all ``-inf`` stays all
        ``-inf`` (rather than becoming NaN). Floating inputs keep their dtype;
        other inputs are returned as float32.
    """
    work = log_weights.to(_working_dtype(log_weights))
    # Shift by the row max before subtracting the logsumexp: `x - max` is exact,
    # whereas `x - logsumexp(x)` at |x| ~ 1e4 would round to the float32 spacing
    # there (~1e-3) and distort the weights. For an all-dead row the max is -inf
    # and `-inf - -inf` would be NaN; shifting by 0 keeps the row at -inf.
    row_max = work.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = work - row_max
    lse = torch.logsumexp(shifted, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = shifted - lse
    if log_weights.is_floating_point():
        out = out.to(log_weights.dtype)
    return out


def log_mean_weight(log_weights: Tensor, keepdim: bool = False) -> Tensor:
    """``log((1/N) sum_i exp(log_weights_i))`` over the last dimension: a group's factor of the
    evidence estimate log Z_hat, and the weight every particle of a resampled group takes.

    A row whose entries are all ``-inf`` gives ``-inf`` (never NaN).
    """
    n = log_weights.shape[-1]
    return torch.logsumexp(log_weights, dim=-1, keepdim=keepdim) - math.log(n)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """Effective sample size ``1 / sum_i wbar_i^2`` of each row.

    Computed as ``exp(-logsumexp(2 * log wbar))`` so that arbitrarily large or
    small log-weights neither overflow nor underflow.

    Args:
        log_weights: ``[..., N]`` unnormalized log-weights; ``-inf`` marks dead
            particles.

    Returns:
        ``[...]`` ESS per row in ``[1, N]``, or exactly ``0.0`` for a row whose
        particles are all dead. Dtype is float64 for float64 input, otherwise
        float32.
    """
    n = log_weights.shape[-1]
    log_wbar = normalized_log_weights(log_weights.to(_working_dtype(log_weights)))
    log_sum_sq = torch.logsumexp(2.0 * log_wbar, dim=-1)
    # Mathematically 1 <= ESS <= N; clamping removes rounding excursions such as
    # N * (1 + 1e-16) for equal weights, which would otherwise surprise
    # threshold comparisons like `ess < N`.
    ess = torch.exp(-log_sum_sq).clamp(min=1.0, max=float(n))
    alive = torch.isfinite(log_sum_sq)
    return torch.where(alive, ess, torch.zeros_like(ess))


def offspring_counts(ancestors: Tensor, num_particles: int | None = None) -> Tensor:
    """Number of times each particle was chosen as an ancestor, per row.

    Args:
        ancestors: int64 ``[B, M]`` ancestor indices in ``[0, num_particles)``.
        num_particles: number of parent particles ``N``; defaults to ``M``.

    Returns:
        int64 ``[B, N]`` counts; each row sums to ``M``.
    """
    if ancestors.dim() != 2:
        raise ValueError(f"ancestors must have shape [B, M], got {tuple(ancestors.shape)}")
    n = ancestors.shape[-1] if num_particles is None else num_particles
    counts = torch.zeros(ancestors.shape[0], n, dtype=torch.int64, device=ancestors.device)
    return counts.scatter_add_(1, ancestors.long(), torch.ones_like(ancestors, dtype=torch.int64))


def ancestors_from_counts(counts: Tensor, num_offspring: int | None = None) -> Tensor:
    """Expand offspring counts into sorted ancestor indices (batched ``repeat_interleave``).

    Args:
        counts: non-negative integer ``[B, N]`` counts whose rows each sum to
            ``num_offspring``.
        num_offspring: number of offspring slots ``M`` per row; defaults to ``N``.

    Returns:
        int64 ``[B, M]`` ancestors in non-decreasing order; particle ``i``
        appears ``counts[b, i]`` times in row ``b``.
    """
    if counts.dim() != 2:
        raise ValueError(f"counts must have shape [B, N], got {tuple(counts.shape)}")
    b, n = counts.shape
    m = n if num_offspring is None else num_offspring
    cum = counts.to(torch.int64).cumsum(dim=-1)
    slots = torch.arange(m, device=counts.device, dtype=torch.int64).expand(b, m).contiguous()
    # Slot j belongs to the first particle whose cumulative count exceeds j;
    # right=True skips zero-count particles, whose cumulative count equals the
    # previous one.
    idx = torch.searchsorted(cum, slots, right=True)
    return idx.clamp_(max=n - 1)


def _weights_from_log(log_weights: Tensor) -> Tensor:
    """Normalized float64 weights of a ``[B, N]`` log-weight tensor.

    Dead particles get weight exactly 0. A row with no live particle violates
    the resamplers' precondition; it is given uniform weights so the output
    stays a valid index tensor instead of NaN-driven garbage (checking the
    precondition would force a host-device sync).
    """
    w = torch.exp(normalized_log_weights(log_weights.to(torch.float64)))
    alive = w.sum(dim=-1, keepdim=True) > 0
    return torch.where(alive, w, torch.ones_like(w))


def _cdf(weights: Tensor) -> Tensor:
    """Cumulative distribution of non-negative float64 ``[B, N]`` weights with positive row sums.

    The final entry of every row is exactly 1, and every entry after the last
    positive weight is also exactly 1 (adding 0.0 is exact and ``x / x == 1``
    in IEEE arithmetic), so no interval past the last live particle has width.
    """
    cum = torch.cumsum(weights, dim=-1)
    cdf = cum / cum[:, -1:]
    cdf[:, -1] = 1.0
    return cdf


def _inverse_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """Index ``i`` with ``cdf[i-1] <= u < cdf[i]`` for each uniform ``u`` (row-wise).

    ``right=True`` returns the first index whose cumulative value is strictly
    greater than ``u``; a zero-weight particle has ``cdf[i] == cdf[i-1]`` and so
    can never be that first index. Clamping ``u`` below 1 guarantees such an
    index exists, and the final index clamp is only a last line of defence
    against NaN input.
    """
    u = u.clamp(max=_BELOW_ONE).contiguous()
    idx = torch.searchsorted(cdf, u, right=True)
    return idx.clamp_(max=cdf.shape[-1] - 1)


def _uniform(shape: tuple[int, ...], like: Tensor, generator: Any) -> Tensor:
    """Float64 uniforms in ``[0, 1)`` on ``like``'s device, drawn from ``generator``.

    ``generator`` may also be a uniform source with ``uniform(shape) -> Tensor`` (the native
    engine's counter-based Philox stream, which a CUDA graph can capture).
    """
    if hasattr(generator, "uniform"):
        return generator.uniform(shape).to(device=like.device, dtype=torch.float64)
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float64)


def graph_safe(resampler: Resampler) -> bool:
    """True when ``resampler`` draws its randomness through ``_uniform`` with static shapes only (the
    built-in schemes), so an engine may feed it a device uniform source and capture it in a graph.

    A subclass opts in with ``graph_safe = True`` in the class that defines its ``_ancestors``.
    """
    for cls in type(resampler).__mro__:
        if "_ancestors" in cls.__dict__:
            return bool(cls.__dict__.get("graph_safe", False))
    return False


def _check_log_weights(log_weights: Tensor) -> None:
    """Validate the shape of resampler input (cheap checks only, no device sync)."""
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must have shape [B, N], got {tuple(log_weights.shape)}")
    if log_weights.shape[-1] == 0:
        raise ValueError("log_weights must have at least one particle per row (N >= 1)")


class Resampler(abc.ABC):
    """Maps log-weights ``[B, N]`` to ancestor indices ``[B, N]``.

    Each row is resampled independently. Every scheme is unbiased: the expected
    number of offspring of particle ``i`` is ``N * wbar_i``. Particles with
    ``-inf`` log-weight are never selected. Each row must contain at least one
    finite log-weight; log-weights must not be ``+inf`` or NaN.

    Randomness comes only from ``generator`` (or torch's global RNG when it is
    ``None``); the generator must live on the same device as the log-weights.
    """

    name: ClassVar[str]

    def __call__(self, log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Alias of :meth:`ancestors`."""
        return self.ancestors(log_weights, generator)

    def ancestors(self, log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample ancestor indices.

        Args:
            log_weights: ``[B, N]`` unnormalized log-weights, any float dtype.
            generator: source of randomness, on ``log_weights.device``.

        Returns:
            int64 ``[B, N]`` ancestor indices in ``[0, N)`` on
            ``log_weights.device``.
        """
        _check_log_weights(log_weights)
        return self._ancestors(_weights_from_log(log_weights), generator)

    @abc.abstractmethod
    def _ancestors(self, weights: Tensor, generator: torch.Generator | None) -> Tensor:
        """Scheme-specific sampling from normalized float64 ``[B, N]`` weights (rows sum to 1)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MultinomialResampler(Resampler):
    """Draws each of the ``N`` ancestors independently from ``wbar``.

    Highest-variance scheme (offspring counts are Multinomial(N, wbar)); kept
    as the reference against which the others are judged. Implemented as an
    inverse-CDF lookup rather than ``torch.multinomial`` so that the dead-particle
    guarantee rests on the same code path as the other schemes. Ancestors are
    returned in draw order, not sorted.
    """

    name: ClassVar[str] = "multinomial"
    graph_safe: ClassVar[bool] = True

    def _ancestors(self, weights: Tensor, generator: torch.Generator | None) -> Tensor:
        return _inverse_cdf(_cdf(weights), _uniform(tuple(weights.shape), weights, generator))


class SystematicResampler(Resampler):
    """One uniform ``U`` per row; positions ``u_i = (i + U) / N``.

    Lowest variance in practice and the usual default. Each particle receives
    either ``floor(N * wbar_i)`` or ``ceil(N * wbar_i)`` offspring. Ancestors are
    sorted.
    """

    name: ClassVar[str] = "systematic"
    graph_safe: ClassVar[bool] = True

    def _ancestors(self, weights: Tensor, generator: torch.Generator | None) -> Tensor:
        b, n = weights.shape
        offsets = _uniform((b, 1), weights, generator)
        grid = torch.arange(n, device=weights.device, dtype=torch.float64)
        return _inverse_cdf(_cdf(weights), (grid + offsets) / n)


class StratifiedResampler(Resampler):
    """One independent uniform per stratum; positions ``u_i = (i + U_i) / N``.

    Variance is never above multinomial's for any particle. Ancestors are sorted.
    """

    name: ClassVar[str] = "stratified"
    graph_safe: ClassVar[bool] = True

    def _ancestors(self, weights: Tensor, generator: torch.Generator | None) -> Tensor:
        b, n = weights.shape
        offsets = _uniform((b, n), weights, generator)
        grid = torch.arange(n, device=weights.device, dtype=torch.float64)
        return _inverse_cdf(_cdf(weights), (grid + offsets) / n)


class ResidualResampler(Resampler):
    """``floor(N * wbar_i)`` deterministic copies plus multinomial draws on the residuals.

    Rows differ in how many residual draws ``R_b = N - sum_i floor(N * wbar_bi)``
    they need; every row draws ``N`` candidates and keeps its first ``R_b``,
    which keeps the computation rectangular without a loop over rows. Ancestors
    are sorted.
    """

    name: ClassVar[str] = "residual"
    graph_safe: ClassVar[bool] = True

    def _ancestors(self, weights: Tensor, generator: torch.Generator | None) -> Tensor:
        b, n = weights.shape
        scaled = weights * n
        deterministic = torch.floor(scaled)
        residual = (scaled - deterministic).clamp_(min=0.0)
        # Rows are normalized in float64, so sum(floor) <= N; the clamp only
        # guards against pathological rounding.
        num_residual = (n - deterministic.sum(dim=-1, keepdim=True)).round_().clamp_(min=0.0)
        # Rows whose weights are all exact multiples of 1/N have no residual mass
        # (and need no draws); give them any valid CDF so it is not 0/0.
        has_residual = residual.sum(dim=-1, keepdim=True) > 0
        residual = torch.where(has_residual, residual, weights)

        draws = _inverse_cdf(_cdf(residual), _uniform((b, n), weights, generator))
        slot = torch.arange(n, device=weights.device, dtype=torch.float64)
        keep = (slot < num_residual).to(torch.int64)
        counts = deterministic.to(torch.int64).scatter_add_(1, draws, keep)
        return ancestors_from_counts(counts, n)


RESAMPLERS: dict[str, type[Resampler]] = {
    cls.name: cls for cls in (MultinomialResampler, SystematicResampler, StratifiedResampler, ResidualResampler)
}
"""Resampler classes keyed by their ``name``."""


def get_resampler(name: str) -> Resampler:
    """Instantiate the resampler registered under ``name`` (case-insensitive).

    Raises:
        ValueError: if ``name`` is not a key of :data:`RESAMPLERS`; the message
            lists the allowed names.
    """
    key = name.strip().lower()
    try:
        cls = RESAMPLERS[key]
    except KeyError:
        allowed = ", ".join(sorted(RESAMPLERS))
        raise ValueError(f"unknown resampler {name!r}; allowed names: {allowed}") from None
    return cls()
