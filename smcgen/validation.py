"""Argument checks for ``smcgen.generate`` and for what user code hands back to the engine.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
value) naming the parameter and what is allowed, before any model work starts. The step loop
calls :func:`check_proposal_output` on a custom proposal's draws (through :class:`CheckedProposal`
today, which ``generate`` wraps around a user's proposal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from smcgen.core.config import EngineSettings, SamplingParams, SMCConfig
from smcgen.potentials.base import Potential
from smcgen.proposals.base import Proposal

ON_DEAD_POLICIES = ("raise", "flag", "partial")
"""``generate(on_dead=...)``: raise :class:`AllParticlesDeadError`, or return the best partial
result flagged ``SMCResult.dead`` (``"flag"`` and ``"partial"`` are synonyms)."""


def _kind(value: Any) -> str:
    return type(value).__name__


def as_config(config: Any, overrides: Mapping[str, Any]) -> SMCConfig:
    """``config`` with keyword overrides applied. ``config`` is an :class:`SMCConfig`, a
    :class:`SamplingParams`, an :class:`EngineSettings`, a dict of fields, a tuple of these (merged
    left to right: ``(SamplingParams(...), EngineSettings(...))``) or None. An override
    ``temperature`` replaces both of the base's temperatures, except one the overrides also give."""
    parts = config if isinstance(config, tuple) else (config,)
    base: dict[str, Any] = {}
    for part in parts:
        if part is None:
            continue
        if isinstance(part, (SamplingParams, EngineSettings)):
            base.update(part.model_dump())
        elif isinstance(part, Mapping):
            base.update(part)
        else:
            raise TypeError(
                "config must be an SMCConfig, SamplingParams, EngineSettings, a dict of their fields, a tuple of "
                f"these or None, got {_kind(part)}"
            )
    if overrides.get("temperature") is not None:
        # a keyword temperature outranks the base config's two temperatures, as any keyword does its field
        for field in ("target_temperature", "draft_temperature"):
            if field not in overrides:
                base.pop(field, None)
    return SMCConfig(**{**base, **overrides})


def as_potentials(potentials: Any) -> list[Potential]:
    """``potentials``: a Potential, a list/tuple of Potentials, or None (no potentials)."""
    if potentials is None:
        return []
    if isinstance(potentials, Potential):
        return [potentials]
    if isinstance(potentials, (str, bytes)) or not isinstance(potentials, Sequence):
        hint = "; wrap a reward function as smcgen.RewardPotential(fn)" if callable(potentials) else ""
        raise TypeError(f"potentials must be a Potential or a list of Potentials, got {_kind(potentials)}{hint}")
    bad = [f"{i}: {_kind(p)}" for i, p in enumerate(potentials) if not isinstance(p, Potential)]
    if bad:
        raise TypeError(f"potentials must all be Potential objects; not Potentials at {', '.join(bad[:3])}")
    return list(potentials)


def check_grammar(grammar: Any) -> None:
    """``guide`` / ``grammar``: checked where it is converted (:func:`smcgen.potentials.output.as_grammar`
    names what it takes); nothing to refuse before that."""


def check_on_dead(on_dead: Any) -> str:
    """The engine's policy (``"raise"`` or ``"flag"``) for ``generate(on_dead=...)``."""
    if on_dead not in ON_DEAD_POLICIES:
        raise ValueError(f"on_dead must be one of {', '.join(map(repr, ON_DEAD_POLICIES))}, got {on_dead!r}")
    return "raise" if on_dead == "raise" else "flag"


def check_model_device(model: Any, what: str) -> None:
    """A model whose weights are still on the meta device (never loaded) cannot run."""
    inner = getattr(model, "model", model)
    params = getattr(inner, "parameters", None)
    if params is None:
        return
    first = next(iter(params()), None)
    if first is not None and first.is_meta:
        raise ValueError(
            f"{what} has its weights on the meta device (an empty shell, never loaded); "
            f"load it with real weights (from_pretrained, or .to_empty() then load a state dict)"
        )


