"""Exact targets by enumeration, for tiny vocabularies: the ground truth SMC is tested against."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from smcgen.potentials.base import Potential, Product, SequenceBatch, checked_scores
from smcgen.potentials.lm import LMPotential


@dataclass(frozen=True)
class ExactTarget:
    """Every continuation of a prompt with its unnormalized log-target, and log Z.

    ``sequences[i]`` ends at its first EOS or at ``max_new_tokens``; ``log_weights[i]`` is
    ``alpha * log p_tau(x) + log Psi_complete(x)`` and ``log_z`` their log-sum-exp.
    """

    sequences: list[tuple[int, ...]]
    log_weights: Tensor
    log_z: float

    def probabilities(self) -> dict[tuple[int, ...], float]:
        """The normalized target as a mapping from continuation to probability."""
        p = torch.exp(self.log_weights - self.log_z)
        return {s: float(v) for s, v in zip(self.sequences, p)}


def all_continuations(vocab_size: int, eos_ids: Sequence[int], max_new_tokens: int) -> list[tuple[int, ...]]:
    """Every token sequence that ends at its first EOS or at ``max_new_tokens`` tokens."""
    eos = set(eos_ids)
    body = [t for t in range(vocab_size) if t not in eos]
    out: list[tuple[int, ...]] = []
    for n in range(max_new_tokens):
        for prefix in itertools.product(body, repeat=n):
            out.extend(prefix + (e,) for e in sorted(eos))
    out.extend(itertools.product(body, repeat=max_new_tokens))
    return out


def enumerate_target(
    target: LMPotential,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    potentials: Potential | Sequence[Potential] = (),
    limit: int = 200_000,
) -> ExactTarget:
    """Enumerate the target ``p_tau^alpha * prod Psi`` over all continuations (small vocabularies only)."""
    lm = target.lm
    seqs = all_continuations(lm.vocab_size, lm.eos_token_ids, max_new_tokens)
    if len(seqs) > limit:
        raise ValueError(f"{len(seqs)} continuations exceed the enumeration limit {limit}")
    batch = SequenceBatch(seqs, prompt_ids, lm.tokenizer)
    log_w = target.log_prefix(batch).double()
    if isinstance(potentials, Potential):
        potentials = [potentials]
    if potentials:
        product = Product(list(potentials))
        log_w = log_w + checked_scores(product, product.log_complete(batch), len(seqs))
    log_z = float(torch.logsumexp(log_w, dim=0))
    if log_z == -math.inf:
        raise ValueError("the target gives every continuation weight zero")
    return ExactTarget(sequences=seqs, log_weights=log_w, log_z=log_z)
