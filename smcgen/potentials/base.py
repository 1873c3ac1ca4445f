"""The Potential abstraction: non-negative factors Psi on token sequences, in log space."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Protocol

import torch
from torch import Tensor


class Decoder(Protocol):
    """Anything that turns token ids into text (a Hugging Face tokenizer qualifies)."""

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = ...) -> list[str]: ...


class SequenceBatch:
    """The particles a potential scores: generated token ids (prompt excluded) and their texts.

    ``texts`` is decoded lazily, once, with the run's tokenizer (special tokens skipped).
    ``rows`` (set by the step loop, else None) are the particles' row indices in the run, for
    stateful potentials that keep a state per row (see :meth:`Potential.start`).
    """

    def __init__(
        self,
        token_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[int],
        decoder: Decoder | None,
        rows: Sequence[int] | None = None,
    ):
        self.token_ids: list[list[int]] = [list(t) for t in token_ids]
        self.prompt_ids: list[int] = list(prompt_ids)
        self._decoder = decoder
        self.rows: list[int] | None = None if rows is None else [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.token_ids)

    @cached_property
    def texts(self) -> list[str]:
        """Decoded continuation of each particle."""
        if self._decoder is None:
            raise RuntimeError(
                "this potential needs decoded text but the run has no tokenizer; pass a tokenizer "
                "(or a model name) to smcgen.generate"
            )
        return list(self._decoder.batch_decode(self.token_ids, skip_special_tokens=True))


class Potential(abc.ABC):
    """A factor Psi(x) >= 0 of the target, scored in log space and batched over particles.

    Subclasses implement :meth:`log_prefix` (the score of an unfinished prefix, a "twist" that
    guides particles early) and optionally :meth:`log_complete` (the factor's true value on a
    finished sequence; defaults to ``log_prefix``). The engine weights each extension by
    ``log Psi(x y) - log Psi(x)``, so the twist telescopes away and only ``log_complete`` shapes
    the final target. Return ``-inf`` for zero; NaN and ``+inf`` are errors.
    Potentials compose by product: ``p1 * p2``.

    Stateful potentials (a grammar matcher per particle) may keep a state per row: the step loop
    calls :meth:`start` once per run and :meth:`reorder` whenever resampling reorders the
    particles (exactly where it reorders the proposal), and passes ``batch.rows``.

    Contract for stateful potentials: one potential object may serve several runs at once (one
    model, concurrent ``generate`` calls in threads). Every call of one run comes from the thread
    that runs it, so per-run state must live per thread (``threading.local``), never in a plain
    attribute of the shared object; and a state is only a cache: scores and masks must equal what a
    fresh state fed ``batch.token_ids`` gives (rebuild when the cached tokens do not match), so a
    run's results never depend on another run or on whether the hooks were called.
    """

    def start(self, prompt_ids: Sequence[int], n_rows: int) -> None:
        """Called once per run, before the first step, with the run's number of particle rows."""

    def reorder(self, rows: Tensor) -> None:
        """Make row i's state a copy of row ``rows[i]``'s after resampling."""

    def explain_zero(self, token_ids: Sequence[int], finished: bool) -> str | None:
        """Why this factor is zero on a particle (for error messages), or None if it is not zero."""
        return None

    @abc.abstractmethod
    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        """Log-score of each unfinished particle, shape ``[len(batch)]``."""

    def log_complete(self, batch: SequenceBatch) -> Tensor:
        """Log-score of each finished particle (EOS or max length), shape ``[len(batch)]``."""
        return self.log_prefix(batch)

    def __mul__(self, other: Potential) -> Potential:
        if not isinstance(other, Potential):
            return NotImplemented
        return Product([self, other])

    @property
    def name(self) -> str:
        """Name used in error messages."""
        return type(self).__name__


class Product(Potential):
    """The product of several potentials (sum of their log-scores)."""

    def __init__(self, factors: Sequence[Potential]):
        flat: list[Potential] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, Product) else [f])
        self.factors: list[Potential] = flat

    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        return _sum_scores([(f, checked_scores(f, f.log_prefix(batch), len(batch))) for f in self.factors], len(batch))

    def log_complete(self, batch: SequenceBatch) -> Tensor:
        return _sum_scores([(f, checked_scores(f, f.log_complete(batch), len(batch))) for f in self.factors], len(batch))

    def _distinct(self) -> list[Potential]:
        # a factor that appears twice keeps one state: start and reorder it once
        seen: dict[int, Potential] = {}
        for f in self.factors:
            seen.setdefault(id(f), f)
        return list(seen.values())

    def start(self, prompt_ids: Sequence[int], n_rows: int) -> None:
        for f in self._distinct():
            f.start(prompt_ids, n_rows)

    def reorder(self, rows: Tensor) -> None:
        for f in self._distinct():
            f.reorder(rows)

    def explain_zero(self, token_ids: Sequence[int], finished: bool) -> str | None:
        reasons = [r for f in self.factors if (r := f.explain_zero(token_ids, finished))]
        return "; ".join(reasons) if reasons else None

    @property
    def name(self) -> str:
        return " * ".join(f.name for f in self.factors)


def _sum_scores(scored: list[tuple[Potential, Tensor]], n: int) -> Tensor:
    total = torch.zeros(n, dtype=torch.float64)
    for _, s in scored:
        total = total + s
    return total


def checked_scores(potential: Potential, scores: Any, n: int) -> Tensor:
    """Validate a potential's output: shape ``[n]``, no NaN, no ``+inf``; returns float64 on CPU."""
    t = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() != n:
        raise ValueError(f"potential {potential.name} returned {t.numel()} scores for a batch of {n} particles")
    if torch.isnan(t).any():
        raise ValueError(f"potential {potential.name} returned NaN; return -inf for a zero factor")
    if torch.isposinf(t).any():
        raise ValueError(f"potential {potential.name} returned +inf; scores must be finite or -inf")
    return t
