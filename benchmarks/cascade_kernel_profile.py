"""Where a cascade attention call's time goes: the kernels of one layer's call, for a profiler.

Builds the shapes of ``cascade_speed.py`` (Llama-3.1-8B verify: 8 rows x 9 queries, 32 query / 8 KV
heads of 128; Llama-3.2-1B draft step: 8 rows x 1 query, heads of 64), random bf16 K/V, one request
of 8 rows sharing a ``--prompt``-token prefix, and calls plain and cascade attention ``--iters``
times each inside NVTX ranges, after a warm-up (compiles). Run it under Nsight Compute to read each
kernel's duration, memory and compute throughput, occupancy and stall reasons:

    ncu --set full --nvtx --nvtx-include "verify plain/" --nvtx-include "verify cascade/" \\
        --nvtx-include "draft plain/" --nvtx-include "draft cascade/" \\
        -o cascade python benchmarks/cascade_kernel_profile.py --prompt 4096 --iters 2
    ncu --import cascade.ncu-rep --page details --csv > cascade_details.csv

Alone it prints each call's median time (CUDA events), as cascade_speed.py does, and with
``--kernels`` each kernel's mean device time per call from the PyTorch profiler (where Nsight
Compute cannot read counters). ``--sweep`` times the cascade call's kernels for every prefix split
count and prefix query tile in ``--prefix-splits`` x ``--prefix-tiles`` (0: the automatic choice),
with each one's largest difference from plain attention:

    python benchmarks/cascade_kernel_profile.py --prompt 4096 --sweep --prefix-splits 0,2,4,5,8 --prefix-tiles 0,64

``--launch`` times plain and cascade kernels (verify and draft, one request and eight, at each
``--launch-prompts`` length) for every key tile x warps x pipeline stages in ``--launch-configs``,
patched into ``attention._launch_config`` (the query tile stays the automatic one). Options after
a slash: "/strided" launches the prefix kernel's query tiles as the slowest grid axis
(``attention.PREFIX_TILES_ADJACENT`` off), "/mN" merges N partial slots a step in the prefix
kernel's tiles below ``attention.BIG_TILE`` (``MERGE_PER_ITER_SMALL``, 8 by default):

    python benchmarks/cascade_kernel_profile.py --launch --launch-configs 0,0/strided,0/m2,64:4:2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cascade_speed import layer_calls, time_call  # noqa: E402

SHAPES = {"verify": (9, 32, 8, 128), "draft": (1, 32, 8, 64)}  # (queries per row, query heads, kv heads, head dim)


def kernel_times(fn, reps: int = 20) -> dict[str, float]:
    """Mean device microseconds per call of each kernel ``fn`` launches (PyTorch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {
        e.key[:60]: e.device_time_total / reps
        for e in prof.key_averages()
        if e.device_time_total > 0 and "Memcpy" not in e.key
    }


def sweep(name: str, args) -> list[dict]:
    """Kernel device time (us) of the cascade call for each prefix split count x prefix tile."""
    rows = []
    for splits in [int(x) for x in args.prefix_splits.split(",") if x]:
        for tile in [int(x) for x in args.prefix_tiles.split(",") if x]:
            kw = {"prefix_splits": splits or None, "prefix_block_m": tile or None}
            plain, cascade = layer_calls(args.prompt, 1, 8, *SHAPES[name], cascade_kw=kw)
            diff = float((plain().float() - cascade().float()).abs().max())
            times = kernel_times(cascade)
            row = {"prefix_splits": splits, "prefix_tile": tile, "kernels_us": times}
            rows.append({**row, "total_us": sum(times.values()), "max_abs_diff": diff})
            print(json.dumps({"call": name, **rows[-1]}), flush=True)
    return rows


def _patched_launch(config: str):
    """``attention._launch_config`` with key tile, warps and stages from "BLOCK_N:warps:stages"
    ("0": the library's own)."""
    from smcgen.kernels import attention

    own = attention._launch_config
    config = config.split("/")[0]
    if config == "0":
        return own
    bn, warps, stages = (int(x) for x in config.split(":"))

    def launch(packed: int, dim: int, ieee: bool = False):
        return own(packed, dim, ieee)[0], bn, warps, stages

    return launch


def launch_sweep(args) -> list[dict]:
    """Kernel device time (us) of plain and cascade attention under each launch configuration."""
    from smcgen.kernels import attention

    saved = attention._launch_config, attention.PREFIX_TILES_ADJACENT, attention.MERGE_PER_ITER_SMALL
    configs = [c for c in args.launch_configs.split(",") if c]
    for config in configs:  # all checked before any is patched in
        base, *options = config.split("/")
        bad = [o for o in options if o != "strided" and not re.fullmatch(r"m[1-9][0-9]*", o)]
        if bad or not (base == "0" or re.fullmatch(r"\d+:\d+:\d+", base)):
            raise SystemExit(f"--launch-configs: {config!r} is not BLOCK_N:warps:stages or 0, then /strided or /mN")
    rows = []
    cases = [
        (name, prompt, groups)
        for prompt in [int(x) for x in args.launch_prompts.split(",") if x]
        for groups in (1, 8)
        for name in [c for c in args.calls.split(",") if c]
    ]
    for config in configs:
        options = config.split("/")[1:]
        try:
            attention._launch_config = _patched_launch(config)
            attention.PREFIX_TILES_ADJACENT = "strided" not in options
            attention.MERGE_PER_ITER_SMALL = next((int(o[1:]) for o in options if o.startswith("m")), saved[2])
            for name, prompt, groups in cases:
                plain, cascade = layer_calls(prompt, groups, 8, *SHAPES[name])
                row = {"config": config, "call": name, "prompt": prompt, "requests": groups}
                try:
                    diff = float((plain().float() - cascade().float()).abs().max())
                    row |= {"plain_us": sum(kernel_times(plain).values())}
                    row |= {"cascade_us": sum(kernel_times(cascade).values()), "max_abs_diff": diff}
                except Exception as err:  # a configuration the compiler refuses (shared memory)
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            attention._launch_config, attention.PREFIX_TILES_ADJACENT, attention.MERGE_PER_ITER_SMALL = saved
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=4096, help="shared prefix length (tokens)")
    ap.add_argument("--calls", default="verify,draft", help=f"from {', '.join(SHAPES)}")
    ap.add_argument("--iters", type=int, default=3, help="calls of each kind inside its NVTX range")
    ap.add_argument("--kernels", action="store_true", help="also each kernel's mean time (PyTorch profiler)")
    ap.add_argument("--sweep", action="store_true", help="time the cascade kernels over the settings below")
    ap.add_argument("--prefix-splits", default="0,2,4,5,8", help="prefix split counts to sweep (0: automatic)")
    ap.add_argument("--prefix-tiles", default="0,64", help="prefix query tiles to sweep (0: automatic)")
    ap.add_argument("--launch", action="store_true", help="only time the launch configurations below")
    ap.add_argument("--launch-configs", default="0,32:4:2,64:4:2,64:8:3", help="BLOCK_N:warps:stages, 0: own")
    ap.add_argument("--launch-prompts", default="256,4096", help="prefix lengths of the launch sweep")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "prompt": args.prompt}
    if args.launch:
        print(json.dumps({**out, "launch": launch_sweep(args)}))
        return
    for name in [c for c in args.calls.split(",") if c]:
        plain, cascade = layer_calls(args.prompt, 1, 8, *SHAPES[name])
        for fn in (plain, cascade):  # compile outside the ranges a profiler filters on
            fn()
        torch.cuda.synchronize()
        for label, fn in (("plain", plain), ("cascade", cascade)):
            torch.cuda.nvtx.range_push(f"{name} {label}")
            for _ in range(args.iters):
                fn()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        out[name] = {"plain_us": time_call(plain, 20), "cascade_us": time_call(cascade, 20)}
        if args.kernels:
            out[name]["kernels_us"] = {
                label: kernel_times(fn) for label, fn in (("plain", plain), ("cascade", cascade))
            }
        if args.sweep:
            out[name]["sweep"] = sweep(name, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
