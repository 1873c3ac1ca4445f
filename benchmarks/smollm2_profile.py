"""Where a SmolLM2-135M decode cycle's time goes on the GPU: wall, device-busy and per-kernel time.

The embedded target decodes at about 710 tokens/s alone on an H100 in fp32 (1,030 in bf16): a
token's 250-350 kernels take about 3.5 us each, far more than 30 layers of a 135M model cost at the
copy bandwidth. For each configuration (``AR`` or
``NxK`` with ``--draft``) this script makes a warm-up call through ``smcgen.generate`` (engine
build, graph capture) and a second one (it records the prefill's graph), one timed call of the
same shape (it replays both), and one call under ``torch.profiler``. Per configuration it reports:

- wall tokens/s;
- the engine's split of the timed call: prefill, capture and decode seconds, cycles;
- the decode milliseconds per cycle and per token;
- the device-busy milliseconds of the profiled call (prefill and decode, summed over its GPU
  kernels) next to the timed call's prefill + decode wall milliseconds;
- kernel launches per call;
- the kernels that take most device time, with their launches per decode cycle.

A call whose wall time far exceeds its busy time waits on the host. One whose kernels are many and
short is bound by launches.

    python benchmarks/smollm2_profile.py --device cuda --draft self-int8 --configs AR,2x8 --out $OUT
    python benchmarks/smollm2_profile.py --device cuda --configs AR,2x8,2x8+fused,2x16+fused --out $OUT
    OMP_NUM_THREADS=2 python benchmarks/smollm2_profile.py --configs AR --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from embedded_pair import add_target_dtype, load_target, parse_configs, split_fused, use_fused_layers
from fidelity import native_timing
from torch.profiler import ProfilerActivity, profile

import smcgen
from smcgen.api import load_draft
from smcgen.cli import DEFAULT_PROMPT
from smcgen.samplers import native_select


def kernel_table(prof, cycles: int, top: int) -> tuple[float, int, list[dict]]:
    """(device-busy ms, kernel launches, the ``top`` kernels by device time) of a profiled call.

    Only device-side events count: a CPU op (``aten::mm``) also carries its kernels' device time,
    which would count them twice."""
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", 0.0)
        if e.device_type != torch.autograd.DeviceType.CUDA or dev_us <= 0:
            continue
        if e.key.startswith(("Memcpy", "Memset")):
            continue
        rows.append({"kernel": e.key[:160], "calls": e.count, "ms": dev_us / 1e3})
    busy = sum(r["ms"] for r in rows)
    launches = sum(r["calls"] for r in rows)
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] / busy if busy else 0.0
        r["calls_per_cycle"] = r["calls"] / max(cycles, 1)
    return busy, launches, rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--draft", default="self-int8", help="draft name or trained draft directory")
    ap.add_argument(
        "--configs",
        default="AR,2x8",
        help="'AR' and N x K settings, comma separated; a '+fused' suffix: one launch per decoder layer",
    )
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per configuration")
    add_target_dtype(ap)
    ap.add_argument(
        "--quantized-draft-dtype",
        choices=["bfloat16", "as-loaded"],
        default="bfloat16",
        help="activations of the native int8 draft copy of an fp32 model (the library's default: bfloat16)",
    )
    ap.add_argument(
        "--target-skinny-rows",
        type=int,
        default=None,
        help="the native target's skinny_max_rows (default: the model's own; 0: every target layer on cuBLAS)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if args.quantized_draft_dtype == "as-loaded":  # the earlier behaviour, for a side-by-side measurement
        native_select.QUANTIZED_DTYPE = None

    target = load_target(args.device, args.target_dtype, [args.draft])
    draft = load_draft(args.draft, target, args.device)
    if args.target_skinny_rows is not None:  # the target's cached native copy, which every engine uses
        native_select.native_model(target).skinny_max_rows = args.target_skinny_rows
    prompt = [{"role": "user", "content": DEFAULT_PROMPT}]
    common = {
        "max_new_tokens": args.max_new_tokens,
        "target_temperature": args.temperature,
        "draft_temperature": args.temperature,
        "engine": "native" if args.device == "cuda" else "auto",
        "seed": 0,  # every call of a configuration draws the same tokens: the same cycles are timed
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    report = []
    for token in args.configs.split(","):
        text, fused = split_fused(token)
        use_fused_layers(fused)
        setting = None if text.upper() == "AR" else parse_configs(text)[0]
        kw = (
            {"n_particles": 1}
            if setting is None
            else {"draft": draft, "n_particles": setting[0], "block_size": setting[1]}
        )
        name = "AR (target alone)" if setting is None else f"SMC-SD N={setting[0]} K={setting[1]}"
        name += ", one launch per layer" if fused else ""
        smcgen.generate(target, prompt, **common, **kw)  # warm-up: build, convert, capture the cycle
        smcgen.generate(target, prompt, **common, **kw)  # the kept run's second use records its prefill
        t0 = time.perf_counter()
        res = smcgen.generate(target, prompt, **common, **kw)
        wall = time.perf_counter() - t0
        timing = native_timing(target, res, {**common, **kw})
        cycles = int(timing.get("cycles", 0))
        with profile(activities=activities) as prof:
            smcgen.generate(target, prompt, **common, **kw)
            if args.device == "cuda":
                torch.cuda.synchronize()
        busy, launches, kernels = kernel_table(prof, cycles, args.top)
        tokens = len(res.token_ids)
        row = {
            "config": name,
            "engine": res.engine,
            "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "mean_ess_over_n": res.mean_ess_fraction if setting is not None else None,
            "timing": timing,
            "decode_ms_per_cycle": 1e3 * timing["decode_s"] / cycles if cycles else None,
            "decode_ms_per_token": 1e3 * timing["decode_s"] / tokens if cycles and tokens else None,
            # the profiled call's kernels, prefill included: compare with the timed call's wall time of both
            "busy_ms_per_call": busy,
            "prefill_decode_wall_ms": 1e3 * (timing["prefill_s"] + timing["decode_s"]) if cycles else None,
            "launches_per_call": launches,
            "kernels": kernels,
        }
        report.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
        for r in kernels:
            print(f"  {r['ms']:8.2f} ms {100 * r['share']:5.1f}% {r['calls_per_cycle']:7.1f}/cycle  {r['kernel']}")
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            **{
                k: getattr(args, k)
                for k in (
                    "draft",
                    "target_dtype",
                    "quantized_draft_dtype",
                    "target_skinny_rows",
                    "max_new_tokens",
                    "temperature",
                )
            },
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "smollm2_profile.json").write_text(json.dumps({"meta": meta, "rows": report}, indent=1))


if __name__ == "__main__":
    main()
