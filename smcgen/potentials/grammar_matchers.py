"""The per-particle state of a grammar potential: one xgrammar matcher per row.

A row's matcher follows the row's tokens; resampling forks the matchers of duplicated rows
(``reorder``). The states are an accelerator only: each call checks that a row's cached tokens
are a prefix of the tokens asked about and replays the tokens from the start otherwise, so
scores never depend on the hooks being called. ``GrammarStats`` counts where that CPU time goes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from smcgen.potentials.base import SequenceBatch
from smcgen.potentials.grammar_vocab import xgr

__all__ = ["GrammarStats", "MatcherRow", "MatcherRows"]


@dataclass
class GrammarStats:
    """Where the grammar's CPU time goes, accumulated over runs (``reset()`` to clear).

    ``mask_rows``: particle-steps whose next-token mask was computed, in ``mask_seconds``;
    ``forks``: matcher forks by resampling, in ``fork_seconds``; ``tokens``: tokens advanced, in
    ``advance_seconds``; ``rebuilds``: rows whose cached state did not match and was replayed.
    """

    mask_rows: int = 0
    mask_seconds: float = 0.0
    forks: int = 0
    fork_seconds: float = 0.0
    tokens: int = 0
    advance_seconds: float = 0.0
    rebuilds: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())

    @property
    def mask_us_per_row(self) -> float:
        """Mean mask latency per particle-step in microseconds (advance excluded)."""
        return 1e6 * self.mask_seconds / self.mask_rows if self.mask_rows else float("nan")


class MatcherRow:
    """One particle's grammar state: a matcher that has consumed ``tokens`` (while ``alive``)."""

    __slots__ = ("alive", "matcher", "reason", "tokens")

    def __init__(self, matcher: Any, tokens: list[int], alive: bool, reason: str | None = None):
        self.matcher = matcher
        self.tokens = tokens
        self.alive = alive
        self.reason = reason

    def fork(self) -> MatcherRow:
        return MatcherRow(self.matcher.fork(), list(self.tokens), self.alive, self.reason)


class MatcherRows:
    """The per-row matcher states of ``GrammarPotential`` (a mixin placed before ``Potential``).

    Expects the bound grammar's fresh matcher ``_initial`` and TokenizerInfo ``_info``, the
    ``_threads`` setting of the batch mask filler, a ``threading.local`` ``_local``, ``stats`` and
    ``_need_bound``.
    """

    _local: threading.local
    _threads: int | str
    _initial: Any
    _info: Any
    stats: GrammarStats
    eos_token_ids: tuple[int, ...]
    _need_bound: Callable[[], None]

    # A run's states live in the calling thread's slot: the engine calls start / reorder / scores /
    # masks of one run from one thread, and concurrent runs (threads) sharing this bound grammar
    # must not advance or replace each other's matchers (they did: 2-3 of 8 concurrent seeded runs
    # drew differently from the sequential ones).
    @property
    def _rows(self) -> list[MatcherRow]:
        rows = getattr(self._local, "rows", None)
        if rows is None:
            rows = self._local.rows = []
        return rows

    @_rows.setter
    def _rows(self, rows: list[MatcherRow]) -> None:
        self._local.rows = rows

    @property
    def _batch(self) -> Any:
        """This thread's batched mask filler (it holds scratch state, so it is not shared either)."""
        batch = getattr(self._local, "batch", None)
        if batch is None:
            batch = self._local.batch = xgr.BatchGrammarMatcher(max_threads=self._threads)
        return batch

    def _fresh(self) -> MatcherRow:
        return MatcherRow(self._initial.fork(), [], True)

    def _advance(self, row: MatcherRow, tokens: list[int]) -> None:
        """Feed ``tokens[len(row.tokens):]`` to the row's matcher (``tokens`` extends ``row.tokens``)."""
        self._feed(row, tokens[len(row.tokens) :])

    def _feed(self, row: MatcherRow, new: list[int]) -> None:
        """Feed ``new`` tokens after ``row.tokens``; the row leaves the language (with the reason) at
        the first one its matcher rejects, and records every token either way."""
        if not new:
            return
        t0 = time.perf_counter()
        if row.alive:
            m = row.matcher
            for j, t in enumerate(new):
                if m.is_terminated() or not m.accept_token(t):
                    row.alive = False
                    pos = len(row.tokens) + j
                    row.reason = (
                        f"token {t} ({self._token_text(t)}) at position {pos} is not allowed by the grammar"
                        if not m.is_terminated()
                        else f"token {t} at position {pos} follows the end of the grammar"
                    )
                    break
        row.tokens.extend(new)
        self.stats.tokens += len(new)
        self.stats.advance_seconds += time.perf_counter() - t0

    def _extended(self, tokens: list[int], length: int) -> list[MatcherRow] | None:
        """The rows after each consumed one more token (``tokens[r]`` for row r), or None (nothing
        fed) when a row has not consumed ``length - 1`` tokens: the caller rebuilds from whole rows.
        A row that ended at an EOS stays as it is (what follows an EOS is padding)."""
        rows = self._rows
        eos = self.eos_token_ids
        if len(rows) != len(tokens):
            return None
        for r in rows:
            n = len(r.tokens)
            if n != length - 1 and not (n < length and n and r.tokens[-1] in eos):
                return None
        for r, t in zip(rows, tokens):
            if not (r.tokens and r.tokens[-1] in eos):
                self._feed(r, [t])
        return rows

    def _synced(self, row: MatcherRow | None, tokens: list[int]) -> MatcherRow:
        """A state that has consumed exactly ``tokens``: ``row`` advanced, or rebuilt from the start."""
        n = len(row.tokens) if row is not None else 0
        if row is None or len(tokens) < n or tokens[:n] != row.tokens:
            if row is not None:
                self.stats.rebuilds += 1
            row = self._fresh()
        self._advance(row, tokens)
        return row

    def _row(self, index: int, tokens: list[int]) -> MatcherRow:
        while len(self._rows) <= index:
            self._rows.append(self._fresh())
        row = self._synced(self._rows[index], tokens)
        self._rows[index] = row
        return row

    def _rows_for(self, batch: SequenceBatch) -> list[MatcherRow]:
        self._need_bound()
        rows = batch.rows
        if rows is None:
            return [self._synced(None, list(t)) for t in batch.token_ids]
        return [self._row(int(r), list(t)) for r, t in zip(rows, batch.token_ids)]

    def start(self, prompt_ids: Sequence[int], n_rows: int) -> None:
        self._need_bound()
        self._rows = [self._fresh() for _ in range(n_rows)]

    def reorder(self, rows: Tensor) -> None:
        t0 = time.perf_counter()
        taken: set[int] = set()
        new: list[MatcherRow] = []
        forks = 0
        for r in rows.tolist():
            if r >= len(self._rows):
                new.append(self._fresh())
                continue
            if r in taken:
                new.append(self._rows[r].fork())
                forks += 1
            else:
                taken.add(r)
                new.append(self._rows[r])
        self._rows = new
        self.stats.forks += forks
        self.stats.fork_seconds += time.perf_counter() - t0

    def _token_text(self, token: int) -> str:
        try:
            return repr(bytes(self._info.decoded_vocab[token]).decode("utf-8", errors="replace"))
        except (IndexError, TypeError, AttributeError):
            return "?"
