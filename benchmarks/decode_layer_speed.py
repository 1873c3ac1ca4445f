"""A draft step with one launch per decoder layer against five, and the target's AR step, in one run.

Builds the embedded SmolLM2-135M's architecture with random weights (speed does not depend on them):
the draft as the ``self-int8`` draft is laid out (bf16 activations, int8 gate/up, down and LM head)
and the target in fp32, each with ``--rows`` rows of ``--context`` tokens already in its cache. A
draft step (``--tokens`` new tokens a row) is captured in a CUDA graph with ``fused_layers`` off and
on (and with its weights prefetched into L2, ``decode_layer.PREFETCH_WEIGHTS``), and the target's
one-row AR step too; each graph is replayed ``--iters`` times between CUDA
events. Reports microseconds per forward and per layer, each draft step over the target step (issue
15's 2x at K=8 needs a draft step under about 0.45 of it), and whether the two draft steps gave the
same logits.

    python benchmarks/decode_layer_speed.py --out $OUT
    python benchmarks/decode_layer_speed.py --tokens 2 --context 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from architectures import SMOLLM2_135M
from transformers import LlamaConfig

from smcgen.kernels import decode_layer
from smcgen.runners.native.model import NativeCausalLM


def filled(model: NativeCausalLM, rows: int, context: int, tokens: int, device) -> object:
    """A cache of ``rows`` rows holding ``context`` random tokens each, pages reserved for ``tokens`` more."""
    cache = model.make_cache(
        n_pages=rows * (-(-(context + tokens) // 16) + 1), n_rows=rows, max_pages=-(-(context + tokens) // 16) + 1
    )
    cache.reserve(context)
    prompt = torch.randint(0, model.vocab_size, (rows, context), generator=torch.Generator().manual_seed(1)).to(device)
    model(prompt, torch.zeros(rows, dtype=torch.int32, device=device), cache, last_only=True)
    cache.reserve(context + tokens)
    return cache


def timed(step, iters: int) -> tuple[float, torch.Tensor]:
    """(microseconds per replay, output) of ``step`` captured in a CUDA graph."""
    for _ in range(3):  # compile and warm up outside the graph
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / iters, out.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2, help="particles (rows) of the draft step")
    ap.add_argument("--tokens", type=int, default=1, help="tokens a row (a cycle's first draft step feeds 2)")
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_layer_speed.py times CUDA graphs: it needs a GPU")
    device = torch.device("cuda")
    cfg = LlamaConfig(**SMOLLM2_135M)
    draft = NativeCausalLM.from_config(cfg, dtype=torch.bfloat16, device=device, seed=0).eval()
    draft.quantize_weights("int8")
    target = NativeCausalLM.from_config(cfg, dtype=torch.float32, device=device, seed=0).eval()
    rows, t, ctx = args.rows, args.tokens, args.context
    tokens = torch.randint(0, cfg.vocab_size, (rows, t), generator=torch.Generator().manual_seed(2)).to(device)
    start = torch.full((rows,), ctx, dtype=torch.int32, device=device)
    report = {}
    variants = (
        ("draft step, five launches per layer", False, False),
        ("draft step, one launch per layer", True, False),
        ("draft step, one launch per layer, L2 prefetch", True, True),
    )
    for name, fused, prefetch in variants:
        draft.fused_layers = fused
        decode_layer.PREFETCH_WEIGHTS = prefetch
        cache = filled(draft, rows, ctx, t, device)
        report[name] = timed(lambda cache=cache: draft(tokens, start, cache, last_only=True), args.iters)
    decode_layer.PREFETCH_WEIGHTS = False
    t_cache = filled(target, 1, ctx, 1, device)
    t_tokens, t_start = tokens[:1, :1], start[:1]
    report["target AR step (fp32)"] = timed(lambda: target(t_tokens, t_start, t_cache, last_only=True), args.iters)
    target_us = report["target AR step (fp32)"][0]
    rows_out = []
    print(f"rows {rows}, tokens a row {t}, context {ctx}, {torch.cuda.get_device_name()}")
    print("| forward | us | us a layer | over the target step |")
    print("|---|---:|---:|---:|")
    for name, (us, _) in report.items():
        rows_out.append(
            {"forward": name, "us": us, "us_per_layer": us / cfg.num_hidden_layers, "over_target": us / target_us}
        )
        print(f"| {name} | {us:.1f} | {us / cfg.num_hidden_layers:.2f} | {us / target_us:.3f} |")
    a = report["draft step, five launches per layer"][1]
    fused = [report[name][1] for name, is_fused, _ in variants if is_fused]
    same = all(bool(torch.equal(a, b)) for b in fused)
    diff = max(float((a.float() - b.float()).abs().max()) for b in fused)
    print(f"draft logits equal across the three: {same} (max abs difference {diff:.3g})")
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            **vars(args),
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        body = {"meta": meta, "rows": rows_out, "draft_logits_equal": same, "max_abs_diff": diff}
        Path(args.out, "decode_layer_speed.json").write_text(json.dumps(body, indent=1))


if __name__ == "__main__":
    main()
