"""Property checks for a :class:`~smcgen.potentials.base.Potential`: run them on your own potential.

What a potential must do for the engine to weight particles correctly (docs/potentials.md):

- **values**: ``log_prefix`` / ``log_complete`` return one score per particle, finite or ``-inf``
  (never NaN or ``+inf``);
- **batch consistency**: a batch scores as its rows scored alone (no leakage between particles;
  the engine batches particles as it likes);
- **determinism**: the same batch twice gives the same scores;
- **monotonicity** (only where the potential claims it, e.g. a hard constraint or a grammar):
  extending a prefix never raises its score, and a complete sequence never scores above itself as
  a prefix; in particular zero is absorbing, so a particle ruled out stays ruled out;
- **mask consistency** (where the potential offers ``next_token_bitmask``, as
  :class:`~smcgen.potentials.grammar.GrammarPotential` does): token v is allowed after x exactly
  when ``log_prefix(x v) > -inf`` (v not EOS) / ``log_complete(x EOS) > -inf`` (v an EOS).

Two ways to use them. As functions on sequences you choose: :func:`check_potential` (all of the
above) or the single checks. As a pytest mixin driven by ``hypothesis``: subclass
:class:`PotentialTests`, give ``make_potential`` and the vocabulary, and pytest collects one test
per property, each run on generated batches of token sequences (walks along the mask where one is
offered, so that the interesting, still-allowed prefixes are reached)::

    class TestNoDigits(smcgen.testing.PotentialTests):
        vocab_size = 4
        decoder = MyDecoder()
        monotone = True

        def make_potential(self):
            return NoDigits()

Each check raises ``AssertionError`` naming the property, the sequences and the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from smcgen.potentials.base import Decoder, Potential, SequenceBatch

__all__ = [
    "PotentialTests",
    "check_batch_consistency",
    "check_determinism",
    "check_mask_consistency",
    "check_monotone",
    "check_potential",
    "check_values",
]

Seqs = Sequence[Sequence[int]]


def _batch(seqs: Seqs, prompt_ids: Sequence[int], decoder: Decoder | None) -> SequenceBatch:
    return SequenceBatch([list(s) for s in seqs], prompt_ids, decoder)


def _scores(potential: Potential, which: str, seqs: Seqs, prompt_ids: Sequence[int], decoder: Decoder | None) -> Tensor:
    """The potential's raw ``log_prefix`` / ``log_complete`` output, checked for shape, as float64."""
    out = getattr(potential, which)(_batch(seqs, prompt_ids, decoder))
    t = torch.as_tensor(out).detach().cpu()
    assert t.dim() == 1 and t.numel() == len(seqs), (
        f"{potential.name}.{which} returned shape {tuple(t.shape)} for a batch of {len(seqs)}; expected ({len(seqs)},)"
    )
    assert t.is_floating_point(), f"{potential.name}.{which} returned dtype {t.dtype}; expected a float tensor"
    return t.double()


def check_values(
    potential: Potential, seqs: Seqs, prompt_ids: Sequence[int] = (), decoder: Decoder | None = None
) -> None:
    """One score per sequence from both methods, each finite or ``-inf``."""
    for which in ("log_prefix", "log_complete"):
        t = _scores(potential, which, seqs, prompt_ids, decoder)
        bad = [i for i, v in enumerate(t.tolist()) if math.isnan(v) or v == math.inf]
        assert not bad, (
            f"{potential.name}.{which} gave {t[bad[0]].item()} for {list(seqs[bad[0]])}: scores must be finite or -inf"
        )


def _same(a: Tensor, b: Tensor, tol: float) -> bool:
    both_inf = torch.isneginf(a) & torch.isneginf(b)
    close = torch.isclose(a, b, rtol=tol, atol=tol)
    return bool((both_inf | close).all())


def check_batch_consistency(
    potential: Potential,
    seqs: Seqs,
    prompt_ids: Sequence[int] = (),
    decoder: Decoder | None = None,
    tol: float = 1e-5,
) -> None:
    """Scoring the batch gives each row the score it gets alone (``tol``: relative/absolute, for batched
    floating point such as a padded model forward)."""
    for which in ("log_prefix", "log_complete"):
        together = _scores(potential, which, seqs, prompt_ids, decoder)
        alone = torch.cat([_scores(potential, which, [s], prompt_ids, decoder) for s in seqs])
        if not _same(together, alone, tol):
            i = int(
                (
                    ~(
                        torch.isclose(together, alone, rtol=tol, atol=tol)
                        | (torch.isneginf(together) & torch.isneginf(alone))
                    )
                ).nonzero()[0]
            )
            raise AssertionError(
                f"{potential.name}.{which}: row {i} {list(seqs[i])} scores {together[i].item()} in a batch of "
                f"{len(seqs)} but {alone[i].item()} alone"
            )


