"""What every SMC run returns and how it fails: shared by the engines, owned by neither.

:class:`BatchRun` is the raw result of a run over B groups of N particles,
:class:`AllParticlesDeadError` the error for groups whose particles all reach weight zero, and
:func:`length_problem` the check of a prompt and token budget against a model's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from smcgen.core.resampling import log_mean_weight, normalized_log_weights


class AllParticlesDeadError(RuntimeError):
    """Every particle of a group has weight zero: the target gives the explored prefixes no mass.

    ``step`` and ``groups`` say where; ``sequences`` holds the token ids every particle of the
    first such group had reached (the partial outputs), when the engine provides them.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        groups: Sequence[int] = (),
        sequences: Sequence[Sequence[int]] = (),
    ):
        super().__init__(message)
        self.step = step
        self.groups = list(groups)
        self.sequences = [list(s) for s in sequences]


@dataclass(frozen=True)
class BatchRun:
    """Raw output of :meth:`SMC.run` for B groups of N particles (tensors on the CPU).

    ``tokens[b, n, :lengths[b, n]]`` is a particle's continuation (EOS included when it
    stopped on one); ``log_weights`` are normalized per group; ``log_z[b]`` is the log of the
    unbiased estimate of the group's normalizing constant; ``ess_history[s, b]`` is the ESS
    after step s (before any resampling) and ``resampled[s, b]`` whether that step resampled.
    ``dead[b]`` (runs with ``on_dead="flag"``) marks groups whose particles all reached weight
    zero: their tokens are the partial outputs at that step, their log-weights ``-inf`` and
    ``log_z`` is ``-inf`` (Z_hat = 0).
    """

    tokens: Tensor
    lengths: Tensor
    log_weights: Tensor
    log_z: Tensor
    ess_history: Tensor
    resampled: Tensor
    elapsed_s: float
    dead: Tensor | None = None

    @classmethod
    def from_log_weights(
        cls,
        tokens: Tensor,
        lengths: Tensor,
        log_w: Tensor,
        ess_history: Tensor,
        resampled: Tensor,
        elapsed_s: float,
        dead: Tensor,
    ) -> BatchRun:
        """Assemble a run from unnormalized ``log_w [B, N]``: normalized weights, log Z_hat, all on the CPU."""
        return cls(
            tokens=tokens.cpu(),
            lengths=lengths.cpu(),
            log_weights=normalized_log_weights(log_w).cpu(),
            log_z=log_mean_weight(log_w).cpu(),
            ess_history=ess_history.cpu(),
            resampled=resampled.cpu(),
            elapsed_s=elapsed_s,
            dead=dead.cpu(),
        )


def length_problem(prompt_len: int, max_new_tokens: int, context: int | None) -> str | None:
    """Why a prompt and a token budget do not fit a model context (None when they do or it is unknown)."""
    if context is None:
        return None
    if prompt_len > context:
        return f"prompt has {prompt_len} tokens but the model context is {context} tokens"
    if prompt_len + max_new_tokens > context:
        return (
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model context ({context} tokens); shorten the prompt or lower max_new_tokens"
        )
    return None


def dead_group_error(
    groups: list[int],
    partial: list[list[int]],
    finished: list[bool],
    potential: Any,
    step: int | None = None,
    cause: str | None = None,
) -> AllParticlesDeadError:
    """The error for groups whose particles all have weight zero: the first group's partial outputs
    and, where the potential can tell, why they are ruled out."""
    reasons: list[str] = []
    if potential is not None:
        for toks, fin in zip(partial, finished):
            why = potential.explain_zero(toks, fin)
            if why and why not in reasons:
                reasons.append(why)
    detail = f" ({potential.name}: {'; '.join(reasons[:3])})" if reasons and potential is not None else ""
    which = str(groups[:8])[:-1] + (f", ... ({len(groups)} groups)]" if len(groups) > 8 else "]")
    where = f"step {step}: " if step is not None else ""
    cause = cause or "the potentials rule out every continuation the proposal reached"
    return AllParticlesDeadError(
        f"{where}every particle of group(s) {which} has weight zero; {cause}{detail}",
        step=step,
        groups=groups,
        sequences=partial,
    )


__all__ = ["AllParticlesDeadError", "BatchRun", "dead_group_error", "length_problem"]
