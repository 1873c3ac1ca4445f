"""The Proposal abstraction: how particles are extended by a block of tokens."""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from smcgen.potentials.base import Potential


class Proposal(abc.ABC):
    """Extends every particle by a block of tokens and reports their log-probabilities.

    ``propose`` gets the full sequences (prompt included, ``[R, T]``, all rows equal length) and
    returns ``(tokens [R, n_tokens], log_q [R, n_tokens])`` where ``log_q[r, k]`` is the log
    proposal probability of ``tokens[r, k]`` given everything before it. Stateful proposals
    (a draft model's KV cache) prepare in ``start`` and follow resampling in ``reorder``.
    """

    def start(self, prompt_ids: Tensor, n_rows: int) -> None:
        """Called once per run before the first step."""

    @abc.abstractmethod
    def propose(self, sequences: Tensor, n_tokens: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Draw ``n_tokens`` tokens for every row; return the tokens and their log q (float64)."""

    def reorder(self, rows: Tensor) -> None:
        """Make row i a copy of row ``rows[i]`` after resampling."""

    def required_potentials(self) -> tuple[Potential, ...]:
        """Factors the target must include for this proposal's weights to be right (the engine
        adds any that are missing): e.g. a grammar the proposal samples inside."""
        return ()

    def target_constraint(self) -> Potential | None:
        """A hard constraint that the target's own draws (the bonus token) must be drawn inside
        too, by adaptive weighted rejection sampling (see :class:`~smcgen.proposals.awrs.AWRS`);
        None: the target draws freely."""
        return None
