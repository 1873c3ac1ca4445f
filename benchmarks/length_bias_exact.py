"""Does SMC's final answer favour sequences that stop early at finite N? Exactly, on tiny models.

SMC-SD's answer is one particle drawn by final weight. That draw is exact only as N grows: at
finite N it follows the self-normalised weights, and a particle that has stopped keeps its
weight while the running ones keep multiplying theirs by heavy-tailed factors of mean one. This
script measures the effect where the target can be enumerated: tiny random Llamas from the test
suite (4 tokens, one EOS), a draft close to the target and one far from it. For each N and block
size K it runs many SMC runs as one batch and reports the final draw's expected length and stop
rate (the mean over runs of the self-normalised weights), against the exact target's.

    OMP_NUM_THREADS=1 python benchmarks/length_bias_exact.py --out OUT
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fidelity import write_report  # noqa: E402
from tiny_models import EOS, PROMPT, tiny_lm  # noqa: E402

from smcgen import SMC, LMPotential, LMProposal, SMCConfig  # noqa: E402
from smcgen.exact import enumerate_target  # noqa: E402

#: (label, seed, logit scale) of the drafts; the target is tiny_lm(0, logit_scale=2.0)
DRAFTS = (("close draft", 1, 0.7), ("far draft", 2, 2.0))


def final_draw(target: LMPotential, draft, n: int, block: int, max_new: int, runs: int, seed: int) -> dict:
    """Mean and SE over ``runs`` of the final draw's expected length and stop indicator."""
    cfg = SMCConfig(n_particles=n, block_size=block, max_new_tokens=max_new, seed=seed, ess_threshold=0.5)
    out = SMC(target, cfg, proposal=LMProposal(draft)).run(PROMPT, n_groups=runs)
    w = torch.softmax(out.log_weights.double(), dim=1)
    lengths = out.lengths.double()
    last = out.tokens.gather(2, (out.lengths - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    stopped = ((out.lengths > 0) & (last == EOS)).double()
    row = {}
    for key, values in (("length", lengths), ("stop", stopped)):
        per_run = (w * values).sum(1)
        row[key] = [float(per_run.mean()), float(per_run.std() / math.sqrt(runs))]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=7)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--particles", default="1,4,16,64")
    ap.add_argument("--blocks", default="1,3")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    target = LMPotential(tiny_lm(0, logit_scale=2.0))
    exact = enumerate_target(target, PROMPT, args.max_new_tokens)
    pi = torch.exp(exact.log_weights - exact.log_z)
    exact_len = float(pi @ torch.tensor([len(s) for s in exact.sequences], dtype=torch.float64))
    exact_stop = float(
        pi @ torch.tensor([float(bool(s) and s[-1] == EOS) for s in exact.sequences], dtype=torch.float64)
    )
    lines = [
        f"# SMC's final draw vs the exact target: tiny Llamas, {args.max_new_tokens} new tokens, {args.runs} runs "
        "per row",
        "",
        f"Exact target: mean length {exact_len:.3f}, stop rate {exact_stop:.3f}.",
        "",
        "| draft | N | K | final-draw length | minus exact (SE) | stop rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for label, seed, scale in DRAFTS:
        draft = tiny_lm(seed, logit_scale=scale)
        for n in [int(x) for x in args.particles.split(",")]:
            for block in [int(x) for x in args.blocks.split(",")]:
                r = {
                    "draft": label,
                    "N": n,
                    "K": block,
                    **final_draw(target, draft, n, block, args.max_new_tokens, args.runs, 100 + n + block),
                }
                rows.append(r)
                (m, se), (s, s_se) = r["length"], r["stop"]
                lines.append(
                    f"| {label} | {n} | {block} | {m:.3f} ± {se:.3f} | {m - exact_len:+.3f} ({(m - exact_len) / se:+.1f}) "
                    f"| {s:.3f} ± {s_se:.3f} |"
                )
                print(lines[-1], flush=True)
    report = "\n".join(lines)
    write_report(
        args.out, "length_bias_exact", report, {"exact_length": exact_len, "exact_stop": exact_stop, "rows": rows}
    )
    print(report)


if __name__ == "__main__":
    main()
