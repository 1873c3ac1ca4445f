"""How fast each ``smcgen distill`` sampler draws one round of target samples, side by side.

Loads the embedded SmolLM2-135M-Instruct and draws ``--rounds`` rounds of ``--n`` continuations of up to
``--max-new-tokens`` tokens at ``--temperature`` (the GPU recipe of ``distill_embedded.py``: 512 x 192
at 0.7) with each sampler in ``--samplers`` (``smcgen.distill.SAMPLERS``): the transformers loop and
one native ``Engine`` batch of one-particle requests. The first round of each includes compiling and
capturing. Reports seconds per round, generated tokens per second and, as a check that both draw the
same distribution, each round's mean length, stop rate and mean target log-probability per token
(tempered), with standard errors.

    python benchmarks/distill_sampler_speed.py --out $OUT
    python benchmarks/distill_sampler_speed.py --device cpu --n 8 --max-new-tokens 8 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import smcgen
from smcgen.distill_samples import SampleBatch, _logits, chat_prompts, sample_from_target, sample_with_engine

distill_module = importlib.import_module("smcgen.distill")  # smcgen.distill is the function


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


@torch.no_grad()
def describe(model, batch: SampleBatch, width: int, eos: list[int], temperature: float, micro: int) -> dict:
    """Mean generated length, stop rate and target log p per generated token of a round (with SEs)."""
    gen_real = batch.real[:, width:]
    lengths = gen_real.sum(1)
    last = batch.ids[:, width:].gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    stopped = (lengths > 0) & torch.isin(last, torch.tensor(eos, device=last.device))
    logp_rows = []
    for i in range(0, batch.ids.shape[0], micro):
        part = batch.slice(slice(i, i + micro))
        with torch.autocast(batch.ids.device.type, dtype=torch.bfloat16, enabled=batch.ids.is_cuda):
            logits = _logits(model, part)
        logp = torch.log_softmax(logits[:, width - 1 : -1].float() / temperature, -1)
        tok = part.ids[:, width:]
        got = logp.gather(-1, tok[..., None])[..., 0] * part.real[:, width:]
        logp_rows += (got.sum(1) / part.real[:, width:].sum(1).clamp(min=1)).tolist()
    out = {}
    for name, xs in (
        ("length", lengths.float().tolist()),
        ("stop_rate", stopped.float().tolist()),
        ("logp_per_token", logp_rows),
    ):
        out[name], out[name + "_se"] = _mean_se(xs)
    out["tokens"] = int(lengths.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=512, help="continuations per round")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per sampler (the first compiles)")
    ap.add_argument("--samplers", default=",".join(distill_module.SAMPLERS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    target = smcgen.load_model("smollm2-135m", device=args.device)
    prompts = chat_prompts(target.tokenizer)
    eos = list(target.eos_token_ids)
    rows = []
    for sampler in [s for s in args.samplers.split(",") if s]:
        if sampler not in distill_module.SAMPLERS:
            raise SystemExit(f"--samplers: {sampler!r} is not one of {distill_module.SAMPLERS}")
        t0 = time.perf_counter()
        engine = distill_module._sampling_engine(target) if sampler == "engine" else None
        setup_s = time.perf_counter() - t0
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        for r in range(args.rounds):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if engine is not None:
                batch = sample_with_engine(engine, prompts, args.n, args.max_new_tokens, gen, args.temperature)
            else:
                batch = sample_from_target(
                    target.model, prompts, args.n, args.max_new_tokens, eos, gen, cuda, args.temperature
                )
            if cuda:
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            width = int(batch.scored[0].nonzero()[0]) + 1  # the last prompt column is the first scored one
            stats = describe(target.model, batch, width, eos, args.temperature, 64)
            row = {"sampler": sampler, "round": r, "seconds": secs, "setup_s": setup_s if r == 0 else 0.0}
            row |= stats | {"tokens_per_s": stats["tokens"] / secs}
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
    }
    lines = [
        f"{head['device']}, {args.n} continuations x up to {args.max_new_tokens} tokens at temperature "
        f"{args.temperature}, SmolLM2-135M-Instruct",
        "",
        "| sampler | round | s | generated tok/s | length | stop rate | target log p / token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['round']} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['length']:.1f} ± {r['length_se']:.1f} | {r['stop_rate']:.3f} ± {r['stop_rate_se']:.3f} | "
            f"{r['logp_per_token']:.3f} ± {r['logp_per_token_se']:.3f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_sampler_speed.json").write_text(json.dumps({**head, "rows": rows}, indent=2) + "\n")
    (out / "distill_sampler_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
