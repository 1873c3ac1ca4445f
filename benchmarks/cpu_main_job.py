"""Wall time and tokens/s of the main job on this machine, beside autoregressive decoding.

Runs, in one process on the embedded SmolLM2-135M-Instruct: (1) AR = plain SMC with one
particle (the target samples every token itself), (2) the main job's SMC-SD configuration,
(3) plain SMC with the same N. Prints a Markdown table for BENCHMARKS.md.

    python benchmarks/cpu_main_job.py [--max-new-tokens 96] [--repeats 2]
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
    args = ap.parse_args()

    target = load_model("smollm2-135m", "cpu")
    draft = load_model("smollm2-135m-draft", "cpu")
    prompt = list(target.tokenizer.apply_chat_template(
        [{"role": "user", "content": DEFAULT_PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False))
    common = dict(max_new_tokens=args.max_new_tokens, draft_temperature=0.7, target_temperature=0.7)
    cases = [
        ("AR (plain SMC, N=1)", None, dict(n_particles=1)),
        ("SMC-SD N=8, K=4 (main job)", draft, dict(n_particles=8, block_size=4)),
        ("plain SMC N=8", None, dict(n_particles=8)),
    ]
    print(f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| configuration | new tokens | wall s (median) | tokens/s | steps | resamples |")
    print("|---|---|---|---|---|---|")
    for name, d, kw in cases:
        walls, res = [], None
        for r in range(args.repeats):
            t0 = time.perf_counter()
            res = smcgen.generate(target, prompt, draft=d, seed=r, **common, **kw)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        n = len(res.token_ids)
        print(f"| {name} | {n} | {wall:.2f} | {n / wall:.1f} | {res.n_steps} | {res.n_resamples} |")


if __name__ == "__main__":
    main()
