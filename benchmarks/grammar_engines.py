"""xgrammar vs outlines-core on the SmolLM2 vocabulary: compile time, mask latency, fork cost.

What SMC needs from a grammar engine, per particle and step: the next-token bitmask, advancing
the state by one token, and forking a state when resampling duplicates a particle. The
workload replays real token trajectories (valid outputs tokenized by SmolLM2's tokenizer,
49,152 tokens) with R particles in lock step, and times each operation per particle-step.
Prints a Markdown table for BENCHMARKS.md.

    python benchmarks/grammar_engines.py [--particles 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from enum import Enum

import torch
from pydantic import BaseModel, Field

from smcgen.api import load_model
from smcgen.core.sampling import bitmask_width


# Kept apart from recipes/json_record.py's models on purpose: BENCHMARKS.md's engine table was
# measured with these (name up to 20 characters, hobbies uncapped; the recipe allows 24 and caps
# each hobby at 20), and importing the recipe's would silently make that table stale.
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    favorite_color: Color
    address: Address
    hobbies: list[str] = Field(max_length=3)


CASES = {
    # name: (kind, source, a valid output)
    "regex (email)": ("regex", r"[a-z]{1,12}@[a-z]{1,8}\.(com|org|net)", "janedoe@example.com"),
    "JSON schema (Person)": (
        "json",
        Person.model_json_schema(),
        json.dumps(
            {
                "name": "Ada Lovelace",
                "age": 36,
                "favorite_color": "green",
                "address": {"city": "London", "zip_code": "12345"},
                "hobbies": ["math", "poetry"],
            }
        ),
    ),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table (byte-level BPE tokens are spelled in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def outlines_vocabulary(tokenizer, eos: int):
    import outlines_core as oc

    dec = {v: k for k, v in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    table: dict[bytes, list[int]] = {}
    for s, i in tokenizer.get_vocab().items():
        if i not in special:
            table.setdefault(bytes(dec[c] for c in s), []).append(i)
    return oc.Vocabulary(eos, table)


def per_op(fn, n_ops: int, repeats: int) -> float:
    """Median over repeats of (wall time / n_ops), in microseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / n_ops * 1e6)
    return statistics.median(times)


