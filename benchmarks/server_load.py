"""Load test of ``smcgen serve``: many concurrent ``openai`` clients against a local server.

Starts ``python -m smcgen serve MODEL`` as a subprocess on 127.0.0.1 (the embedded SmolLM2 by
default), waits for /health, then runs ``--clients`` concurrent clients (the official ``openai``
async client), each sending ``--requests`` chat completions one after another (a bounded loop;
retries off, so a lost or failed request counts as lost). Reports every request's outcome,
p50 / p90 / p99 latency, requests/s and answer tokens/s over the wall time, and the server's own
/metrics. Writes JSON to ``--out`` (default $OUT or .) and prints a markdown table last.

    OMP_NUM_THREADS=2 python benchmarks/server_load.py                       # 64 clients x 2 requests
    python benchmarks/server_load.py --clients 8 --requests 1 --max-tokens 8  # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai

PROMPTS = [
    "Name a colour.",
    "Say hello in French.",
    "Give one word that rhymes with cat.",
    "What is two plus two?",
    "Name a planet.",
    "Write one short sentence about rain.",
    "Name an animal that can fly.",
    "What is the capital of Italy?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_client(client: openai.AsyncOpenAI, cid: int, args, records: list[dict]) -> None:
    for j in range(args.requests):
        prompt = PROMPTS[(cid + j) % len(PROMPTS)]
        t0 = time.perf_counter()
        rec = {"client": cid, "request": j}
        try:
            out = await client.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=args.max_tokens,
                temperature=0.7,
                extra_body={"n_particles": args.n_particles},
            )
            rec.update(ok=True, tokens=out.usage.completion_tokens, text=out.choices[0].message.content)
        except Exception as err:  # noqa: BLE001 - every failure is recorded, none is lost silently
            rec.update(ok=False, error=f"{type(err).__name__}: {err}")
        rec["latency_s"] = time.perf_counter() - t0
        records.append(rec)


def outcome(records: list[dict], wall: float, args) -> dict:
    """What the load test measured: requests answered, failed and lost, latency percentiles, throughput."""
    sent = args.clients * args.requests
    ok = [r for r in records if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    return {
        "clients": args.clients,
        "requests_per_client": args.requests,
        "requests_sent": sent,
        "answered_ok": len(ok),
        "failed": len(records) - len(ok),
        "lost": sent - len(records),
        "max_tokens": args.max_tokens,
        "n_particles": args.n_particles,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "answer_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "p50_s": percentile(lat, 0.5) if lat else None,
        "p90_s": percentile(lat, 0.9) if lat else None,
        "p99_s": percentile(lat, 0.99) if lat else None,
        "mean_s": statistics.fmean(lat) if lat else None,
    }


def print_table(records: list[dict], summary: dict) -> None:
    """The first distinct errors, then the summary as one markdown row."""
    for e in sorted({r["error"] for r in records if not r["ok"]})[:5]:
        print("error:", e)

    def fmt(x: float | None) -> str:
        return f"{x:.2f}" if x is not None else "-"

    print(
        "| clients x requests | answered | failed | lost | p50 s | p90 s | p99 s | requests/s | answer tok/s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {summary['clients']} x {summary['requests_per_client']} | {summary['answered_ok']}/{summary['requests_sent']} "
        f"| {summary['failed']} | {summary['lost']} | {fmt(summary['p50_s'])} | {fmt(summary['p90_s'])} "
        f"| {fmt(summary['p99_s'])} | {summary['requests_per_s']:.2f} | {summary['answer_tokens_per_s']:.1f} "
        f"| {summary['wall_s']:.1f} |"
    )


async def load(base: str, args) -> tuple[list[dict], float]:
    client = openai.AsyncOpenAI(
        base_url=f"{base}/v1",
        api_key="unused",
        max_retries=0,
        timeout=args.timeout,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=args.clients)),
    )
    records: list[dict] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(client, c, args, records) for c in range(args.clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return records, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--n-particles", type=int, default=4)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-request client timeout (s)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "smcgen",
        "serve",
        args.model,
        "--port",
        str(port),
        "--engine",
        args.engine,
        "--max-queue",
        str(args.clients * 2),
        "--max-batch",
        str(args.max_batch),
        "--log-level",
        "warning",
    ]
    if args.draft:
        cmd += ["--draft", args.draft]
    if args.device:
        cmd += ["--device", args.device]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.time() + 300
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        records, wall = asyncio.run(load(base, args))
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(timeout=30)

    summary = outcome(records, wall, args)
    summary.update(model=args.model, draft=args.draft, engine=health["engine"])
    summary.update(omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cpu_count=os.cpu_count())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "server_load.json"), "w") as f:
        json.dump({"summary": summary, "records": records, "metrics": metrics}, f, indent=1)
    print("\n".join(line for line in metrics.splitlines() if line.startswith("smcgen_") and "uptime" not in line))
    print()
    print_table(records, summary)


if __name__ == "__main__":
    main()
