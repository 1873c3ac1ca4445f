"""smcgen.Engine: built once, reused across calls (no rebuild), the same seeded draws as generate,
batches of prompts of different lengths, chat input, and what SMCResult offers its users."""

from __future__ import annotations

import math

import pytest
from tiny_models import tiny_lm, tiny_tokenizer

import smcgen
from smcgen import Engine, GrammarPotential, LanguageModel
from smcgen.runners.native import model as native_model_mod
from smcgen.samplers.native_select import forget_native_copies

LETTERS = '{}":,ab'
EOS_ID = len(LETTERS)


def lm_with_tokenizer(seed: int = 0) -> LanguageModel:
    """A tiny Llama over single-character tokens with a real (fast) tokenizer and a chat template."""
    tok = tiny_tokenizer(LETTERS)
    tok.chat_template = "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}"
    base = tiny_lm(seed, vocab=EOS_ID + 1, eos=EOS_ID, hidden=32)
    return LanguageModel(base.model, tok, (EOS_ID,), 64)


@pytest.fixture
def models():
    return lm_with_tokenizer(0), lm_with_tokenizer(1)


@pytest.fixture
def count_conversions(monkeypatch):
    """Counts native conversions (NativeCausalLM.from_hf) made during the test."""
    calls = {"n": 0}
    original = native_model_mod.NativeCausalLM.from_hf.__func__

    def counting(cls, *args, **kwargs):
        calls["n"] += 1
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(native_model_mod.NativeCausalLM, "from_hf", classmethod(counting))
    forget_native_copies()
    smcgen.api.clear_engine_cache()
    yield calls
    forget_native_copies()
    smcgen.api.clear_engine_cache()


def same(a: smcgen.SMCResult, b: smcgen.SMCResult) -> None:
    assert a.sequences == b.sequences
    assert a.text == b.text
    assert a.log_weights == pytest.approx(b.log_weights)
    assert a.log_z == pytest.approx(b.log_z)


def test_engine_converts_once_and_reuses_its_native_engine(models, count_conversions):
    target, draft = models
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=12)
    # converted when built (the native engine was chosen before converting anything)
    assert count_conversions["n"] == 2
    assert engine.engine_reason is None
    first = engine("ab", seed=3)
    second = engine("ab", seed=3)
    third = engine("ba", seed=4)
    assert count_conversions["n"] == 2, "a later call converted a model again"
    assert engine.stats["native_engines_built"] == 1, "a later call built another native engine"
    assert first.engine == second.engine == "native" and first.engine_reason is None
    same(first, second)
    assert third.sequences != first.sequences or third.text != first.text
    # generate runs the same draws (its own cached Engine, the same cached native copies)
    via_generate = smcgen.generate(
        target, "ab", draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=12, seed=3
    )
    same(first, via_generate)
    assert count_conversions["n"] == 2


def test_generate_caches_its_engine(models, count_conversions):
    target, _ = models
    a = smcgen.generate(target, "ab", n_particles=4, max_new_tokens=8, seed=1)
    engine = smcgen.api.cached_engine(target)
    built = engine.stats["requests"]
    b = smcgen.generate(target, "ab", n_particles=4, max_new_tokens=8, seed=1)
    assert engine.stats["requests"] == built + 1, "generate built a new Engine for the same model"
    same(a, b)


def test_generic_engine_is_chosen_without_converting(models, count_conversions):
    target, draft = models
    engine = Engine(target, draft=draft, n_particles=4)  # auto on the CPU: generic
    assert engine.engine_reason == "the model is not on a GPU"
    res = engine("ab", seed=0, max_new_tokens=6)
    assert res.engine == "generic" and res.engine_reason == "the model is not on a GPU"
    assert "engine: generic (the model is not on a GPU)" in res.summary()
    assert count_conversions["n"] == 0


