"""Language-model proposal: a draft model (or the target itself) sampled at a temperature."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smcgen.core.sampling import sample_tokens
from smcgen.proposals.base import Proposal
from smcgen.runners.transformers import CausalLMRunner, LanguageModel


class LMProposal(Proposal):
    """Samples a block autoregressively from ``lm`` at ``temperature``, one forward per token.

    The last drafted token is not fed until the next step, where it goes in together with the
    target's bonus token (the "deferred bonus": K draft forwards per step, not K+1).
    Subclasses change how a token is drawn from the logits through :meth:`_request` (work to
    start before the forward) and :meth:`_draw`.
    """

    def __init__(self, lm: LanguageModel, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lm = lm
        self.temperature = float(temperature)
        self.runner = CausalLMRunner(lm)
        self.n_prompt = 0

    def start(self, prompt_ids: Tensor, n_rows: int) -> None:
        self.n_prompt = int(prompt_ids.shape[-1])
        self.runner.start(prompt_ids, n_rows)

    def propose(self, sequences: Tensor, n_tokens: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        seq = sequences.to(self.lm.device)
        tokens, log_qs = [], []
        for k in range(n_tokens):
            pending = self._request(seq)
            logits = self.runner.forward_new(seq)[:, -1]
            tok, log_q = self._draw(logits, pending, generator)
            tokens.append(tok)
            log_qs.append(log_q)
            if k + 1 < n_tokens:
                seq = torch.cat([seq, tok[:, None]], dim=1)
        out_device = sequences.device
        return torch.stack(tokens, dim=1).to(out_device), torch.stack(log_qs, dim=1).to(out_device)

    def _request(self, sequences: Tensor) -> Any:
        """Start per-token work that depends on the tokens so far (before the forward); None here."""
        return None

    def _draw(self, logits: Tensor, pending: Any, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Draw one token per row from the next-token logits; return it and its log q (float64)."""
        return sample_tokens(logits, 1.0 / self.temperature, generator)

    def reorder(self, rows: Tensor) -> None:
        self.runner.reorder(rows)
