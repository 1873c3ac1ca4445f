"""Token sampling from logits: token, its log-probability and the local log-normalizer.

This is the torch reference that the fused Triton sampling kernel must equal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise; the uniform is kept away from 0 and 1 so the log never overflows."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def sample_tokens(logits: Tensor, scale: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw one token per row from softmax(scale * logits) by Gumbel-max.

    Returns ``(tokens [R], log_q [R])`` where ``log_q`` is the token's log-probability under the
    scaled distribution (float64). ``scale`` is 1/temperature.
    """
    scaled = logits.float() * scale
    tokens = torch.argmax(scaled + gumbel_noise(scaled.shape, generator, scaled.device), dim=-1)
    log_q = scaled.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
    return tokens, log_q.double()


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """Per-token log-probabilities of the tempered distribution p^(1/tau), renormalized (float32)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def sample_powered(
    logits: Tensor, temperature: float, alpha: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw from p_tau^alpha renormalized, where p_tau is the tempered next-token distribution.

    Returns ``(tokens [R], alpha * log p_tau(token) [R], log sum_v p_tau(v)^alpha [R])``; the last
    is the incremental importance weight of such a draw under the target p_tau^alpha (0 at alpha=1).
    """
    powered = alpha * log_probs(logits, temperature)
    tokens = torch.argmax(powered + gumbel_noise(powered.shape, generator, powered.device), dim=-1)
    log_target = powered.gather(-1, tokens[:, None]).squeeze(-1).double()
    if alpha == 1.0:
        # log_softmax already normalizes; an exact zero keeps Z_hat free of rounding drift
        log_norm = torch.zeros_like(log_target)
    else:
        log_norm = torch.logsumexp(powered, dim=-1).double()
    return tokens, log_target, log_norm
