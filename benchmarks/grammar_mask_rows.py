"""Grammar mask time per step for N = 8..64 rows (CPU, SmolLM2 tokenizer, a JSON-schema grammar).

Each row's matcher is advanced along a different valid JSON document (so rows sit in different
grammar states), then the next-token bitmask of all rows is timed three ways:

- ``loop``: one ``GrammarMatcher.fill_next_token_bitmask`` per row (what a per-row loop costs);
- ``batch``: xgrammar's ``BatchGrammarMatcher.batch_fill_next_token_bitmask`` (the rows filled in
  parallel on its thread pool, ``--threads``, the GIL released), what :class:`GrammarPotential` uses
  (with its default, ``auto``);
- ``potential``: ``GrammarPotential.next_token_bitmask`` end to end (the host copy of the
  generated tokens, the per-row state check and the batch fill).

    python benchmarks/grammar_mask_rows.py [--repeats 20] [--threads auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import xgrammar as xgr

from smcgen import GrammarPotential
from smcgen.api import load_model
from smcgen.core.sampling import bitmask_width

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 6},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}


def documents(n: int) -> list[str]:
    """n different valid documents (the rows stop at different points of them)."""
    return [
        json.dumps(
            {
                "name": f"person number {i}",
                "age": 20 + i,
                "tags": [f"t{j}" for j in range(i % 5)],
                "address": {"city": f"city {i}", "zip": f"{10000 + i}"},
            }
        )
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", default="auto", help="xgrammar's batch threads ('auto' or a number)")
    args = ap.parse_args()
    threads = args.threads if args.threads == "auto" else int(args.threads)
    lm = load_model("smollm2-135m", "cpu")
    tok = lm.tokenizer
    g = GrammarPotential.json_schema(SCHEMA).bind(lm)
    print("| rows | loop (ms/step) | batch (ms/step) | potential end to end (ms/step) | batch speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for n in (8, 16, 32, 64):
        seqs = []
        for i, doc in enumerate(documents(n)):
            ids = tok.encode(doc, add_special_tokens=False)
            seqs.append(ids[: max(1, (len(ids) * (i % 7 + 1)) // 8)])  # stop at different depths
        matchers = []
        for s in seqs:
            m = xgr.GrammarMatcher(g._compiled, override_stop_tokens=list(g.eos_token_ids))
            for t in s:
                assert m.accept_token(t)
            matchers.append(m)
        out = torch.empty((n, bitmask_width(g.vocab_size)), dtype=torch.int32)
        batch = xgr.BatchGrammarMatcher(max_threads=threads)

        def loop(matchers=matchers, out=out) -> None:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(out, i)

        rows = list(range(n))

        def batched(matchers=matchers, out=out, batch=batch, rows=rows) -> None:
            batch.batch_fill_next_token_bitmask(matchers, out, rows)

        def best(fn) -> float:
            fn()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return 1e3 * statistics.median(times)

        t_loop, t_batch = best(loop), best(batched)
        # the end-to-end path takes a [rows, tokens] tensor: every row cut to the shortest row's length
        seq_tensor = torch.tensor([s[: min(len(x) for x in seqs)] for s in seqs])
        g.start([], n)

        def end_to_end(seq_tensor=seq_tensor) -> None:
            g.next_token_bitmask(seq_tensor, 0)

        t_pot = best(end_to_end)
        print(f"| {n} | {t_loop:.2f} | {t_batch:.2f} | {t_pot:.2f} | {t_loop / t_batch:.2f}x |")


if __name__ == "__main__":
    main()
