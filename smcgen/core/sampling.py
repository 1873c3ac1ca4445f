"""Token sampling from logits: token, its log-probability and the local log-normalizer.

This is the torch reference that the fused Triton sampling kernel must equal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gumbel_in_place(u: Tensor) -> Tensor:
    """Turn float32 uniforms into standard Gumbel noise in place: -log(-log(u)), u kept away from 0
    and 1 so the log never overflows (in place: a full-vocabulary row costs no new buffers)."""
    return (
        u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
        .log_()
        .neg_()
        .log_()
        .neg_()
    )


def gumbel_from_uniform(u: Tensor) -> Tensor:
    """Standard Gumbel noise from float32 uniforms, kept away from 0 and 1 so the log never overflows."""
    return _gumbel_in_place(u.clone())


def gumbel_noise(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Standard Gumbel noise drawn with ``generator``."""
    return _gumbel_in_place(torch.rand(shape, generator=generator, device=device, dtype=torch.float32))


def _scaled(logits: Tensor, scale: float) -> Tensor:
    """``logits`` as float32 times ``scale``, a new tensor (one pass when the logits need a cast)."""
    keys = logits.float()
    return keys * scale if keys is logits else keys.mul_(scale)


def bitmask_width(vocab_size: int) -> int:
    """Words per row of a token bitmask (xgrammar's layout): ceil(V / 32)."""
    return (vocab_size + 31) // 32


def allowed_from_bitmask(bitmask: Tensor, vocab_size: int, device: torch.device) -> Tensor:
    """int32 bitmask ``[R, ceil(V/32)]`` (xgrammar's layout: bit v%32 of word v//32, 1 = allowed)
    -> bool ``[R, V]`` on ``device``."""
    words = bitmask.to(device, non_blocking=True)
    bits = torch.arange(32, device=device, dtype=torch.int32)
    # an arithmetic shift of a negative word still leaves the wanted bit at position 0
    return ((words[:, :, None] >> bits) & 1).reshape(words.shape[0], -1)[:, :vocab_size].bool()


def bitmask_from_allowed(allowed: Tensor) -> Tensor:
    """bool ``[R, V]`` -> int32 bitmask ``[R, ceil(V/32)]`` (the inverse of :func:`allowed_from_bitmask`)."""
    r, v = allowed.shape
    width = bitmask_width(v)
    bits = torch.zeros(r, width * 32, dtype=torch.int64, device=allowed.device)
    bits[:, :v] = allowed.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=allowed.device) << torch.arange(32, device=allowed.device)
    words = (bits.view(r, width, 32) * weights).sum(dim=-1)
    # two's complement: a word with bit 31 set is negative in int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _restrict(scores: Tensor, allowed: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``scores`` with the tokens ``allowed`` (bitmask) does not allow set to -inf, and the rows
    left with no allowed token (``None`` and the scores themselves without a mask)."""
    if allowed is None:
        return scores, None
    ok = allowed_from_bitmask(allowed, scores.shape[-1], scores.device) & (scores > float("-inf"))
    return scores.masked_fill(~ok, float("-inf")), ~ok.any(dim=-1)


def sample_tokens(
    logits: Tensor, scale: float, generator: torch.Generator | None, allowed: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row from softmax(scale * logits) by Gumbel-max.

    Returns ``(tokens [R], log_q [R])`` where ``log_q`` is the token's log-probability under the
    scaled distribution (float64). ``scale`` is 1/temperature. With ``allowed`` (an int32 bitmask
    ``[R, ceil(V/32)]``) the distribution is restricted to the allowed tokens and renormalized;
    a row with no allowed token draws token 0 with ``log_q = 0`` (its particle must be ruled out
    by the potential that supplied the mask).
    """
    keys, empty = _restrict(_scaled(logits, scale), allowed)
    # Gumbel-max; the noise buffer takes the sum (x + g is the same float as g + x)
    tokens = torch.argmax(gumbel_noise(keys.shape, generator, keys.device).add_(keys), dim=-1)
    log_q = keys.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(keys, dim=-1)
    if empty is not None:
        tokens = torch.where(empty, torch.zeros_like(tokens), tokens)
        log_q = torch.where(empty, torch.zeros_like(log_q), log_q)
    return tokens, log_q.double()


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """Per-token log-probabilities of the tempered distribution p^(1/tau), renormalized (float32)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def sample_powered(
    logits: Tensor,
    temperature: float,
    alpha: float,
    generator: torch.Generator | None,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw from p_tau^alpha renormalized, where p_tau is the tempered next-token distribution.

    Returns ``(tokens [R], alpha * log p_tau(token) [R], log sum_v p_tau(v)^alpha [R])``; the last
    is the incremental importance weight of such a draw under the target p_tau^alpha (0 at alpha=1).
    With ``allowed`` (int32 bitmask ``[R, ceil(V/32)]``, xgrammar's layout) the draw is restricted
    to the allowed tokens (the masked target) and the log-normalizer sums over them only:
    ``log sum_{v allowed} p_tau(v)^alpha``, the weight of a masked draw. A row with no allowed
    token gives token 0 and ``-inf`` for both values. ``alpha * log p_tau(token)`` is always the
    unmasked value (the fused sampling kernel's semantics).
    """
    powered = alpha * log_probs(logits, temperature)
    keys, empty = _restrict(powered, allowed)
    tokens = torch.argmax(gumbel_noise(powered.shape, generator, powered.device).add_(keys), dim=-1)
    log_target = powered.gather(-1, tokens[:, None]).squeeze(-1).double()
    if empty is not None:
        log_norm = torch.logsumexp(keys, dim=-1).double()
        tokens = torch.where(empty, torch.zeros_like(tokens), tokens)
        log_target = torch.where(empty, torch.full_like(log_target, float("-inf")), log_target)
    elif alpha == 1.0:
        # log_softmax already normalizes; an exact zero keeps Z_hat free of rounding drift
        log_norm = torch.zeros_like(log_target)
    else:
        log_norm = torch.logsumexp(powered, dim=-1).double()
    return tokens, log_target, log_norm
