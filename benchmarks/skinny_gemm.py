"""Linear-layer sweep of one forward: the fused skinny Triton kernel against cuBLAS (GPU host).

For a model shape (Llama-3.1-8B, Llama-3.2-1B, Qwen3-0.6B) and a row count M, one CUDA graph holds
the linear work of a whole forward with distinct random weights per layer (so L2 cannot hold
them): per layer norm -> qkv, o + residual, norm -> gate_up -> SiLU-mul, down + residual, then
norm -> LM head. Three versions, timed side by side in one process (median of graph replays):

- ``cublas``: bare ``F.linear`` GEMMs only (the cuBLAS floor, no elementwise);
- ``composed``: cuBLAS with the fused elementwise kernels (the engine's path for wide batches);
- ``skinny``: ``kernels.linear.fused_linear_triton`` with its default launch plan.

``--sweep`` also times cuBLAS and a grid of launch plans per layer kind at ``--sweep-at`` and
prints the best, which is how ``skinny_plan``'s rule was chosen.

    python benchmarks/skinny_gemm.py --sweep
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import time

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from smcgen.kernels import linear
from smcgen.kernels.linear import (
    fused_linear_composed,
    fused_linear_triton,
    quantize_fp8,
    quantize_int8,
    skinny_plan,
)

#: --fp8: id(bf16 weight) -> (fp8 weight, row scales); the skinny kernel streams these instead,
#: cuBLAS keeps the bf16 weight (the comparison is fp8 skinny against bf16 cuBLAS)
FP8_OF: dict[int, tuple] = {}


def skinny(x, weight, *args, **kw):
    """``fused_linear_triton``, on the weight's fp8 copy when ``--fp8`` made one."""
    if id(weight) in FP8_OF:
        q, scale = FP8_OF[id(weight)]
        return fused_linear_triton(x, q, *args, weight_scale=scale, **kw)
    return fused_linear_triton(x, weight, *args, **kw)


# hidden, q heads x head dim, qkv out, intermediate, layers, vocab
SHAPES = {
    "llama-8b": (4096, 4096, 6144, 14336, 32, 128256),
    "llama-1b": (2048, 2048, 3072, 8192, 16, 128256),
    "qwen3-0.6b": (1024, 2048, 4096, 3072, 28, 151936),
}


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of one replay of a CUDA graph of ``fn``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile / warm outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def build(shape, dev):
    hidden, q_size, qkv, inter, layers, vocab = shape
    bf = torch.bfloat16

    def w(n, k):
        return torch.randn(n, k, device=dev, dtype=bf) * k**-0.5

    ls = [
        {
            "qkv": w(qkv, hidden),
            "o": w(hidden, q_size),
            "gate_up": w(2 * inter, hidden),
            "down": w(hidden, inter),
            "n1": torch.ones(hidden, device=dev, dtype=bf),
            "n2": torch.ones(hidden, device=dev, dtype=bf),
        }
        for _ in range(layers)
    ]
    head = w(vocab, hidden)
    return ls, head, torch.ones(hidden, device=dev, dtype=bf)


def forward_fn(kind, ls, head, norm, x, eps=1e-5):
    # attention's output stands in as a fixed buffer: only the linear work is timed
    att = torch.randn(x.shape[0], ls[0]["o"].shape[1], device=x.device, dtype=x.dtype)

    def cublas():
        h = x
        for L in ls:
            F.linear(h, L["qkv"])
            h = F.linear(att, L["o"])
            a = F.linear(h, L["gate_up"])
            h = F.linear(a[:, : L["down"].shape[1]], L["down"])
        F.linear(h, head)

    def fused(linear):
        def run():
            h = x
            for L in ls:
                linear(h, L["qkv"], norm_weight=L["n1"], eps=eps)
                h = linear(att, L["o"], residual=h)
                a = linear(h, L["gate_up"], norm_weight=L["n2"], eps=eps, gated=True)
                h = linear(a, L["down"], residual=h)
            linear(h, head, norm_weight=norm, eps=eps)

        return run

    return {
        "cublas": cublas,
        "composed": fused(fused_linear_composed),
        "skinny": fused(skinny),
    }[kind]


