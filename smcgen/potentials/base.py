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

    # ------------------------------------------------------------------ next-token capability

    def next_token_mask(self, batch: SequenceBatch) -> Tensor | None:
        """Optional: bool ``[len(batch), V]``, the next tokens this factor does not rule out.

        Passed as an engine's ``guide``, a potential that implements this shapes the proposal: the
        target's own draws (and a draft's, on the native engine) are restricted to the allowed
        tokens and weighted by the masked log-normalizer, so particles are steered away from zeros
        instead of dying. The mask must allow every token after which the potential is not zero
        (a sound support), else the target loses mass. None (the default): no information.
        """
        return None

    @property
    def shapes_proposal(self) -> bool:
        """True when the potential can restrict next tokens (overrides :meth:`next_token_mask` or
        :meth:`request_bitmask`)."""
        cls = type(self)
        return (
            cls.next_token_mask is not Potential.next_token_mask or cls.request_bitmask is not Potential.request_bitmask
        )

    def for_logits(self, vocab_size: int, lm: Any = None, whose: str = "the target's") -> Potential:
        """Prepare the potential to mask logits of ``vocab_size`` columns (``lm``: the model, for
        its tokenizer); returns the potential to use. Checks a grammar's vocabulary, for instance."""
        self._guide_vocab_size = int(vocab_size)
        if lm is not None:
            self.guide_context(getattr(lm, "tokenizer", None), getattr(lm, "eos_token_ids", ()))
        return self

    def guide_context(self, decoder: Decoder | None, eos_token_ids: Sequence[int]) -> None:
        """The run's tokenizer (for ``batch.texts``) and EOS ids (a row's tokens end at its first
        EOS) for the default :meth:`request_bitmask`; engines call it."""
        self._guide_decoder = decoder
        self._guide_eos = tuple(int(e) for e in eos_token_ids)

    def token_automaton(self, max_bytes: int) -> Any:
        """Optional: this guide's next-token masks as a token-level automaton
        (:class:`~smcgen.potentials.token_dfa.TokenDFA` whose tables take at most ``max_bytes``), which
        a GPU engine steps on the device; or a string saying why there is none (the default: masks
        come from :meth:`next_token_mask` on the host)."""
        return f"{self.name} computes its masks on the host (it has no token automaton)"

    #: token ids this potential treats as end of sequence (a grammar's; none by default)
    eos_token_ids: tuple[int, ...] = ()

    def request_bitmask(self, sequences: Tensor, n_prompt: int) -> PendingMask:
        """Start computing the next-token bitmask (int32 ``[R, ceil(V/32)]``) of every row of
        ``sequences`` (prompt of ``n_prompt`` tokens included); collect it with ``.result()``.

        The default calls :meth:`next_token_mask` when the result is collected.
        """
        return PendingMask(self, sequences[:, n_prompt:].to("cpu", copy=True), list(sequences[0, :n_prompt].tolist()))

    def extend_bitmask(self, tokens: Tensor, length: int, out: Tensor) -> bool:
        """Optional fast path of :meth:`request_bitmask` for an engine that feeds every drawn token.

        Each row has consumed ``length - 1`` tokens (fewer when it ended at an EOS) through
        :meth:`start`, the masks asked before and :meth:`reorder`; ``tokens`` (int64 ``[R]``, CPU)
        is every row's next one. Write the next-token bitmasks after them into ``out`` (int32
        ``[R, ceil(V/32)]``, CPU) and return True, or return False without writing (the default,
        or rows that are not where the engine says): the engine then asks :meth:`request_bitmask`
        with the rows' whole tokens. It saves re-reading every row's history at every step.
        """
        return False

    def __mul__(self, other: Potential) -> Potential:
        if not isinstance(other, Potential):
            return NotImplemented
        return Product([self, other])

    @property
    def name(self) -> str:
        """Name used in error messages."""
        return type(self).__name__


