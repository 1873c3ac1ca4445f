"""Grammar potentials end to end on tiny models: JSON schema, EBNF, Lark, regex; per-particle
states under resampling; masks consistent with scores; masked sampling; the generate() wiring."""

from __future__ import annotations

import json
import math
import random
import re
from enum import Enum

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field
from tiny_models import tiny_lm

import smcgen
from smcgen import SMC, GrammarPotential, LMPotential, SequenceBatch, SMCConfig
from smcgen.core.sampling import allowed_from_bitmask, sample_powered, sample_tokens
from smcgen.proposals.masked import MaskedLMProposal

# a character-level vocabulary: printable ASCII plus EOS, for grammars over real text
CHARS = [chr(i) for i in range(32, 127)]
CHAR_EOS = len(CHARS)
CHAR_TOKENS = CHARS + [None]


def decode(ids) -> str:
    return "".join(CHARS[t] for t in ids if t != CHAR_EOS)


@pytest.fixture(scope="module")
def char_lm():
    return tiny_lm(3, vocab=len(CHAR_TOKENS), eos=CHAR_EOS, logit_scale=1.0)


class Color(str, Enum):
    red = "red"
    green = "green"


class Point(BaseModel):
    x: int = Field(ge=0, le=9)
    y: int = Field(ge=0, le=9)


class Record(BaseModel):
    c: Color
    p: Point
    f: list[bool] = Field(max_length=2)


def finished_outputs(out) -> list[tuple[list[int], float]]:
    """(token ids, normalized weight) of every particle of every group."""
    res = []
    for b in range(out.tokens.shape[0]):
        for i in range(out.tokens.shape[1]):
            n = int(out.lengths[b, i])
            res.append((out.tokens[b, i, :n].tolist(), float(out.log_weights[b, i].exp())))
    return res


def run_masked(lm, g, n_groups=12, n=4, max_new=60, seed=0):
    cfg = SMCConfig(n_particles=n, max_new_tokens=max_new, seed=seed, ess_threshold=1.0)
    return SMC(LMPotential(lm), cfg, mask=g).run([0], n_groups=n_groups)


def test_json_schema_from_pydantic_generates_valid_json(char_lm):
    g = GrammarPotential.json_schema(
        Record, CHAR_TOKENS, eos_token_ids=[CHAR_EOS], any_whitespace=False, separators=(",", ":")
    )
    out = run_masked(char_lm, g)
    schema = Record.model_json_schema()
    n_checked = 0
    for ids, w in finished_outputs(out):
        if w == 0:
            continue
        assert ids[-1] == CHAR_EOS, "a weighted particle must have ended at EOS"
        doc = json.loads(decode(ids))
        jsonschema.validate(doc, schema)
        Record.model_validate(doc)
        n_checked += 1
    assert n_checked >= 12
    assert g.stats.mask_rows > 0 and g.stats.forks > 0


def test_json_schema_dict_and_text_are_the_same_language():
    schema = {"type": "object", "properties": {"k": {"enum": ["u", "v"]}}, "required": ["k"]}
    a = GrammarPotential.json_schema(schema, CHAR_TOKENS, eos_token_ids=[CHAR_EOS], any_whitespace=False)
    b = GrammarPotential.json_schema(json.dumps(schema), CHAR_TOKENS, eos_token_ids=[CHAR_EOS], any_whitespace=False)
    texts = ['{"k": "u"}', '{"k": "w"}', '{"k": "v"', "{}"]
    batch = SequenceBatch([[CHARS.index(c) for c in t] + [CHAR_EOS] for t in texts], [], None)
    assert a.log_complete(batch).tolist() == b.log_complete(batch).tolist() == [0.0, -math.inf, -math.inf, -math.inf]


ARITH_EBNF = """
root ::= num (op num){0,3}
num ::= [1-9] [0-9]?
op ::= "+" | "*"
"""
ARITH_LARK = r"""
start: num (OP num)~0..3
num: /[1-9][0-9]?/
OP: "+" | "*"
"""
ARITH_RE = re.compile(r"[1-9][0-9]?([+*][1-9][0-9]?){0,3}")


