"""Shared fixtures: the tiny target, draft and tokenizer used by the API tests."""

from __future__ import annotations

import pytest

from tiny_models import tiny_lm, tiny_tokenizer


@pytest.fixture(scope="session")
def target():
    """Tiny random Llama target (vocab a, b, c, </s>) as a bare transformers model."""
    return tiny_lm(0, logit_scale=2.0).model


@pytest.fixture(scope="session")
def draft():
    """A flatter, different tiny model with the same vocabulary."""
    return tiny_lm(1, logit_scale=0.7).model


@pytest.fixture(scope="session")
def tok():
    """Word-level tokenizer over the letters a, b, c plus </s>."""
    return tiny_tokenizer()
