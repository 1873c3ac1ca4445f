"""SmolLM2-135M pair, real weights: AR vs standard SD vs SMC-SD, tokens/s and mean ESS/N side by side.

One process, one prompt (the CLI's default question in the chat template), the same seeds for every
configuration: AR (the target alone, and Hugging Face ``generate`` on the same model), SD with K in {2, 4, 8} (``method='sd'``) and SMC-SD with
N in {1, 4, 8} x K in {2, 4, 8}. Tokens/s counts the answer's tokens over the run's wall time; SD
also reports the fraction of drafted tokens kept. ``--draft`` takes a name or a trained draft directory.
``--sd-engine`` picks the engine of the SD rows: 'auto' (native on a GPU), 'native', 'generic', or
'both' (each K once per engine, so native SD, generic SD, AR and SMC-SD sit in one table).

    OMP_NUM_THREADS=2 python benchmarks/smollm2_speed.py --device cpu --max-new-tokens 32 --repeats 1
    python benchmarks/smollm2_speed.py --device cuda --draft DRAFT_DIR --sd-engine both --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from embedded_pair import add_target_dtype, load_target
from hf_baseline import hf_generate_speed

import smcgen
from smcgen.api import load_draft
from smcgen.cli import DEFAULT_PROMPT
from smcgen.engine_requests import prompt_ids


def hf_generate_row(target, prompt, args) -> dict:
    """Hugging Face ``generate`` on the same model object and prompt (sampling at the temperature,
    no top-k / top-p), the same token count forced: the peer baseline, median of the repeats."""
    ids = torch.tensor([prompt_ids(prompt, target)], device=target.device)
    tps = hf_generate_speed(target.model, ids, args.max_new_tokens, args.temperature, args.repeats)
    return {"config": "AR, Hugging Face generate", "tokens_per_s": tps, "engine": "transformers",
            "mean_ess_over_n": None, "sd_kept": None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--draft",
        default="smollm2-135m-draft",
        help="draft name or trained draft directory",
    )
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm-ups", type=int, default=2, help="untimed calls per configuration before its repeats")
    ap.add_argument("--temperature", type=float, default=0.7)
    add_target_dtype(ap)
    ap.add_argument(
        "--engine",
        default="auto",
        help="engine for AR and SMC-SD",
    )
    ap.add_argument(
        "--sd-engine",
        choices=["auto", "native", "generic", "both"],
        default="auto",
        help="engine for the SD rows (method='sd'); 'both' runs each K on the native and the generic engine",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()

    target = load_target(args.device, args.target_dtype, [args.draft])
    draft = load_draft(args.draft, target, args.device)
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]  # generate applies the chat template
    common = {
        "max_new_tokens": args.max_new_tokens,
        "target_temperature": args.temperature,
        "draft_temperature": args.temperature,
    }
    cases = [("AR (target alone)", None, {"n_particles": 1, "engine": args.engine})]
    sd_engines = ["native", "generic"] if args.sd_engine == "both" else [args.sd_engine]
    cases += [
        (f"SD K={k}" + (f" ({e})" if len(sd_engines) > 1 else ""), draft,
         {"method": "sd", "n_particles": 1, "block_size": k, "engine": e})
        for e in sd_engines
        for k in (2, 4, 8)
    ]  # fmt: skip
    cases += [
        (
            f"SMC-SD N={n} K={k}",
            draft,
            {"n_particles": n, "block_size": k, "engine": args.engine},
        )
        for n in (1, 4, 8)
        for k in (2, 4, 8)
    ]
    smcgen.generate(target, prompt, n_particles=1, max_new_tokens=4, seed=0)  # warm-up
    for e in sd_engines:  # converts the models for native SD and compiles its kernels before timing
        smcgen.generate(target, prompt, draft=draft, method="sd", engine=e, block_size=2, max_new_tokens=4, seed=0)
    rows = []
    for name, d, kw in cases:
        # untimed calls of this shape first: the first sizes pools and captures the cycle, the
        # second records the prefill graph; the timed calls then replay both (steady state)
        for r in range(args.warm_ups):
            smcgen.generate(target, prompt, draft=d, seed=100 + r, **common, **kw)
        tps, ess, acc = [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = smcgen.generate(target, prompt, draft=d, seed=r, **common, **kw)
            wall = time.perf_counter() - t0
            tps.append(len(res.token_ids) / wall)
            if res.mean_ess_fraction is not None:
                ess.append(res.mean_ess_fraction)
            if res.acceptance_rate is not None:
                acc.append(res.acceptance_rate)
        rows.append(
            {
                "config": name,
                "tokens_per_s": statistics.median(tps),
                "engine": res.engine,
                "mean_ess_over_n": statistics.mean(ess) if ess else None,
                "sd_kept": statistics.mean(acc) if acc else None,
            }
        )
    rows.insert(1, hf_generate_row(target, prompt, args))
    ar = rows[0]["tokens_per_s"]
    best_sd = max(r["tokens_per_s"] for r in rows if r["config"].startswith("SD"))
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        (
            f"# SmolLM2-135M pair, draft={args.draft}, target dtype={args.target_dtype or 'as loaded'}, {dev}, "
            f"{args.max_new_tokens} new tokens, median of {args.repeats} after {args.warm_ups} untimed calls"
        ),
        "",
        "| configuration | engine | tokens/s | vs AR | vs best SD | mean ESS/N | SD drafts kept |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ess = f"{r['mean_ess_over_n']:.2f}" if r["mean_ess_over_n"] is not None else "–"
        kept = f"{r['sd_kept']:.2f}" if r["sd_kept"] is not None else "–"
        lines.append(
            f"| {r['config']} | {r['engine']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / ar:.2f}x "
            f"| {r['tokens_per_s'] / best_sd:.2f}x | {ess} | {kept} |"
        )
    report = "\n".join(lines)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "smollm2_speed.md").write_text(report + "\n")
        Path(args.out, "smollm2_speed.json").write_text(json.dumps(rows, indent=1))
    print(report)


if __name__ == "__main__":
    main()
