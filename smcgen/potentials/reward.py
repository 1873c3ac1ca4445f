"""Reward potentials: exp(beta * R(text)) from a Python callable on decoded text."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from smcgen.potentials.base import Potential, SequenceBatch


def _number(value: object, text: str) -> float:
    """A reward value as a float; None, strings, bools and containers are errors naming the text."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
        raise TypeError(f"reward must return a number, got {type(value).__name__} {value!r} for text {text!r}")
    return float(value)


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
            returned = self.reward(texts)  # type: ignore[arg-type]
            # a dict or a string is iterable but is not a list of rewards (its keys / characters would be read)
            if isinstance(returned, (str, bytes, Mapping)) or not isinstance(returned, (Sequence, Tensor, np.ndarray)):
                raise TypeError(
                    f"a batched reward must return a list of numbers (one per text), got {type(returned).__name__}"
                )
            values = (
                list(returned.reshape(-1).tolist()) if isinstance(returned, (Tensor, np.ndarray)) else list(returned)
            )
        else:
            values = [self.reward(t) for t in texts]  # type: ignore[arg-type]
        if len(values) != len(texts):
            raise ValueError(f"reward returned {len(values)} values for {len(texts)} texts")
        out = torch.tensor([_number(v, texts[i]) for i, v in enumerate(values)], dtype=torch.float64)
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
