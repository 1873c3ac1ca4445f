"""Engine.stream: text deltas of the live particles' common prefix, never taken back, adding up to the answer."""

from __future__ import annotations

import pytest
from test_engine import lm_with_tokenizer

from smcgen import Engine
from smcgen.streaming import StablePrefix, common_prefix


class _Bytes:
    """A decoder whose tokens are bytes (a multi-byte character spans tokens)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[5], [6]]) == [] and common_prefix([]) == []


def test_stable_prefix_follows_live_particles_and_holds_back_split_characters():
    s = StablePrefix(_Bytes())
    a, e_acute = list(b"a"), list("é".encode())  # two bytes
    # the dead particle (weight zero) does not hold the prefix back
    assert s.update([a + e_acute[:1], a + e_acute[:1], list(b"zz")], [True, True, False]) == "a"
    assert s.update([a + e_acute, a + e_acute + list(b"b")], [True, True]) == "é"
    assert s.update([a + e_acute + list(b"b"), a + e_acute + list(b"c")], [True, True]) == ""
    assert s.finish("aéc!") == "c!"
    other = StablePrefix(_Bytes())
    other.update([list(b"ab")], [True])
    with pytest.raises(RuntimeError, match="not a prefix"):  # the guarantee is checked, never silently broken
        other.finish("b")


@pytest.mark.parametrize("engine_name", ["native", "generic"])
def test_stream_adds_up_to_the_answer_and_streams_before_the_end(engine_name):
    engine = Engine(
        lm_with_tokenizer(0),
        draft=lm_with_tokenizer(1),
        engine=engine_name,
        n_particles=4,
        block_size=2,
        max_new_tokens=24,
        ess_threshold=1.0,
    )
    seen = 0
    for seed in range(4):
        stream = engine.stream("abba", seed=seed)
        parts = list(stream)
        assert "".join(parts) == stream.result.text
        assert stream.result.text == engine("abba", seed=seed).text  # streaming does not change the draw
        seen += len(parts) > 1
    assert seen > 0, "no run streamed any text before its end"


def test_stream_raises_the_runs_error():
    engine = Engine(lm_with_tokenizer(0), engine="native", n_particles=2, max_new_tokens=4)
    stream = engine.stream("ab", seed=0, max_new_tokens=4)
    assert "".join(stream) == stream.result.text
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.stream("ab", max_new_tokens=10_000)
