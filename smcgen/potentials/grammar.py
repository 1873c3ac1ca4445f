"""Grammar potentials: Psi(x) = 1 when x is in a regular or context-free language, else 0.

Backed by xgrammar (chosen over outlines-core by measurement, see BENCHMARKS.md: it compiles
context-free grammars, and forking a matcher state costs microseconds). One xgrammar matcher
per particle row follows the row's tokens; when resampling duplicates a particle its matcher is
forked (:meth:`GrammarPotential.reorder`). The state cache is only an accelerator: every call
re-checks that a row's cached tokens are a prefix of the tokens it is asked about and rebuilds
the state otherwise, so results never depend on the hooks being called. The per-row states
belong to the run, not to the shared bound grammar: they are kept per calling thread (a run's
calls all come from the thread that runs it), so concurrent ``generate`` calls sharing one grammar
never advance each other's matchers. The per-row states live in ``grammar_matchers``, the
vocabulary's compiler cache in ``grammar_vocab``.

Scores (log space): ``log_prefix`` is 0 while the tokens can still be completed to a member of
the language and ``-inf`` once a token is rejected; ``log_complete`` is 0 when the sequence is a
member: it ended with an EOS token that the grammar accepted (EOS is allowed only where the
language can end) or it reached the length limit exactly at a complete string. Special tokens
other than EOS are never allowed.

As a plain factor the potential works with any proposal (particles that leave the language get
weight zero). For locally constrained proposals it also gives next-token bitmasks, batched over
rows as int32 ``[R, ceil(V/32)]`` in xgrammar's layout (bit ``v % 32`` of word ``v // 32``,
1 = allowed): :class:`smcgen.proposals.MaskedLMProposal` masks a draft with it and
``SMC(..., mask=g)`` draws the target's tokens from the masked target.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from smcgen.core.sampling import bitmask_width
from smcgen.potentials.base import Potential, SequenceBatch
from smcgen.potentials.errors import GrammarError, engine_message, with_caret
from smcgen.potentials.grammar_dfa import DEFAULT_MAX_BYTES, build_token_dfa, sub_rules_are_a_tree
from smcgen.potentials.grammar_matchers import GrammarStats, MatcherRow, MatcherRows
from smcgen.potentials.grammar_vocab import tokenizer_info, xgr
from smcgen.potentials.json_budget import (
    MASK_HORIZON,
    TokenCapacity,
    budget_forbidden,
    budget_twist,
    string_specials,
)
from smcgen.potentials.json_schema import LoweredSchema, lower_json_schema
from smcgen.potentials.token_dfa import TokenDFA

# the old private name of tokenizer_info (benchmarks/json_schema_eval.py imports it from here)
_tokenizer_info = tokenizer_info

__all__ = ["GrammarError", "GrammarPotential", "GrammarStats", "PendingBitmask"]


def _parse(label: str, source: str, build: Any) -> Any:
    """``build(source)``, with xgrammar's parse error re-raised as a GrammarError pointing into ``source``."""
    try:
        return build(source)
    except RuntimeError as err:
        raise GrammarError(f"invalid {label}: {with_caret(source, engine_message(err))}") from None


class PendingBitmask:
    """A next-token bitmask requested before the model forward and collected after it.

    The token ids are copied to the host when the request is made (before the forward is
    launched); turning them into per-row lists and computing the masks happen in :meth:`result`,
    which a GPU engine calls after launching the forward, so the CPU work overlaps the device's.
    On the CPU backend the forward is synchronous and nothing overlaps.
    """

    def __init__(self, potential: GrammarPotential, continuations: Tensor):
        self._potential = potential
        self._continuations = continuations
        self._value: Tensor | None = None

    def result(self) -> Tensor:
        if self._value is None:
            token_ids = self._potential._token_ids_of(self._continuations)
            self._value = self._potential._bitmask_for(token_ids)
        return self._value