class PendingMask:
    """A next-token mask requested before a model forward and computed when collected (after it)."""

    def __init__(self, potential: Potential, continuations: Tensor, prompt_ids: list[int]):
        self._potential = potential
        self._continuations = continuations
        self._prompt = prompt_ids
        self._value: Tensor | None = None

    def result(self) -> Tensor:
        """The int32 bitmask ``[R, ceil(V/32)]`` (CPU)."""
        if self._value is None:
            from smcgen.core.sampling import bitmask_from_allowed

            pot = self._potential
            vocab = getattr(pot, "_guide_vocab_size", None)
            if vocab is None:
                raise RuntimeError(f"potential {pot.name}: call for_logits(vocab_size) before requesting masks")
            eos = set(getattr(pot, "_guide_eos", ()))
            rows = []
            for r in self._continuations.tolist():
                end = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
                rows.append(r[:end])
            batch = SequenceBatch(rows, self._prompt, getattr(pot, "_guide_decoder", None), rows=list(range(len(rows))))
            allowed = pot.next_token_mask(batch)
            if allowed is None:
                allowed = torch.ones(len(batch), vocab, dtype=torch.bool)
            allowed = torch.as_tensor(allowed).detach().cpu()
            if allowed.shape != (len(batch), vocab):
                raise ValueError(
                    f"potential {pot.name}: next_token_mask returned shape {tuple(allowed.shape)}, "
                    f"expected [{len(batch)}, {vocab}] (particles x vocabulary)"
                )
            self._value = bitmask_from_allowed(allowed.bool())
        return self._value


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
        return _sum_scores(
            [(f, checked_scores(f, f.log_complete(batch), len(batch))) for f in self.factors], len(batch)
        )

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


def as_guide(guide: Any, mask: Any = None) -> Any:
    """An engine's one next-token guide: ``guide=``, or ``mask=`` (its older name); checked."""
    if guide is not None and mask is not None and guide is not mask:
        raise ValueError("give the next-token guide once: guide= (mask= is its older name)")
    guide = guide if guide is not None else mask
    if guide is not None and not (isinstance(guide, Potential) and guide.shapes_proposal):
        raise TypeError(
            "guide must be a Potential with a next-token mask (next_token_mask or request_bitmask, "
            f"e.g. a GrammarPotential), got {type(guide).__name__}"
        )
    return guide


class PotentialError(RuntimeError):
    """A potential raised while the engine scored particles; the message names it and the step."""


def scoring_error(potential: Potential, err: Exception, step: int | None) -> Exception:
    """The error to raise when ``potential`` failed at ``step``: a ValueError or TypeError (bad scores,
    the library's own checks of what a potential returned) keeps its type with the step prepended;
    any other exception becomes a :class:`PotentialError` naming the potential and the step, chained
    to the original."""
    where = f"step {step}: " if step is not None else ""
    if isinstance(err, (ValueError, TypeError)):
        try:
            return type(err)(f"{where}{err}")
        except TypeError:
            return ValueError(f"{where}{err}")
    return PotentialError(f"{where}potential {potential.name} raised {type(err).__name__}: {err}")


def score_particles(
    potential: Potential,
    token_ids: Sequence[Sequence[int]],
    finished: Sequence[bool],
    prompt_ids: Sequence[int],
    decoder: Decoder | None,
    rows: Sequence[int] | None = None,
) -> Tensor:
    """Checked float64 scores ``[len(token_ids)]``: ``log_complete`` for finished particles,
    ``log_prefix`` for the others (two batched calls at most); what both engines call."""
    out = torch.empty(len(token_ids), dtype=torch.float64)
    for want_complete in (False, True):
        pick = [i for i, f in enumerate(finished) if bool(f) == want_complete]
        if not pick:
            continue
        batch = SequenceBatch(
            [token_ids[i] for i in pick], prompt_ids, decoder, rows=None if rows is None else [rows[i] for i in pick]
        )
        fn = potential.log_complete if want_complete else potential.log_prefix
        out[pick] = checked_scores(potential, fn(batch), len(pick))
    return out


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
