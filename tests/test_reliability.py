"""Issue 14: inputs that used to give a silent wrong result or a useless error, now refused early.

Each case raises TypeError / ValueError naming the parameter and what is allowed, before any
model work, or (prompts from a tokenizer, config as a dict) is accepted.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import smcgen
from smcgen import AllParticlesDeadError, Potential, Proposal, RewardPotential, SMCConfig

# ------------------------------------------------------------------ config bounds


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_temperature", 1e-40),
        ("draft_temperature", 1e-40),
        ("target_temperature", math.inf),
        ("draft_temperature", math.nan),
        ("alpha", math.inf),
        ("alpha", math.nan),
        ("seed", 2**64),
        ("seed", 2**64 - 1),
        ("seed", 2**32),
        ("seed", -1),
    ],
)
def test_config_refuses_values_where_the_arithmetic_breaks(field, value):
    with pytest.raises(ValidationError) as err:
        SMCConfig(**{field: value})
    # a range for finite values; NaN and inf are named as such
    words = ("less than", "greater than") if math.isfinite(value) else ("finite number",)
    assert field in str(err.value) and any(w in str(err.value) for w in words)


def test_largest_seed_runs_and_distinct_seeds_differ(target, tok):
    """Seeds 0 and 2**32 drew the same tokens (the CPU generator keeps 32 bits); now 2**32 is refused and
    the whole accepted range runs (2**32 - 1 failed only after the run, in the answer's draw)."""
    out = smcgen.generate(target, [0, 1], tokenizer=tok, seed=2**32 - 1, n_particles=4, max_new_tokens=4)
    assert out.token_ids is not None


# ------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    "prompt,exc,words",
    [
        ([0.5, 1.0], TypeError, "token ids must be integers"),
        ([0, 1.0], TypeError, "token ids must be integers"),
        (torch.tensor([0.0, 1.7]), TypeError, "integer token ids"),
        (torch.tensor([True, False]), TypeError, "integer token ids"),
        ([True, False], TypeError, "token ids must be integers"),
        (b"ab", TypeError, "got bytes"),
        (["ab", "ba"], ValueError, "batch"),
        ([[0, 1], [1, 0]], ValueError, "batch"),
        ("a\ud800b", ValueError, "lone surrogate"),
        (3.5, TypeError, "prompt must be"),
        ({"ids": [0]}, TypeError, "input_ids"),
    ],
)
def test_bad_prompts(target, tok, prompt, exc, words):
    with pytest.raises(exc, match=words):
        smcgen.generate(target, prompt, tokenizer=tok, n_particles=2, max_new_tokens=2)


def test_tokenizer_output_is_accepted_as_the_prompt(target, tok):
    plain = smcgen.generate(target, "ab", tokenizer=tok, seed=3, n_particles=4, max_new_tokens=4)
    for prompt in (tok("ab"), tok("ab", return_tensors="pt"), [list(tok("ab")["input_ids"])]):
        out = smcgen.generate(target, prompt, tokenizer=tok, seed=3, n_particles=4, max_new_tokens=4)
        assert out.token_ids == plain.token_ids and out.log_weights == plain.log_weights


def test_chat_template_dict_is_accepted():
    lm = smcgen.load_model("smollm2-135m", "cpu")
    enc = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    out = smcgen.generate(lm, enc, seed=0, n_particles=2, max_new_tokens=2)
    ids = smcgen.generate(lm, list(enc["input_ids"]), seed=0, n_particles=2, max_new_tokens=2)
    assert out.token_ids == ids.token_ids


def test_padded_tokenizer_output_is_refused(target, tok):
    with pytest.raises(ValueError, match="attention_mask has padding"):
        smcgen.generate(target, {"input_ids": [0, 1, 3], "attention_mask": [1, 1, 0]}, tokenizer=tok)


# ------------------------------------------------------------------ other arguments


