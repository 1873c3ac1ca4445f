"""Tabulate a bound grammar's token-level automaton by exploring xgrammar's matcher states.

The automaton is built from the very matcher the host guide uses, so its masks are the host
masks bit for bit: breadth-first from the start state, each state's mask comes from
``fill_next_token_bitmask`` and each allowed token's next state from ``accept_token`` on a copy.
A matcher state is an Earley item set whose items may point back to the step their rule started
at (a regex group, a repetition, a JSON Schema's nested rules); its future depends on those
steps' item sets too. The automaton's state key is therefore the completion flag plus the item
set with every such pointer replaced, recursively, by the key of the step it points to: equal
keys mean equal futures. Tokens whose steps carry such pointers are replayed byte by byte so
every step has its key. The matcher prints only the top of its stacks, though: an item's callers
and a ``{m,n}`` repetition's counter are not shown (measured: keys merged states with different
masks for ``root ::= "a" root "b" | "c"`` and for a counted group). So sub-rule states are keyed
only when the sub-rules form a tree (each referenced once, none recursive, nothing counted), where
an item's rule fixes its callers; otherwise only states whose items are all of the root rule are. A language with unbounded nesting (recursion, some ``+`` loops) keeps
producing new keys until the memory budget stops exploration; the guide then stays on the host,
with the reason.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import deque
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from smcgen.core.sampling import bitmask_width
from smcgen.potentials.token_dfa import TokenDFA

#: default memory budget of one automaton's tables on the device
DEFAULT_MAX_BYTES = 256 * 2**20
#: default time budget of one exploration (a large vocabulary over a wide language is slow to
#: tabulate; the host path then runs instead and draws the same tokens, only slower)
DEFAULT_MAX_SECONDS = 10.0

_LAST_STEP = "Last step:"
_STEPS = re.compile(r"There are (\d+) steps")
_ORIGIN = re.compile(r"rule_start_pos=(-?\d+)")


def _step(matcher: Any) -> tuple[int, str]:
    """(the matcher's current history step, its parser item set as text)."""
    text = matcher._debug_print_internal_state()
    at = text.find(_LAST_STEP)
    steps = _STEPS.search(text)
    if at < 0 or steps is None:
        raise RuntimeError("unexpected xgrammar matcher state text; the automaton cannot be built")
    return int(steps.group(1)) - 1, text[at + len(_LAST_STEP) :]


def _canonical(items: str, here: int, history: list[str]) -> str | None:
    """The item set with each item's origin (the step its rule started at) replaced by the canonical
    key of that step: an Earley item set plus the item sets its origins point to is the whole parser
    configuration, so equal keys mean equal futures. None when an origin is unknown."""

    def origin(m: re.Match) -> str:
        p = int(m.group(1))
        if p < 0:
            return "root"
        if p == here:
            return "here"
        return history[p] if p < len(history) else "?"

    out = _ORIGIN.sub(origin, items)
    if "?" in out:
        return None
    return hashlib.blake2b(out.encode(), digest_size=16).hexdigest()


def _points_back(items: str, here: int) -> bool:
    """Some item's rule started at an earlier step."""
    return any(0 <= int(p) < here for p in _ORIGIN.findall(items))


def _in_sub_rule(items: str) -> bool:
    """Some item belongs to a rule other than the root (its origin is a step, not -1)."""
    return any(int(p) >= 0 for p in _ORIGIN.findall(items))


def _root_state(matcher: Any, here: int, items: str) -> tuple[list[str], str]:
    """(step keys, state key) of a step whose items point to no earlier step: the steps before it
    can never be referred to again (any later item pointing back would pass through this step's
    items), so they are left unknown."""
    key = _canonical(items, here, [])
    assert key is not None
    return ["?"] * here + [key], f"{matcher.is_completed()}|{key}"


class _NotFinite(Exception):
    """Exploration cannot key the matcher's states soundly (the message says why)."""


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')


def has_counted_repetition(ebnf: str) -> bool:
    """The grammar text (xgrammar's printed EBNF) repeats something ``{m,n}`` times (``n`` may be
    -1, unbounded: the count up to ``m`` is hidden too)."""
    return re.search(r"\{\s*\d+\s*,?\s*-?\d*\s*\}", _QUOTED.sub("", ebnf)) is not None


def _reachable_rules(ebnf: str) -> dict[str, str]:
    """The rules of the grammar text that the root reaches (name -> body with literals removed):
    xgrammar prints a JSON Schema's whole library of value rules, used or not."""
    rules: dict[str, str] = {}
    for line in ebnf.splitlines():
        name, sep, body = line.partition("::=")
        if sep:
            rules[name.strip()] = _QUOTED.sub("", body)
    seen, todo = set(), ["root"]
    while todo:
        r = todo.pop()
        if r in seen or r not in rules:
            continue
        seen.add(r)
        todo.extend(x for x in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rules[r]) if x in rules)
    return {n: b for n, b in rules.items() if n in seen}


