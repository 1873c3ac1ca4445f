"""Concurrent runs sharing one model and one grammar give the sequential results (issue 14, item 3)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from tiny_models import tiny_lm

import smcgen
from smcgen import GrammarPotential, SequenceBatch

# character vocabulary: printable ASCII plus EOS
CHARS = [chr(i) for i in range(32, 127)]
EOS = len(CHARS)
TOKENS = [*CHARS, None]
A, B = CHARS.index("a"), CHARS.index("b")


class CharDecoder:
    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(CHARS[t] for t in s if t != EOS) for s in sequences]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.batch_decode([ids])[0]

    def get_vocab(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(CHARS)}


def _grammar():
    return GrammarPotential.regex("a[ab]*", TOKENS, eos_token_ids=[EOS])


def test_two_runs_in_two_threads_keep_their_own_matchers():
    """Run A in one thread and run B in another, interleaved step by step on one bound grammar:
    B's start and tokens used to replace A's matchers (A's next call then rebuilt them from scratch,
    or, in a race, read a matcher B had advanced past A's tokens)."""
    g = _grammar()
    a_ready, b_done = threading.Event(), threading.Event()
    scores: dict[str, list[float]] = {}

    def run_a():
        g.start([], 2)
        first = g.log_prefix(SequenceBatch([[A], [A]], [], None, rows=[0, 1]))
        a_ready.set()
        b_done.wait(10)
        second = g.log_prefix(SequenceBatch([[A, B], [A, A]], [], None, rows=[0, 1]))
        mask = g.next_token_bitmask(torch.tensor([[A, B], [A, A]]), 0)
        scores["a"] = [*first.tolist(), *second.tolist(), int(mask[0, 0]), int(mask[1, 0])]

    def run_b():
        a_ready.wait(10)
        g.start([], 2)
        scores["b"] = g.log_prefix(SequenceBatch([[B], [A, A, A]], [], None, rows=[0, 1])).tolist()
        b_done.set()

    g.stats.reset()
    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    fresh = _grammar().next_token_bitmask(torch.tensor([[A, B], [A, A]]), 0)
    assert scores["a"][:4] == [0.0, 0.0, 0.0, 0.0] and scores["a"][4:] == [int(fresh[0, 0]), int(fresh[1, 0])]
    assert scores["b"] == [float("-inf"), 0.0]
    # each run advanced its own rows: no state was found replaced and rebuilt
    assert g.stats.rebuilds == 0


def test_concurrent_generate_calls_equal_sequential_ones():
    """4 threads x 2 seeded runs on one model and one grammar give exactly the sequential outputs."""
    lm = tiny_lm(3, vocab=len(TOKENS), eos=EOS, logit_scale=1.0)
    lm = smcgen.LanguageModel(lm.model, CharDecoder(), lm.eos_token_ids, lm.context_length)
    draft = tiny_lm(4, vocab=len(TOKENS), eos=EOS, logit_scale=0.5)
    draft = smcgen.LanguageModel(draft.model, CharDecoder(), draft.eos_token_ids, draft.context_length)
    g = _grammar()

    def one(seed: int):
        r = smcgen.generate(
            lm,
            [A],
            draft=draft,
            grammar=g,
            seed=seed,
            n_particles=6,
            block_size=2,
            max_new_tokens=10,
            ess_threshold=0.9,
        )
        return r.token_ids, r.sequences, r.log_weights

    seeds = [0, 1, 2, 3] * 2
    sequential = [one(s) for s in seeds]
    g.stats.reset()
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(one, seeds))
    assert concurrent == sequential
    assert g.stats.rebuilds == 0