class GrammarPotential(MatcherRows, Potential):
    """Psi(x) = 1 if the text of x is in the language of a regex, JSON schema or grammar, else 0.

    Build with :meth:`regex`, :meth:`json_schema`, :meth:`ebnf` or :meth:`lark`. The source is
    parsed at once (invalid input raises :class:`GrammarError` naming what and where); it is
    compiled against a vocabulary when bound, either right away (pass ``vocab``: a
    :class:`smcgen.LanguageModel`, a Hugging Face tokenizer, or a list of token strings with
    ``eos_token_ids``) or later with :meth:`bind` (``smcgen.generate(grammar=...)`` binds to the
    target). One bound potential may serve concurrent runs in different threads: the particles'
    matcher states are kept per thread (see :class:`Potential` for the contract).
    """

    def __init__(self, grammar: Any, kind: str, source: str, *, threads: int | str = "auto"):
        self._grammar = grammar
        self.kind = kind
        self.source = source
        self._threads = threads
        self._info: Any = None
        self._compiled: Any = None
        self.vocab_size: int = 0
        self.eos_token_ids: tuple[int, ...] = ()
        # per-run state (row matchers, the batch mask filler): one per calling thread, see MatcherRows
        self._local = threading.local()
        self._initial: Any = None
        # keyed by the compiled vocabulary (tokenizer, logit width, EOS ids), not by the object passed:
        # a target and a draft sharing a tokenizer get one bound copy, hence one set of matchers
        self._bound_copies: dict[int, tuple[Any, GrammarPotential]] = {}
        self.stats = GrammarStats()
        # JSON schemas: the exact validator that completes a looser grammar (None for other kinds)
        self.schema: LoweredSchema | None = None
        # what a finished text is parsed into (smcgen.potentials.output.as_grammar sets it)
        self.output_type: Any = None
        self._vocab_bytes: list[bytes] | None = None
        # max_new_tokens of the run: the budget twist of JSON schemas, the last-token mask of Python (None: off)
        self.finish_within: int | None = None
        self._token_capacity: tuple[TokenCapacity, np.ndarray, np.ndarray] | None = None
        # token automata built by token_automaton, per memory budget (an automaton or why there is none)
        self._automata: dict[int, TokenDFA | str] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def regex(cls, pattern: str, vocab: Any = None, **bind_kw: Any) -> GrammarPotential:
        """The language of a regular expression (full match; xgrammar's syntax: no lookaround or backreferences)."""
        if not isinstance(pattern, str):
            raise GrammarError(f"a regex must be a string, got {type(pattern).__name__}")
        grammar = _parse(f"regex {pattern!r}", pattern, xgr.Grammar.from_regex)
        return cls._maybe_bind(cls(grammar, "regex", pattern), vocab, bind_kw)

    @classmethod
    def json_schema(
        cls,
        schema: Any,
        vocab: Any = None,
        *,
        any_whitespace: bool = True,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        max_whitespace: int | None = None,
        **bind_kw: Any,
    ) -> GrammarPotential:
        """JSON documents valid under a schema: a pydantic model class, a dict or JSON text.

        Properties come in the schema's order and no properties or items beyond the schema's are
        generated (xgrammar's strict mode). ``any_whitespace`` allows any whitespace between tokens
        (at most ``max_whitespace`` characters in a row when set); otherwise the layout follows
        ``indent`` and ``separators`` as in ``json.dumps``. Annotations and unknown keywords are
        ignored and unknown formats generated as plain strings, as the specification says (with a
        :class:`~smcgen.potentials.json_schema.SchemaWarning`); keywords the grammar cannot
        generate are enforced on every finished document by an exact validator, so the
        potential is exactly "valid against the schema" (:attr:`checked_after` names them).
        Schemas that cannot be generated or checked raise :class:`GrammarError` with JSON pointers.
        """
        lowered = lower_json_schema(schema)
        text = json.dumps(lowered.grammar_schema)
        try:
            grammar = xgr.Grammar.from_json_schema(
                text,
                any_whitespace=any_whitespace,
                indent=indent,
                separators=separators,
                strict_mode=True,
                max_whitespace_cnt=max_whitespace,
            )
        except RuntimeError as err:
            raise GrammarError(f"invalid JSON schema: {engine_message(err)}") from None
        name = schema.__name__ if isinstance(schema, type) else "schema"
        g = cls(grammar, "json_schema", f"{name}: {json.dumps(lowered.schema)}")
        g.schema = lowered
        return cls._maybe_bind(g, vocab, bind_kw)

    @classmethod
    def ebnf(cls, grammar: str, vocab: Any = None, *, root: str = "root", **bind_kw: Any) -> GrammarPotential:
        """A context-free grammar in xgrammar's EBNF (GBNF): ``root ::= "a" rule | [0-9]+``."""
        parsed = _parse("EBNF grammar", grammar, lambda g: xgr.Grammar.from_ebnf(g, root_rule_name=root))
        return cls._maybe_bind(cls(parsed, "ebnf", grammar), vocab, bind_kw)

    @classmethod
    def lark(cls, grammar: str, vocab: Any = None, **bind_kw: Any) -> GrammarPotential:
        """A context-free grammar in Lark syntax (a ``start`` rule; terminals, regexes, ``%ignore``)."""
        parsed = _parse("Lark grammar", grammar, xgr.Grammar.from_lark)
        return cls._maybe_bind(cls(parsed, "lark", grammar), vocab, bind_kw)

    @classmethod
    def python(cls, vocab: Any = None, **kwargs: Any) -> GrammarPotential:
        """Python 3.10+ code: a function's body after its ``def`` line, or a module (:mod:`smcgen.grammars.python`).

        Returns a :class:`~smcgen.potentials.python_grammar.PythonGrammarPotential`; the keywords
        (``depth``, ``indent``, ``start``, ``fence``, ``lazy`` and the binding ones) are those of
        :meth:`PythonGrammarPotential.build <smcgen.potentials.python_grammar.PythonGrammarPotential.build>`.
        Compiled lazily when bound (milliseconds; each mask position is built on first use), or
        eagerly with ``lazy=False`` (minutes against a 49k-token vocabulary). The masks are the same.
        """
        from smcgen.potentials.python_grammar import PythonGrammarPotential  # it subclasses this class

        return PythonGrammarPotential.build(vocab, **kwargs)

    @staticmethod
    def _maybe_bind(g: GrammarPotential, vocab: Any, bind_kw: dict[str, Any]) -> GrammarPotential:
        if vocab is None:
            if bind_kw:
                raise TypeError(f"{sorted(bind_kw)} only apply together with vocab")
            return g
        return g.bind(vocab, **bind_kw)

    def bind(
        self, vocab: Any, *, vocab_size: int | None = None, eos_token_ids: Sequence[int] | None = None
    ) -> GrammarPotential:
        """A copy compiled against ``vocab`` (cached: binding to the same vocabulary again, through this or
        another model with that tokenizer, logit width and EOS ids, returns the same copy).

        ``vocab``: a :class:`smcgen.LanguageModel` (tokenizer, logit width and EOS ids taken from it),
        a Hugging Face tokenizer, or a list of token strings (index = token id, ``None`` or ``""``
        for special tokens). ``vocab_size`` is the width of the model's logits (the bitmask covers
        it); ``eos_token_ids`` end a sequence (default: the model's / tokenizer's EOS).
        """
        info, compiler, size = tokenizer_info(vocab, vocab_size, eos_token_ids)
        hit = self._bound_copies.get(id(info))
        if hit is not None and hit[0] is info:
            return hit[1]
        try:
            compiled = self._compiler_for(info, compiler).compile_grammar(self._grammar)
        except RuntimeError as err:
            raise GrammarError(f"cannot compile the {self.kind} grammar: {engine_message(err)}") from None
        g = self._unbound_copy()
        g._info, g._compiled, g.vocab_size = info, compiled, size
        g.eos_token_ids = tuple(int(e) for e in info.stop_token_ids)
        g._initial = xgr.GrammarMatcher(compiled, override_stop_tokens=list(g.eos_token_ids))
        self._bound_copies[id(info)] = (info, g)
        return g

    def _compiler_for(self, info: Any, compiler: Any) -> Any:
        """The xgrammar compiler :meth:`bind` uses for ``info`` (``compiler``: the shared eager one)."""
        return compiler

    def _unbound_copy(self) -> GrammarPotential:
        """A fresh, unbound potential of the same grammar, which :meth:`bind` compiles."""
        g = GrammarPotential(self._grammar, self.kind, self.source, threads=self._threads)
        g.schema, g.output_type = self.schema, self.output_type
        return g

    @property
    def checked_after(self) -> tuple[str, ...]:
        """The schema parts (``"<JSON pointer>: <keyword>"``) that the mask does not enforce and the
        exact validator checks on each finished document; empty when the grammar alone is exact."""
        return self.schema.checked_after if self.schema is not None else ()

    def parse(self, text: str) -> Any:
        """``text`` parsed as the output type this grammar was built from (a pydantic object, an
        Enum member, a JSON value), or None when it was built from a grammar without one."""
        from smcgen.potentials.json_schema import parse_as

        if self.output_type is None and self.schema is None:
            return None
        return parse_as(self.output_type, text)

    @property
    def bound(self) -> bool:
        """Whether the potential is compiled against a vocabulary (needed to score and mask)."""
        return self._compiled is not None

    def for_logits(self, vocab_size: int, lm: Any = None, whose: str = "the target's") -> GrammarPotential:
        """This grammar as a mask over ``vocab_size`` logits: bound to ``lm`` first when unbound.

        Without ``lm`` an unbound grammar is an error (the native engine has no tokenizer to bind
        to); a grammar compiled for another vocabulary size is one too.
        """
        g = self
        if not g.bound:
            if lm is None:
                raise ValueError("bind the grammar to the tokenizer first (GrammarPotential.bind)")
            g = g.bind(lm)
        if g.vocab_size != vocab_size:
            raise ValueError(f"the grammar is compiled for {g.vocab_size} tokens but {whose} logits have {vocab_size}")
        return g

    @property
    def name(self) -> str:
        short = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"GrammarPotential({self.kind}: {short!r})"

    def _need_bound(self) -> None:
        if self._compiled is None:
            raise RuntimeError(
                f"{self.name} is not bound to a vocabulary; call .bind(model_or_tokenizer) or pass it to "
                "smcgen.generate(grammar=...), which binds it to the target"
            )

    # ------------------------------------------------------------------ scores
    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        rows = self._rows_for(batch)
        scores = [0.0 if r.alive else -math.inf for r in rows]
        if self.finish_within is not None and self.schema is not None:
            # the budget twist: a finite score on prefixes only, so it telescopes out of the weights and
            # leaves the target unchanged, but resampling favours particles that can still close in time
            capacity = self._capacity()[0]
            for i, tokens in enumerate(batch.token_ids):
                if rows[i].alive:
                    left = self.finish_within - len(tokens)
                    scores[i] = budget_twist(self._text(tokens), left, self.schema, capacity)
        return torch.tensor(scores, dtype=torch.float64)

    def log_complete(self, batch: SequenceBatch) -> Tensor:
        out = []
        for r, tokens in zip(self._rows_for(batch), batch.token_ids):
            ok = r.alive and (r.matcher.is_terminated() or r.matcher.is_completed())
            # a JSON schema's grammar may be looser than the schema: the exact validator decides
            ok = ok and (self.schema is None or self.schema.violation(self._text(tokens)) is None)
            out.append(0.0 if ok else -math.inf)
        return torch.tensor(out, dtype=torch.float64)

    @property
    def counts_down_budget(self) -> bool:
        """Whether the guide reads ``finish_within`` (the run's ``max_new_tokens``), which the engine
        sets before each run: JSON schemas do (their budget twist and mask)."""
        return self.schema is not None

    def _capacity(self) -> tuple[TokenCapacity, np.ndarray, np.ndarray]:
        """What the budget mask needs of the bound vocabulary (computed once): what one token holds
        (the lower bound's divisors), which tokens hold a quote or backslash, and which ids may be
        dropped at all (tokens with text, not EOS)."""
        if self._token_capacity is None:
            self._text([])
            vocab = self._vocab_bytes or []
            usable = np.zeros(self.vocab_size, dtype=bool)
            usable[: len(vocab)] = True
            usable[[e for e in self.eos_token_ids if 0 <= e < self.vocab_size]] = False
            self._token_capacity = (TokenCapacity.of(vocab), string_specials(vocab), usable)
        return self._token_capacity

    def _budget_mask(self, out: Tensor, row: int, tokens: list[int]) -> None:
        """Clear the bits of row ``row`` for tokens after which the document cannot end within the
        budget (exact: those continuations have zero target mass; see json_budget.budget_forbidden)."""
        after = self.finish_within - len(tokens) - 1
        if after > MASK_HORIZON or after < 0:
            return
        words = out[row].numpy()
        capacity, specials, usable = self._capacity()  # also reads the vocabulary's bytes
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        candidates = np.flatnonzero(bits & usable)
        forbidden = budget_forbidden(
            self._text(tokens), candidates, self._vocab_bytes or [], after, self.schema, capacity, specials
        )
        if forbidden.size:  # clear their bits in place, one packed AND over the row
            drop = np.zeros(words.size * 32, dtype=bool)
            drop[forbidden] = True
            words &= ~np.packbits(drop, bitorder="little").view(words.dtype)

    def _text(self, tokens: Sequence[int]) -> str:
        """The text of generated token ids (EOS and special tokens contribute nothing)."""
        if self._vocab_bytes is None:
            self._vocab_bytes = [bytes(b) for b in self._info.decoded_vocab]
        eos, vocab = set(self.eos_token_ids), self._vocab_bytes
        return b"".join(vocab[t] for t in tokens if t not in eos and 0 <= t < len(vocab)).decode("utf-8", "replace")

    def explain_zero(self, token_ids: Sequence[int], finished: bool) -> str | None:
        self._need_bound()
        row = self._synced(None, list(token_ids))
        if not row.alive:
            return row.reason
        if finished and not (row.matcher.is_terminated() or row.matcher.is_completed()):
            return f"the text after {len(token_ids)} tokens is an unfinished {self.kind} string (length limit reached?)"
        if finished and self.schema is not None:
            why = self.schema.violation(self._text(token_ids))
            if why is not None:
                return f"the JSON fails the schema check after generation: {why}"
        return None

    # ------------------------------------------------------------------ masks
    def token_automaton(self, max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = False) -> TokenDFA | str:
        """This grammar as a token-level automaton (:class:`~smcgen.potentials.token_dfa.TokenDFA`,
        built once per budget and cached), or a string saying why it has none: its language is not
        regular in the matcher's terms (a JSON Schema's nested rules, a context-free grammar) or the
        tables exceed ``max_bytes``. The automaton's masks are this grammar's host masks exactly."""
        self._need_bound()
        hit = self._automata.get(max_bytes)
        if hit is None:
            hit = build_token_dfa(
                self._initial,
                list(self._info.decoded_vocab),
                self.vocab_size,
                self.eos_token_ids,
                max_bytes,
                progress,
                tree=sub_rules_are_a_tree(str(self._grammar)),
            )
            if isinstance(hit, TokenDFA):
                # a JSON Schema's exact validator also decides the end: the engine keeps it on the host
                hit.complete_is_exact = self.schema is None
            self._automata[max_bytes] = hit
        return hit

    def _token_ids_of(self, continuations: Tensor) -> list[list[int]]:
        """Each row's tokens up to and including its first EOS (what follows an EOS is padding)."""
        ends = [continuations.shape[1]] * continuations.shape[0]
        if self.eos_token_ids and continuations.numel():
            is_eos = torch.isin(continuations, torch.tensor(list(self.eos_token_ids), dtype=continuations.dtype))
            first = is_eos.int().argmax(dim=1) + 1
            ends = torch.where(is_eos.any(dim=1), first, continuations.shape[1]).tolist()
        return [r[:e] for r, e in zip(continuations.tolist(), ends)]

    def request_bitmask(self, sequences: Tensor, n_prompt: int) -> PendingBitmask:
        """Start computing the next-token bitmask of every row of ``sequences`` (prompt included).

        Call before launching the model forward and :meth:`PendingBitmask.result` after it: the
        token ids are read now, the masks computed on the CPU when the result is collected.
        """
        self._need_bound()
        return PendingBitmask(self, sequences[:, n_prompt:].to("cpu", copy=True))

    def next_token_bitmask(self, sequences: Tensor, n_prompt: int) -> Tensor:
        """int32 ``[R, ceil(V/32)]`` (CPU): bit v of row r set iff token v may follow row r.

        ``sequences`` are the run's rows (prompt of ``n_prompt`` tokens included); row r uses the
        state cached for row r (advanced, or rebuilt when it does not match). Rows that ended (EOS)
        or already left the language get an all-ones mask: their draws are ignored.
        """
        return self.request_bitmask(sequences, n_prompt).result()

    def extend_bitmask(self, tokens: Tensor, length: int, out: Tensor) -> bool:
        self._need_bound()
        rows = self._extended(tokens.tolist(), length)
        if rows is None:
            return False
        self._fill(rows, out)
        return True

    def _bitmask_for(self, token_ids: list[list[int]]) -> Tensor:
        states = [self._row(i, t) for i, t in enumerate(token_ids)]
        # numpy fills it on this thread: torch.full goes parallel above 32k elements (R >= 22 rows of a
        # 49k vocabulary) and waking its OpenMP pool cost 30-60 ms per step on a loaded 2-core host
        out = torch.from_numpy(np.full((len(states), bitmask_width(self.vocab_size)), -1, dtype=np.int32))
        self._fill(states, out, cleared=True)
        return out

    def _fill(self, states: list[MatcherRow], out: Tensor, cleared: bool = False) -> None:
        """Write each row's next-token bitmask into ``out``: the grammar's (and the JSON budget's)
        for live rows, all ones for rows that ended or left the language (their draws are ignored;
        ``cleared``: ``out`` is all ones already)."""
        live = [i for i, s in enumerate(states) if s.alive and not s.matcher.is_terminated()]
        if not cleared and len(live) < len(states):
            alive = set(live)
            out[[i for i in range(len(states)) if i not in alive]] = -1
        if live:
            t0 = time.perf_counter()
            self._batch.batch_fill_next_token_bitmask([states[i].matcher for i in live], out, live)
            if self.finish_within is not None:
                for i in live:
                    self._narrow_to_budget(out, i, states[i])
            self.stats.mask_seconds += time.perf_counter() - t0
            self.stats.mask_rows += len(live)

    def _narrow_to_budget(self, out: Tensor, i: int, row: MatcherRow) -> None:
        """Clear from live row ``i``'s grammar mask the tokens after which no text can end within
        ``finish_within`` tokens (exact: they have zero target mass): a JSON schema's budget mask."""
        if self.schema is not None:
            self._budget_mask(out, i, row.tokens)
