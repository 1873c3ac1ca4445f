"""Where a warm native call's set-up and prefill time goes, piece by piece: host issue and device.

For AR and SMC-SD N=2 K=8 on the embedded SmolLM2-135M (``self-int8`` draft), two untimed calls
of the CLI's prompt (the first sizes pools and captures the cycle, the second records the prefill
graph), then one call whose engine steps are wrapped in timers: each step's host time to issue
its work, and its time up to a device sync after it. A step whose two times agree is bound by the
host (launches, Python); the nested steps' syncs add a little to the outer ones.

    python benchmarks/prefill_profile.py --device cuda --out $OUT
    python benchmarks/prefill_profile.py --device cuda --target-skinny-rows 16   # fp32 target in the skinny kernel
    python benchmarks/prefill_profile.py --device cuda --kernels 15   # + the top kernels of a prefill
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from embedded_pair import add_target_dtype, load_target
from smollm2_profile import kernel_table
from torch.profiler import ProfilerActivity, profile

import smcgen
from smcgen.api import load_draft
from smcgen.cli import DEFAULT_PROMPT
from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers import native_select
from smcgen.samplers.native import NativeSMC
from smcgen.samplers.native_prefill import PrefillBuffers
from smcgen.samplers.native_state import _CycleState

#: the engine steps timed, by class
STEPS = (
    (NativeSMC, ("_run_segments", "_make_caches", "_prefill", "_prefill_segment", "_start_potentials")),
    (PrefillBuffers, ("run",)),
    (_CycleState, ("start",)),
    (PagedKVCache, ("reset", "reserve", "resample", "share_prefixes")),
    (NativeCausalLM, ("forward",)),
)


def top_kernels(target, prompt, kw: dict, top: int) -> list[dict]:
    """The ``top`` kernels with the most device time in one call of one new token, after two untimed
    calls of that shape (the second records the prefill's graph): the prefills' kernels and one
    cycle's (an AR step, or SMC-SD's draft steps and verify)."""
    for _ in range(2):
        smcgen.generate(target, prompt, **kw)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        smcgen.generate(target, prompt, **kw)
        torch.cuda.synchronize()
    busy, launches, rows = kernel_table(prof, 1, top)
    print(f"  one-token call: {busy:.2f} ms of kernels, {launches} launches")
    for r in rows:
        print(f"    {r['ms']:8.3f} ms {r['calls']:5d}x {1e3 * r['ms'] / r['calls']:9.2f} us  {r['kernel'][:100]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    add_target_dtype(ap)
    ap.add_argument("--target-skinny-rows", type=int, default=None, help="the native target's skinny_max_rows")
    ap.add_argument(
        "--kernels",
        type=int,
        default=0,
        help="also list the N kernels with the most device time in a call of one new token "
        "(prefills and one cycle: an AR step, or SMC-SD's draft steps and verify)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if args.kernels and args.device != "cuda":
        raise SystemExit("--kernels lists GPU kernels: it needs --device cuda")
    target = load_target(args.device, args.target_dtype, ["self-int8"])
    draft = load_draft("self-int8", target, args.device)
    if args.target_skinny_rows is not None:
        native_select.native_model(target).skinny_max_rows = args.target_skinny_rows
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]
    common = {"max_new_tokens": 96, "target_temperature": 0.7, "draft_temperature": 0.7, "engine": "native", "seed": 0}

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    active = [False]

    def timed(name, fn):
        @functools.wraps(fn)
        def wrap(*a, **k):
            if not active[0]:
                return fn(*a, **k)
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            t1 = time.perf_counter()
            sync()
            row = times[name]
            row[0] += 1e3 * (t1 - t0)
            row[1] += 1e3 * (time.perf_counter() - t0)
            row[2] += 1
            return out

        return wrap

    for cls, names in STEPS:
        for n in names:
            setattr(cls, n, timed(f"{cls.__name__}.{n}", getattr(cls, n)))
    report = []
    for label, kw in (("AR", {"n_particles": 1}), ("2x8", {"draft": draft, "n_particles": 2, "block_size": 8})):
        for _ in range(2):
            smcgen.generate(target, prompt, **common, **kw)
        times.clear()
        active[0] = True
        sync()
        t0 = time.perf_counter()
        res = smcgen.generate(target, prompt, **common, **kw)
        sync()
        wall = 1e3 * (time.perf_counter() - t0)
        active[0] = False
        steps = {k: {"host_ms": h, "synced_ms": d, "calls": n} for k, (h, d, n) in times.items()}
        report.append({"config": label, "tokens": len(res.token_ids), "wall_ms": wall, "steps": steps})
        print(json.dumps({"config": label, "tokens": len(res.token_ids), "wall_ms": round(wall, 2)}))
        for k, v in sorted(steps.items(), key=lambda kv: -kv[1]["synced_ms"]):
            print(f"  {k:32s} calls {v['calls']:4d}  host {v['host_ms']:8.2f} ms  synced {v['synced_ms']:8.2f} ms")
        if args.kernels:
            report[-1]["kernels"] = top_kernels(target, prompt, {**common, **kw, "max_new_tokens": 1}, args.kernels)
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"),
            "target_dtype": args.target_dtype,
            "target_skinny_rows": args.target_skinny_rows,
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"prefill_profile_{args.target_dtype or 'as-loaded'}.json"
        Path(args.out, name).write_text(json.dumps({"meta": meta, "rows": report}, indent=1))


if __name__ == "__main__":
    main()
