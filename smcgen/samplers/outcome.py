"""From an engine's run to the user's answer: the particle drawn, and what happens when all died.

``generate(on_dead="raise")`` re-raises :class:`AllParticlesDeadError` with the dead particles'
text and a hint (mask the proposal with a grammar or a next-token potential, so that particles are
never drawn into a zero); ``on_dead="flag"`` returns the longest partial output, flagged
``SMCResult.dead``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from smcgen.samplers.generic import AllParticlesDeadError

_MASK_HINT = (
    "the proposal keeps drawing tokens the potentials rule out: constrain the draws instead of only "
    "weighting them, with generate(grammar=GrammarPotential...) or a next-token mask, raise n_particles, or "
    "pass on_dead='flag' to get the best partial result"
)


def choose_answer(log_w: Tensor, lengths: list[int], seed: int | None, dead: bool) -> int:
    """The particle returned as the answer: drawn by its final weight (seeded by ``seed + 1``), or for
    a dead run (every weight zero) the longest partial output."""
    if dead or not bool(torch.isfinite(log_w).any()):
        return max(range(len(lengths)), key=lambda i: lengths[i])
    chooser = torch.Generator().manual_seed(seed + 1 if seed is not None else random.SystemRandom().getrandbits(63))
    return int(torch.multinomial(log_w.exp(), 1, generator=chooser))


def explained_dead_end(err: AllParticlesDeadError, decoder: Any, masked: bool) -> AllParticlesDeadError:
    """``err`` with the last live prefixes' text and, unless a grammar already masks the draws, a hint."""
    texts: list[str] = []
    if decoder is not None and err.sequences:
        try:
            texts = list(dict.fromkeys(decoder.batch_decode(err.sequences, skip_special_tokens=True)))
        except Exception:  # noqa: BLE001 - a decoder failure must not hide the original error
            texts = []
    parts = [str(err)]
    if texts:
        shown = ", ".join(repr(t[-80:]) for t in texts[:3])
        parts.append(f"last prefixes: {shown}" + (f" (+{len(texts) - 3} more)" if len(texts) > 3 else ""))
    if not masked:
        parts.append(_MASK_HINT)
    out = AllParticlesDeadError(". ".join(parts), step=err.step, groups=err.groups, sequences=err.sequences)
    return out


__all__ = ["choose_answer", "explained_dead_end"]
