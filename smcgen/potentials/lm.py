"""The language-model potential: p_tau(x)^alpha, the target of every run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from smcgen.core.sampling import log_probs
from smcgen.potentials.base import Potential, SequenceBatch

if TYPE_CHECKING:  # only a type here: the potential calls whatever model object it is given
    from smcgen.runners.transformers import LanguageModel


class LMPotential(Potential):
    """Psi(x) = prod_t p_tau(x_t | prompt, x_<t)^alpha for a causal LM.

    ``temperature`` (tau) tempers each next-token distribution and renormalizes it;
    ``alpha`` raises the whole sequence probability to a power (power sampling). As the run's
    target, the engine scores it incrementally through its KV cache; as an extra factor in a
    product it is scored here from scratch (one batched forward over prompt + continuation).
    """

    def __init__(self, lm: LanguageModel, temperature: float = 1.0, alpha: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.lm = lm
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    @torch.inference_mode()
    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        prompt = batch.prompt_ids
        lengths = [len(t) for t in batch.token_ids]
        width = len(prompt) + max(lengths, default=0)
        pad = self.lm.eos_token_ids[0] if self.lm.eos_token_ids else 0
        rows = [prompt + t + [pad] * (width - len(prompt) - len(t)) for t in batch.token_ids]
        ids = torch.tensor(rows, device=self.lm.device)
        # right padding never influences earlier positions of a causal model, so no mask is needed
        logp = log_probs(self.lm.model(input_ids=ids).logits[:, :-1], self.temperature)
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).double()
        positions = torch.arange(1, width, device=ids.device)[None, :]
        start = len(prompt)
        end = torch.tensor([start + n for n in lengths], device=ids.device)[:, None]
        mask = (positions >= start) & (positions < end)
        return (self.alpha * (token_logp * mask).sum(dim=1)).cpu()
