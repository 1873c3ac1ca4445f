"""Cascade (prefix-shared) attention against plain paged attention on a GPU, side by side.

Random-weight Llama-3.1-8B target and Llama-3.2-1B draft (published configs, bf16, no download),
the same engine with ``NativeCausalLM.cascade`` off and on:

1. one layer's attention alone (CUDA events, median of 50 calls): the 8B's verify (8 rows x 9
   queries per request) and the 1B's draft step (8 rows x 1 query) at every prompt length, for 1
   request and (at the aggregate prompts) 8, plain vs cascade, with the largest difference between
   their outputs (bf16);
2. SMC-SD N=8 K=8 (int8 draft, what ``generate`` picks for 8 rows) at each prompt length, tokens/s
   per request, decode only, in each ``--modes`` (``MODES``: off; on; auto, the models' own choice
   per call; draft-only; on with coarser prefix splits; on with the wider prefix tiles used before
   2026-12-07; on and auto with the prefix query tiles as the slowest grid axis, the order before
   2026-12-07);
3. 8 requests x 8 particles (bf16 draft), aggregate tokens/s, cascade off / on.

    python benchmarks/cascade_speed.py --out $OUT              # prompts 256, 4096, 16384
    python benchmarks/cascade_speed.py --prompts 256,4096 --aggregate-prompts 256
    python benchmarks/cascade_speed.py --prompts 256,4096 --aggregate-prompts 4096 --modes off,auto,draft-only

Writes cascade_speed.json and cascade_speed.md under ``--out`` (default $OUT, else .) and prints
the markdown table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from native_speed import PAIRS, hf_config, run_engine  # noqa: E402

from smcgen.kernels import attention  # noqa: E402
from smcgen.runners.native.model import NativeCausalLM  # noqa: E402

#: engine modes: (target/draft cascade flag, prefix keys per packed query of the prefix splits)
MODES = {
    "off": (False, attention.PREFIX_KEYS_PER_QUERY),
    "auto": (None, attention.PREFIX_KEYS_PER_QUERY),  # NativeCausalLM's own choice per call
    "on": (True, attention.PREFIX_KEYS_PER_QUERY),
    "on-coarse": (True, 4 * attention.PREFIX_KEYS_PER_QUERY),  # 4x fewer prefix splits, cheaper merge
    "draft-only": ("draft", attention.PREFIX_KEYS_PER_QUERY),  # the draft models cascade, the target not
    "on-wide-tiles": (True, attention.PREFIX_KEYS_PER_QUERY),  # the prefix query tiles before 2026-12-07
    "on-strided": (True, attention.PREFIX_KEYS_PER_QUERY),  # on, prefix query tiles the slowest grid axis
    "auto-strided": (None, attention.PREFIX_KEYS_PER_QUERY),  # auto, prefix query tiles the slowest grid axis
}
_PREFIX_TILE = attention.prefix_tile


def _wide_prefix_tile(packed: int) -> int:
    """The prefix kernel's query tile before 2026-12-07: the plain kernel's (all packed queries in one
    tile of up to 128 rows)."""
    return attention._launch_config(packed, 128)[0]


def set_mode(models, mode: str) -> None:
    on, per_query = MODES[mode]
    for i, m in enumerate(models):  # models[0] is the target, the rest drafts
        m.cascade = (i > 0) if on == "draft" else on
    attention.PREFIX_KEYS_PER_QUERY = per_query
    attention.prefix_tile = _wide_prefix_tile if mode == "on-wide-tiles" else _PREFIX_TILE
    attention.PREFIX_TILES_ADJACENT = not mode.endswith("-strided")


def time_call(fn, reps: int = 50) -> float:
    """Median microseconds of ``fn`` over ``reps`` calls (after warm-up: compiles)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def layer_calls(
    prompt: int,
    groups: int,
    group: int,
    n_q: int,
    n_qh: int,
    n_kvh: int,
    dim: int,
    new: int = 512,
    cascade_kw: dict | None = None,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
):
    """(plain, cascade): one layer's paged and cascade attention as argument-free calls on random
    K/V (bf16 on the GPU by default; float32 on the CPU under TRITON_INTERPRET for a smoke test): ``groups`` requests of ``group`` rows, each request's rows sharing the pages of its
    ``prompt`` tokens, every row 256 tokens past its prompt. ``cascade_kw`` (tuning: split counts,
    the prefix tile) goes to the Triton cascade kernel directly."""
    dev, ps = torch.device(device), 16
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = groups * group
    max_pages = -(-(prompt + new + n_q) // ps)
    shared, own = prompt // ps, max_pages - prompt // ps
    n_pages = groups * shared + rows * own
    k_pool = torch.randn(n_pages, ps, n_kvh, dim, generator=gen, device=dev).to(dtype)
    v_pool = torch.randn(n_pages, ps, n_kvh, dim, generator=gen, device=dev).to(dtype)
    table = torch.empty(rows, max_pages, dtype=torch.int32, device=dev)
    i32 = {"dtype": torch.int32, "device": dev}
    table[:, :shared] = (
        torch.arange(groups * shared, **i32).view(groups, 1, shared).expand(groups, group, shared).reshape(rows, shared)
    )
    table[:, shared:] = groups * shared + torch.arange(rows * own, **i32).view(rows, own)
    # mid-run: every row 256 tokens past its prompt (the partial prompt page belongs to each row)
    start = torch.full((rows,), prompt + 256, **i32)
    shared_len = shared * ps  # only the shared pages are one copy here
    plen = torch.full((groups,), shared_len, **i32)
    q = torch.randn(rows, n_q, n_qh, dim, generator=gen, device=dev).to(dtype)
    counters = torch.zeros(16384, **i32)
    scale = dim**-0.5

    def plain():
        return attention.paged_attention(q, k_pool, v_pool, table, start, scale, counters)

    def cascade():
        if cascade_kw:
            return attention.cascade_attention_triton(
                q, k_pool, v_pool, table, start, scale, plen, group, shared_len, counters=counters, **cascade_kw
            )
        return attention.cascade_attention(q, k_pool, v_pool, table, start, scale, plen, group, shared_len, counters)

    return plain, cascade


def attention_layer(prompt: int, groups: int, group: int, n_q: int, n_qh: int, n_kvh: int, dim: int, new: int = 512):
    """One layer's plain / cascade attention time (us) and max |difference| (see ``layer_calls``)."""
    plain, cascade = layer_calls(prompt, groups, group, n_q, n_qh, n_kvh, dim, new)
    diff = float((plain().float() - cascade().float()).abs().max())
    return {"plain_us": time_call(plain), "cascade_us": time_call(cascade), "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="256,4096,16384", help="prompt lengths of the N=8 K=8 rows")
    ap.add_argument("--aggregate-prompts", default="256,4096", help="prompt lengths of the 8 x 8 rows ('' for none)")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--modes", default="off,on,on-coarse", help=f"from {', '.join(MODES)}")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    prompts = [int(p) for p in args.prompts.split(",") if p]
    agg_prompts = [int(p) for p in args.aggregate_prompts.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; known: {', '.join(MODES)}")
    os.makedirs(args.out, exist_ok=True)

    (t_name, t_kind, t_fields), (d_name, d_kind, d_fields) = PAIRS["llama"]
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "pair": f"{t_name} / {d_name}",
        "new_tokens": args.new_tokens,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(info), flush=True)

    # 1. one layer's attention, both models' shapes
    kernel_rows = []
    calls = [(p, 1) for p in prompts] + [(p, 8) for p in agg_prompts]
    for p, groups in calls:
        for what, (n_q, n_qh, n_kvh, dim) in (("verify 8B", (9, 32, 8, 128)), ("draft 1B", (1, 32, 8, 64))):
            for mode in [m for m in modes if MODES[m][0] is True]:  # the modes that force cascade on
                set_mode((), mode)
                r = {
                    "prompt": p,
                    "call": f"{what}, {groups} x 8",
                    "mode": mode,
                    **attention_layer(p, groups, 8, n_q, n_qh, n_kvh, dim, args.new_tokens),
                }
                kernel_rows.append(r)
                print(json.dumps(r), flush=True)

    # 2. and 3. the engine
    max_pos = max(prompts + agg_prompts) + args.new_tokens + 64
    target = NativeCausalLM.from_config(hf_config(t_kind, t_fields), torch.bfloat16, dev, seed=0, max_positions=max_pos)
    draft = NativeCausalLM.from_config(hf_config(d_kind, d_fields), torch.bfloat16, dev, seed=1, max_positions=max_pos)
    draft8 = NativeCausalLM.from_config(hf_config(d_kind, d_fields), torch.bfloat16, dev, seed=1, max_positions=max_pos)
    draft8.quantize_int8()
    models = (target, draft, draft8)
    grid = [(8, 8, 1, p) for p in prompts] + [(8, 8, 8, p) for p in agg_prompts]
    rows = []
    for n, k, reqs, p in grid:
        for mode in modes if reqs == 1 else [m for m in modes if m != "on-coarse"]:
            set_mode(models, mode)
            d_model = draft8 if n * reqs <= 16 else draft
            try:
                r = run_engine(target, d_model, n, k, reqs, p, args.new_tokens)
            except (ValueError, RuntimeError, torch.OutOfMemoryError) as err:  # a pool that does not fit
                r = {"error": str(err)[:300]}
                torch.cuda.empty_cache()
            r.update(
                {
                    "N": n,
                    "K": k,
                    "requests": reqs,
                    "prompt": p,
                    "mode": mode,
                    "draft": "int8" if d_model is draft8 else "bf16",
                }
            )
            if "tok_s_per_request" in r:
                r["aggregate_tok_s"] = r["tok_s_per_request"] * reqs
            rows.append(r)
            print(json.dumps(r), flush=True)
    set_mode(models, "off")
    for m in models:
        m.cascade = None
    info["elapsed_s"] = time.perf_counter() - t0

    md = [
        f"{info['pair']} on {info['device']}, bf16 random weights, {args.new_tokens} new tokens, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
    ]
    if kernel_rows:  # (modes that force cascade on; uncaptured calls, launches included)
        md += [
            "One layer's attention (8 rows, 256 tokens past the prompt; us, median of 50):",
            "",
            "| prompt | call | cascade mode | plain us | cascade us | speed-up | max abs diff |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
    for r in kernel_rows:
        md.append(
            f"| {r['prompt']} | {r['call']} | {r['mode']} | {r['plain_us']:.1f} | {r['cascade_us']:.1f} | "
            f"{r['plain_us'] / r['cascade_us']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    md += [
        "",
        "SMC-SD N=8 K=8 through the engine (decode tokens/s; aggregate = per request x requests):",
        "",
        "| prompt | requests x N | draft | " + " | ".join(f"cascade {m}" for m in modes) + " | best vs off |",
        "|---:|---|---|" + "---:|" * (len(modes) + 1),
    ]
    for n, k, reqs, p in grid:
        # a mode named twice (--modes off,on,off,on) ran twice: its runs fill its columns in order
        mine: dict[str, list[dict]] = {}
        for r in rows:
            if (r["N"], r["K"], r["requests"], r["prompt"]) == (n, k, reqs, p):
                mine.setdefault(r["mode"], []).append(r)
        cells, speeds, seen = [], {}, {}
        for m in modes:
            i = seen[m] = seen.get(m, -1) + 1
            r = mine[m][i] if i < len(mine.get(m, [])) else None
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("does not fit")
            else:
                speeds.setdefault(m, []).append(r["aggregate_tok_s"])
                cells.append(f"{r['aggregate_tok_s']:.1f}")
        mean = {m: sum(v) / len(v) for m, v in speeds.items()}  # the repeats' mean per mode
        best = max((v for m, v in mean.items() if m != "off"), default=float("nan"))
        gain = f"{best / mean['off']:.2f}x" if "off" in mean and math.isfinite(best) else "-"
        draft_kind = next(iter(mine.values()))[0]["draft"]
        md.append(f"| {p} | {reqs} x {n} | {draft_kind} | " + " | ".join(cells) + f" | {gain} |")
    # the yardstick: a long prompt's speed as a fraction of the shortest prompt's, per mode
    base = min(prompts) if prompts else None
    for p in prompts:
        if p == base:
            continue
        fracs = []
        for m in dict.fromkeys(modes):  # a repeated mode once (its first run)
            long_ = next((r for r in rows if (r["requests"], r["prompt"], r["mode"]) == (1, p, m)), {})
            short = next((r for r in rows if (r["requests"], r["prompt"], r["mode"]) == (1, base, m)), {})
            if "aggregate_tok_s" in long_ and "aggregate_tok_s" in short:
                fracs.append(f"{m} {100 * long_['aggregate_tok_s'] / short['aggregate_tok_s']:.0f}%")
        md.append(f"\n1 x 8 at a {p}-token prompt as a share of its {base}-token speed: " + ", ".join(fracs))
    md.append(f"\n(total {info['elapsed_s']:.0f} s)")
    table = "\n".join(md)
    with open(os.path.join(args.out, "cascade_speed.json"), "w") as f:
        json.dump({"info": info, "attention": kernel_rows, "engine": rows}, f, indent=1)
    with open(os.path.join(args.out, "cascade_speed.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