@pytest.mark.parametrize("kind", ["ebnf", "lark", "regex"])
def test_context_free_and_regular_grammars_generate_their_language(kind, char_lm):
    make = {
        "ebnf": lambda: GrammarPotential.ebnf(ARITH_EBNF, CHAR_TOKENS, eos_token_ids=[CHAR_EOS]),
        "lark": lambda: GrammarPotential.lark(ARITH_LARK, CHAR_TOKENS, eos_token_ids=[CHAR_EOS]),
        "regex": lambda: GrammarPotential.regex(ARITH_RE.pattern, CHAR_TOKENS, eos_token_ids=[CHAR_EOS]),
    }
    g = make[kind]()
    out = run_masked(char_lm, g, n_groups=16, max_new=16)
    seen = set()
    for ids, w in finished_outputs(out):
        if w > 0:
            text = decode(ids)
            assert ARITH_RE.fullmatch(text), f"{kind}: {text!r} is outside the language"
            eval(compile(text, "<arith>", "eval"))  # a valid Python expression too
            seen.add(text)
    assert len(seen) >= 5, seen


def test_states_follow_resampling_and_match_stateless_scores():
    """The per-row cache (advance, fork on duplicates) gives exactly the stateless scores, and
    resampling forks instead of replaying."""
    g = GrammarPotential.ebnf(ARITH_EBNF, CHAR_TOKENS, eos_token_ids=[CHAR_EOS])
    rng = random.Random(0)
    R = 6
    g.start([], R)
    seqs: list[list[int]] = [[] for _ in range(R)]
    alphabet = [CHARS.index(c) for c in "0123456789+*x"]
    for step in range(8):
        for r in range(R):
            seqs[r].append(rng.choice(alphabet))
        cached = g.log_prefix(SequenceBatch(seqs, [], None, rows=range(R)))
        fresh = g.log_prefix(SequenceBatch(seqs, [], None))
        assert cached.tolist() == fresh.tolist(), f"step {step}"
        mask_cached = g.next_token_bitmask(torch.tensor([[0] + s for s in seqs]), 1)
        ancestors = torch.tensor(sorted(rng.randrange(R) for _ in range(R)))
        g.reorder(ancestors)
        seqs = [list(seqs[a]) for a in ancestors.tolist()]
        assert torch.equal(g.next_token_bitmask(torch.tensor([[0] + s for s in seqs]), 1), mask_cached[ancestors])
    assert g.stats.forks > 0 and g.stats.rebuilds == 0
    # rows asked about out of order are rebuilt, and still scored right
    swapped = seqs[1:] + seqs[:1]
    assert (
        g.log_prefix(SequenceBatch(swapped, [], None, rows=range(R))).tolist()
        == g.log_prefix(SequenceBatch(swapped, [], None)).tolist()
    )
    assert g.stats.rebuilds > 0


def test_mask_bits_agree_with_prefix_and_complete_scores():
    """Token v is allowed after x  <=>  log_prefix(x v) = 0 (v not EOS)  /  log_complete(x EOS) = 0."""
    g = GrammarPotential.json_schema(Record, CHAR_TOKENS, eos_token_ids=[CHAR_EOS], any_whitespace=False)
    rng = random.Random(1)
    prefix: list[int] = []
    V = len(CHAR_TOKENS)
    for _ in range(120):
        allowed = allowed_from_bitmask(g.next_token_bitmask(torch.tensor([[0] + prefix]), 1), V, torch.device("cpu"))[0]
        body = [prefix + [v] for v in range(V - 1)]
        prefix_ok = (g.log_prefix(SequenceBatch(body, [], None)) == 0).tolist()
        eos_ok = bool(g.log_complete(SequenceBatch([prefix + [CHAR_EOS]], [], None))[0] == 0)
        assert allowed.tolist() == prefix_ok + [eos_ok], f"after {decode(prefix)!r}"
        choices = [v for v in range(V - 1) if allowed[v]]
        if not choices:
            assert eos_ok
            break
        prefix.append(rng.choice(choices))
    else:
        pytest.fail("the random walk should reach the end of a Record")