def sweep(
    ls,
    head,
    norm,
    rows,
    dev,
    eps=1e-5,
    only=None,
    block_ns=(64,),
    warps=(4,),
    splits=(1, 2, 4, 8),
    stages_=(3, 4),
    swaps=(False, True),
):
    """Per layer kind: cuBLAS (composed) and a grid of skinny plans, every layer's weight of that
    kind in one graph (weights stay cold); prints the best plan against the default one."""
    hidden = head.shape[1]
    x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16)
    a = torch.randn(rows, ls[0]["down"].shape[1], device=dev, dtype=torch.bfloat16)
    att = torch.randn(rows, ls[0]["o"].shape[1], device=dev, dtype=torch.bfloat16)

    def linear(plan, *args, **kw):
        if plan is None:
            return fused_linear_composed(*args, **kw)
        return skinny(*args, plan=plan, **kw)

    kinds = {  # name: (call(plan), output width, K, gated, layers)
        "qkv+norm": (
            lambda p: [linear(p, x, L["qkv"], norm_weight=L["n1"], eps=eps) for L in ls],
            ls[0]["qkv"].shape[0],
            hidden,
            False,
            len(ls),
        ),
        "o+res": (
            lambda p: [linear(p, att, L["o"], residual=x) for L in ls],
            hidden,
            att.shape[1],
            False,
            len(ls),
        ),
        "gate_up+norm+silu": (
            lambda p: [linear(p, x, L["gate_up"], norm_weight=L["n2"], eps=eps, gated=True) for L in ls],
            ls[0]["gate_up"].shape[0] // 2,
            hidden,
            True,
            len(ls),
        ),
        "down+res": (
            lambda p: [linear(p, a, L["down"], residual=x) for L in ls],
            hidden,
            a.shape[1],
            False,
            len(ls),
        ),
        "head+norm": (
            lambda p: linear(p, x, head, norm_weight=norm, eps=eps),
            head.shape[0],
            hidden,
            False,
            1,
        ),
    }
    out = {}
    for name, (fn, n_out, k, gated, n_layers) in kinds.items():
        if only and name not in only:
            continue
        n_bytes = n_layers * (2 if gated else 1) * n_out * k * 2
        default = skinny_plan(rows, n_out, k, gated, dev, one_byte=bool(FP8_OF))
        plans = {default}
        for bk, stages, split, bn, nw, swap in itertools.product(
            (128, 256, 512) if FP8_OF else ((64, 128) if rows > 32 else (128, 256)),
            stages_,
            (*splits, default[5]),
            block_ns,
            warps,
            swaps,
        ):
            for floor in (8, 16) if swap and rows <= 16 else (16,):  # rows padded to 8 or 16 in the swapped MMA
                block_m = max(floor, 1 << max(rows - 1, 0).bit_length())
                plans.add((block_m, bn, bk, nw, stages, split, swap))
        results = []
        for plan in sorted(plans):
            try:
                ms = graph_ms(functools.partial(fn, plan), reps=10)
            except (OutOfResources, RuntimeError) as e:  # shared memory / registers exceeded
                results.append({"plan": plan, "error": type(e).__name__})
                continue
            results.append({"plan": plan, "ms": ms, "TBs": n_bytes / ms / 1e9})
        cublas = graph_ms(functools.partial(fn, None), reps=10)
        ok = sorted((r for r in results if "ms" in r), key=lambda r: r["ms"])
        dflt = next((r for r in ok if tuple(r["plan"]) == default), None)
        out[name] = {"best": ok[:5], "default": dflt, "default_plan": default, "composed_ms": cublas}
        print(
            f"  {name:20s} composed {cublas:.3f} ms {n_bytes / cublas / 1e9:.2f} TB/s | best {ok[0]['plan']} "
            f"{ok[0]['ms']:.3f} ms {ok[0]['TBs']:.2f} TB/s | default {default} "
            f"{dflt['ms'] if dflt else float('nan'):.3f} ms",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama-8b", "llama-1b"], choices=sorted(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 16, 32, 64])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--sweep-at",
        nargs="+",
        default=["llama-8b:1", "llama-1b:8"],
        help="shape:rows pairs to sweep (AR of the 8B, a draft step of N=8 on the 1B)",
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "skinny_gemm.json"))
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=None,
        help="layer kinds to sweep (qkv+norm, o+res, gate_up+norm+silu, down+res, head+norm); default all",
    )
    ap.add_argument("--block-n", nargs="+", type=int, default=[64], help="output columns per program to sweep")
    ap.add_argument("--warps", nargs="+", type=int, default=[4], help="warps per program to sweep")
    ap.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8], help="split-K factors to sweep")
    ap.add_argument("--stages", nargs="+", type=int, default=[3, 4], help="pipeline stages to sweep")
    ap.add_argument(
        "--swap",
        nargs="+",
        type=int,
        default=[0, 1],
        help="operand orders to sweep: 0 rows x weight tile, 1 weight tile x rows (SWAP_AB)",
    )
    ap.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="raise kernels.linear.MAX_SKINNY_ROWS (the skinny kernel's row limit) for this run",
    )
    ap.add_argument(
        "--fp8",
        action="store_true",
        help="the skinny kernel on weight-only fp8 copies of the weights (cuBLAS stays bf16)",
    )
    ap.add_argument("--int8", action="store_true", help="as --fp8, with weight-only int8 copies")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.max_rows is not None:
        linear.MAX_SKINNY_ROWS = args.max_rows
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
        "sweeps": {},
    }
    print(
        f"| shape | M | weights GB | cuBLAS GEMMs ms | composed ms | skinny ms | skinny TB/s | skinny vs composed | "
        f"skinny, SWAP_AB={not linear.SWAP_AB} ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.shapes:
        ls, head, norm = build(SHAPES[name], dev)
        FP8_OF.clear()
        if args.fp8 or args.int8:
            quantize = quantize_int8 if args.int8 else quantize_fp8
            for w in [head] + [L[k] for L in ls for k in ("qkv", "o", "gate_up", "down")]:
                FP8_OF[id(w)] = quantize(w)
        n_bytes = sum(t.numel() * 2 for L in ls for k_, t in L.items() if k_ in ("qkv", "o", "gate_up", "down"))
        n_bytes += head.numel() * 2
        for m in args.rows:
            x = torch.randn(m, head.shape[1], device=dev, dtype=torch.bfloat16)
            t = {k: graph_ms(forward_fn(k, ls, head, norm, x)) for k in ("cublas", "composed", "skinny")}
            linear.SWAP_AB = not linear.SWAP_AB  # the other operand order of the default plans
            t["skinny_other_order"] = graph_ms(forward_fn("skinny", ls, head, norm, x))
            linear.SWAP_AB = not linear.SWAP_AB
            row = {
                "shape": name,
                "M": m,
                "GB": n_bytes / 1e9,
                **{f"{k}_ms": v for k, v in t.items()},
            }
            result["rows"].append(row)
            print(
                f"| {name} | {m} | {n_bytes / 1e9:.2f} | {t['cublas']:.3f} | {t['composed']:.3f} | {t['skinny']:.3f} | "
                f"{n_bytes / t['skinny'] / 1e9:.2f} | {t['composed'] / t['skinny']:.2f}x | {t['skinny_other_order']:.3f} |",
                flush=True,
            )
        if args.sweep:
            for m in [int(a.split(":")[1]) for a in args.sweep_at if a.split(":")[0] == name]:
                print(f"sweep {name} M={m}")
                result["sweeps"][f"{name}/M={m}"] = sweep(
                    ls,
                    head,
                    norm,
                    m,
                    dev,
                    only=args.kinds,
                    block_ns=tuple(args.block_n),
                    warps=tuple(args.warps),
                    splits=tuple(args.splits),
                    stages_=tuple(args.stages),
                    swaps=tuple(bool(v) for v in args.swap),
                )
        del ls, head
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
