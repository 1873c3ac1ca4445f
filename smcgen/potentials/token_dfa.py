"""A guide as a token-level automaton: next-token masks and state updates as tensor gathers.

A guide whose language is regular (a regex, a choice of literals, a JSON schema without
recursion) has finitely many states over token prefixes. Tabulated once, every step of a guided
run becomes two gathers per particle: the state's next-token bitmask (``bitmask[state]``) and the
next state (``next[state, token]``), so a GPU engine keeps the particles' states on the device and
records the guided cycle in its CUDA graph with no host round-trip.

The table mirrors the host matcher's conventions exactly (see ``GrammarPotential``): a row that
consumed an EOS is *terminated*, a row that consumed a forbidden token is *dead*, and both get an
all-ones mask (their draws are ignored). Two absorbing states stand for them, so a state update
never needs a branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenDFA:
    """A token-level automaton of a guide (states x vocabulary), built once and moved to a device.

    ``next_state`` ``[S, V]`` int32: the state after a token, ``-1`` when the token is forbidden
    (the row becomes :attr:`dead`). ``bitmask`` ``[S, ceil(V/32)]`` int32: the allowed next tokens in
    xgrammar's layout, exactly the host matcher's mask. ``accepting`` ``[S]`` bool: a sequence that
    stops in this state is in the language (the guide's complete score is 0, else ``-inf``).
    States :attr:`terminated` (after an EOS) and :attr:`dead` are absorbing with all-ones masks.
    ``complete_is_exact``: the accepting flags are the guide's whole ``log_complete`` (False when
    something else, e.g. a JSON Schema validator, also decides the end).
    """

    next_state: Tensor
    bitmask: Tensor
    accepting: Tensor
    eos_token_ids: tuple[int, ...]
    complete_is_exact: bool = True
    start: int = 0

    @property
    def n_states(self) -> int:
        return int(self.next_state.shape[0])

    @property
    def terminated(self) -> int:
        """The state after an EOS the guide accepted."""
        return self.n_states - 2

    @property
    def dead(self) -> int:
        """The state after a token the guide forbids."""
        return self.n_states - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.next_state, self.bitmask, self.accepting))

    def to(self, device: torch.device | str) -> TokenDFA:
        return TokenDFA(
            self.next_state.to(device),
            self.bitmask.to(device),
            self.accepting.to(device),
            self.eos_token_ids,
            self.complete_is_exact,
            self.start,
        )

    # ---------------------------------------------------------------- tensor ops (graph-safe)
    def masks(self, states: Tensor) -> Tensor:
        """int32 ``[R, ceil(V/32)]`` next-token bitmasks of the rows in ``states`` ``[R]``."""
        return self.bitmask[states]

    def step(self, states: Tensor, tokens: Tensor) -> Tensor:
        """The states ``[R]`` after each row takes its token ``[R]`` (forbidden: :attr:`dead`)."""
        nxt = self.next_state[states, tokens].long()
        return torch.where(nxt >= 0, nxt, torch.full_like(nxt, self.dead))

    def fold(self, states: Tensor, block: Tensor) -> Tensor:
        """The states after each row takes its tokens ``block`` ``[R, T]`` in order."""
        for t in range(block.shape[1]):
            states = self.step(states, block[:, t])
        return states

    def log_complete(self, states: Tensor) -> Tensor:
        """float32 ``[R]``: 0 where a sequence ending in the state is in the language, else ``-inf``."""
        ok = self.accepting[states]
        return torch.where(
            ok, torch.zeros(ok.shape, device=ok.device), torch.full(ok.shape, float("-inf"), device=ok.device)
        )

    def initial(self, n_rows: int, device: torch.device | str) -> Tensor:
        """``[n_rows]`` int64 start states (nothing generated yet)."""
        return torch.full((n_rows,), self.start, dtype=torch.long, device=device)


__all__ = ["TokenDFA"]