def sub_rules_are_a_tree(ebnf: str) -> bool:
    """Every rule the root reaches is referenced at most once and none reaches itself, and nothing
    repeats ``{m,n}`` times. Then a sub-rule item's hidden parents (the matcher prints only the top
    of its stacks) are fixed by the item's rule, and its item set with the steps it points to is
    the whole parser configuration; otherwise only states whose items are all of the root rule are
    keyed (measured: ``root ::= "a" root "b" | "c"`` merged depths that differ). Rules the root
    never reaches (a JSON Schema's unused value rules) cannot appear in a parse and are ignored."""
    rules = _reachable_rules(ebnf)
    if has_counted_repetition("\n".join(rules.values())):
        return False
    refs = {n: [r for r in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", b) if r in rules] for n, b in rules.items()}
    counts: dict[str, int] = {}
    for rs in refs.values():
        for r in rs:
            counts[r] = counts.get(r, 0) + 1
    if any(c > 1 for c in counts.values()) or counts.get("root", 0):
        return False
    # one reference each: a cycle would be a rule reached again from itself
    for start in rules:
        seen, todo = set(), list(refs[start])
        while todo:
            r = todo.pop()
            if r == start:
                return False
            if r not in seen:
                seen.add(r)
                todo.extend(refs[r])
    return True


def _advance(parent: Any, history: list[str], token: bytes, tree: bool) -> tuple[Any, list[str], str] | None:
    """A copy of ``parent`` after ``token``'s bytes, its step keys, and its automaton state key.

    Fast path: one ``accept_token``-like step whose items are all of the root rule need no history
    (no later item can point before such a step). Otherwise the token is replayed byte by byte so
    every step it passes has a canonical key that later items may point to; unless the grammar's
    sub-rules form a tree (``tree``, :func:`sub_rules_are_a_tree`) that is refused (:class:`_NotFinite`).
    """
    child = parent.fork()
    if not child.accept_string(token):
        return None
    here, items = _step(child)
    if not _in_sub_rule(items) or (tree and not _points_back(items, here)):
        return child, *_root_state(child, here, items)
    if not tree:
        raise _NotFinite(
            "the grammar's sub-rules are shared, recursive or repeated {m,n} times, and the matcher's item "
            "sets do not show their callers, so its states cannot be told apart"
        )
    child = parent.fork()
    steps = list(history)
    for b in token:
        if not child.accept_string(bytes([b])):
            return None
        here, items = _step(child)
        while len(steps) < here:
            steps.append("?")
        key = _canonical(items, here, steps)
        if key is None:
            return None
        steps.append(key)
    return child, steps, f"{child.is_completed()}|{steps[-1]}"


def _allowed_ids(matcher: Any, vocab_size: int, scratch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(the state's bitmask row, the ids it allows)."""
    scratch.fill_(0)
    matcher.fill_next_token_bitmask(scratch)
    row = scratch[0].numpy().copy()
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size]
    return row, np.flatnonzero(bits)


def build_token_dfa(
    initial: Any,
    vocab_bytes: list[bytes],
    vocab_size: int,
    eos_token_ids: tuple[int, ...],
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
    tree: bool = False,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> TokenDFA | str:
    """The automaton of the matcher ``initial`` (a fresh xgrammar ``GrammarMatcher``), or why not.

    ``vocab_bytes[v]`` is the text of token ``v`` as the matcher reads it (xgrammar's decoded vocabulary).
    ``tree``: the grammar's sub-rules form a tree (:func:`sub_rules_are_a_tree`); otherwise only
    states whose items are all of the root rule are keyed.

    Returns a string reason instead when a state is not a finite-automaton state (see the module
    docstring), the tables would exceed ``max_bytes`` or exploring takes more than ``max_seconds``.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    width = bitmask_width(vocab_size)
    row_bytes = 4 * vocab_size + 4 * width + 1
    max_states = max_bytes // row_bytes - 2  # two absorbing states are added
    eos = set(int(e) for e in eos_token_ids)
    scratch = torch.zeros(1, width, dtype=torch.int32)

    start = initial.fork()
    here, items = _step(start)
    if not tree and _in_sub_rule(items):
        return "the grammar's start state is inside a shared, recursive or counted sub-rule"
    start_history, start_key = _root_state(start, here, items)
    ids: dict[str, int] = {start_key: 0}
    matchers = [start]
    histories: list[list[str]] = [start_history]
    token_bytes = [bytes(b) for b in vocab_bytes]
    transitions: list[dict[int, int]] = []  # per state: token -> next state (TERM as -2)
    masks: list[np.ndarray] = []
    accepting: list[bool] = []
    queue = deque([0])
    deadline = time.perf_counter() + max_seconds
    bar = tqdm(disable=not progress, desc="guide automaton", unit="state", leave=False)
    while queue:
        s = queue.popleft()
        m = matchers[s]
        row, allowed = _allowed_ids(m, vocab_size, scratch)
        trans: dict[int, int] = {}
        for i, v in enumerate(allowed.tolist()):
            if i % 2048 == 0 and time.perf_counter() > deadline:
                return f"tabulating the guide's automaton took more than {max_seconds:g} s ({len(ids)} states so far)"
            if v in eos:
                trans[v] = -2
                continue
            try:
                advanced = _advance(m, histories[s], token_bytes[v], tree)
            except _NotFinite as err:
                return str(err)
            if advanced is None:  # the mask allowed it: cannot happen, but never guess
                return f"the grammar's mask allows token {v} that its matcher rejects byte by byte"
            child, history, k = advanced
            nxt = ids.get(k)
            if nxt is None:
                if len(ids) >= max_states:
                    return (
                        f"the guide's automaton has more than {max_states} states, whose tables would exceed "
                        f"the {max_bytes / 2**20:.0f} MiB budget"
                    )
                nxt = ids[k] = len(matchers)
                matchers.append(child)
                histories.append(history)
                queue.append(nxt)
            trans[v] = nxt
        transitions.append(trans)
        masks.append(row)
        accepting.append(bool(m.is_completed()))
        matchers[s], histories[s] = None, []  # done with it: keep memory flat
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


__all__ = ["DEFAULT_MAX_BYTES", "build_token_dfa", "has_counted_repetition", "sub_rules_are_a_tree"]
