"""Per-step cost on this CPU of early-exit-sized drafts (1, 2, 4 layers + the tied head) vs the target.

A draft step decodes N rows one token each against a KV cache; a verify scores N*(K+1) new
positions in one forward. Only the number of layers matters for cost, so drafts are the target's
first L layers (``derive_draft``). Run with OMP_NUM_THREADS=2; prints a markdown table and a
per-configuration estimate of SMC-SD tokens/s assuming every drafted token is kept
(an upper bound: the real rate is scaled by the acceptance the weights allow).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DynamicCache

from smcgen.models.smollm2 import derive_draft, load_smollm2


@torch.no_grad()
def step_ms(model, rows: int, new: int, context: int = 64, reps: int = 8) -> float:
    """Median ms of one forward of ``new`` positions per row for ``rows`` rows after a ``context`` prefix."""
    ids = torch.randint(0, 1000, (rows, context))
    times = []
    for _ in range(reps):
        cache = DynamicCache()
        model(ids, past_key_values=cache, use_cache=True)
        step = torch.randint(0, 1000, (rows, new))
        t0 = time.perf_counter()
        model(step, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    target, _ = load_smollm2()
    rows = []
    t_ar = step_ms(target, 1, 1)
    for name, model in [("target (30)", target)] + [(f"draft {n}", derive_draft(target, n)) for n in (1, 2, 4)]:
        rows.append(
            {"model": name, "1x1": step_ms(model, 1, 1), "8x1": step_ms(model, 8, 1), "4x1": step_ms(model, 4, 1)}
        )
    verify = {f"{n}x{k + 1}": step_ms(target, n, k + 1) for n, k in ((4, 4), (8, 4), (8, 2), (4, 8))}
    print("| model | 1 row x 1 token (ms) | 4 rows | 8 rows |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['1x1']:.1f} | {r['4x1']:.1f} | {r['8x1']:.1f} |")
    print("target verify (rows x positions):", {k: round(v, 1) for k, v in verify.items()})
    print(f"target AR: {1000 / t_ar:.1f} tok/s")
    est = []
    for r in rows[1:]:
        for n, k in ((4, 4), (8, 4), (8, 2), (4, 8)):
            cyc = k * r[f"{n}x1"] + verify[f"{n}x{k + 1}"]
            est.append({"draft": r["model"], "N": n, "K": k, "cycle_ms": cyc, "max_tok_s": 1000 * (k + 1) / cyc})
    for e in est:
        print(f"{e['draft']} N={e['N']} K={e['K']}: cycle {e['cycle_ms']:.1f} ms, <= {e['max_tok_s']:.1f} tok/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "verify": verify, "ar_ms": t_ar, "estimates": est}, f, indent=1)


if __name__ == "__main__":
    main()
