"""Guides as token automata (smcgen/potentials/token_dfa.py) on the native engine's device path.

The automaton is built from xgrammar's matcher, so its masks must be the host guide's masks bit
for bit on every token walk; the native engine with the device guide must then draw the same
seeded tokens and give the same weights as with the host guide (same masks, same Philox stream).
The enumerated-target exactness of the device path is tests/test_native_grammar.py's (its regex
guides now take the device path, asserted there).
"""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from test_grammar_exactness import MASKED_REGEX, grammar
from test_native_grammar import DEVICE_REGEX
from tiny_models import EOS, PROMPT, tiny_lm

from smcgen import SMCConfig
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.token_dfa import TokenDFA
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC


class Order(BaseModel):
    """A JSON object of bounded fields without strings: its grammar tabulates."""

    item: Literal["apple", "pear", "fig"]
    quantity: int
    gift: bool


class Person(BaseModel):
    """Strings (a tail-recursive rule in xgrammar), max_length ({m,n} counts) and a shared string rule."""

    name: str = Field(max_length=20)
    age: int
    role: Literal["admin", "user", "guest"]
    tags: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def embedded_lm():
    import smcgen

    return smcgen.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def embedded_guides(embedded_lm):
    """Guides over the embedded 49152-token vocabulary, each with its automaton: a regex in one rule,
    one with groups (sub-rules whose items point back into the history), a Literal choice
    (lowered to a JSON Schema enum) and a JSON schema from a pydantic model without strings
    (xgrammar prints its unused, recursive value rules too: they are ignored)."""
    from typing import Literal

    from smcgen.potentials.output import as_grammar

    guides = [
        GrammarPotential.regex(r"The answer is [ABCD]\.", embedded_lm),
        GrammarPotential.regex(r"(yes|no), [0-9]*( kg)?\.", embedded_lm),
        as_grammar(Literal["red", "green", "blue"], embedded_lm),
        GrammarPotential.json_schema(Order, embedded_lm),
    ]
    out = []
    for g in guides:
        dfa = g.token_automaton()
        assert isinstance(dfa, TokenDFA), (g.name, dfa)
        out.append((g, dfa))
    for _, dfa in out[2:]:
        assert dfa.complete_is_exact is False  # a JSON Schema's validator also decides the end
    return out


def _host_mask_and_done(g: GrammarPotential, tokens: list[int]) -> tuple[torch.Tensor, bool]:
    """The host guide's bitmask after ``tokens`` and whether a sequence stopping there is in the language."""
    mask = g.next_token_bitmask(torch.tensor([tokens], dtype=torch.long).reshape(1, -1), 0)[0]
    from smcgen.potentials.base import SequenceBatch

    complete = float(g.log_complete(SequenceBatch([tokens], [], None))[0]) == 0.0
    return mask, complete


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_automaton_agrees_with_the_matcher_on_random_walks(embedded_guides, data):
    """Walk tokens (mostly allowed ones, sometimes any token, EOS included): at every step the
    automaton's mask and end verdict equal the host matcher's (49152-token vocabulary)."""
    g, dfa = data.draw(st.sampled_from(embedded_guides))
    g.start([], 1)
    tokens: list[int] = []
    state = dfa.initial(1, "cpu")
    for _ in range(data.draw(st.integers(0, 14))):
        host, complete = _host_mask_and_done(g, tokens)
        assert torch.equal(dfa.masks(state)[0], host)
        if dfa.complete_is_exact:
            assert bool(dfa.accepting[state][0]) == complete or int(state) == dfa.terminated
        else:  # the schema validator may refuse more; never less
            assert bool(dfa.accepting[state][0]) or not complete
        allowed = torch.nonzero(dfa.next_state[state[0]] >= 0).squeeze(-1).tolist()
        if allowed and data.draw(st.integers(0, 3)) > 0:
            t = data.draw(st.sampled_from(allowed))
        else:
            t = data.draw(
                st.sampled_from([*g.eos_token_ids, 0, 1, 504, 68, 32, data.draw(st.integers(0, g.vocab_size - 1))])
            )
        tokens.append(t)
        state = dfa.step(state, torch.tensor([t]))
    host, complete = _host_mask_and_done(g, tokens)
    assert torch.equal(dfa.masks(state)[0], host)


def test_json_automaton_agrees_with_the_matcher_to_the_end(embedded_guides):
    """Walks that write whole JSON documents (whitespace-only tokens avoided, so they finish): the
    automaton's mask equals the host matcher's at every step, through EOS."""
    import random

    g, dfa = embedded_guides[3]
    vocab = [bytes(b) for b in g._info.decoded_vocab]
    rng = random.Random(0)
    finished = 0
    for _ in range(4):
        g.start([], 1)
        tokens: list[int] = []
        state = dfa.initial(1, "cpu")
        while int(state) != dfa.terminated and len(tokens) < 60:
            host, complete = _host_mask_and_done(g, tokens)
            assert torch.equal(dfa.masks(state)[0], host)
            assert bool(dfa.accepting[state][0]) or not complete
            allowed = torch.nonzero(dfa.next_state[state[0]] >= 0).squeeze(-1).tolist()
            solid = [v for v in allowed if v < len(vocab) and vocab[v].strip()] or allowed
            t = rng.choice(solid)
            tokens.append(t)
            state = dfa.step(state, torch.tensor([t]))
        finished += int(state) == dfa.terminated
    assert finished == 4  # every walk ended its document with EOS