def test_masked_sampling_draws_the_renormalized_masked_distribution():
    torch.manual_seed(0)
    V = 70
    logits = torch.randn(3, V) * 2
    bits = torch.zeros(3, V, dtype=torch.bool)
    bits[0, [1, 5, 64, 69]] = True
    bits[1, :] = True
    # row 2: nothing allowed
    padded = torch.zeros(3, 96, dtype=torch.long)
    padded[:, :V] = bits.long()
    packed = (padded.view(3, 3, 32) << torch.arange(32)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    assert torch.equal(allowed_from_bitmask(packed, V, torch.device("cpu")), bits)

    draws = 20000
    gen = torch.Generator().manual_seed(1)
    rows = logits[0:1].expand(draws, V)
    tok, log_target, log_norm = sample_powered(rows, 0.8, 1.5, gen, allowed=packed[0:1].expand(draws, -1))
    powered = 1.5 * torch.log_softmax(logits[0] / 0.8, -1).double()
    want_norm = torch.logsumexp(powered[bits[0]], 0)
    assert torch.allclose(log_norm, torch.full_like(log_norm, float(want_norm)), atol=1e-5)
    assert torch.allclose(log_target, powered[tok].to(log_target.dtype), atol=1e-5)
    freq = torch.bincount(tok, minlength=V).double() / draws
    want = torch.zeros(V, dtype=torch.float64)
    want[bits[0]] = torch.softmax(powered[bits[0]], 0)
    assert float((freq - want).abs().max()) < 0.015

    tq, lq = sample_tokens(logits, 1.25, gen, allowed=packed)
    assert bool(bits[0, tq[0]]) and tq[2] == 0 and lq[2] == 0
    scaled = logits[0] * 1.25
    assert math.isclose(float(lq[0]), float(scaled[tq[0]] - torch.logsumexp(scaled[bits[0]], 0)), abs_tol=1e-5)
    t2, lt2, ln2 = sample_powered(logits, 1.0, 1.0, gen, allowed=packed)
    assert t2[2] == 0 and lt2[2] == -math.inf and ln2[2] == -math.inf
    assert ln2[1] == pytest.approx(0.0, abs=1e-5)  # everything allowed: the normalizer is 1


def test_generate_with_grammar_binds_masks_and_stays_in_the_language(target, draft, tok):
    g = GrammarPotential.regex("(ab|c)+")  # unbound: generate binds it to the target's tokenizer
    for kw in ({}, {"draft": draft, "block_size": 2}):
        res = smcgen.generate(
            target,
            "a",
            tokenizer=tok,
            grammar=g,
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


def test_special_tokens_are_never_allowed(tok):
    """A tokenizer's special tokens decode to nothing, so the grammar must not let them stand for
    their spelling: '<x>' is excluded even where the characters '<', 'x', '>' are allowed."""
    from tiny_models import tiny_tokenizer

    special = tiny_tokenizer()
    special.add_special_tokens({"additional_special_tokens": ["<x>"]})
    sid = special.convert_tokens_to_ids("<x>")
    g = GrammarPotential.regex("[abc<>x]*", special, vocab_size=len(special))
    allowed = allowed_from_bitmask(g.next_token_bitmask(torch.tensor([[0]]), 1), len(special), torch.device("cpu"))[0]
    assert not allowed[sid] and allowed[special.eos_token_id] and allowed[:3].all()


def test_masked_proposal_checks_vocabulary(target, tok):
    lm = smcgen.api.as_language_model(target, tok)
    g = GrammarPotential.regex("a+", CHAR_TOKENS, eos_token_ids=[CHAR_EOS])
    with pytest.raises(ValueError, match="compiled for 96 tokens"):
        MaskedLMProposal(lm, g)
    with pytest.raises(ValueError, match="compiled for 96 tokens"):
        SMC(LMPotential(lm), SMCConfig(), mask=g)


def test_unbound_grammar_as_plain_factor_says_how_to_bind(target, tok):
    with pytest.raises(RuntimeError, match=r"not bound to a vocabulary; call \.bind"):
        smcgen.generate(target, "a", tokenizer=tok, potentials=GrammarPotential.regex("a+"), max_new_tokens=3)


def test_target_and_draft_sharing_a_tokenizer_share_one_bound_grammar(target, draft, tok):
    """An unbound grammar given to both the SMC mask and the masked draft binds once: one factor, one
    set of per-particle matchers (two copies would mask and score every step twice)."""
    t_lm, d_lm = smcgen.api.as_language_model(target, tok), smcgen.api.as_language_model(draft, tok)
    g = GrammarPotential.regex("(ab|c)+")
    proposal = MaskedLMProposal(d_lm, g)
    smc = SMC(LMPotential(t_lm), SMCConfig(), proposal=proposal, mask=g)
    assert smc.mask is proposal.mask
    grammars = [f for f in smc.potential.factors if isinstance(f, GrammarPotential)]
    assert grammars == [smc.mask]
    assert g.bind(t_lm) is g.bind(tok, vocab_size=t_lm.vocab_size), "the vocabulary decides, not the object"
