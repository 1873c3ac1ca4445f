"""The decoded posterior of a result: weights normalized in log space, duplicates pooled."""

import math

import pytest

from smcgen.engine_results import posterior_of
from tests.tiny_models import LetterDecoder


def test_posterior_survives_very_negative_log_weights():
    # raw exp(-1000) underflows to 0: the posterior must still hold the two texts, 1:e in mass
    post = posterior_of([[0], [1], [0]], [-1001.0, -1000.0, float("-inf")], LetterDecoder())
    assert [t for t, _ in post] == ["b", "a"]
    assert post[0][1] == pytest.approx(math.e / (1 + math.e))


def test_posterior_survives_very_large_log_weights():
    post = posterior_of([[0], [1]], [800.0, 800.0], LetterDecoder())
    assert sorted(post) == [("a", pytest.approx(0.5)), ("b", pytest.approx(0.5))]


def test_posterior_pools_particles_with_the_same_text():
    # ids 0 and [0, EOS] decode to the same text once EOS is skipped
    post = posterior_of([[0], [0, 3], [1]], [0.0, 0.0, 0.0], LetterDecoder())
    assert post[0] == ("a", pytest.approx(2 / 3))
    assert post[1] == ("b", pytest.approx(1 / 3))