def bench_xgrammar(kind, source, tokens, tokenizer, vocab_size, eos, R, repeats):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    t_info = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg = compiler.compile_regex(source) if kind == "regex" else compiler.compile_json_schema(json.dumps(source))
    t_compile = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(R, vocab_size)
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    masks = []

    def run(batched: bool, record: bool = False):
        ms = [xgr.GrammarMatcher(cg, override_stop_tokens=[eos]) for _ in range(R)]
        for t in tokens + [eos]:
            if batched:
                batch.batch_fill_next_token_bitmask(ms, bitmask)
            else:
                for i, m in enumerate(ms):
                    m.fill_next_token_bitmask(bitmask, i)
            if record:
                masks.append(bitmask[0].clone())
            for m in ms:
                assert m.accept_token(t)

    def accept_only():
        ms = [xgr.GrammarMatcher(cg, override_stop_tokens=[eos]) for _ in range(R)]
        for t in tokens + [eos]:
            for m in ms:
                m.accept_token(t)

    run(True, record=True)  # warm-up (and the reference masks)
    steps = (len(tokens) + 1) * R
    acc = per_op(accept_only, steps, repeats)
    fill_b = per_op(lambda: run(True), steps, repeats) - acc
    fill_s = per_op(lambda: run(False), steps, repeats) - acc
    m = xgr.GrammarMatcher(cg, override_stop_tokens=[eos])
    for t in tokens[: len(tokens) // 2]:
        m.accept_token(t)
    fork = per_op(lambda: [m.fork() for _ in range(1000)], 1000, repeats)
    row = {
        "info": t_info,
        "compile": t_compile,
        "fill_batched": fill_b,
        "fill_single": fill_s,
        "accept": acc,
        "fork": fork,
    }
    return row, masks


def bench_outlines(kind, source, tokens, tokenizer, vocab_size, eos, R, repeats):
    import outlines_core as oc

    t0 = time.perf_counter()
    vocab = outlines_vocabulary(tokenizer, eos)
    t_info = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = source if kind == "regex" else oc.json_schema.build_regex_from_schema(json.dumps(source))
    index = oc.Index(regex, vocab)
    t_compile = time.perf_counter() - t0
    words = bitmask_width(vocab_size)
    bitmask = torch.zeros(R, words, dtype=torch.int32)
    masks = []

    def run(record: bool = False):
        gs = [oc.Guide(index) for _ in range(R)]
        for t in tokens + [eos]:
            for i, g in enumerate(gs):
                g.write_mask_into(bitmask[i].data_ptr(), words, 4)
            if record:
                masks.append(bitmask[0].clone())
            for g in gs:
                if t != eos:
                    g.advance(t, return_tokens=False)

    def accept_only():
        gs = [oc.Guide(index) for _ in range(R)]
        for t in tokens:
            for g in gs:
                g.advance(t, return_tokens=False)

    run(record=True)
    steps = (len(tokens) + 1) * R
    acc = per_op(accept_only, len(tokens) * R, repeats)
    fill = per_op(run, steps, repeats) - acc * len(tokens) / (len(tokens) + 1)
    g = oc.Guide(index)
    for t in tokens[: len(tokens) // 2]:
        g.advance(t, return_tokens=False)
    fork = per_op(lambda: [copy.copy(g) for _ in range(20)], 20, repeats)
    guide_row = {
        "info": t_info,
        "compile": t_compile,
        "fill_batched": math.nan,
        "fill_single": fill,
        "accept": acc,
        "fork": fork,
    }

    # the other way to use outlines-core: a particle is a DFA state id (forking copies an int) and
    # masks are built from Index.get_allowed_tokens once per state, then cached
    cache: dict[int, torch.Tensor] = {}
    shifts = torch.arange(32, dtype=torch.int64)

    def state_mask(state: int) -> torch.Tensor:
        m = cache.get(state)
        if m is None:
            ids = torch.tensor(index.get_allowed_tokens(state), dtype=torch.int64)
            bits = torch.zeros(words * 32, dtype=torch.int64)
            bits[ids] = 1
            m = (bits.view(words, 32) << shifts).sum(1).to(torch.int64)
            m = torch.where(m >= 2**31, m - 2**32, m).to(torch.int32)
            cache[state] = m
        return m

    def run_states():
        states = [index.get_initial_state()] * R
        for t in tokens + [eos]:
            for i, s in enumerate(states):
                bitmask[i].copy_(state_mask(s))
            if t != eos:
                states = [index.get_next_state(s, t) for s in states]

    cold = per_op(lambda: (cache.clear(), run_states()), steps, 1)
    warm = per_op(run_states, steps, repeats)
    state_row = {
        "info": t_info,
        "compile": t_compile,
        "fill_batched": math.nan,
        "fill_single": warm,
        "accept": math.nan,
        "fork": 0.0,
        "cold": cold,
    }
    return guide_row, state_row, masks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lm = load_model("smollm2-135m", "cpu")
    tok, V, eos = lm.tokenizer, lm.vocab_size, lm.eos_token_ids[0]
    print(
        f"device: {platform.machine()}, {torch.get_num_threads()} torch threads; vocabulary {V}; R = {args.particles}"
    )
    print(
        "| grammar | engine | vocab setup s | compile s | mask µs/particle-step (batched) | mask µs (one at a time) "
        "| advance µs | fork µs | masks agree |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (kind, source, text) in CASES.items():
        tokens = tok(text, add_special_tokens=False)["input_ids"]
        rx, mx = bench_xgrammar(kind, source, tokens, tok, V, eos, args.particles, args.repeats)
        ro, rs, mo = bench_outlines(kind, source, tokens, tok, V, eos, args.particles, args.repeats)
        agree = sum(bool(torch.equal(a, b)) for a, b in zip(mx, mo))
        rs["fill_single"] = f"{rs['fill_single']:.1f} (cold {rs.pop('cold'):.0f})"
        for engine, r in (
            ("xgrammar 0.2.8", rx),
            ("outlines-core 0.2.14, Guide per particle", ro),
            ("outlines-core 0.2.14, state id + mask cache", rs),
        ):
            f = {k: (v if isinstance(v, str) else "n/a" if math.isnan(v) else f"{v:.1f}") for k, v in r.items()}
            print(
                f"| {name} ({len(tokens)} tokens) | {engine} | {r['info']:.2f} | {r['compile']:.3f} | "
                f"{f['fill_batched']} | {f['fill_single']} | {f['accept']} | {r['fork']:.2f} | {agree}/{len(mx)} steps |"
            )


if __name__ == "__main__":
    main()
