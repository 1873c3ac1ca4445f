"""The Python grammar as a potential, compiled lazily against a vocabulary.

xgrammar's eager compile computes, for every position of every rule of a grammar, which tokens of
the vocabulary are accepted, rejected or uncertain there. The Python grammar
(:mod:`smcgen.grammars.python`) has about 2,400 normalised rules, so against a 49,152-token
vocabulary that precomputation took 3 to 9 minutes on a 2-core CPU, while a run visits only a few
hundred of those positions. With xgrammar's dynamic compilation the compile only parses and
normalises the grammar (milliseconds); each position's token classes are computed the first
time a mask is asked there and kept in the compiled grammar for every later mask, every row and
every run that shares the bound potential. The masks are the same as the eager compile's
(``tests/test_python_grammar_lazy.py`` compares them); the first mask at a new position costs
that position's share of the eager compile (BENCHMARKS.md, "Python grammar: lazy compile").

With ``finish_within`` set to the run's ``max_new_tokens``, the mask of a particle's last token
keeps only the tokens that end the text as a member of the language (a newline that closes a
comment or a statement, a closing fence, EOS). Every other token there leads to a text that is cut
unfinished and scores zero at the end, so restricting the proposal to the ending tokens leaves the
target unchanged (the weight is the mass of the tokens kept, as for any mask) and turns particles
that would die at the limit into members.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xgrammar as xgr
from torch import Tensor

from smcgen.grammars.python import python_grammar
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.grammar_matchers import MatcherRow
from smcgen.potentials.grammar_vocab import tokenizer_info

__all__ = ["PythonGrammarPotential", "lazy_compiler"]

# id(TokenizerInfo) -> (the info kept alive, its lazy GrammarCompiler)
_LAZY_COMPILERS: dict[int, tuple[Any, Any]] = {}
_LAZY_LOCK = threading.Lock()


def lazy_compiler(info: Any) -> Any:
    """The one xgrammar compiler with dynamic (on-first-use) mask caches for ``info`` (cached per vocabulary)."""
    with _LAZY_LOCK:
        hit = _LAZY_COMPILERS.get(id(info))
        if hit is not None and hit[0] is info:
            return hit[1]
        compiler = xgr.GrammarCompiler(info, max_threads=2, enable_dynamic_compilation=True)
        if len(_LAZY_COMPILERS) >= 8:
            _LAZY_COMPILERS.pop(next(iter(_LAZY_COMPILERS)))
        _LAZY_COMPILERS[id(info)] = (info, compiler)
        return compiler


class PythonGrammarPotential(GrammarPotential):
    """:meth:`GrammarPotential.python`, compiled lazily: binding to a vocabulary takes milliseconds.

    Build with :meth:`build` (or :meth:`GrammarPotential.python` on this class). Everything but
    :meth:`bind` is :class:`GrammarPotential`'s: the same language, scores, masks and per-row
    states. ``lazy=False`` compiles every mask entry up front, as ``GrammarPotential.python`` does.
    """

    def __init__(self, grammar: Any, kind: str, source: str, *, threads: int | str = "auto", lazy: bool = True):
        super().__init__(grammar, kind, source, threads=threads)
        self.lazy = lazy
        self._ending_tokens: np.ndarray | None = None  # ids whose text can end a body (see _ending)

    @classmethod
    def build(
        cls,
        vocab: Any = None,
        *,
        depth: int = 8,
        indent: str = "    ",
        start: str = "body",
        fence: bool = True,
        lazy: bool = True,
        **bind_kw: Any,
    ) -> PythonGrammarPotential:
        """Python 3.10+ source (``start="body"``: a function body after its ``def`` line; ``"module"``).

        ``depth``, ``indent``, ``fence``: as in :func:`smcgen.grammars.python.python_grammar`.
        ``vocab`` (a model, tokenizer or token list, with ``vocab_size``/``eos_token_ids`` in
        ``bind_kw``) binds it at once; ``lazy`` chooses the dynamic compile (default) or the eager one.
        """
        if not isinstance(lazy, bool):
            raise ValueError(f"lazy must be True or False, got {lazy!r}")
        g = cls.ebnf(python_grammar(depth, indent, start, fence))
        g.lazy = lazy
        return cls._maybe_bind(g, vocab, bind_kw)

    @property
    def counts_down_budget(self) -> bool:
        """The last-token mask reads ``finish_within``: the engine sets it before each run."""
        return True

    def bind(
        self, vocab: Any, *, vocab_size: int | None = None, eos_token_ids: Sequence[int] | None = None
    ) -> GrammarPotential:
        """A copy compiled against ``vocab`` (see :meth:`GrammarPotential.bind`); cached per vocabulary."""
        if self.lazy and self._info is not None:
            info, _, _ = tokenizer_info(vocab, vocab_size, eos_token_ids)
            if info is self._info:  # already bound to this vocabulary
                return self
        return super().bind(vocab, vocab_size=vocab_size, eos_token_ids=eos_token_ids)

    def _compiler_for(self, info: Any, compiler: Any) -> Any:
        return lazy_compiler(info) if self.lazy else compiler

    def _unbound_copy(self) -> GrammarPotential:
        # lazy or eager, the bound copy keeps this class: its last-token mask and budget flag
        return type(self)(self._grammar, self.kind, self.source, threads=self._threads, lazy=self.lazy)

    def _ending(self) -> np.ndarray:
        """Token ids that can end a text of this grammar: every statement, comment and blank line ends
        with a newline and the closing fence with backticks, so only tokens ending in either can
        complete it (or EOS after a complete text). A filter only: each one is still tried."""
        if self._ending_tokens is None:
            vocab = self._info.decoded_vocab
            ids = [i for i, b in enumerate(vocab) if bytes(b).endswith((b"\n", b"`"))]
            ids += [e for e in self.eos_token_ids if e < self.vocab_size]
            self._ending_tokens = np.array(sorted(set(ids)), dtype=np.int64)
        return self._ending_tokens

    def _narrow_to_budget(self, out: Tensor, i: int, row: MatcherRow) -> None:
        """At the last token of the budget, keep only the tokens that complete the text (the
        last-token mask); ``row`` is live and has consumed ``row.tokens``."""
        if len(row.tokens) != self.finish_within - 1:
            return
        words = out[i].numpy().view(np.uint32)
        cand = self._ending()
        cand = cand[(words[cand >> 5] >> (cand & 31).astype(np.uint32)) & 1 == 1]
        keep = []
        for t in cand.tolist():
            if row.matcher.accept_token(t):
                if row.matcher.is_completed() or row.matcher.is_terminated():
                    keep.append(t)
                row.matcher.rollback(1)
        if not keep:  # no token ends it here: the particle is cut unfinished and scores zero anyway
            return
        ids = np.array(keep, dtype=np.int64)
        new = np.zeros_like(words)
        np.bitwise_or.at(new, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
        out[i] = torch.from_numpy(new.view(np.int32))
