"""The Python budget twist: its closing estimate, its schedule, and that SMC with it keeps the target."""

from __future__ import annotations

import math

import pytest
import torch
from test_grammar_exactness import check_unbiased
from tiny_models import PROMPT, tiny_lm

from smcgen import SMC, LMPotential, SequenceBatch, SMCConfig
from smcgen.exact import enumerate_target
from smcgen.potentials import PythonBudgetTwist, PythonGrammarPotential
from smcgen.potentials.python_budget import SUITE_TOKENS, closing_need
from smcgen.runners.transformers import LanguageModel


def test_closing_need_counts_closers_operands_suites_and_eos():
    assert closing_need("\n    return 1\n") == 1  # only EOS
    assert closing_need("\n    return 1") == 2  # the newline, EOS
    assert closing_need("\n    return 1\n\n# Test the") == 2  # a trailing comment needs its newline
    assert closing_need("\n    x = (a +") == 4  # an operand, ")", the newline, EOS
    assert closing_need('\n    s = """ab') == 3  # the closing quotes, the newline, EOS
    assert closing_need('\n    s = "a#b(" + t') == 2  # "#" and "(" inside a string count for nothing
    assert closing_need("\n    if x:\n") == 1 + SUITE_TOKENS  # the block needs a statement
    assert closing_need("\n    if x:\n        y = 1\n") == 1
    assert closing_need("\n") == 1 + SUITE_TOKENS  # an empty body needs a statement
    assert closing_need("\n    x = f(a,\\\n") == 3  # a continuation keeps the line open
    assert closing_need("\n    return 1\n```") == 1  # the closing fence ends the code


def batch(texts: list[str], lengths: list[int]) -> SequenceBatch:
    class Texts:
        def batch_decode(self, sequences, skip_special_tokens=True):
            return [texts[s[0]] for s in sequences]

    return SequenceBatch([[i] * n for i, n in enumerate(lengths)], [], Texts())


def test_twist_is_zero_with_room_and_falls_as_the_budget_runs_out():
    twist = PythonBudgetTwist(64, margin=12, nats_per_token=2.0)
    mid = "\n    x = (a +"  # needs 4
    scores = twist.log_prefix(batch([mid] * 4, [10, 48, 50, 60]))
    assert scores[0] == 0.0 and scores[1] == 0.0  # 4 + 12 <= 54, 16
    assert scores[2] == -4.0 and scores[3] == -24.0  # 2 and 12 tokens short
    # at the same length, the particle at a statement boundary is favoured over one mid-statement
    pair = twist.log_prefix(batch(["\n    return x\n", mid], [60, 60]))
    assert pair[0] > pair[1]
    assert torch.equal(twist.log_complete(batch([mid], [60])), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"max_new_tokens": 8, "margin": -1}, "margin must be an int >= 0"),
        ({"max_new_tokens": 8, "nats_per_token": math.inf}, "nats_per_token must be a finite number > 0"),
    ],
)
def test_bad_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PythonBudgetTwist(**kw)


# ---------------------------------------------------------------------------------------- exactness
# four Python pieces and EOS for the mask: a statement, a comment line, a blank line
PIECES = ["\n    x = (1", ")\n", "\n    # c", "\n"]
EOS5 = 4
MAX_NEW = 4


# the exactness runs: a statement and blank lines (two tokens may end a finished body: "\n" and EOS)
RUN_PIECES = ["\n    x = (1", ")\n", "\n"]
EOS4 = 3


class PieceDecoder:
    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(RUN_PIECES[t] for t in s if t != EOS4) for s in sequences]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.batch_decode([ids])[0]


def allowed(grammar, tokens: list[int]) -> list[int]:
    mask = grammar.next_token_bitmask(torch.tensor([PROMPT + tokens]), len(PROMPT))[0]
    return [v for v in range(5) if (int(mask[v // 32]) >> (v % 32)) & 1]


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_last_token_mask_keeps_only_the_tokens_that_end_the_body(lazy):
    grammar = PythonGrammarPotential.build([*PIECES, None], eos_token_ids=[EOS5], lazy=lazy)
    assert isinstance(grammar, PythonGrammarPotential) and grammar.counts_down_budget
    grammar.start(PROMPT, 1)
    body_then_comment = [0, 1, 2]  # "\n    x = (1)\n\n    # c"
    assert allowed(grammar, body_then_comment) == [0, 1, 2, 3]  # a statement, ")" + newline, ...
    grammar.finish_within = 4
    assert allowed(grammar, body_then_comment) == [1, 3]  # the last token: those that end the comment's line
    assert allowed(grammar, [0, 1]) == [0, 2, 3, EOS5]  # not the last token: the mask is unchanged
    grammar.finish_within = 3
    assert allowed(grammar, [0, 1]) == [3, EOS5]  # a finished body: a blank line or EOS (not a comment)
    grammar.finish_within = 2
    assert allowed(grammar, [2]) == [0, 1, 2, 3]  # a comment alone is no body: nothing ends it, mask unchanged


@pytest.mark.parametrize("finish", [False, True])
def test_smc_with_the_budget_twist_targets_the_same_bodies(finish):
    """Grammar SMC with the twist on (margin 1, 1 nat per token: active on most prefixes of this
    4-token budget), and with the last-token mask, against the enumerated grammar-conditioned
    target, which has neither."""
    base = tiny_lm(3, vocab=4, eos=EOS4, logit_scale=0.5)
    lm = LanguageModel(base.model, PieceDecoder(), (EOS4,), base.context_length)
    grammar = PythonGrammarPotential.build([*RUN_PIECES, None], eos_token_ids=[EOS4])
    exact = enumerate_target(LMPotential(lm), PROMPT, MAX_NEW, [grammar])
    if finish:
        grammar.finish_within = MAX_NEW
    twist = PythonBudgetTwist(MAX_NEW, margin=1, nats_per_token=1.0)
    assert twist.log_prefix(SequenceBatch([[0]], PROMPT, lm.tokenizer))[0] < 0, "the twist should be active"
    assert sum(math.isfinite(w) for w in exact.log_weights.tolist()) >= 4  # several bodies to tell apart
    index = {s: i for i, s in enumerate(exact.sequences)}
    cfg = SMCConfig(n_particles=4, max_new_tokens=MAX_NEW, seed=11, ess_threshold=1.0)
    out = SMC(LMPotential(lm), cfg, mask=grammar, potentials=grammar * twist).run(PROMPT, n_groups=1500, on_dead="flag")
    check_unbiased(f"python budget twist N=4 finish={finish}", out, exact, index)


def test_the_engine_sets_the_last_token_mask_from_the_requests_limit():
    """Through ``smcgen.Engine`` a Python grammar guide gets ``finish_within`` from each request's
    ``max_new_tokens`` (as a JSON schema's budget does), so users need not set it by hand."""
    import smcgen

    base = tiny_lm(3, vocab=4, eos=EOS4, logit_scale=0.5)
    lm = LanguageModel(base.model, PieceDecoder(), (EOS4,), base.context_length)
    grammar = PythonGrammarPotential.build([*RUN_PIECES, None], eos_token_ids=[EOS4])
    assert grammar.counts_down_budget and grammar.finish_within is None
    engine = smcgen.Engine(lm, guide=grammar, n_particles=4, engine="generic")
    for limit in (3, MAX_NEW):
        res = engine(PROMPT, max_new_tokens=limit, seed=1, on_dead="flag")
        assert grammar.finish_within == limit
        if not res.dead:  # a live answer ends as a finished body within the limit
            assert len(res.token_ids) <= limit