def check_request(
    config: Any,
    overrides: Mapping[str, Any],
    potentials: Any,
    proposal: Any,
    grammar: Any,
    on_dead: Any,
) -> tuple[SMCConfig, list[Potential], str]:
    """All of ``generate``'s argument checks that need no model: (config, potentials, engine on_dead)."""
    cfg = as_config(config, overrides)
    factors = as_potentials(potentials)
    if proposal is not None and not isinstance(proposal, Proposal):
        raise TypeError(f"proposal must be a smcgen.Proposal or None, got {_kind(proposal)}")
    check_grammar(grammar)
    return cfg, factors, check_on_dead(on_dead)


# ------------------------------------------------------------------ what a proposal returns


def check_proposal_output(
    proposal: Any, tokens: Any, log_q: Any, n_rows: int, n_tokens: int, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Validate ``Proposal.propose``'s return: integer ids ``[n_rows, n_tokens]`` in ``[0, vocab_size)``
    and finite float log q of the same shape (float64 returned). The error names the proposal."""
    name = _kind(proposal)
    if not isinstance(tokens, Tensor) or not isinstance(log_q, Tensor):
        raise TypeError(
            f"proposal {name}.propose must return (tokens, log_q) tensors, got ({_kind(tokens)}, {_kind(log_q)})"
        )
    want = (n_rows, n_tokens)
    if tuple(tokens.shape) != want or tuple(log_q.shape) != want:
        raise ValueError(
            f"proposal {name}.propose returned tokens {tuple(tokens.shape)} and log_q {tuple(log_q.shape)}; "
            f"both must be [rows, n_tokens] = {list(want)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"proposal {name}.propose returned tokens of dtype {tokens.dtype}; token ids must be integers")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][:5].tolist()
        raise ValueError(f"proposal {name}.propose returned token ids {bad} outside the vocabulary [0, {vocab_size})")
    if not log_q.dtype.is_floating_point:
        raise TypeError(f"proposal {name}.propose returned log_q of dtype {log_q.dtype}; it must be a float tensor")
    if log_q.numel() and not bool(torch.isfinite(log_q).all()):
        raise ValueError(
            f"proposal {name}.propose returned a non-finite log q ({log_q[~torch.isfinite(log_q)][:3].tolist()}); "
            "a drawn token must have finite log-probability"
        )
    return tokens.long(), log_q.double()


class CheckedProposal(Proposal):
    """A user's :class:`Proposal` whose every draw goes through :func:`check_proposal_output`."""

    def __init__(self, inner: Proposal, vocab_size: int):
        self.inner = inner
        self.vocab_size = int(vocab_size)

    def start(self, prompt_ids: Tensor, n_rows: int) -> None:
        self.inner.start(prompt_ids, n_rows)

    def propose(self, sequences: Tensor, n_tokens: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        out = self.inner.propose(sequences, n_tokens, generator)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(
                f"proposal {_kind(self.inner)}.propose must return a (tokens, log_q) tuple, got {_kind(out)}"
            )
        tokens, log_q = check_proposal_output(self.inner, *out, sequences.shape[0], n_tokens, self.vocab_size)
        return tokens.to(sequences.device), log_q

    def reorder(self, rows: Tensor) -> None:
        self.inner.reorder(rows)

    def required_potentials(self) -> tuple[Potential, ...]:
        return tuple(self.inner.required_potentials())

    def target_constraint(self) -> Potential | None:
        return self.inner.target_constraint()


def checked_proposal(proposal: Proposal | None, vocab_size: int) -> Proposal | None:
    """Wrap a user's proposal so that its draws are validated (None stays None)."""
    return None if proposal is None else CheckedProposal(proposal, vocab_size)


__all__ = [
    "ON_DEAD_POLICIES",
    "CheckedProposal",
    "as_config",
    "as_potentials",
    "check_grammar",
    "check_model_device",
    "check_on_dead",
    "check_proposal_output",
    "check_request",
    "checked_proposal",
]