@pytest.mark.parametrize("engine_name", ["native", "generic"])
def test_batch_of_different_lengths_matches_single_calls(models, engine_name):
    target, draft = models
    engine = Engine(target, draft=draft, engine=engine_name, n_particles=4, block_size=2, max_new_tokens=9)
    prompts = ["ab", "abba", [0, 1, 0, 1, 1, 0, 5]]
    seeds = [11, 12, 13]
    batched = engine.batch(prompts, seed=seeds, max_new_tokens=[9, 6, 9])
    assert len(batched) == 3
    for prompt, seed, limit, res in zip(prompts, seeds, [9, 6, 9], batched):
        # one batch (native: prompts of three lengths, three seeds, two limits), each request the same
        # draw as the single call with its seed
        same(res, engine(prompt, seed=seed, max_new_tokens=limit))
        assert max(len(s) for s in res.sequences) <= limit


def test_batch_of_agreeing_requests_runs_as_one_native_batch(models):
    target, draft = models
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=9, seed=5)
    results = engine.batch(["ab", "ba", "abab"])
    assert engine.stats["native_engines_built"] == 1 and engine.stats["native_requests"] == 3
    assert all(len(r.sequences) == 4 for r in results)
    again = engine.batch(["ab", "ba", "abab"])
    for a, b in zip(results, again):  # seeded: the batch reproduces
        same(a, b)


def test_chat_messages_apply_the_chat_template(models):
    target, _ = models
    chat = [{"role": "user", "content": "ab"}]
    ids = target.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    by_chat = smcgen.generate(target, chat, n_particles=4, max_new_tokens=6, seed=2)
    by_ids = smcgen.generate(target, list(ids), n_particles=4, max_new_tokens=6, seed=2)
    same(by_chat, by_ids)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        smcgen.generate(target, [{"content": "ab"}], n_particles=2, max_new_tokens=2)


def test_result_posterior_alive_and_parsed(models):
    target, _ = models
    schema = {"type": "object", "properties": {"a": {"enum": ["ab", "ba"]}}, "required": ["a"]}
    engine = Engine(target, n_particles=6, target_temperature=0.8)
    res = engine("ab", grammar=GrammarPotential.json_schema(schema), max_new_tokens=12, seed=0)
    assert res.output_format == "json"
    assert res.parsed in ({"a": "ab"}, {"a": "ba"})
    assert sum(p for _, p in res.posterior) == pytest.approx(1.0)
    assert res.argmax_text == res.posterior[0][0]
    assert len(res.alive) == 6 and res.n_alive >= 1
    # a JSON budget too small for the schema's shortest document is refused before any work
    with pytest.raises(smcgen.GrammarError, match="max_new_tokens=4 is too small"):
        engine("ab", grammar=GrammarPotential.json_schema(schema), max_new_tokens=4, seed=0)
    # too few tokens for any word of the language: every particle is cut off, flagged dead in a batch
    longer = GrammarPotential.regex("(ab){4}")
    (cut,) = engine.batch(["ab"], grammar=longer, max_new_tokens=4, seed=0)
    assert cut.dead and cut.n_alive == 0 and cut.posterior == [] and cut.parsed is None
    with pytest.raises(smcgen.AllParticlesDeadError):
        engine("ab", grammar=longer, max_new_tokens=4, seed=0)
    flagged = engine("ab", grammar=longer, max_new_tokens=4, seed=0, on_dead="flag")
    assert flagged.dead and flagged.parsed is None
    plain = engine("ab", max_new_tokens=8, seed=0)
    assert plain.parsed is None and plain.output_format is None and not plain.dead


def test_tokens_per_second_counts_answer_and_particles(models):
    target, _ = models
    res = Engine(target, n_particles=8)("ab", max_new_tokens=8, seed=0)
    assert res.particle_tokens == sum(len(s) for s in res.sequences)
    assert res.particle_tokens_per_second == pytest.approx(
        res.tokens_per_second * res.particle_tokens / len(res.token_ids)
    )
    text = res.summary()
    assert "answer:" in text and "all particles:" in text and "alive: 8 of 8" in text
    assert all(math.isfinite(w) for w in res.log_weights)


def test_engine_rejects_bad_overrides(models):
    target, _ = models
    engine = Engine(target, n_particles=2)
    with pytest.raises(Exception, match="n_particles"):
        engine("ab", n_particles=0)
    with pytest.raises(ValueError, match="context"):
        engine("a" * 70)
    with pytest.raises(ValueError, match="3 entries for 2 prompts"):
        engine.batch(["ab", "ba"], seed=[1, 2, 3])
