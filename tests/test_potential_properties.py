"""The project's potentials pass smcgen.testing's properties (hypothesis-driven), and the harness
catches potentials that break each property."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import EOS, PROMPT, LetterDecoder, tiny_lm

from smcgen import GrammarPotential, LMPotential, Potential, Product, RewardPotential, SequenceBatch
from smcgen.testing import (
    PotentialTests,
    check_batch_consistency,
    check_determinism,
    check_mask_consistency,
    check_monotone,
    check_potential,
    check_values,
)

LETTERS = ["a", "b", "c", None]  # token strings of the tiny vocabulary; id 3 is EOS
LM = tiny_lm(0, logit_scale=2.0)


def count_a(text: str) -> float:
    return text.count("a") / 2


# ---------------------------------------------------------------------------- the project's potentials


class TestRewardPotentialTwist(PotentialTests):
    vocab_size = 4
    decoder = LetterDecoder()
    eos_token_ids = (EOS,)

    def make_potential(self):
        return RewardPotential(count_a, beta=1.5, prefix=True)


class TestRewardPotentialAtTheEnd(PotentialTests):
    vocab_size = 4
    decoder = LetterDecoder()

    def make_potential(self):
        return RewardPotential(lambda texts: [len(t) / 3 for t in texts], beta=-1.0, batched=True)


class TestGrammarPotential(PotentialTests):
    vocab_size = 4
    eos_token_ids = (EOS,)
    monotone = True  # 0 while the prefix can be completed, -inf after; complete <= prefix
    max_length = 8

    def make_potential(self):
        return GrammarPotential.regex("(ab|c)+a?", LETTERS, eos_token_ids=[EOS])


class TestLMPotential(PotentialTests):
    vocab_size = 4
    prompt_ids = PROMPT
    eos_token_ids = (EOS,)
    monotone = True  # log p(x) only falls as tokens are added
    max_examples = 4
    tol = 1e-4  # a padded batch forward and a single-row forward differ by float rounding

    def make_potential(self):
        return LMPotential(LM, temperature=0.8, alpha=2.0)


class TestProductGrammarTimesLM(PotentialTests):
    vocab_size = 4
    prompt_ids = PROMPT
    eos_token_ids = (EOS,)
    monotone = True  # a product of monotone factors
    max_examples = 4
    tol = 1e-4

    def make_potential(self):
        return Product([GrammarPotential.regex("(ab|c)+", LETTERS, eos_token_ids=[EOS]), LMPotential(LM)])


class TestProductWithReward(PotentialTests):
    vocab_size = 4
    decoder = LetterDecoder()
    eos_token_ids = (EOS,)

    def make_potential(self):
        return GrammarPotential.regex("[ab]*c?", LETTERS, eos_token_ids=[EOS]) * RewardPotential(count_a, prefix=True)


def test_check_potential_on_chosen_sequences():
    g = GrammarPotential.regex("(ab|c)+", LETTERS, eos_token_ids=[EOS])
    seqs = [[0, 1, 2], [0, 0], [], [2, EOS], [0, 1, 0]]
    check_potential(g, seqs, monotone=True, vocab_size=4, eos_token_ids=[EOS])


# ---------------------------------------------------------------------------- the harness catches bugs


class LeakyBatch(Potential):
    """Scores depend on the batch: a row's score is the batch's mean length."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        mean = sum(len(t) for t in batch.token_ids) / max(len(batch), 1)
        return torch.full((len(batch),), -mean, dtype=torch.float64)


class NaNOnC(Potential):
    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([math.nan if 2 in t else 0.0 for t in batch.token_ids], dtype=torch.float64)


class WrongShape(Potential):
    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.zeros(len(batch) + 1)


class Noisy(Potential):
    def __init__(self):
        self.rng = random.Random(0)

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([self.rng.random() for _ in batch.token_ids], dtype=torch.float64)


class RewardsLength(Potential):
    """Claims nothing, but would break monotonicity: the score grows with length."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([float(len(t)) for t in batch.token_ids], dtype=torch.float64)


class LyingMask(Potential):
    """A grammar whose mask also allows token 'c' where the language forbids it."""

    def __init__(self, grammar: GrammarPotential):
        self.grammar = grammar

    def log_prefix(self, batch):
        return self.grammar.log_prefix(batch)

    def log_complete(self, batch):
        return self.grammar.log_complete(batch)

    def next_token_bitmask(self, sequences, n_prompt):
        return self.grammar.next_token_bitmask(sequences, n_prompt) | (1 << 2)


def test_harness_catches_a_batch_leak():
    check_batch_consistency(LeakyBatch(), [[0], [0]])  # equal rows: no difference to see
    with pytest.raises(AssertionError, match="in a batch of 2 but"):
        check_batch_consistency(LeakyBatch(), [[0], [0, 1, 2]])


def test_harness_catches_nan_and_shape():
    with pytest.raises(AssertionError, match="finite or -inf"):
        check_values(NaNOnC(), [[0], [2]])
    with pytest.raises(AssertionError, match=r"shape \(3,\) for a batch of 2"):
        check_values(WrongShape(), [[0], [1]])


def test_harness_catches_nondeterminism():
    with pytest.raises(AssertionError, match="not deterministic"):
        check_determinism(Noisy(), [[0, 1]])


def test_harness_catches_a_false_monotonicity_claim():
    with pytest.raises(AssertionError, match="rises from"):
        check_monotone(RewardsLength(), [[0, 1]])


def test_harness_catches_a_mask_that_disagrees_with_the_scores():
    honest = GrammarPotential.regex("(ab)+", LETTERS, eos_token_ids=[EOS])
    check_mask_consistency(honest, [[0], [0, 1], []], 4, [EOS])
    with pytest.raises(AssertionError, match="token 2 is allowed but its score is -inf"):
        check_mask_consistency(LyingMask(honest), [[0]], 4, [EOS])


def test_mixin_runs_hypothesis_and_fails_on_a_broken_potential():
    class Broken(PotentialTests):
        vocab_size = 4
        max_examples = 30
        shrink = False

        def make_potential(self):
            return LeakyBatch()

    with pytest.raises(AssertionError):
        Broken().test_batch_scores_as_rows_alone()