def check_determinism(
    potential: Potential, seqs: Seqs, prompt_ids: Sequence[int] = (), decoder: Decoder | None = None
) -> None:
    """The same batch scored twice gives the same scores."""
    for which in ("log_prefix", "log_complete"):
        a = _scores(potential, which, seqs, prompt_ids, decoder)
        b = _scores(potential, which, seqs, prompt_ids, decoder)
        assert _same(a, b, 0.0), f"{potential.name}.{which} is not deterministic: {a.tolist()} then {b.tolist()}"


def check_monotone(
    potential: Potential,
    seqs: Seqs,
    prompt_ids: Sequence[int] = (),
    decoder: Decoder | None = None,
    tol: float = 1e-9,
) -> None:
    """For a potential that claims monotonicity: along each sequence, ``log_prefix`` never increases
    as tokens are added, and ``log_complete(x) <= log_prefix(x)``; so a prefix at ``-inf`` keeps every
    extension and completion at ``-inf``."""
    for s in seqs:
        prefixes = [list(s[:i]) for i in range(len(s) + 1)]
        pre = _scores(potential, "log_prefix", prefixes, prompt_ids, decoder).tolist()
        for i in range(1, len(pre)):
            assert pre[i] <= pre[i - 1] + tol, (
                f"{potential.name}.log_prefix rises from {pre[i - 1]} on {prefixes[i - 1]} to {pre[i]} on "
                f"{prefixes[i]}; a monotone potential never rewards an extension"
            )
        comp = _scores(potential, "log_complete", prefixes, prompt_ids, decoder).tolist()
        for p, c, x in zip(pre, comp, prefixes):
            assert c <= p + tol, f"{potential.name}: log_complete {c} > log_prefix {p} on {x}"


def _allowed(potential: Any, seqs: Seqs, prompt_ids: Sequence[int], vocab_size: int) -> Tensor:
    """bool ``[len(seqs), V]`` from the potential's ``next_token_bitmask`` (xgrammar's int32 layout)."""
    from smcgen.core.sampling import allowed_from_bitmask, bitmask_width

    width = max(len(s) for s in seqs)
    # rows of unequal length: each is asked about alone so padding never enters its state
    if any(len(s) != width for s in seqs):
        return torch.cat([_allowed(potential, [s], prompt_ids, vocab_size) for s in seqs])
    rows = torch.tensor([list(prompt_ids) + list(s) for s in seqs], dtype=torch.long)
    mask = potential.next_token_bitmask(rows, len(prompt_ids))
    assert tuple(mask.shape) == (len(seqs), bitmask_width(vocab_size)), (
        f"{potential.name}.next_token_bitmask returned shape {tuple(mask.shape)}; expected "
        f"({len(seqs)}, {bitmask_width(vocab_size)})"
    )
    return allowed_from_bitmask(mask, vocab_size, torch.device("cpu"))


def check_mask_consistency(
    potential: Potential,
    seqs: Seqs,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    prompt_ids: Sequence[int] = (),
    decoder: Decoder | None = None,
    tokens: Sequence[int] | None = None,
) -> None:
    """For each still-allowed, unfinished prefix x: token v is set in the mask after x exactly when
    ``log_prefix(x v) > -inf`` (v not EOS) or ``log_complete(x v) > -inf`` (v an EOS). ``tokens``
    limits the check to some token ids (a large vocabulary); default all."""
    eos = {int(e) for e in eos_token_ids}
    live = [list(s) for s in seqs if not (s and s[-1] in eos)]
    if live:
        ok = _scores(potential, "log_prefix", live, prompt_ids, decoder)
        live = [s for s, v in zip(live, ok.tolist()) if v > -math.inf]
    if not live:
        return
    allowed = _allowed(potential, live, prompt_ids, vocab_size)
    check = list(range(vocab_size)) if tokens is None else [int(t) for t in tokens]
    for x, row in zip(live, allowed):
        body = [v for v in check if v not in eos]
        ends = [v for v in check if v in eos]
        got = {}
        if body:
            got.update(
                zip(
                    body,
                    (
                        _scores(potential, "log_prefix", [x + [v] for v in body], prompt_ids, decoder) > -math.inf
                    ).tolist(),
                )
            )
        if ends:
            got.update(
                zip(
                    ends,
                    (
                        _scores(potential, "log_complete", [x + [v] for v in ends], prompt_ids, decoder) > -math.inf
                    ).tolist(),
                )
            )
        wrong = [v for v in check if bool(row[v]) != got[v]]
        assert not wrong, (
            f"{potential.name}: after {x} the mask says token {wrong[0]} is "
            f"{'allowed' if row[wrong[0]] else 'forbidden'} but its score is "
            f"{'-inf' if not got[wrong[0]] else 'finite'} ({len(wrong)} tokens disagree)"
        )


def check_potential(
    potential: Potential,
    seqs: Seqs,
    *,
    prompt_ids: Sequence[int] = (),
    decoder: Decoder | None = None,
    monotone: bool = False,
    vocab_size: int | None = None,
    eos_token_ids: Sequence[int] = (),
    tol: float = 1e-5,
) -> None:
    """Every check above on ``seqs`` (monotonicity only with ``monotone=True``; mask consistency when
    the potential has ``next_token_bitmask`` and ``vocab_size`` is given)."""
    check_values(potential, seqs, prompt_ids, decoder)
    check_batch_consistency(potential, seqs, prompt_ids, decoder, tol)
    check_determinism(potential, seqs, prompt_ids, decoder)
    if monotone:
        check_monotone(potential, seqs, prompt_ids, decoder)
    if vocab_size is not None and hasattr(potential, "next_token_bitmask"):
        check_mask_consistency(potential, seqs, vocab_size, eos_token_ids, prompt_ids, decoder)


