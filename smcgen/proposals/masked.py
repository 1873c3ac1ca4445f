"""Masked proposals: a draft restricted to the tokens a grammar allows, renormalized.

The locally constrained proposal of docs/math.md: q(y) = q_D(y) m(y) / sum_v q_D(v) m(v), with m the
grammar's next-token mask. The step loop weights each drafted token by alpha log p_T(y) - log q(y)
as for any proposal; the target's own draws (the bonus token, and every token of plain SMC) are
masked by ``SMC(..., mask=grammar)``, which weights them by the masked log-normalizer
log sum_{v allowed} p_T(v)^alpha. ``smcgen.generate(grammar=...)`` wires both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smcgen.core.sampling import sample_tokens
from smcgen.potentials.grammar import GrammarPotential, PendingBitmask
from smcgen.proposals.lm import LMProposal
from smcgen.runners.transformers import LanguageModel


class MaskedLMProposal(LMProposal):
    """A draft model sampled at ``temperature`` and restricted to ``mask``'s allowed tokens.

    ``mask`` is a bound :class:`GrammarPotential`; the SMC run includes it in the target (the
    engine adds it when it is missing), which gives zero weight to particles that end outside the
    language (for example at the length limit). The masks of the drafted positions are computed
    from the grammar states the potential keeps per particle, advanced token by token; on a GPU
    the mask of the next position is computed on the CPU while the draft's forward runs.
    """

    def __init__(self, lm: LanguageModel, mask: GrammarPotential, temperature: float = 1.0):
        super().__init__(lm, temperature)
        self.mask = mask.for_logits(lm.vocab_size, lm, "the draft's")

    def required_potentials(self) -> tuple[GrammarPotential, ...]:
        """The grammar: it zeroes particles that end outside the language (e.g. at the length limit)."""
        return (self.mask,)

    def _request(self, sequences: Tensor) -> PendingBitmask:
        return self.mask.request_bitmask(sequences, self.n_prompt)

    def _draw(self, logits: Tensor, pending: Any, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        return sample_tokens(logits, 1.0 / self.temperature, generator, allowed=pending.result())
