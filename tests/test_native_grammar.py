"""Grammar-constrained generation on the native engine (CPU: the kernels' torch twins).

The same regex target as tests/test_grammar_exactness.py, pi(x) ∝ p(x) 1[x in L]: the native
engine's masked target (plain SMC) and masked draft + masked bonus (SMC-SD, K = 2) are unbiased
(E[Z_hat] = Z and E[Z_hat * mass on x] = pi~(x), z-tests) and their total variation to pi
shrinks with N. The masks enter the fused sampling op (``allowed=`` bitmask).
"""

from __future__ import annotations

import pytest
from test_exactness import assert_tv_shrinks
from test_grammar_exactness import MASKED_REGEX, check_unbiased, grammar
from tiny_models import EOS, PROMPT

from smcgen import LMPotential, SMCConfig
from smcgen.exact import enumerate_target
from smcgen.samplers.native import NativeSMC

RUNS = 3000
# MASKED_REGEX's language without groups: xgrammar keeps it in one rule, so the guide compiles to a
# token automaton and the native engine runs it on the device path (the host path draws the same
# tokens: tests/test_device_guide.py)
DEVICE_REGEX = "a|b|aa|ac|ab|ba|bc|bb|aab|acb|bab|bcb"


@pytest.mark.parametrize("use_draft", [False, True], ids=["masked_target", "masked_draft_k2"])
def test_native_masked_smc_matches_the_constrained_target(use_draft, native_models):
    target_lm, native_target, native_draft = native_models
    exact = enumerate_target(LMPotential(target_lm), PROMPT, 4, [grammar(MASKED_REGEX)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    tvs = {}
    for n in (1, 4, 16):
        cfg = SMCConfig(
            n_particles=n, block_size=2 if use_draft else 1, max_new_tokens=4, seed=200 + n, ess_threshold=1.0
        )
        engine = NativeSMC(
            native_target,
            cfg,
            draft=native_draft if use_draft else None,
            eos_token_ids=(EOS,),
            page_size=4,
            mask=grammar(DEVICE_REGEX),
        )
        out = engine.run(PROMPT, n_groups=RUNS)
        assert engine.dfa is not None and engine.guide_reason is None  # a regular guide: device automaton
        tvs[n] = check_unbiased(f"native draft={use_draft} N={n}", out, exact, index)
    assert_tv_shrinks(f"native draft={use_draft}", tvs)


def test_generate_with_grammar_on_the_native_engine(target, draft, tok):
    """generate(grammar=..., engine='native'): masked native runs whose answers are in the language."""
    import math
    import re

    import smcgen
    from smcgen.potentials.grammar import GrammarPotential

    for kw in ({}, {"draft": draft, "block_size": 2}):
        g = GrammarPotential.regex("(ab|c)+")  # unbound: generate binds it to the target's tokenizer
        res = smcgen.generate(
            target,
            "ab",
            tokenizer=tok,
            grammar=g,
            engine="native",
            n_particles=4,
            max_new_tokens=8,
            seed=0,
            return_all_particles=True,
            **kw,
        )
        assert re.fullmatch("(ab|c)+", res.text), res.text
        for text, lw in zip(res.texts, res.log_weights):
            if lw > -math.inf:
                assert re.fullmatch("(ab|c)+", text), text


def test_native_grammar_dead_end_is_a_clear_error(native_models):
    """A language no particle can finish inside max_new_tokens: AllParticlesDeadError with partial outputs."""
    from smcgen import AllParticlesDeadError

    _, native_target, _ = native_models
    cfg = SMCConfig(n_particles=4, block_size=1, max_new_tokens=2, seed=0)
    engine = NativeSMC(native_target, cfg, eos_token_ids=(EOS,), page_size=4, mask=grammar("aaaa(b|c)"))
    with pytest.raises(AllParticlesDeadError, match="language") as err:
        engine.run(PROMPT, n_groups=2)
    assert err.value.groups == [0, 1] and len(err.value.sequences) == 4
    assert all(s == [0, 0] for s in err.value.sequences)  # the only tokens the grammar allowed
    # prompts of two lengths run as two batches: the error names the groups in the caller's order
    with pytest.raises(AllParticlesDeadError, match="language") as err:
        engine.run([PROMPT, [*PROMPT, 2], PROMPT])
    assert err.value.groups == [0, 1, 2]


def test_grammar_eos_must_be_an_engine_eos(native_models):
    _, native_target, _ = native_models
    with pytest.raises(ValueError, match="EOS ids"):
        NativeSMC(native_target, SMCConfig(), eos_token_ids=(), mask=grammar("a+"))


def test_native_on_dead_flag_keeps_the_living_groups(native_models):
    """on_dead="flag": groups whose one particle took the branch it cannot finish are flagged dead
    (log-weights and log Z -inf); the others come back with finite weights, inside the language."""
    import torch

    _, native_target, _ = native_models
    cfg = SMCConfig(n_particles=1, block_size=1, max_new_tokens=2, seed=3)
    # after "a" the language needs 4 more tokens: dead within 2; after "b" it may end at once
    engine = NativeSMC(native_target, cfg, eos_token_ids=(EOS,), page_size=4, mask=grammar("aaaa(b|c)|b"))
    out = engine.run(PROMPT, n_groups=40, on_dead="flag")
    assert out.dead.dtype == torch.bool and out.dead.shape == (40,)
    assert 0 < int(out.dead.sum()) < 40, out.dead
    first = out.tokens[:, 0, 0]
    assert torch.equal(out.dead, first == 0)  # token 0 is "a": exactly those groups died
    assert torch.isneginf(out.log_weights[out.dead]).all() and torch.isneginf(out.log_z[out.dead]).all()
    assert torch.isfinite(out.log_z[~out.dead]).all()
    for b in (~out.dead).nonzero().squeeze(-1).tolist():
        assert out.tokens[b, 0, : int(out.lengths[b, 0])].tolist() == [1, EOS]
    with pytest.raises(ValueError, match="on_dead must be"):
        engine.run(PROMPT, on_dead="ignore")