def test_config_as_dict_is_accepted(target, tok):
    a = smcgen.generate(target, [0, 1], tokenizer=tok, config={"n_particles": 4, "seed": 5, "max_new_tokens": 4})
    b = smcgen.generate(target, [0, 1], tokenizer=tok, config=SMCConfig(n_particles=4, seed=5, max_new_tokens=4))
    assert a.token_ids == b.token_ids and a.n_particles == 4


def test_config_of_another_type_is_a_type_error(target, tok):
    with pytest.raises(TypeError, match="config must be an SMCConfig"):
        smcgen.generate(target, [0, 1], tokenizer=tok, config=[("n_particles", 4)])


@pytest.mark.parametrize(
    "potentials,words",
    [
        (lambda text: 1.0, "RewardPotential"),
        ("regex", "potentials must be a Potential"),
        ([RewardPotential(len), "x"], "not Potentials at 1: str"),
    ],
)
def test_bad_potentials(target, tok, potentials, words):
    with pytest.raises(TypeError, match=words):
        smcgen.generate(target, [0, 1], tokenizer=tok, potentials=potentials, max_new_tokens=4)


def test_potentials_none_means_none(target, tok):
    a = smcgen.generate(target, [0, 1], tokenizer=tok, potentials=None, seed=1, n_particles=4, max_new_tokens=4)
    b = smcgen.generate(target, [0, 1], tokenizer=tok, seed=1, n_particles=4, max_new_tokens=4)
    assert a.token_ids == b.token_ids


def test_grammar_of_an_unknown_type_names_what_it_takes(target, tok):
    with pytest.raises(smcgen.GrammarError, match="grammar must be a GrammarPotential, a pydantic model"):
        smcgen.generate(target, [0, 1], tokenizer=tok, grammar=42)


def test_proposal_of_another_type_is_a_type_error(target, tok):
    with pytest.raises(TypeError, match="proposal must be"):
        smcgen.generate(target, [0, 1], tokenizer=tok, proposal="draft")


@pytest.mark.parametrize(
    "returned,exc,words",
    [
        ({"a": 1.0}, TypeError, "list of numbers"),
        ("1.0", TypeError, "list of numbers"),
        (None, TypeError, "list of numbers"),
        ([None], TypeError, "must return a number"),
        (["1.0"], TypeError, "must return a number"),
    ],
)
def test_batched_reward_returning_the_wrong_type(target, tok, returned, exc, words):
    def reward(texts):
        return returned if not isinstance(returned, list) else returned * len(texts)

    with pytest.raises(exc, match=words):
        smcgen.generate(
            target, [0, 1], tokenizer=tok, potentials=RewardPotential(reward, batched=True), max_new_tokens=4
        )


@pytest.mark.parametrize("value", [None, "high", [1.0]])
def test_reward_returning_a_non_number(target, tok, value):
    with pytest.raises(TypeError, match="reward must return a number"):
        smcgen.generate(target, [0, 1], tokenizer=tok, potentials=RewardPotential(lambda t: value), max_new_tokens=4)


def test_reward_returning_a_tensor_or_array_is_accepted(target, tok):
    import numpy as np

    a = RewardPotential(lambda texts: np.array([len(t) for t in texts], dtype=float), batched=True)
    b = RewardPotential(lambda texts: [float(len(t)) for t in texts], batched=True)
    ra = smcgen.generate(target, [0, 1], tokenizer=tok, potentials=a, seed=2, n_particles=4, max_new_tokens=4)
    rb = smcgen.generate(target, [0, 1], tokenizer=tok, potentials=b, seed=2, n_particles=4, max_new_tokens=4)
    assert ra.log_weights == rb.log_weights


def test_draft_on_the_meta_device(target, tok):
    with torch.device("meta"):
        shell = type(target)(target.config)
    with pytest.raises(ValueError, match="draft has its weights on the meta device"):
        smcgen.generate(target, [0, 1], tokenizer=tok, draft=shell, max_new_tokens=4)


