"""The public API end to end on tiny models: generate(), config, results, seeds, custom potentials."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import EOS

import smcgen
from smcgen import Potential, RewardPotential, SequenceBatch, SMCConfig


class NoC(Potential):
    """The README's custom potential, on the tiny vocabulary: forbid the letter 'c'."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([-math.inf if "c" in text else 0.0 for text in batch.texts])


def test_generate_smc_sd_text_prompt(target, draft, tok):
    res = smcgen.generate(
        target, "ab", draft=draft, tokenizer=tok, n_particles=6, block_size=2, max_new_tokens=7, seed=3
    )
    assert isinstance(res, smcgen.SMCResult)
    assert res.n_particles == 6 and len(res.sequences) == 6 and len(res.log_weights) == 6
    assert math.isclose(sum(math.exp(w) for w in res.log_weights), 1.0, rel_tol=1e-9)
    assert res.token_ids in res.sequences
    assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)
    assert all(len(s) <= 7 for s in res.sequences)
    assert math.isfinite(res.log_z) and res.n_steps == len(res.ess_history) >= 1
    assert all(1.0 - 1e-9 <= e <= 6 + 1e-9 for e in res.ess_history)
    assert res.elapsed_s > 0 and res.tokens_per_second > 0
    assert "particles: 6" in res.summary()


def test_prompt_forms_agree(target, tok):
    ids = tok("ab")["input_ids"]
    results = [
        smcgen.generate(target, p, tokenizer=tok, n_particles=4, max_new_tokens=5, seed=7)
        for p in ("ab", ids, torch.tensor(ids), torch.tensor([ids]))
    ]
    assert all(r.sequences == results[0].sequences for r in results)


def test_seed_reproducible_and_varies(target, draft, tok):
    kw = dict(draft=draft, tokenizer=tok, n_particles=8, block_size=2, max_new_tokens=8)
    a = smcgen.generate(target, "a", seed=1, **kw)
    b = smcgen.generate(target, "a", seed=1, **kw)
    c = smcgen.generate(target, "a", seed=2, **kw)
    assert a.sequences == b.sequences and a.log_weights == b.log_weights and a.token_ids == b.token_ids
    assert a.sequences != c.sequences


def test_custom_potential_is_enforced(target, tok):
    res = smcgen.generate(
        target,
        "ab",
        tokenizer=tok,
        potentials=[NoC()],
        n_particles=16,
        max_new_tokens=6,
        seed=0,
        return_all_particles=True,
    )
    assert "c" not in res.text
    # every particle with positive weight avoids the forbidden letter; the rest have weight zero
    for text, w in zip(res.texts, res.log_weights):
        assert w == -math.inf or "c" not in text
        assert not math.isnan(w)


def test_eos_ends_a_particle_and_freezes_it(target, tok):
    res = smcgen.generate(target, "ab", tokenizer=tok, n_particles=32, max_new_tokens=6, seed=5)
    ended = [s for s in res.sequences if EOS in s]
    assert ended, "the tiny model should emit EOS within 6 tokens for some particle"
    for s in ended:
        assert s.index(EOS) == len(s) - 1  # nothing after the EOS
    assert all(len(s) == 6 for s in res.sequences if EOS not in s)


def test_config_object_and_overrides(target, tok):
    cfg = SMCConfig(n_particles=3, max_new_tokens=4, seed=0)
    res = smcgen.generate(target, "a", tokenizer=tok, config=cfg, n_particles=5)
    assert res.n_particles == 5
    assert cfg.n_particles == 3  # the caller's config is not mutated


@pytest.mark.parametrize("resampler", ["systematic", "multinomial", "stratified", "residual"])
def test_every_resampler_runs(target, draft, tok, resampler):
    res = smcgen.generate(
        target,
        "a",
        draft=draft,
        tokenizer=tok,
        n_particles=8,
        max_new_tokens=6,
        ess_threshold=1.0,
        resampler=resampler,
        seed=0,
    )
    # threshold 1 resamples after every step except one that leaves every particle finished
    assert res.n_resamples >= max(res.n_steps - 1, 1)


def test_ess_threshold_zero_never_resamples(target, draft, tok):
    res = smcgen.generate(
        target, "a", draft=draft, tokenizer=tok, n_particles=8, max_new_tokens=6, ess_threshold=0.0, seed=0
    )
    assert res.n_resamples == 0


def test_reward_potential_steers(target, tok):
    """A strong reward for the letter 'b' (rare after the prompt "b") must raise its expected count."""
    kw = dict(tokenizer=tok, n_particles=64, max_new_tokens=6, seed=0, return_all_particles=True)
    plain = smcgen.generate(target, "b", **kw)
    steered = smcgen.generate(
        target, "b", potentials=RewardPotential(lambda t: t.count("b"), beta=3.0, prefix=True), **kw
    )

    def expected_b(res):
        return sum(math.exp(w) * t.count("b") for w, t in zip(res.log_weights, res.texts))

    assert expected_b(steered) > expected_b(plain) + 0.5, (expected_b(plain), expected_b(steered))


def test_progress_bar_runs(target, tok, capsys):
    smcgen.generate(target, "a", tokenizer=tok, n_particles=2, max_new_tokens=3, seed=0, progress=True)
    assert "smc" in capsys.readouterr().err


def test_product_of_potentials_composes():
    class Const(Potential):
        def __init__(self, v):
            self.v = v

        def log_prefix(self, batch):
            return torch.full((len(batch),), self.v)

    p = Const(1.0) * Const(2.0) * Const(-0.5)
    assert isinstance(p, smcgen.Product) and len(p.factors) == 3
    assert torch.allclose(
        p.log_prefix(SequenceBatch([[1], [2]], [0], None)), torch.tensor([2.5, 2.5], dtype=torch.float64)
    )
