"""Where the Python grammar's compile time goes, and the lazy compile that removes it.

Profiles xgrammar's eager compile of ``smcgen.grammars.python.python_grammar`` on random subsets
of the embedded model's vocabulary (SmolLM2) at several indentation depths (median of
``--repeats`` compiles each, a fresh compiler with its cache off every time), counts the rules
after xgrammar's normalisation, and times the lazy compile (``PythonGrammarPotential``, xgrammar's
dynamic compilation) against the whole vocabulary. ``--full-eager`` also runs one eager compile
against the whole vocabulary (minutes). Writes ``summary.json`` under ``--out`` and prints a table.

    OMP_NUM_THREADS=1 python benchmarks/python_grammar_compile.py --full-eager
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import xgrammar as xgr
from tqdm import tqdm
from transformers import AutoTokenizer

from smcgen.grammars.python import python_grammar
from smcgen.models.smollm2 import converted_path
from smcgen.potentials.grammar import _tokenizer_info
from smcgen.potentials.python_grammar import PythonGrammarPotential


def subset_info(decoded: list[bytes], n: int, seed: int) -> xgr.TokenizerInfo:
    """A TokenizerInfo over ``n`` random tokens of ``decoded`` (raw strings) plus an EOS."""
    picked = sorted(random.Random(seed).sample(range(len(decoded)), min(n, len(decoded))))
    strings = [bytes(decoded[i]).decode("utf-8", "replace") for i in picked] + [""]
    return xgr.TokenizerInfo(strings, xgr.VocabType.RAW, stop_token_ids=[len(strings) - 1])


def eager_compile_s(info: xgr.TokenizerInfo, grammar: xgr.Grammar) -> float:
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t0 = time.perf_counter()
    compiler.compile_grammar(grammar)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="2,6,12", help="indentation depths, comma-separated")
    ap.add_argument("--sizes", default="500,2000", help="vocabulary subset sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="compiles per figure (the median is reported)")
    ap.add_argument("--lazy-depth", type=int, default=6, help="depth of the lazy and full eager compiles")
    ap.add_argument("--full-eager", action="store_true", help="also compile eagerly for the whole vocabulary")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/python_grammar_compile"))
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.repeats < 1 or min(sizes) < 1:
        raise SystemExit("--repeats and --sizes must be >= 1")
    tokenizer = AutoTokenizer.from_pretrained(str(converted_path()))
    t0 = time.perf_counter()
    info, _, _ = _tokenizer_info(tokenizer, None, [tokenizer.eos_token_id])
    info_s = time.perf_counter() - t0
    decoded = list(info.decoded_vocab)
    res: dict = {"vocab": len(decoded), "tokenizer_info_s": info_s, "eager_subsets": [], "rules": {}}
    jobs = [(d, n) for d in depths for n in sizes]
    for d, n in tqdm(jobs, desc="eager compiles on subsets"):
        grammar = xgr.Grammar.from_ebnf(python_grammar(d))
        res["rules"][d] = sum(1 for ln in str(grammar).splitlines() if "::=" in ln)
        times = [eager_compile_s(subset_info(decoded, n, seed), grammar) for seed in range(args.repeats)]
        res["eager_subsets"].append({"depth": d, "tokens": n, "median_s": statistics.median(times), "all_s": times})
    lazy_times, bind_times = [], []
    for _ in tqdm(range(max(args.repeats, 5)), desc="lazy compiles"):
        grammar = xgr.Grammar.from_ebnf(python_grammar(args.lazy_depth))
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False, enable_dynamic_compilation=True)
        t0 = time.perf_counter()
        compiler.compile_grammar(grammar)
        lazy_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # what a user pays: grammar text, parse, compile (vocabulary info cached)
        PythonGrammarPotential.build(tokenizer, eos_token_ids=[tokenizer.eos_token_id], depth=args.lazy_depth)
        bind_times.append(time.perf_counter() - t0)
    res["lazy_compile_s"] = {"median": statistics.median(lazy_times), "all": lazy_times}
    res["lazy_build_and_bind_s"] = {"median": statistics.median(bind_times), "all": bind_times}
    if args.full_eager:
        grammar = xgr.Grammar.from_ebnf(python_grammar(args.lazy_depth))
        res["full_eager_s"] = eager_compile_s(info, grammar)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(res, indent=2))
    print(f"TokenizerInfo for {len(decoded)} tokens: {info_s:.2f} s (once per tokenizer)")
    print("| compile | depth | tokens | normalised rules | seconds (median) |")
    print("|---|---|---|---|---|")
    for row in res["eager_subsets"]:
        d, n = row["depth"], row["tokens"]
        print(f"| eager | {d} | {n} | {res['rules'][d]} | {row['median_s']:.2f} |")
    if args.full_eager:
        d = args.lazy_depth
        print(f"| eager | {d} | {len(decoded)} | {res['rules'].get(d, '-')} | {res['full_eager_s']:.1f} (one run) |")
    med = res["lazy_compile_s"]["median"]
    print(f"| lazy (compile_grammar) | {args.lazy_depth} | {len(decoded)} | - | {med:.4f} |")
    med = res["lazy_build_and_bind_s"]["median"]
    print(f"| lazy (PythonGrammarPotential.build + bind) | {args.lazy_depth} | {len(decoded)} | - | {med:.4f} |")


if __name__ == "__main__":
    main()
