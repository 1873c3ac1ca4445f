"""Reward potentials: exp(beta * R(text)) from a Python callable on decoded text."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from smcgen.potentials.base import Potential, SequenceBatch


class RewardPotential(Potential):
    """Psi(x) = exp(beta * R(text(x))) for a user reward ``R``.

    With ``prefix=True`` the reward also scores unfinished prefixes (a twist that steers early,
    for rewards meaningful on partial text); otherwise it is applied once, when a particle
    finishes. ``batched=True`` means ``reward`` takes a list of texts and returns a list of floats.
    Non-finite reward values (NaN, +inf, -inf) raise ``ValueError``: express hard constraints as a
    custom :class:`Potential` returning ``-inf`` instead.
    """

    def __init__(
        self,
        reward: Callable[[str], float] | Callable[[list[str]], Sequence[float]],
        beta: float = 1.0,
        prefix: bool = False,
        batched: bool = False,
    ):
        if not math.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta}")
        self.reward = reward
        self.beta = float(beta)
        self.prefix = prefix
        self.batched = batched

    def _rewards(self, batch: SequenceBatch) -> Tensor:
        texts = batch.texts
        if self.batched:
            values = list(self.reward(texts))  # type: ignore[arg-type]
        else:
            values = [self.reward(t) for t in texts]  # type: ignore[arg-type]
        if len(values) != len(texts):
            raise ValueError(f"reward returned {len(values)} values for {len(texts)} texts")
        out = torch.tensor([float(v) for v in values], dtype=torch.float64)
        bad = ~torch.isfinite(out)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"reward returned a non-finite value {values[i]!r} for text {texts[i]!r}")
        return self.beta * out

    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        if self.prefix:
            return self._rewards(batch)
        return torch.zeros(len(batch), dtype=torch.float64)

    def log_complete(self, batch: SequenceBatch) -> Tensor:
        return self._rewards(batch)