def test_grammars_whose_callers_are_hidden_stay_on_the_host(embedded_lm, tok):
    """The matcher's item sets show neither a sub-rule's callers nor a {m,n} counter: a counted
    group, a ``+`` loop (recursive), a shared rule or a recursive grammar is not tabulated (its keys
    merged states with different masks), and the reason says so."""
    for g in (
        GrammarPotential.regex(r"[A-Z][a-z]{1,8}( [a-z]{1,8}){2,5}\.", embedded_lm),
        GrammarPotential.regex(r"(yes|no), [0-9]+\.", embedded_lm),
        GrammarPotential.ebnf('root ::= "a" root "b" | "c"', tok),
        GrammarPotential.json_schema(Person, embedded_lm),
    ):
        assert "cannot be told apart" in g.token_automaton() or "start state" in g.token_automaton()


def test_tables_are_absorbing_and_budgeted():
    assert isinstance(grammar(MASKED_REGEX).token_automaton(), TokenDFA)  # groups: sub-rules, keyed
    g = grammar(DEVICE_REGEX)
    dfa = g.token_automaton()
    assert isinstance(dfa, TokenDFA)
    assert g.token_automaton() is dfa  # cached per budget
    for s in (dfa.terminated, dfa.dead):
        assert (dfa.next_state[s] == s).all() and (dfa.bitmask[s] == -1).all()
    assert bool(dfa.accepting[dfa.terminated]) and not bool(dfa.accepting[dfa.dead])
    assert "budget" in g.token_automaton(max_bytes=64)
    with pytest.raises(ValueError, match="max_bytes"):
        g.token_automaton(max_bytes=0)


@pytest.fixture(scope="module")
def models(device):
    target, draft = tiny_lm(0, logit_scale=1.0), tiny_lm(1, logit_scale=0.7)
    return NativeCausalLM.from_hf(target.model, device=device), NativeCausalLM.from_hf(draft.model, device=device)


@pytest.mark.parametrize("graph_path", [False, True], ids=["eager", "warm_up_and_lookahead"])
@pytest.mark.parametrize("block", [0, 2], ids=["plain", "sd_k2"])
def test_device_guide_draws_what_the_host_guide_draws(block, models, graph_path, warm_up_capture):
    """Same seed, same masks, same Philox stream: identical tokens, lengths and weights. Also with
    what only a GPU does to the device guide's run (the whole cycle's graph warm-up on a snapshot,
    the next cycle enqueued before the host reads the last one's done flag), which the host
    guide's pieces do not do (on an H100 the two drew different answers from the second cycle)."""
    target, draft = models
    cfg = SMCConfig(n_particles=4, block_size=max(block, 1), max_new_tokens=9, seed=7, ess_threshold=1.0)
    runs = {}
    for on_device in (True, False):
        engine = NativeSMC(
            target,
            cfg,
            draft=draft if block else None,
            eos_token_ids=(EOS,),
            page_size=4,
            guide=grammar(DEVICE_REGEX),
            device_guide=on_device,
        )
        assert (engine.dfa is not None) == on_device
        assert (engine.guide_reason is None) == on_device
        engine.pad_prefill = False  # on CUDA only the graph path would pad: the same prefill for both
        if on_device and graph_path:
            captured = warm_up_capture(engine)
            engine.lookahead = True
        runs[on_device] = engine.run(PROMPT, n_groups=16, on_dead="flag")
        if on_device and graph_path:
            assert captured, "the run took the graph path"
    dev, host = runs[True], runs[False]
    assert torch.equal(dev.tokens, host.tokens) and torch.equal(dev.lengths, host.lengths)
    assert torch.allclose(dev.log_weights, host.log_weights, atol=1e-5)
    assert torch.equal(torch.isneginf(dev.log_weights), torch.isneginf(host.log_weights))
    assert dev.resampled.any()  # resampling moved the automaton states too


def test_generate_reports_where_the_guide_ran(target, tok):
    """generate: a regex guide runs on the device (no engine_reason); a guide without an automaton
    (a context-free grammar) runs on the host and the result says why."""
    import smcgen

    regular = smcgen.generate(
        target,
        "ab",
        tokenizer=tok,
        guide=GrammarPotential.regex("[abc]{1,6}"),
        engine="native",
        n_particles=4,
        max_new_tokens=6,
        seed=0,
    )
    assert regular.engine == "native" and regular.engine_reason is None
    cfg = GrammarPotential.ebnf('root ::= "a" root "b" | "c"')
    nested = smcgen.generate(
        target,
        "ab",
        tokenizer=tok,
        guide=cfg,
        engine="native",
        n_particles=4,
        max_new_tokens=7,
        seed=0,
        on_dead="partial",
    )
    assert nested.engine == "native" and "host" in nested.engine_reason
    assert math.isfinite(regular.log_z)
