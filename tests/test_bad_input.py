"""Bad input gives a clear error (naming what and the allowed range) or a documented outcome."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from tiny_models import tiny_lm, tiny_tokenizer

import smcgen
from smcgen import AllParticlesDeadError, Potential, RewardPotential, SequenceBatch, SMCConfig


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("n_particles", 0, "greater than or equal to 1"),
        ("block_size", 0, "greater than or equal to 1"),
        ("max_new_tokens", 0, "greater than or equal to 1"),
        ("ess_threshold", 1.5, "less than or equal to 1"),
        ("ess_threshold", -0.1, "greater than or equal to 0"),
        ("draft_temperature", 0.0, "greedy decoding"),
        ("draft_temperature", 1e-5, "greater than or equal to 0.0001"),
        ("target_temperature", -1.0, "greater than or equal to 0.0001"),
        ("target_temperature", math.nan, "finite number"),
        ("alpha", 0.0, "greater than 0"),
        ("alpha", math.inf, "finite number"),
        ("resampler", "bogus", "systematic"),
        ("n_particle", 4, "Extra inputs are not permitted"),
    ],
)
def test_invalid_config_names_field_and_range(field, value, words):
    with pytest.raises(ValidationError) as err:
        SMCConfig(**{field: value})
    assert field in str(err.value) and words in str(err.value)


def test_invalid_override_through_generate(target, tok):
    with pytest.raises(ValidationError, match="n_particles"):
        smcgen.generate(target, "a", tokenizer=tok, n_particles=0)


def test_temperature_sets_both_temperatures_unless_one_is_given():
    from smcgen.validation import as_config

    assert (SMCConfig(temperature=0.5).target_temperature, SMCConfig(temperature=0.5).draft_temperature) == (0.5, 0.5)
    cfg = SMCConfig(temperature=0.5, draft_temperature=0.3)
    assert (cfg.target_temperature, cfg.draft_temperature) == (0.5, 0.3)
    assert SMCConfig(temperature=0.5, target_temperature=None).target_temperature == 0.5  # None: not given
    # a keyword temperature outranks the base config's temperatures, as generate(config=..., **kw) merges
    cfg = as_config(SMCConfig(n_particles=3, target_temperature=0.9), {"temperature": 0.6})
    assert (cfg.n_particles, cfg.target_temperature, cfg.draft_temperature) == (3, 0.6, 0.6)
    with pytest.raises(ValidationError, match="greedy decoding"):
        SMCConfig(temperature=0)


@pytest.mark.parametrize("prompt", ["", [], torch.tensor([], dtype=torch.long)])
def test_empty_prompt(target, tok, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        smcgen.generate(target, prompt, tokenizer=tok)


@pytest.mark.parametrize(
    "messages,words",
    [
        ([{"role": "usr", "content": "hi"}], "chat message 0 has role 'usr'; expected one of system, user"),
        ([{"role": "user", "content": "hi"}, {"content": "x"}], "chat message 1 needs 'role' and 'content'"),
    ],
)
def test_a_chat_message_with_a_wrong_role_or_keys_is_named(target, tok, messages, words):
    with pytest.raises(ValueError, match=words):
        smcgen.generate(target, messages, tokenizer=tok)


def test_prompt_longer_than_context(target, tok):
    context = target.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"model context is {context}"):
        smcgen.generate(target, [0] * (context + 1), tokenizer=tok)
    with pytest.raises(ValueError, match="exceeds the model context"):
        smcgen.generate(target, [0] * (context - 2), tokenizer=tok, max_new_tokens=5)


def test_prompt_ids_outside_vocab(target, tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smcgen.generate(target, [0, 99], tokenizer=tok)


def test_text_prompt_without_tokenizer(target):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        smcgen.generate(target, "ab")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward(target, tok, bad):
    with pytest.raises(ValueError, match="non-finite"):
        smcgen.generate(target, "a", tokenizer=tok, potentials=RewardPotential(lambda t: bad), max_new_tokens=3)


def test_potential_returning_nan_or_wrong_shape(target, tok):
    class NaNPot(Potential):
        def log_prefix(self, batch):
            return torch.full((len(batch),), math.nan)

    class ShortPot(Potential):
        def log_prefix(self, batch):
            return torch.zeros(1)

    with pytest.raises(ValueError, match="NaN"):
        smcgen.generate(target, "a", tokenizer=tok, potentials=NaNPot(), max_new_tokens=3)
    with pytest.raises(ValueError, match="returned 1 scores"):
        smcgen.generate(target, "a", tokenizer=tok, potentials=ShortPot(), n_particles=4, max_new_tokens=3)


def test_every_particle_at_weight_zero(target, tok):
    class Nothing(Potential):
        """Rules out every continuation of one token or more."""

        def log_prefix(self, batch: SequenceBatch):
            return torch.tensor([-math.inf if ids else 0.0 for ids in batch.token_ids])

    with pytest.raises(AllParticlesDeadError, match="weight zero"):
        smcgen.generate(target, "a", tokenizer=tok, potentials=Nothing(), max_new_tokens=3)

    class NothingAtAll(Potential):
        def log_prefix(self, batch):
            return torch.full((len(batch),), -math.inf)

    with pytest.raises(AllParticlesDeadError):
        smcgen.generate(target, "a", tokenizer=tok, potentials=NothingAtAll(), max_new_tokens=3)


def test_some_particles_dead_gives_no_nan(target, tok):
    class NoB(Potential):
        def log_prefix(self, batch):
            return torch.tensor([-math.inf if "b" in t else 0.0 for t in batch.texts])

    res = smcgen.generate(
        target, "a", tokenizer=tok, potentials=NoB(), n_particles=16, max_new_tokens=4, ess_threshold=0.0, seed=1
    )
    assert not any(math.isnan(w) for w in res.log_weights)
    assert math.isfinite(res.log_z)
    assert "b" not in res.text


def test_tokenizer_mismatch(target, tok):
    bigger = tiny_lm(2, vocab=5, eos=4).model
    with pytest.raises(ValueError, match="vocabularies differ"):
        smcgen.generate(target, "a", draft=bigger, tokenizer=tok)
    same_size = tiny_lm(3).model
    other_tok = tiny_tokenizer("abd")
    with pytest.raises(ValueError, match="tokenizers differ"):
        smcgen.generate(
            smcgen.LanguageModel.wrap(target, tok), "a", draft=smcgen.LanguageModel.wrap(same_size, other_tok)
        )


def test_draft_and_proposal_together(target, tok):
    with pytest.raises(ValueError, match="either draft or proposal"):
        smcgen.generate(
            target, "a", tokenizer=tok, draft=target, proposal=smcgen.LMProposal(smcgen.LanguageModel.wrap(target))
        )


def test_unknown_model_type():
    with pytest.raises(TypeError, match="expected a model name"):
        smcgen.generate(42, "a")


@pytest.mark.parametrize("name", ["smollm2-13m", "smollm2-135m-draf", "self-int9"])
def test_a_misspelt_model_name_fails_at_once_with_a_suggestion(name, monkeypatch):
    """A near miss of a name this package knows never reaches the hub (offline, that retries for
    seconds before a connection error that does not say the name is wrong)."""
    from transformers import AutoModelForCausalLM

    from smcgen.api import load_model

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(
        ValueError, match=r"unknown model name .*did you mean '(smollm2-135m|smollm2-135m-draft|self-int8)'"
    ):
        load_model(name)


def test_a_name_transformers_cannot_load_lists_the_known_names(monkeypatch):
    from transformers import AutoModelForCausalLM

    from smcgen.api import load_model

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match=r"could not load model 'no-such-model'.*smollm2-135m.*couldn't connect"):
        load_model("no-such-model")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", disk_full)
    with pytest.raises(OSError, match="^\\[Errno 28\\] No space left on device$"):  # not blamed on the name
        load_model("no-such-model")


def test_self_int8_as_a_target_says_it_is_a_draft():
    from smcgen.api import load_model

    with pytest.raises(ValueError, match="'self-int8' is a draft built from its target: pass it as draft="):
        load_model("self-int8")
