"""One SMC step as pure tensor functions, shared by both engines.

Every engine runs the same cycle: propose a block of tokens, weight it, update lengths and the
done flags, add the potentials' increments, and resample the groups whose ESS fell. The math of
that cycle lives here once; :class:`smcgen.samplers.cycle.Cycle` drives it over any runner (the
generic engine), and the native engine's captured cycle (:mod:`smcgen.samplers.native`) calls it too.

Every function here is device-side and shape-static: no ``.item()``, no ``nonzero``, no boolean
indexing, so the native engine can record them inside its CUDA graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from smcgen.core.resampling import log_mean_weight


class BlockAdvance(NamedTuple):
    """What one block does to the particles: see :func:`advance`."""

    block: Tensor  # [R, T] the tokens kept (padding where not valid)
    valid: Tensor  # [R, T] bool: the position counts
    inc: Tensor  # [R] the block's token log-weight increment
    lengths: Tensor  # [R] generated tokens so far
    done: Tensor  # [R] bool: the particle has finished (EOS or the budget)


def is_eos(block: Tensor, eos: Tensor) -> Tensor:
    """``[R, T]`` bool: the token is one of ``eos`` (a 1-D id tensor, possibly empty).

    A broadcast compare, not ``torch.isin``: isin sorts (and syncs) for many ids, breaking capture.
    """
    return (block[..., None] == eos).any(dim=-1)


def masked_log_q(log_prob: Tensor, log_norm: Tensor) -> Tensor:
    """Log-probability ``log_prob - log_norm`` of a drafted token under the masked proposal.

    A row whose mask allows no token (``log_norm`` is ``-inf``) is a dead end: ``+inf`` here gives
    it weight zero in :func:`token_weights`, where ``-inf - -inf`` would be NaN.
    """
    return torch.where(torch.isneginf(log_norm), torch.full_like(log_norm, math.inf), log_prob - log_norm)


def token_weights(log_p: Tensor, log_q: Tensor, bonus_log_norm: Tensor | None) -> Tensor:
    """Per-position log-weights ``[R, k (+1)]`` of a block (docs/math.md, "Particles and weights").

    ``log_p`` ``[R, k]`` is alpha * log p_tau of each drafted token under the target, ``log_q``
    its log-probability under the proposal; the bonus token (drawn from the target itself)
    contributes its log-normalizer log sum_v p(v)^alpha (masked: over the allowed tokens only).
    """
    w = log_p.to(torch.float64) - log_q.to(torch.float64)
    if bonus_log_norm is not None:
        w = torch.cat([w, bonus_log_norm.to(torch.float64)[:, None]], dim=1)
    return w


def advance(
    block: Tensor,
    token_w: Tensor,
    done: Tensor,
    lengths: Tensor,
    eos: Tensor,
    max_new_tokens: int | Tensor,
    pad_id: int,
    in_budget: Tensor | None = None,
) -> BlockAdvance:
    """Which positions of a block count, their weight, and the new lengths and done flags.

    A position counts while its particle is alive, no EOS came earlier in the block and (native
    engine, whose blocks have a fixed width) it lies within ``max_new_tokens`` (``in_budget``
    ``[T]`` or, with a limit per row, ``[R, T]`` bool; ``max_new_tokens`` an int or ``[R]``).
    Positions that do not count add no weight and are replaced by ``pad_id``.
    """
    eos_here = is_eos(block, eos)
    eos_before = (torch.cumsum(eos_here.int(), dim=1) - eos_here.int()) > 0
    valid = (~done)[:, None] & ~eos_before
    if in_budget is not None:
        valid = valid & in_budget.expand_as(valid)
    inc = torch.where(valid, token_w, torch.zeros_like(token_w)).sum(dim=1)
    kept = torch.where(valid, block, torch.full_like(block, pad_id))
    new_lengths = lengths + valid.sum(dim=1)
    new_done = done | (eos_here & valid).any(dim=1) | (new_lengths >= max_new_tokens)
    return BlockAdvance(kept, valid, inc, new_lengths, new_done)


def potential_increment(new: Tensor, prev: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """A potential's weight increment ``log Psi(x y) - log Psi(x)`` and the score to remember.

    ``new`` is the score after the block (complete for particles that just finished, prefix
    otherwise), ``prev`` the one before; a particle already at zero (``prev = -inf``) stays at
    zero (never ``-inf - -inf = NaN``). Rows that are not ``active`` (finished before this step)
    add nothing and keep their score.
    """
    delta = torch.where(torch.isneginf(prev), torch.full_like(new, -math.inf), new - prev)
    inc = torch.where(active, delta, torch.zeros_like(delta))
    return inc, torch.where(active, new, prev)


def resample_gate(ess: Tensor, ess_threshold: float, n_particles: int, all_done: Tensor, dead: Tensor) -> Tensor:
    """``[B]`` bool: which groups resample after this step.

    A group resamples when its ESS fell below ``ess_threshold * N`` (always when the threshold is
    >= 1), unless it is dead (all weights zero) or every particle of the run has finished:
    resampling after the last step only adds noise to the final weights.
    """
    want = ess < ess_threshold * n_particles
    if ess_threshold >= 1.0:
        want = torch.ones_like(want)
    return want & ~dead & ~all_done.reshape(())


def next_block_size(k: int, k_max: int, increments: Tensor, active: Tensor) -> int:
    """The adaptive block size for the next cycle, from this cycle's weight increments only.

    ``increments`` ``[B, N]`` are the log-weight increments of the cycle just run (drafted with block
    size ``k``) and ``active`` ``[B, N]`` the particles that were still running. The mean ESS/N of the
    increments over the groups with at least two active particles says how far one block of the
    draft strays from the target: below 0.5 the block halves, above 0.8 it doubles (never above
    ``k_max`` or below 1). The choice depends on the past alone (it is made before the next block is
    drafted), so the SMC estimate stays unbiased, as for any adapted proposal.
    """
    counts = active.sum(dim=1)
    use = counts >= 2
    if not bool(use.any()):
        return k
    inc = torch.where(active, increments, torch.full_like(increments, -math.inf))[use]
    ess = torch.exp(2 * torch.logsumexp(inc, 1) - torch.logsumexp(2 * inc, 1))
    ess = torch.nan_to_num(ess, nan=0.0)  # a group whose active particles all died: no information
    frac = float((ess / counts[use]).mean())
    if frac < 0.5:
        return max(1, k // 2)
    if frac > 0.8:
        return min(k_max, 2 * k)
    return k


def bad_values(x: Tensor) -> Tensor:
    """0-d bool: ``x`` holds NaN or ``+inf`` (an error in a log-weight; ``-inf`` is a zero weight)."""
    return (torch.isnan(x) | torch.isposinf(x)).any()


def reset_weights(log_w: Tensor, resampled: Tensor) -> Tensor:
    """Log-weights after resampling: each resampled group's particles all get the group's mean weight
    (so log Z_hat keeps the group's estimate); other groups keep theirs."""
    mean = log_mean_weight(log_w, keepdim=True)
    return torch.where(resampled[:, None], mean.expand_as(log_w), log_w)


def global_rows(local: Tensor) -> Tensor:
    """Ancestor indices ``[B, N]`` within each group as global row ids ``[B * N]``."""
    b, n = local.shape
    return (local + torch.arange(b, device=local.device)[:, None] * n).reshape(-1)


class NonFiniteError(FloatingPointError):
    """A log-weight increment was NaN or ``+inf``: ``source`` names what produced it, ``step`` where."""

    def __init__(self, source: str, step: int | None):
        where = f" at step {step}" if step is not None else ""
        super().__init__(
            f"{source} produced NaN or +inf{where}; log-weights must be finite or -inf "
            "(a potential returns -inf for a zero factor; a model's logits must be finite)"
        )
        self.source = source
        self.step = step


__all__ = [
    "BlockAdvance",
    "NonFiniteError",
    "advance",
    "bad_values",
    "global_rows",
    "is_eos",
    "masked_log_q",
    "potential_increment",
    "resample_gate",
    "reset_weights",
    "token_weights",
]
