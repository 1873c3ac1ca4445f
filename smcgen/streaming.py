"""Streaming an SMC run's text honestly: only what no later step can take back.

With resampling, the particle that is best now may be dropped later, so its text is no stream.
What is safe is the longest token prefix that every live particle (weight above zero) shares:
every later particle descends from a live one (resampling only copies particles, and a particle
at weight zero is never picked), so the final answer, whichever particle it is, starts with that
prefix. :class:`StablePrefix` follows that prefix step by step and hands out the new text; the
text it emits is never retracted, and at the end the rest of the answer follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix shared by every sequence (empty for no sequences)."""
    if not sequences:
        return []
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in sequences):
            return list(first[:i])
    return list(first[:n])


class StablePrefix:
    """The text of the live particles' common prefix, as deltas (see the module docstring).

    ``update(sequences, alive)`` takes every particle's tokens so far and whether its weight is
    above zero, and returns the text that became stable (possibly ""). Text is decoded from the
    token prefix (``decoder.decode(ids, skip_special_tokens=True)``); a trailing incomplete
    character (a multi-byte character split across tokens) is held back until it is whole.
    ``finish(text)`` returns what is left of the final answer's ``text`` after what was emitted.
    """

    def __init__(self, decoder: Any):
        if decoder is None:
            raise ValueError("streaming needs a tokenizer to decode text; pass tokenizer= to the Engine")
        self.decoder = decoder
        self.tokens: list[int] = []
        self.sent = ""

    def update(self, sequences: Sequence[Sequence[int]], alive: Sequence[bool]) -> str:
        live = [s for s, a in zip(sequences, alive) if a]
        prefix = common_prefix(live)
        if len(prefix) <= len(self.tokens):
            return ""  # the stable prefix only grows (no live particle lacks it)
        self.tokens = prefix
        text = self.decoder.decode(prefix, skip_special_tokens=True).rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""  # wait until the decoded text extends what was sent
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, text: str) -> str:
        """The rest of the final ``text`` (it starts with everything emitted: see the module docstring)."""
        if not text.startswith(self.sent):
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of the final text {text!r}")
        rest, self.sent = text[len(self.sent) :], text
        return rest


__all__ = ["StablePrefix", "common_prefix"]
