"""Tabulate a bound grammar's token-level automaton by exploring xgrammar's matcher states.

The automaton is built from the very matcher the host guide uses, so its masks are the host
masks bit for bit: breadth-first from the start state, each state's mask comes from
``fill_next_token_bitmask`` and each allowed token's next state from ``accept_token`` on a copy.
Two matcher states are the same automaton state when their parser item sets and their completion
flags are equal and every item is of the root rule (``rule_start_pos == -1``): such an item set says everything about the
future (a regex compiles to one rule, so its states all qualify). An item that points back into
the history (a sub-rule started at an earlier position, as in JSON Schemas) makes the state depend
on more than the item set; exploration then stops and the guide stays on the host, with the reason.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from smcgen.potentials.token_dfa import TokenDFA
from smcgen.sampling import bitmask_width

#: default memory budget of one automaton's tables on the device
DEFAULT_MAX_BYTES = 256 * 2**20

_LAST_STEP = "Last step:"


def _state_key(matcher: Any) -> str | None:
    """The matcher's parser item set and completion as a canonical key, or None when an item refers
    back into the history. Completion is part of the key: at the start, xgrammar's root item can
    equal a later one (``(ab|c)+`` before anything and after ``ab``) while only the later may end."""
    text = matcher._debug_print_internal_state()
    at = text.find(_LAST_STEP)
    if at < 0:
        return None
    items = text[at + len(_LAST_STEP):]
    if "rule_start_pos=" in items and items.count("rule_start_pos=-1") != items.count("rule_start_pos="):
        return None
    return f"{matcher.is_completed()}{items}"


def _allowed_ids(matcher: Any, vocab_size: int, scratch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(the state's bitmask row, the ids it allows)."""
    scratch.fill_(0)
    matcher.fill_next_token_bitmask(scratch)
    row = scratch[0].numpy().copy()
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size]
    return row, np.flatnonzero(bits)


def build_token_dfa(
    initial: Any,
    vocab_size: int,
    eos_token_ids: tuple[int, ...],
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> TokenDFA | str:
    """The automaton of the matcher ``initial`` (a fresh xgrammar ``GrammarMatcher``), or why not.

    Returns a string reason instead when a state is not a finite-automaton state (see the module
    docstring) or the tables would exceed ``max_bytes``.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    width = bitmask_width(vocab_size)
    row_bytes = 4 * vocab_size + 4 * width + 1
    max_states = max_bytes // row_bytes - 2  # two absorbing states are added
    eos = set(int(e) for e in eos_token_ids)
    scratch = torch.zeros(1, width, dtype=torch.int32)

    start = initial.fork()
    key = _state_key(start)
    if key is None:
        return "the grammar's parser states refer back into their history (it is not a finite automaton over tokens)"
    ids: dict[str, int] = {key: 0}
    matchers = [start]
    transitions: list[dict[int, int]] = []  # per state: token -> next state (TERM as -2)
    masks: list[np.ndarray] = []
    accepting: list[bool] = []
    queue = deque([0])
    bar = tqdm(disable=not progress, desc="guide automaton", unit="state", leave=False)
    while queue:
        s = queue.popleft()
        m = matchers[s]
        row, allowed = _allowed_ids(m, vocab_size, scratch)
        trans: dict[int, int] = {}
        for v in allowed.tolist():
            if v in eos:
                trans[v] = -2
                continue
            child = m.fork()
            if not child.accept_token(v):  # the mask allowed it: cannot happen, but never guess
                return f"the grammar's mask allows token {v} that its matcher rejects"
            k = _state_key(child)
            if k is None:
                return "the grammar's parser states refer back into their history (it is not a finite automaton over tokens)"
            nxt = ids.get(k)
            if nxt is None:
                if len(ids) >= max_states:
                    return (
                        f"the guide's automaton has more than {max_states} states, whose tables would exceed "
                        f"the {max_bytes / 2**20:.0f} MiB budget"
                    )
                nxt = ids[k] = len(matchers)
                matchers.append(child)
                queue.append(nxt)
            trans[v] = nxt
        transitions.append(trans)
        masks.append(row)
        accepting.append(bool(m.is_completed()))
        matchers[s] = None  # done with it: keep memory flat
        bar.update(1)
    bar.close()

    n = len(transitions)
    term, dead = n, n + 1
    next_state = torch.full((n + 2, vocab_size), -1, dtype=torch.int32)
    for s, trans in enumerate(transitions):
        if trans:
            cols = torch.tensor(list(trans.keys()), dtype=torch.long)
            vals = torch.tensor([term if t == -2 else t for t in trans.values()], dtype=torch.int32)
            next_state[s, cols] = vals
    next_state[term] = term
    next_state[dead] = dead
    bitmask = torch.full((n + 2, width), -1, dtype=torch.int32)
    bitmask[:n] = torch.from_numpy(np.stack(masks))
    acc = torch.tensor(accepting + [True, False], dtype=torch.bool)
    return TokenDFA(next_state, bitmask, acc, tuple(sorted(eos)))


__all__ = ["DEFAULT_MAX_BYTES", "build_token_dfa"]
