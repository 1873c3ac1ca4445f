"""The budget twist of Python bodies: push particles to end their code within ``max_new_tokens``.

A function body cut at the token limit in the middle of a statement, a string, a bracket or a
trailing comment is not a member of the grammar, so the particle scores zero at the end; when
every particle of a sample is cut, the sample is dead. :class:`PythonBudgetTwist` is a finite
score on *prefixes* only (its score on a finished text is 1): it telescopes out of the SMC weights
and leaves the target unchanged, as the JSON schemas' twist does
(:mod:`smcgen.potentials.json_budget`, whose :func:`shortfall_twist` it shares), and only changes
which particles resampling keeps as the budget runs out: those that can end in the tokens left.

:func:`closing_need` estimates how many tokens a body prefix needs at least to end: one per
closer (the open string's quote, each open bracket, the newline of an unfinished line or
comment), one for an operand after a dangling operator or keyword (``x = a +``, ``return a if``),
:data:`SUITE_TOKENS` for a block header still waiting for its first statement (``if x:``, or an
empty body), and the EOS token. It reads the text with its own small lexer (strings, comments,
brackets, line continuations). It is an estimate, not a bound (one token may close several
brackets and the line); the twist needs none, since it cancels at completion whatever it is.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from smcgen.potentials.base import Potential, SequenceBatch
from smcgen.potentials.json_budget import TWIST_NATS_PER_TOKEN, shortfall_twist

__all__ = ["PythonBudgetTwist", "closing_need"]

SUITE_TOKENS = 2  # a block's shortest first statement: its indentation and "pass", then the newline
PYTHON_TWIST_MARGIN = 12  # tokens of slack asked for; Python lines run 8-15 tokens, longer than JSON values
# keywords after which an operand (or a colon) must follow: a line ending in one is unfinished
_DANGLING_WORDS = frozenset(
    "and or not in is if elif else while for with lambda import from as def class del global nonlocal "
    "assert await except async match case".split()
)
_DANGLING_CHARS = frozenset("=+-*/%&|^<>~@.!\\")
_FENCE_END = re.compile(r"\n```[^\n]*\n?$")


def closing_need(text: str) -> int:
    """Tokens a function-body prefix needs at least to end (an estimate; see the module docstring)."""
    if _FENCE_END.search(text):  # the closing code fence ends the text: only EOS is left
        return 1
    quote = ""  # the open string's delimiter
    comment = False
    brackets = 0
    line_code = False  # the current logical line holds code
    last = ""  # its last significant token (a word or a punctuation character)
    statements = 0  # finished logical lines with code
    suite_open = False  # the last finished code line was a block header (ends with ":")
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote, last = "", "str"
                continue
            i += 1
            continue
        if comment:
            if ch != "\n":
                i += 1
                continue
            comment = False
        if ch == "#":
            comment = True
        elif ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            line_code = True
            i += len(quote)
            continue
        elif ch == "\\" and text.startswith("\\\n", i):  # a line continuation: the line goes on
            i += 2
            continue
        elif ch == "\n":
            if brackets == 0 and line_code:
                statements += 1
                suite_open = last == ":"
                line_code, last = False, ""
        elif ch.isalnum() or ch == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            last, line_code = text[i:j], True
            i = j
            continue
        elif not ch.isspace():
            if ch in "([{":
                brackets += 1
            elif ch in ")]}":
                brackets = max(0, brackets - 1)
            last, line_code = ch, True
        i += 1
    need = 1 + int(bool(quote)) + brackets  # EOS, the closing quote, one closer per bracket
    if quote or comment or line_code:
        need += 1  # the line's newline
    if line_code and not quote:
        if last in _DANGLING_WORDS or last in _DANGLING_CHARS or (last == ":" and brackets):
            need += 1  # an operand (a dict value after ":") is still missing
        elif last == ":":
            need += SUITE_TOKENS  # a block header: its suite's first statement
    if not line_code and (suite_open or statements == 0):
        need += SUITE_TOKENS  # the open block (or the empty body) still needs its first statement
    return need


class PythonBudgetTwist(Potential):
    """A prefix twist that favours Python particles able to end within ``max_new_tokens`` tokens.

    ``log_prefix`` is 0 while a prefix can end (:func:`closing_need`) with ``margin`` tokens to
    spare and ``-nats_per_token`` per token short of that; ``log_complete`` is 0. The weights see
    only differences of these scores, so the twist cancels at completion and the target is the
    same with or without it. Compose it with the grammar:
    ``PythonGrammarPotential.build(lm) * PythonBudgetTwist(max_new_tokens)``, with the same
    ``max_new_tokens`` as the run (token counts exclude the prompt).
    """

    def __init__(
        self, max_new_tokens: int, margin: int = PYTHON_TWIST_MARGIN, nats_per_token: float = TWIST_NATS_PER_TOKEN
    ):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be an int >= 0, got {margin!r}")
        if not isinstance(nats_per_token, (int, float)) or not 0 < nats_per_token < float("inf"):
            raise ValueError(f"nats_per_token must be a finite number > 0, got {nats_per_token!r}")
        self.max_new_tokens = max_new_tokens
        self.margin = margin
        self.nats_per_token = float(nats_per_token)

    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        scores = [
            shortfall_twist(closing_need(text), self.max_new_tokens - len(ids), self.margin, self.nats_per_token)
            for text, ids in zip(batch.texts, batch.token_ids)
        ]
        return torch.tensor(scores, dtype=torch.float64)

    def log_complete(self, batch: SequenceBatch) -> Tensor:
        return torch.zeros(len(batch), dtype=torch.float64)

    @property
    def name(self) -> str:
        return f"PythonBudgetTwist(max_new_tokens={self.max_new_tokens}, margin={self.margin})"
