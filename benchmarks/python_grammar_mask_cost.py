"""Compile time and per-step mask cost of the Python grammar for a real vocabulary.

Binds the Python grammar (``PythonGrammarPotential``: lazy compile by default, ``--eager`` for
xgrammar's full precompile) to the embedded model's tokenizer (SmolLM2, 49,152 tokens) in this
fresh process (timed, no cache), then walks ``--rows`` particles along a function body written
for this benchmark, each row staggered by a few tokens so that the rows sit at different grammar
positions, and times one batched mask per step (``GrammarPotential``'s own mask path). The walk is
repeated ``--passes`` times on fresh rows: with the lazy compile the first pass also builds the
token classes of each position it reaches first, later passes reuse them. Prints the median, p99
and max mask time per step for each pass.

    OMP_NUM_THREADS=1 python benchmarks/python_grammar_mask_cost.py --rows 8 --depth 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

import smcgen
from smcgen.potentials.python_grammar import PythonGrammarPotential

BODY = '''
    """Return the words of s that are primes, reversed."""
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    words = [w.strip() for w in s.split(" ") if w]
    result = {k: v for k, v in zip(keys, values)}
    x = foo(a, b=3, *args, **kw)[1:-1]
    while x and not y or z is None:
        x -= 1
        print(f"value {x!r} and {y:>10}")  # progress
    try:
        total = sum(len(w) for w in words) / max(len(words), 1)
    except ZeroDivisionError as exc:
        raise ValueError("no words") from exc
    return " ".join(reversed(words))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8, help="particles masked per step (N)")
    ap.add_argument("--depth", type=int, default=6, help="indentation levels of the grammar")
    ap.add_argument("--stagger", type=int, default=3, help="tokens between consecutive rows")
    ap.add_argument("--passes", type=int, default=2, help="walks of the body (the first builds lazy entries)")
    ap.add_argument("--eager", action="store_true", help="precompile every mask entry (xgrammar's default)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/python_grammar_mask_cost"))
    args = ap.parse_args()
    if args.rows < 1 or args.passes < 1:
        raise SystemExit("--rows and --passes must be >= 1")
    lm = smcgen.load_model("smollm2-135m")
    t0 = time.perf_counter()
    grammar = PythonGrammarPotential.build(lm, depth=args.depth, lazy=not args.eager)
    compile_s = time.perf_counter() - t0
    ids = lm.tokenizer(BODY, add_special_tokens=False)["input_ids"]
    res = {"vocab": grammar.vocab_size, "depth": args.depth, "rows": args.rows, "lazy": not args.eager}
    res["compile_s"] = compile_s
    res["passes"] = [walk(grammar, ids, args, lm.tokenizer, p) for p in range(args.passes)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(res, indent=2))
    print("| compile | vocab | depth | rows | compile s | pass | mask ms/step median | p99 | max | mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p, r in enumerate(res["passes"]):
        print(
            f"| {'lazy' if res['lazy'] else 'eager'} | {res['vocab']} | {args.depth} | {args.rows} | {compile_s:.3f} | "
            f"{p + 1} | {r['mask_ms_median']:.2f} | {r['mask_ms_p99']:.2f} | {r['mask_ms_max']:.2f} | "
            f"{r['mask_ms_mean']:.2f} |"
        )


def walk(grammar: PythonGrammarPotential, ids: list[int], args: argparse.Namespace, tokenizer, p: int) -> dict:
    """One walk of the rows along ``ids``: the mask time per step (and the ten slowest steps)."""
    steps = len(ids) + 1 - args.stagger * (args.rows - 1)
    per_step: list[float] = []
    where: list[tuple[float, str]] = []  # (seconds, the first row's last tokens) per step
    grammar.start([], args.rows)
    for t in tqdm(range(max(steps, 1)), desc=f"mask steps, pass {p + 1}"):
        # the rows' own lengths differ: pass each row's tokens through the potential's row cache
        token_ids = [ids[: t + args.stagger * r] for r in range(args.rows)]
        for r, tk in enumerate(token_ids):
            grammar._row(r, tk)  # advance outside the timed region
        t1 = time.perf_counter()
        mask = grammar._bitmask_for(token_ids)
        per_step.append(time.perf_counter() - t1)
        where.append((per_step[-1], tokenizer.decode(token_ids[0][-6:])))
        for r, tk in enumerate(token_ids):  # the next real token must stay allowed
            if t + args.stagger * r < len(ids):
                nxt = ids[t + args.stagger * r]
                assert (int(mask[r, nxt // 32]) >> (nxt % 32)) & 1, (r, t, tokenizer.decode(tk[-8:]))
    per_step.sort()
    res = {
        "steps": len(per_step),
        "mask_ms_median": 1e3 * statistics.median(per_step),
        "mask_ms_p99": 1e3 * per_step[min(len(per_step) - 1, int(0.99 * len(per_step)))],
        "mask_ms_max": 1e3 * per_step[-1],
        "mask_ms_mean": 1e3 * sum(per_step) / len(per_step),
        "slowest": [[round(1e3 * dt, 2), text] for dt, text in sorted(where, reverse=True)[:10]],
    }
    for ms, text in res["slowest"]:
        print(f"pass {p + 1}: {ms:9.2f} ms/step, first row after {text!r}")
    return res


if __name__ == "__main__":
    main()
