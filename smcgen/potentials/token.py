"""Device potentials: factors computed from token ids with torch ops.

A :class:`TokenPotential` sees every particle's tokens as one padded tensor, so an engine can
score all particles in one batched call on the device; the native engine calls it inside its
captured cycle (no host sync), as long as :meth:`TokenPotential.log_potential` itself stays on
the device (no ``.item()``, no ``.tolist()``, no data-dependent shapes). On the generic engine
it runs through the ordinary :meth:`Potential.log_prefix` protocol.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from smcgen.potentials.base import Potential, SequenceBatch


class TokenPotential(Potential):
    """A potential over token ids, batched with torch ops (a device potential).

    Implement :meth:`log_potential`. ``score_prefixes = False`` makes it an end-only factor:
    engines evaluate it once on finished particles (prefix score 0), which is cheaper for an
    expensive scorer and exact, but gives resampling no early guidance.
    """

    #: score unfinished prefixes too (a twist that guides resampling); False: end only
    score_prefixes: bool = True

    @abc.abstractmethod
    def log_potential(self, tokens: Tensor, lengths: Tensor, finished: Tensor) -> Tensor:
        """Log-score ``[R]`` of each particle.

        ``tokens`` ``[R, L]`` int64 holds the generated ids (prompt excluded); positions at or past
        ``lengths[r]`` are padding to ignore. ``finished`` ``[R]`` bool marks particles that ended
        (EOS or the token budget): score them with the factor's final value. Return ``-inf`` for
        zero; NaN and ``+inf`` are errors. All on ``tokens.device``.
        """

    def _score(self, batch: SequenceBatch, finished: bool) -> Tensor:
        n = len(batch)
        width = max((len(t) for t in batch.token_ids), default=0)
        tokens = torch.zeros(n, max(width, 1), dtype=torch.long)
        for i, t in enumerate(batch.token_ids):
            tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        lengths = torch.tensor([len(t) for t in batch.token_ids], dtype=torch.long)
        return self.log_potential(tokens, lengths, torch.full((n,), finished, dtype=torch.bool))

    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        if not self.score_prefixes:
            return torch.zeros(len(batch), dtype=torch.float64)
        return self._score(batch, False)

    def log_complete(self, batch: SequenceBatch) -> Tensor:
        return self._score(batch, True)


class LearnedReward(TokenPotential):
    """``exp(beta * R(x))`` for a learned reward ``R``: a torch module over all particles' tokens.

    ``model(tokens [R, L], lengths [R]) -> [R]`` scores every particle in one batched call on the
    module's device (a classifier head, a small LM's pooled score, ...). ``every_step=False``
    scores only finished particles (see :attr:`TokenPotential.score_prefixes`).
    """

    def __init__(self, model: torch.nn.Module, beta: float = 1.0, every_step: bool = True, name: str | None = None):
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.model = model
        self.beta = float(beta)
        self.score_prefixes = bool(every_step)
        self._name = name

    def log_potential(self, tokens: Tensor, lengths: Tensor, finished: Tensor) -> Tensor:
        dev = next(iter(self.model.parameters()), torch.empty(0, device=tokens.device)).device
        reward = self.model(tokens.to(dev), lengths.to(dev)).reshape(-1)
        return self.beta * reward.to(device=tokens.device, dtype=torch.float32)

    @property
    def name(self) -> str:
        return self._name or f"LearnedReward({type(self.model).__name__})"


__all__ = ["LearnedReward", "TokenPotential"]
