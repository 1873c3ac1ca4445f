"""A semantic potential for Python: Psi(x) = 0 when the code uses a name that no binding can precede.

The check is static (what pyflakes calls an undefined name, plus uses of a function's local before
any assignment that could run first), done with :mod:`ast` on the text at statement boundaries:

- a name load is fine when the name is bound earlier in its scope (parameters, assignments,
  ``for``/``with``/``except``/``match`` targets, imports, ``def``/``class``, walrus, ``global``), is
  bound anywhere in a loop of that scope that contains the use (a later iteration may run the
  binding first), resolves to an enclosing function (anywhere in it: a closure runs later), to a
  module-level name (anywhere, from inside a function; earlier, at module level), to a builtin or
  to one of ``known_names``;
- in a function, a name that is assigned anywhere in that function is local there: a use before
  every possible assignment is an error even when a builtin has the name (``UnboundLocalError``);
- comprehension variables are visible in their comprehension only; class bodies are not visible
  from their methods.

Uncertain cases score 1 (never -inf), so the prefix score never rules out a completion that would
pass: on an unfinished text, a use inside a loop or an enclosing function that can still grow may
be bound later, and is accepted; text that does not parse (an unfinished line, or invalid syntax:
the grammar's job, not this factor's) is accepted. A wildcard import turns the check off for its
scope. Not modelled (accepted): ``del``, the deletion of ``except ... as e`` names after their
block, names that are only bound in unreachable code, and runtime definitions (``globals()[...]``).

``log_prefix`` checks the text up to its last complete statement (later lines may still change an
open block, never what came before); ``log_complete`` checks the whole text. Scores are cached by
text, so particles that share code are analysed once. The check itself is
``python_undefined.undefined_names`` (re-exported here) over the scopes of ``python_scopes``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import Tensor

from smcgen.potentials.base import Potential, SequenceBatch
from smcgen.potentials.python_undefined import undefined_names

__all__ = ["PythonNamesPotential", "undefined_names"]

_FENCE = re.compile(r"\n?```[^\n]*\n?\s*$")


class PythonNamesPotential(Potential):
    """Psi(x) = 0 when the Python code ``prefix + text(x)`` uses a name no binding can precede, else 1.

    ``prefix``: code the generated text continues (a ``def`` line and docstring); ``known_names``:
    names the code may use without defining them (what the module that runs it provides);
    ``module_grows``: the generation may add module-level code (False for one function's body:
    then a function's free name is an error as soon as it is used). A trailing Markdown fence is
    ignored. Compose with a grammar: ``GrammarPotential.python() *
    PythonNamesPotential(prefix=header)``; see the module docstring for what counts as an error.
    """

    def __init__(
        self, prefix: str = "", known_names: Iterable[str] = (), module_grows: bool = False, cache_size: int = 65536
    ):
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.prefix = prefix
        self.known_names = frozenset(known_names)
        self.module_grows = bool(module_grows)
        self._cache: OrderedDict[tuple[str, bool], float] = OrderedDict()
        self._cache_size = cache_size

    def score(self, text: str, complete: bool) -> float:
        """0.0 or -inf for one generated text (cached)."""
        code = self.prefix + _FENCE.sub("\n", text) if complete else self.prefix + text
        if not complete:
            code = code[: code.rfind("\n") + 1]  # a statement boundary: the last complete line
        key = (code, complete)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        errors = undefined_names(code, complete, self.known_names, self.module_grows)
        value = -math.inf if errors else 0.0
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def log_prefix(self, batch: SequenceBatch) -> Tensor:
        return torch.tensor([self.score(t, False) for t in batch.texts], dtype=torch.float64)

    def log_complete(self, batch: SequenceBatch) -> Tensor:
        return torch.tensor([self.score(t, True) for t in batch.texts], dtype=torch.float64)
