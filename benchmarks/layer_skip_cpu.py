"""How close is the target with some of its layers skipped? A draft for free, if it were close.

A self-speculative draft runs the target itself with some decoder layers left out: no training,
no extra weights, and on a GPU (where a step costs about the same per layer) a draft step of k of
30 layers costs a little more than k/30 of a target step (the LM head and the step's fixed kernels
stay). SMC-SD N=2 K=8 needs a draft step under about 0.45 of a target step for 2x AR, so a draft
of 13 layers or fewer, and it must stay close: N=8 K=4 kept the target's quality up to a KL of
about 0.5 nats/token (BENCHMARKS.md, "How close must a draft be?"), and K=8 blocks are twice as
long.

This script removes layers greedily from the embedded SmolLM2-135M-Instruct: at each step, the
layer (never the first) whose removal raises KL(target || draft) least on target samples. The
samples are the target's own answers (temperature ``--temperature``) to the first ``--prompts``
FreshQA questions of ``--prompts-file``, and only answer positions are scored, both models at that
temperature. Per step: the layers kept, KL, top-1 agreement and sum_v min(p, q).

    OMP_NUM_THREADS=2 python benchmarks/layer_skip_cpu.py --prompts-file freshqa.jsonl --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from fidelity import chat_ids, load_questions
from torch import nn

from smcgen.models.smollm2 import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts-file", required=True, help="one JSON string per line (FreshQA questions)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--min-layers", type=int, default=10, help="stop when this many layers are left")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not 1 <= args.min_layers < 30:
        raise SystemExit(f"--min-layers must be in 1..29, got {args.min_layers}")
    torch.manual_seed(args.seed)
    model, tok = load_smollm2()
    tau = args.temperature
    questions = load_questions(args.prompts_file)
    seqs, starts = [], []
    for q in questions[: args.prompts]:
        ids = torch.tensor([chat_ids(tok, q)])
        out = model.generate(
            ids, do_sample=True, temperature=tau, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens
        )
        seqs.append(out[0])
        starts.append(ids.shape[1])
    print(f"{sum(len(s) - p for s, p in zip(seqs, starts))} answer positions", flush=True)
    layers = list(model.model.layers)

    def log_probs(keep: list[int]) -> torch.Tensor:
        # a forward without a KV cache reads no layer index, so a sub-list of the layers runs as is
        model.model.layers = nn.ModuleList([layers[i] for i in keep])
        try:
            with torch.no_grad():
                rows = [
                    model(s[None], use_cache=False).logits[0, p - 1 : -1].float() / tau for s, p in zip(seqs, starts)
                ]
        finally:
            model.model.layers = nn.ModuleList(layers)
        return torch.log_softmax(torch.cat(rows), dim=-1)

    ref = log_probs(list(range(len(layers))))
    p = ref.exp()

    def closeness(keep: list[int]) -> tuple[float, float, float]:
        q = log_probs(keep)
        kl = float((p * (ref - q)).sum(-1).mean())
        top1 = float((ref.argmax(-1) == q.argmax(-1)).float().mean())
        overlap = float(torch.minimum(p, q.exp()).sum(-1).mean())
        return kl, top1, overlap

    keep = list(range(len(layers)))
    steps = []
    t0 = time.perf_counter()
    while len(keep) > args.min_layers:
        scored = [(closeness([j for j in keep if j != i]), i) for i in keep[1:]]
        (kl, top1, overlap), dropped = min(scored)
        keep.remove(dropped)
        steps.append(
            {"layers": len(keep), "dropped": dropped, "kl": kl, "top1": top1, "overlap": overlap, "kept": list(keep)}
        )
        print(
            f"{len(keep):2d} layers (dropped {dropped:2d}): KL {kl:.3f}  top-1 {top1:.3f}  "
            f"sum min(p,q) {overlap:.3f}  [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        meta = {k: getattr(args, k) for k in ("prompts", "max_new_tokens", "temperature", "seed")}
        Path(args.out, "layer_skip_cpu.json").write_text(json.dumps({"meta": meta, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
