"""Continuous batching against the whole-batch schedule on a stream of mixed-length requests.

One run, random weights of the real architectures (Llama-3.1-8B target, Llama-3.2-1B draft, from
their configs, on the GPU), N=8 K=8, EOS off (every answer has its full length). The stream:
``--requests`` requests (default 64) with prompts of random ids, lengths drawn from 64..512, and
token limits drawn from {64, 128, 256, 512}, all queued at t=0 in a fixed order. Two schedules on
the same converted models, each warmed up first (graph capture, kernel compiles):

1. continuous: ``Engine(continuous=True, slots=8)``: every request submitted at once; a request
   joins the running batch between cycles when one of the 8 slots frees, and leaves when its
   particles finish.
2. whole-batch: ``Engine(continuous=False)``: the requests in arrival order, 8 at a time, each 8
   one native batch (prompts of every length together) that runs until its longest request ends
   (what the server's worker did: take up to 8 waiting requests, run them to the end).

Reported per schedule: aggregate tok/s = the answers' tokens (each request's limit, counted once,
as engine_speed.py counts) over the wall time of the whole stream; particle tok/s (x N); request
latency p50 / p99 from t=0 (the queueing included) and of the short requests (limit 64) alone;
and how many requests got the same tokens under both schedules (the same seeds: equal unless bf16
rounding differs between the batch shapes). ``--tiny`` runs it on the CPU with tiny models (checks
the script, not a speed figure). JSON to ``--out`` (default $OUT or .), a markdown table last.

    python benchmarks/continuous_batching.py --out DIR     # GPU host
    python benchmarks/continuous_batching.py --tiny        # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch
from engine_speed import PAIR, TINY, build, sync


def percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8, help="requests at once, both schedules")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from smcgen import Engine

    if args.tiny:
        device, dtype, pair = torch.device("cpu"), torch.float32, TINY
        prompt_lens, limits = (4, 24), [6, 12, 24, 48]
        engine_name, n, k = "native", min(args.n, 4), min(args.k, 2)
        n_requests = min(args.requests, 12)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --tiny)")
        device, dtype, pair = torch.device("cuda"), torch.bfloat16, PAIR
        prompt_lens, limits = (64, 512), [64, 128, 256, 512]
        engine_name, n, k = "auto", args.n, args.k
        n_requests = args.requests

    (t_name, t_fields), (d_name, d_fields) = pair["target"], pair["draft"]
    target, draft = build(t_fields, dtype, device, 0), build(d_fields, dtype, device, 1)
    vocab = t_fields["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    stream = []
    for i in range(n_requests):
        length = int(torch.randint(prompt_lens[0], prompt_lens[1] + 1, (1,), generator=gen))
        limit = limits[int(torch.randint(0, len(limits), (1,), generator=gen))]
        stream.append((torch.randint(0, vocab, (length,), generator=gen).tolist(), limit, 1000 + i))
    answer_tokens = sum(limit for _, limit, _ in stream)
    settings = {
        "n_particles": n,
        "block_size": k,
        "max_new_tokens": max(limits),
        "draft_temperature": 0.7,
        "target_temperature": 0.7,
        "engine": engine_name,
    }
    continuous = Engine(target, draft=draft, slots=args.slots, continuous=True, **settings)
    whole = Engine(target, draft=draft, continuous=False, **settings)
    if continuous.engine_reason is not None:
        raise SystemExit(f"the native engine does not run here: {continuous.engine_reason}")
    warm = [(p, lim, s) for p, lim, s in stream[: args.slots]]
    for eng in (continuous, whole):  # graph capture, kernel compiles, the slots' pool
        eng.batch([p for p, _, _ in warm], seed=[s for *_, s in warm], max_new_tokens=[lim for _, lim, _ in warm])

    rows, outputs = [], {}

    def record(name: str, wall: float, latency: list[float], results: list) -> None:
        short = [t for t, (_, lim, _) in zip(latency, stream) if lim == min(limits)]
        row = {
            "schedule": name,
            "wall_s": wall,
            "answer_tok_s": answer_tokens / wall,
            "particle_tok_s": answer_tokens * n / wall,
            "latency_p50_s": percentile(latency, 0.5),
            "latency_p99_s": percentile(latency, 0.99),
            "short_latency_p50_s": percentile(short, 0.5),
        }
        rows.append(row)
        outputs[name] = [r.token_ids for r in results]
        print(f"{name}: {row['answer_tok_s']:.1f} tok/s ({wall:.2f} s)", flush=True)

    # 1. continuous: all submitted at t=0, each finishing time taken as its future completes
    warm_stats = dict(continuous.batcher.stats)  # the stream's own counts are the differences
    sync(device)
    t0 = time.perf_counter()
    finished: dict[int, float] = {}
    futures = []
    for i, (p, lim, s) in enumerate(stream):
        f = continuous.submit(p, seed=s, max_new_tokens=lim)
        f.add_done_callback(lambda _, i=i: finished.__setitem__(i, time.perf_counter()))
        futures.append(f)
    results = [f.result() for f in tqdm(futures, desc="continuous", leave=False)]
    sync(device)
    wall = time.perf_counter() - t0
    record("continuous (slots)", wall, [finished[i] - t0 for i in range(len(stream))], results)
    stats = {k: v - warm_stats[k] for k, v in continuous.batcher.stats.items()}

    # 2. whole-batch: 8 at a time in arrival order, each batch to its longest request's end
    sync(device)
    t0 = time.perf_counter()
    latency, results = [], []
    for j in tqdm(range(0, len(stream), args.slots), desc="whole-batch", leave=False):
        chunk = stream[j : j + args.slots]
        out = whole.batch(
            [p for p, _, _ in chunk], seed=[s for *_, s in chunk], max_new_tokens=[lim for _, lim, _ in chunk]
        )
        sync(device)
        results += out
        latency += [time.perf_counter() - t0] * len(chunk)
    wall = time.perf_counter() - t0
    record("whole-batch (8 at a time)", wall, latency, results)
    same = sum(a == b for a, b in zip(*outputs.values()))

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "models": f"{t_name} / {d_name} (random weights)",
        "n": n,
        "k": k,
        "requests": len(stream),
        "slots": args.slots,
        "prompt_lengths": list(prompt_lens),
        "limits": limits,
        "answer_tokens": answer_tokens,
        "same_tokens_both_schedules": same,
        "continuous_stats": stats,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "continuous_batching.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print()
    print(
        f"{meta['models']}, N={n} K={k}; {len(stream)} requests, prompts {prompt_lens[0]}..{prompt_lens[1]}, "
        f"limits {limits}; {meta['device']}; commit {meta['commit']}; same tokens under both: {same}/{len(stream)}; "
        f"continuous: {stats['cycles']} cycles ({stats['cycle_s']:.2f} s), {stats['admitted']} prefills "
        f"({stats['prefill_s']:.2f} s), {stats['waited_for_pages']} waits for pages"
    )
    print("| schedule | wall s | answer tok/s | particle tok/s | latency p50 / p99 s | short requests p50 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['schedule']} | {r['wall_s']:.2f} | {r['answer_tok_s']:.1f} | {r['particle_tok_s']:.1f} | "
            f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | {r['short_latency_p50_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
