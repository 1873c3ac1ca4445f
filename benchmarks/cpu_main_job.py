"""Wall time and tokens/s of the main job on this machine, beside autoregressive decoding and SD.

Runs, in one process on the embedded SmolLM2-135M-Instruct: (1) AR = plain SMC with one
particle (the target samples every token itself), (2) the main job's SMC-SD configuration,
(3) standard speculative decoding with the same draft and K (``method='sd'``), (4) plain SMC with
the same N. Reports tokens/s, the speed-up over AR and mean ESS/N (the issue's target: SMC-SD
>= 1.5x AR with mean ESS/N >= 0.5). ``--draft`` takes a name or a trained draft directory.

    OMP_NUM_THREADS=2 python benchmarks/cpu_main_job.py [--draft DIR] [--max-new-tokens 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import smcgen
from smcgen.api import load_model
from smcgen.cli import DEFAULT_PROMPT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--draft",
        default="smollm2-135m-draft",
        help="draft name or trained draft directory",
    )
    ap.add_argument("--no-plain", action="store_true", help="skip plain SMC N=8")
    args = ap.parse_args()

    target = load_model("smollm2-135m", "cpu")
    draft = load_model(args.draft, "cpu")
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]  # generate applies the chat template
    common = {
        "max_new_tokens": args.max_new_tokens,
        "draft_temperature": 0.7,
        "target_temperature": 0.7,
    }
    cases = [
        ("AR (plain SMC, N=1)", None, {"n_particles": 1}),
        ("SMC-SD N=8, K=4 (main job)", draft, {"n_particles": 8, "block_size": 4}),
        (
            "SD K=4 (method='sd')",
            draft,
            {"method": "sd", "n_particles": 1, "block_size": 4},
        ),
        ("plain SMC N=8", None, {"n_particles": 8}),
    ]
    if args.no_plain:
        cases = cases[:-1]
    print(
        f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"draft: {args.draft}")
    print("| configuration | new tokens | wall s (median) | tokens/s | vs AR | steps | resamples | mean ESS/N |")
    print("|---|---|---|---|---|---|---|---|")
    ar_tps = None
    for name, d, kw in cases:
        walls, res, ess = [], None, []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = smcgen.generate(target, prompt, draft=d, seed=r, **common, **kw)
            walls.append(time.perf_counter() - t0)
            if res.mean_ess_fraction is not None:
                ess.append(res.mean_ess_fraction)
        wall = statistics.median(walls)
        n = len(res.token_ids)
        tps = n / wall
        ar_tps = ar_tps or tps
        ess_cell = f"{statistics.mean(ess):.2f}" if ess else "–"
        print(
            f"| {name} | {n} | {wall:.2f} | {tps:.1f} | {tps / ar_tps:.2f}x | {res.n_steps} | {res.n_resamples} "
            f"| {ess_cell} |"
        )


if __name__ == "__main__":
    main()