class PotentialTests:
    """A pytest mixin: one hypothesis-driven test per property of :func:`check_potential`.

    Subclass it in a ``Test*`` class and set:

    - ``make_potential(self)``: a fresh potential (called once per generated example);
    - ``vocab_size`` (tokens drawn from ``range(vocab_size)``) or ``tokens`` (the ids to draw from);
    - optionally ``prompt_ids``, ``decoder`` (needed when the potential reads ``batch.texts``),
      ``eos_token_ids``, ``monotone = True`` where the potential claims it, ``max_length``,
      ``max_batch``, ``max_examples`` (per property), ``tol`` (batch consistency tolerance),
      ``shrink = False`` to report a failing example without shrinking it.

    Where the potential offers ``next_token_bitmask``, sequences are drawn by walking its mask (every
    prefix allowed, with a chance of one forbidden token at the end), so that checks reach the
    prefixes that matter; the mask test checks every token of ``tokens`` / the vocabulary.
    """

    vocab_size: int = 0
    tokens: Sequence[int] | None = None
    prompt_ids: Sequence[int] = ()
    decoder: Decoder | None = None
    eos_token_ids: Sequence[int] = ()
    monotone: bool = False
    max_length: int = 6
    max_batch: int = 4
    max_examples: int = 12
    tol: float = 1e-5
    shrink: bool = True  # hypothesis shrinks a failing example to a minimal one (slower on failure)

    def make_potential(self) -> Potential:
        raise NotImplementedError("give make_potential(self) returning the potential under test")

    # ------------------------------------------------------------------ generation
    def _alphabet(self) -> list[int]:
        alphabet = list(self.tokens) if self.tokens is not None else list(range(self.vocab_size))
        if not alphabet:
            raise ValueError("PotentialTests needs vocab_size >= 1 or a non-empty tokens list")
        return alphabet

    def _draw_sequence(self, data: Any, potential: Potential) -> list[int]:
        from hypothesis import strategies as st

        alphabet = self._alphabet()
        n = data.draw(st.integers(0, self.max_length), label="length")
        if not hasattr(potential, "next_token_bitmask") or not self.vocab_size:
            return data.draw(st.lists(st.sampled_from(alphabet), min_size=n, max_size=n), label="tokens")
        seq: list[int] = []
        eos = set(self.eos_token_ids)
        for _ in range(n):
            allowed = _allowed(potential, [seq], self.prompt_ids, self.vocab_size)[0]
            choices = [v for v in alphabet if bool(allowed[v])]
            stray = data.draw(st.integers(0, 9), label="stray") == 0  # now and then leave the language
            if not choices or stray:
                seq.append(data.draw(st.sampled_from(alphabet), label="token"))
                break
            v = data.draw(st.sampled_from(choices), label="token")
            seq.append(v)
            if v in eos:
                break
        return seq

    def _draw_batch(self, data: Any, potential: Potential) -> list[list[int]]:
        from hypothesis import strategies as st

        k = data.draw(st.integers(1, self.max_batch), label="batch size")
        return [self._draw_sequence(data, potential) for _ in range(k)]

    def _run(self, body: Any) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st

        phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if self.shrink else [])

        @settings(
            max_examples=self.max_examples,
            deadline=None,
            database=None,
            phases=phases,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
        )
        @given(st.data())
        def prop(data: Any) -> None:
            potential = self.make_potential()
            body(potential, self._draw_batch(data, potential))

        prop()

    # ------------------------------------------------------------------ properties
    def test_values_finite_or_neginf(self) -> None:
        self._run(lambda p, seqs: check_values(p, seqs, self.prompt_ids, self.decoder))

    def test_batch_scores_as_rows_alone(self) -> None:
        self._run(lambda p, seqs: check_batch_consistency(p, seqs, self.prompt_ids, self.decoder, self.tol))

    def test_deterministic(self) -> None:
        self._run(lambda p, seqs: check_determinism(p, seqs, self.prompt_ids, self.decoder))

    def test_monotone_where_claimed(self) -> None:
        if not self.monotone:
            import pytest

            pytest.skip("the potential claims no monotonicity (set monotone = True where it does)")
        self._run(lambda p, seqs: check_monotone(p, seqs, self.prompt_ids, self.decoder))

    def test_mask_matches_scores(self) -> None:
        if not hasattr(self.make_potential(), "next_token_bitmask"):
            import pytest

            pytest.skip("the potential offers no next_token_bitmask")
        self._run(
            lambda p, seqs: check_mask_consistency(
                p, seqs, self.vocab_size, self.eos_token_ids, self.prompt_ids, self.decoder, self.tokens
            )
        )
