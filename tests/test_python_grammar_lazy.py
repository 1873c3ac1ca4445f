"""The lazily compiled Python grammar (smcgen.potentials.python_grammar): the same masks as the eager
compile on real SmolLM2 tokens, binding to the whole vocabulary in well under a second's share of
the eager minutes, and bad arguments named."""

from __future__ import annotations

import random
import time

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from smcgen import GrammarPotential
from smcgen.core.sampling import allowed_from_bitmask
from smcgen.models.smollm2 import converted_path
from smcgen.potentials.python_grammar import PythonGrammarPotential

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
# body texts the walks follow: every step's mask is compared, not only the end
TEXTS = [
    "\n    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):\n        if n % i == 0:\n"
    "            return False\n    return True\n",
    '\n    words = [w.strip() for w in s.split(" ") if w]\n    return " ".join(reversed(words))\n',
    "\n    try:\n        d = {k: v for k, v in zip(a, b)}\n    except KeyError as e:\n        raise ValueError(f'{e!r}')\n"
    "    return d\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(converted_path()))


@pytest.fixture(scope="module")
def subset_vocab(tokenizer):
    """The characters plus 400 random real SmolLM2 tokens (ASCII, no special tokens), and EOS last."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer)
    real = sorted({bytes(b).decode() for b in info.decoded_vocab if bytes(b).isascii() and len(bytes(b)) > 1})
    picked = random.Random(0).sample(real, 400)
    for t in ("\n    ", "\n        ", "    ", " return", " x", "):", " in", " for", " =", ' "'):
        if t not in picked:
            picked.append(t)
    return [*CHARS, *picked, None]


def greedy_tokens(text: str, vocab: list) -> list[int]:
    """Longest-match tokenization of ``text`` over ``vocab`` (so multi-character tokens cross rule ends)."""
    index = {t: i for i, t in enumerate(vocab) if t}
    out, i = [], 0
    while i < len(text):
        j = max(k for k in range(i + 1, min(len(text), i + 12) + 1) if text[i:k] in index)
        out.append(index[text[i:j]])
        i = j
    return out


def same_allowed(a: torch.Tensor, b: torch.Tensor, vocab_size: int) -> bool:
    """Whether two bitmasks allow the same tokens (the padding bits past the vocabulary may differ)."""
    cpu = torch.device("cpu")
    return torch.equal(allowed_from_bitmask(a, vocab_size, cpu), allowed_from_bitmask(b, vocab_size, cpu))


def test_lazy_masks_equal_eager_masks(subset_vocab):
    eos = len(subset_vocab) - 1
    lazy = PythonGrammarPotential.build(subset_vocab, eos_token_ids=[eos], depth=4)
    eager = PythonGrammarPotential.build(subset_vocab, eos_token_ids=[eos], depth=4, lazy=False)
    assert lazy.lazy and isinstance(eager, PythonGrammarPotential) and not eager.lazy  # eager keeps the class
    steps = 0
    for text in TEXTS:  # along real code: every prefix
        ids = greedy_tokens(text, subset_vocab)
        for t in range(len(ids) + 1):
            seq = torch.tensor([[0, *ids[:t]]])
            a, b = lazy.next_token_bitmask(seq, 1), eager.next_token_bitmask(seq, 1)
            assert same_allowed(a, b, len(subset_vocab)), (text, t)
            steps += 1
    # random walks under the lazy masks, 4 rows batched (the batch filler runs rows on threads)
    rng = random.Random(1)
    rows = [[] for _ in range(4)]
    for _ in range(30):
        seq = torch.tensor([[0, *r] for r in rows])
        a, b = lazy.next_token_bitmask(seq, 1), eager.next_token_bitmask(seq, 1)
        assert same_allowed(a, b, len(subset_vocab))
        allowed = allowed_from_bitmask(a, len(subset_vocab), torch.device("cpu"))
        for r, row in enumerate(rows):
            choices = [v for v in range(eos) if allowed[r, v]]
            row.append(rng.choice(choices) if choices else eos)
        steps += 1
    assert steps > 150
    assert lazy.stats.mask_rows > 0


def test_lazy_bind_to_the_whole_vocabulary_is_fast(tokenizer):
    eos = [tokenizer.eos_token_id]
    GrammarPotential.regex("a", tokenizer, eos_token_ids=eos)  # build the vocabulary's TokenizerInfo first
    t0 = time.perf_counter()
    unbound = PythonGrammarPotential.build(depth=6)
    g = unbound.bind(tokenizer, eos_token_ids=eos)
    bind_s = time.perf_counter() - t0
    assert bind_s < 5.0  # the eager compile of the same grammar takes minutes
    ids = tokenizer("\n    return", add_special_tokens=False)["input_ids"]
    allowed = allowed_from_bitmask(g.next_token_bitmask(torch.tensor([ids]), 0), g.vocab_size, torch.device("cpu"))[0]
    x, eq = tokenizer.convert_tokens_to_ids(["Ġx", "Ġ="])
    assert bool(allowed[x]) and not bool(allowed[eq])
    assert unbound.bind(tokenizer, eos_token_ids=eos) is g  # bound copies are cached
    assert g.bind(tokenizer, eos_token_ids=eos) is g


def test_grammar_potential_python_binds_lazily_by_default(tokenizer):
    eos = [tokenizer.eos_token_id]
    GrammarPotential.regex("a", tokenizer, eos_token_ids=eos)  # build the vocabulary's TokenizerInfo first
    t0 = time.perf_counter()
    g = GrammarPotential.python(tokenizer, eos_token_ids=eos, depth=5)
    assert time.perf_counter() - t0 < 5.0  # eagerly this bind takes minutes
    assert isinstance(g, PythonGrammarPotential) and g.lazy and g.bound
    assert not GrammarPotential.python(lazy=False).lazy
    with pytest.raises(ValueError, match="lazy"):
        GrammarPotential.python(lazy=1)


def test_lazy_must_be_a_bool():
    with pytest.raises(ValueError, match="lazy"):
        PythonGrammarPotential.build(lazy="yes")