class _BadProposal(Proposal):
    """A custom proposal returning what its test says."""

    def __init__(self, make):
        self.make = make

    def propose(self, sequences, n_tokens, generator):
        return self.make(sequences.shape[0], n_tokens)


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda r, k: (torch.full((r, k), 7), torch.zeros(r, k)), ValueError, "outside the vocabulary"),
        (lambda r, k: (torch.full((r, k), -1), torch.zeros(r, k)), ValueError, "outside the vocabulary"),
        (lambda r, k: (torch.zeros(r, k + 1, dtype=torch.long), torch.zeros(r, k + 1)), ValueError, "must be"),
        (lambda r, k: (torch.zeros(r, dtype=torch.long), torch.zeros(r)), ValueError, "must be"),
        (lambda r, k: (torch.zeros(r, k), torch.zeros(r, k)), TypeError, "must be integers"),
        (lambda r, k: (torch.zeros(r, k, dtype=torch.long), torch.full((r, k), math.nan)), ValueError, "non-finite"),
        (lambda r, k: [0] * r, TypeError, "tuple"),
    ],
)
def test_custom_proposal_output_is_checked(target, tok, make, exc, words):
    with pytest.raises(exc, match=words) as err:
        smcgen.generate(
            target, [0, 1], tokenizer=tok, proposal=_BadProposal(make), n_particles=2, block_size=2, max_new_tokens=4
        )
    assert "_BadProposal" in str(err.value)


# ------------------------------------------------------------------ memory


def test_memory_estimate_refuses_10000_particles_on_the_embedded_model(monkeypatch):
    from smcgen.memory import RequestTooLargeError, estimate_request

    lm = smcgen.load_model("smollm2-135m", "cpu")
    cfg = SMCConfig(n_particles=10000)
    est = estimate_request(cfg, lm, None, 10, lm.vocab_size)
    # at least the 5 [N x vocab] float32 copies the issue measured (49152 tokens: ~9.8 GB)
    assert est.vocab_bytes >= 5 * 4 * 10000 * lm.vocab_size
    monkeypatch.setenv("SMCGEN_MEMORY_LIMIT_BYTES", str(8e9))
    with pytest.raises(RequestTooLargeError, match=r"n_particles=10000 needs about .* GB .* 8.00 GB is free") as err:
        smcgen.generate(lm, "hi", n_particles=10000, engine="generic")
    assert "lower n_particles" in str(err.value)
    # a small request passes the same limit
    smcgen.generate(lm, "hi", n_particles=2, max_new_tokens=2, engine="generic")


# ------------------------------------------------------------------ when every particle dies


class _NoB(Potential):
    """Zero on any continuation containing 'b' (token 1) -- with a peaked model every particle dies."""

    def log_prefix(self, batch):
        return torch.tensor([-math.inf if 1 in t or 0 in t or 2 in t else 0.0 for t in batch.token_ids])

    def explain_zero(self, token_ids, finished):
        return "has a letter" if any(t in (0, 1, 2) for t in token_ids) else None


def test_all_dead_error_shows_text_and_suggests_a_mask(target, tok):
    with pytest.raises(AllParticlesDeadError) as err:
        smcgen.generate(target, [0, 1], tokenizer=tok, potentials=_NoB(), n_particles=4, seed=0, max_new_tokens=6)
    msg = str(err.value)
    assert "_NoB" in msg and "last prefixes: '" in msg and "grammar" in msg and "on_dead='flag'" in msg


@pytest.mark.parametrize("policy", ["flag", "partial"])
def test_on_dead_flag_returns_the_partial_result(target, tok, policy):
    out = smcgen.generate(
        target, [0, 1], tokenizer=tok, potentials=_NoB(), n_particles=4, seed=0, max_new_tokens=6, on_dead=policy
    )
    assert out.dead and out.log_z == -math.inf
    assert out.token_ids == max(out.sequences, key=len) and len(out.token_ids) > 0


def test_on_dead_unknown_policy(target, tok):
    with pytest.raises(ValueError, match="on_dead must be one of"):
        smcgen.generate(target, [0, 1], tokenizer=tok, on_dead="ignore")


def test_live_run_is_not_flagged(target, tok):
    assert not smcgen.generate(target, [0, 1], tokenizer=tok, n_particles=2, max_new_tokens=3, on_dead="flag").dead
