"""smcgen's AWRS-SMC against genlm-control's AWRS on the same model, prompt and CPU, side by side.

Task: the "no letter e" lipogram (a boolean potential over text), SmolLM2-135M-Instruct (the
embedded weights in ~/.cache/smcgen, float32), chat-template prompt, N particles, max_new_tokens
tokens, ESS threshold 0.5, several seeds. genlm-control runs in its own virtual environment
(``--genlm-python``; ``pip install "genlm-control>=0.4,<0.5"``) through ``_genlm_awrs.py``, one
subprocess per seed, alternating with smcgen's run of the same seed so that both see the same load.
Both sides prefill the prompt once (genlm: ``cache_kv``) and do one short warm-up run first; the
wall time covers the SMC run only (model loading excluded).

    OMP_NUM_THREADS=2 python benchmarks/awrs_vs_genlm.py --seeds 0,1,2 --threads 2 [--out DIR]

Writes ``awrs_vs_genlm.json`` and ``.md`` under ``--out`` (default ``$OUT``, else
benchmarks/results/awrs_vs_genlm) and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

import smcgen
from smcgen import Potential, SequenceBatch

PROMPT = "Write a short story about a cat."
HERE = Path(__file__).resolve().parent


class NoLetterE(Potential):
    """Zero once the text holds an 'e' or 'E' (the same test as genlm's side, on bytes there)."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([-math.inf if "e" in t.lower() else 0.0 for t in batch.texts])


def model_dir() -> Path:
    from smcgen.models import smollm2

    root = Path(os.environ.get("SMCGEN_CACHE", Path.home() / ".cache" / "smcgen"))
    for cand in (root / "smollm2-135m-instruct", *root.glob("*135m*")):
        if (cand / "model.safetensors").exists():
            return cand
    raise SystemExit(f"no converted weights under {root}; run smcgen.load_model('{smollm2.EMBEDDED_TARGET}') once")


def ours(lm, ids: list[int], seed: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    r = smcgen.generate(
        lm,
        ids,
        constraint=NoLetterE(),
        n_particles=args.n,
        max_new_tokens=args.max_new_tokens,
        seed=seed,
        return_all_particles=True,
        engine="generic",
    )
    wall = time.perf_counter() - t0
    live = [t for t, w in zip(r.texts, r.log_weights) if w > -math.inf]
    return {
        "seed": seed,
        "wall_s": wall,
        "died": not live,
        "has_e": any("e" in t.lower() for t in live),
        "text": r.text,
        "tokens": len(r.token_ids),
    }


def genlm(ids: list[int], seed: int, args: argparse.Namespace) -> dict:
    req = {
        "model_dir": str(model_dir()),
        "prompt_ids": ids,
        "seeds": [seed],
        "n_particles": args.n,
        "max_tokens": args.max_new_tokens,
        "threads": args.threads,
        "temperature": 1.0,
        "warmup_tokens": 4,
    }
    proc = subprocess.run(
        [args.genlm_python, str(HERE / "_genlm_awrs.py")],
        input=json.dumps(req),
        text=True,
        check=False,
        capture_output=True,
        timeout=args.timeout,
        cwd="/tmp",
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"genlm-control run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    live = [t for t, w in zip(out["texts"], out["log_weights"]) if w > -math.inf]
    best = max(range(len(out["texts"])), key=lambda i: out["log_weights"][i])
    return {
        "seed": seed,
        "wall_s": out["wall_s"],
        "died": not live,
        "has_e": any("e" in t.lower() for t in live),
        "text": out["texts"][best],
        "tokens": out["n_tokens"][best],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genlm-python", default="/work/genlm-venv/bin/python")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per genlm-control subprocess")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results" / "awrs_vs_genlm")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    lm = smcgen.load_model("smollm2-135m", "cpu")
    ids = list(
        lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    smcgen.generate(lm, ids, constraint=NoLetterE(), n_particles=args.n, max_new_tokens=4, seed=99, engine="generic")
    rows = []
    for seed in seeds:
        a = ours(lm, ids, seed, args)
        b = genlm(ids, seed, args)
        rows.append({"seed": seed, "smcgen": a, "genlm": b})
        print(
            f"seed {seed}: smcgen {a['wall_s']:.1f} s, genlm-control {b['wall_s']:.1f} s", file=sys.stderr, flush=True
        )

    speed = [r["genlm"]["wall_s"] / r["smcgen"]["wall_s"] for r in rows]
    head = (
        f"no-'e' lipogram, SmolLM2-135M-Instruct float32, N={args.n}, {args.max_new_tokens} tokens, "
        f"CPU ({platform.machine()}), {args.threads} torch threads, {date.today()}, smcgen {smcgen.__version__}"
    )
    md = [
        head,
        "",
        "| seed | smcgen AWRS s | genlm-control AWRS s | speed-up | smcgen died / 'e' | genlm died / 'e' |",
        "|---|---|---|---|---|---|",
    ]
    for r, s in zip(rows, speed):
        a, b = r["smcgen"], r["genlm"]
        md.append(
            f"| {r['seed']} | {a['wall_s']:.1f} | {b['wall_s']:.1f} | {s:.2f}x | {a['died']} / {a['has_e']} | "
            f"{b['died']} / {b['has_e']} |"
        )
    md.append(
        f"| median | {statistics.median(r['smcgen']['wall_s'] for r in rows):.1f} | "
        f"{statistics.median(r['genlm']['wall_s'] for r in rows):.1f} | {statistics.median(speed):.2f}x | | |"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "awrs_vs_genlm.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    (out / "awrs_vs_genlm.md").write_text("\n".join(md) + "\n")
    for r in rows:
        print(f"seed {r['seed']} smcgen: {r['smcgen']['text']!r}\nseed {r['seed']} genlm : {r['genlm']['text']!r}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
