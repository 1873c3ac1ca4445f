"""The host's part of a host-guided step: the guide's masks from one new token per row or from whole rows.

Between the captured pieces of a host-guided cycle (smcgen/samplers/native_host_guide.py) the CPU
turns the tokens just drawn into the next masks, while the device runs the next forward. This
times that host work (``HostGuidedCycle._host_mask``: reading the tokens, advancing the guide's
matchers, filling the packed masks, the budget mask of JSON schemas, the copy to the device) in a
real run, twice per guide: with the guide's ``extend_bitmask`` (one new token per row) and with it
switched off (every row's whole tokens, re-read at every step). The models are tiny (the model
time is not measured); the vocabulary is ``guide_speed.py``'s synthetic 128,256 tokens, N=8, K=8.
Both runs must draw the same tokens and log Z (printed).

``--budget`` times the JSON schema's budget mask alone (``GrammarPotential._budget_mask``, the last
few tokens of a run) at prefixes inside and outside strings, median of 5.

    python benchmarks/host_mask_step.py --new-tokens 256
    python benchmarks/host_mask_step.py --budget
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from architectures import TINY_LLAMA, build_llama
from guide_speed import Person, sql_grammar_text, synthetic_tokenizer

import smcgen
from smcgen.potentials.grammar import GrammarPotential
from smcgen.runners.transformers import LanguageModel
from smcgen.samplers import native_host_guide


def guide(name: str, lm: LanguageModel) -> GrammarPotential:
    if name == "regex":
        g = GrammarPotential.regex(r"[A-Z][a-z ,]*").bind(lm)
        g.token_automaton = lambda *a, **k: "hidden by the benchmark (host path)"
        return g
    if name == "json":
        return GrammarPotential.json_schema(Person).bind(lm)
    return GrammarPotential.ebnf(sql_grammar_text()).bind(lm)


def budget_mask_ms() -> None:
    """Milliseconds of one row's budget mask near the end of the budget, ``Person`` schema."""
    import statistics

    tok = synthetic_tokenizer(128256)
    g = GrammarPotential.json_schema(Person).bind(tok, vocab_size=128256)
    g._capacity()  # the vocabulary's one-off tables
    ids = {b: i for i, b in enumerate(g._vocab_bytes)}
    print("| prefix | tokens left after the next | ms (median of 5) |\n|---|---:|---:|")
    for text in ['{"name": "Abc', '{"name": "A", "age": 3, "role": "user", "tags": ["xy', '{"name": "A", "age": 3']:
        tokens = [ids[c.encode()] for c in text]
        g.start([], 1)
        for left in (0, 2):
            g.finish_within = None
            grammar_mask = g.request_bitmask(torch.tensor([tokens]), 0).result()
            g.finish_within = len(tokens) + 1 + left
            times = []
            for _ in range(5):
                out = grammar_mask.clone()
                t0 = time.perf_counter()
                g._budget_mask(out, 0, tokens)
                times.append(1e3 * (time.perf_counter() - t0))
            print(f"| `{text[-14:]}` | {left} | {statistics.median(times):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--guides", default="regex,json,cfg")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--budget", action="store_true", help="time the JSON budget mask alone")
    args = ap.parse_args()
    if args.budget:
        budget_mask_ms()
        return

    spent = [0.0, 0]
    host_mask = native_host_guide.HostGuidedCycle._host_mask

    def timed(self, host_tokens):
        t0 = time.perf_counter()
        host_mask(self, host_tokens)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1

    native_host_guide.HostGuidedCycle._host_mask = timed
    tok = synthetic_tokenizer(128256)
    vocab, max_pos = len(tok), 8 + args.new_tokens + 64
    models = [
        LanguageModel(
            build_llama(
                TINY_LLAMA,
                torch.float32,
                torch.device("cpu"),
                seed,
                vocab_size=vocab,
                max_position_embeddings=max_pos,
                bos_token_id=0,
                eos_token_id=1,
            ),
            tok,
            (1,),
            max_pos,
        )
        for seed in (0, 1)
    ]
    prompt = torch.randint(2, vocab, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for name in args.guides.split(","):
        runs = {}
        for how in ("whole rows", "one new token"):
            g = guide(name, models[0])
            if how == "whole rows":
                g.extend_bitmask = lambda *a: False
            g._capacity() if g.schema is not None else None  # the vocabulary's one-off tables, not per step
            spent[:] = [0.0, 0]
            out = smcgen.generate(
                target=models[0],
                draft=models[1],
                prompt=prompt,
                n_particles=8,
                block_size=8,
                max_new_tokens=args.new_tokens,
                engine="native",
                on_dead="flag",
                guide=g,
                seed=2,
            )
            runs[how] = (out.token_ids, out.log_z)
            row = {
                "guide": name,
                "masks from": how,
                "ms_per_step": 1e3 * spent[0] / max(spent[1], 1),
                "steps": spent[1],
                "answer_tokens": len(out.token_ids),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows[-1]["same_tokens_and_log_z"] = runs["whole rows"] == runs["one new token"]
    print(
        "\n| guide | masks from | host ms per step | steps | answer tokens | same draws |\n|---|---|---:|---:|---:|---|"
    )
    for r in rows:
        same = r.get("same_tokens_and_log_z", "")
        print(
            f"| {r['guide']} | {r['masks from']} | {r['ms_per_step']:.3f} | {r['steps']} | {r['answer_tokens']} | {same} |"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_mask_step.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
