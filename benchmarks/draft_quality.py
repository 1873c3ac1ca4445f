"""What a quantized draft (int8 / fp8, ``SMCConfig.draft_quantization``) costs in proposal quality,
on real weights (SmolLM2-135M-Instruct).

SMC stays exact whatever the draft (the weights use the draft's own probabilities), so quantizing
the draft can only cost efficiency: a proposal further from the target gives more uneven weights,
a lower ESS and more resampling. This measures that cost on the one real model we have, with
SMC-SD run by the native engine (the kernels' torch twins off the GPU; Triton on CUDA):

- draft = the target itself as loaded (bf16): the weights would be uniform but for bf16 rounding
  (a draft step and the verify compute the same logits along different paths), the control;
- draft = the target with its default layers (gate/up, down, LM head) in int8 / in fp8: what each
  format alone costs;
- draft = the embedded early-exit draft (first 28 of 30 layers), as loaded, int8 and fp8: a real
  draft's own mismatch, and what quantizing adds to it.

Per configuration: mean and lowest ESS / N before resampling, the share of cycles that resampled,
and the mean per-token KL(draft as loaded || quantized draft) over generated text (teacher-forced).
Prompts: chat instructions; temperatures 0.7 for target and draft, N = 8, K = 8.

    python benchmarks/draft_quality.py [--device cuda] [--new-tokens 96] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from smcgen import SMCConfig
from smcgen.models import smollm2
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three tips for staying focused while studying.",
    "What is the capital of France, and why is it famous?",
)


FORMATS = ("none", "int8", "fp8")


def native_copy(model, fmt: str, device: torch.device) -> NativeCausalLM:
    native = NativeCausalLM.from_hf(model, dtype=torch.bfloat16, device=device).eval()
    if fmt != "none":
        native.quantize_weights(fmt)
    return native


@torch.no_grad()
def kl_per_token(
    p_model: NativeCausalLM, q_model: NativeCausalLM, sequences: list[tuple[int, list[int]]], temp: float
) -> float:
    """Mean over the generated positions of KL(p || q), the two models' next-token distributions at
    ``temp``; ``sequences``: (prompt length, prompt + continuation)."""
    total, count = 0.0, 0
    for n_prompt, seq in sequences:
        ids = torch.tensor([seq], device=p_model.device)
        # the distributions that drew the continuation: positions n_prompt - 1 .. len - 2
        logp = _logits(p_model, ids)[n_prompt - 1 : -1].float().div(temp).log_softmax(-1)
        logq = _logits(q_model, ids)[n_prompt - 1 : -1].float().div(temp).log_softmax(-1)
        total += float((logp.exp() * (logp - logq)).sum())
        count += logp.shape[0]
    return total / max(count, 1)


def _logits(model: NativeCausalLM, ids: torch.Tensor) -> torch.Tensor:
    pages = -(-ids.shape[1] // 16)
    cache = model.make_cache(n_pages=pages, n_rows=1, max_pages=pages)
    cache.reserve(ids.shape[1])
    return model(ids, torch.zeros(1, dtype=torch.int32, device=ids.device), cache)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--seeds", type=int, default=3, help="runs per prompt and configuration")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "draft_quality.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    target_hf, tok = smollm2.load_embedded(smollm2.EMBEDDED_TARGET)
    draft_hf, _ = smollm2.load_embedded(smollm2.EMBEDDED_DRAFT)
    target = native_copy(target_hf, "none", dev)
    bases = {"target itself": target_hf, "early-exit draft": draft_hf}
    drafts = {f"{base}, {fmt}": native_copy(hf, fmt, dev) for base, hf in bases.items() for fmt in FORMATS}
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in PROMPTS
    ]
    # transformers 5 returns a BatchEncoding here, 4 a list of ids
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    info = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "N": 8,
        "K": 8,
        "temperature": 0.7,
        "new_tokens": args.new_tokens,
        "prompts": len(prompts),
        "seeds": args.seeds,
    }
    print(json.dumps(info))
    rows = []
    texts: dict[str, list[tuple[int, list[int]]]] = {}
    for name, draft in drafts.items():
        ess, resampled, cycles = [], 0, 0
        seqs = []
        for prompt in prompts:
            for seed in range(args.seeds):
                cfg = SMCConfig(
                    n_particles=8,
                    block_size=8,
                    max_new_tokens=args.new_tokens,
                    seed=seed,
                    draft_temperature=0.7,
                    target_temperature=0.7,
                )
                out = NativeSMC(target, cfg, draft=draft, eos_token_ids=[tok.eos_token_id]).run(prompt, n_groups=1)
                ess.append(out.ess_history[:, 0].float() / 8)
                resampled += int(out.resampled.sum())
                cycles += out.resampled.shape[0]
                best = int(out.log_weights[0].argmax())
                seqs.append((len(prompt), prompt + out.tokens[0, best, : int(out.lengths[0, best])].tolist()))
        texts[name] = seqs
        all_ess = torch.cat(ess)
        row = {
            "draft": name,
            "mean_ess_frac": float(all_ess.mean()),
            "min_ess_frac": float(all_ess.min()),
            "resample_rate": resampled / cycles,
            "cycles": cycles,
        }
        rows.append(row)
        print(json.dumps(row))
    # what quantizing adds to each draft, on the text that draft's quantized runs produced
    for base in bases:
        for fmt in FORMATS[1:]:
            seqs = texts[f"{base}, {fmt}"]
            row = {
                "draft": f"{base}, {fmt}",
                "kl_to_quantized_per_token": kl_per_token(drafts[f"{base}, none"], drafts[f"{base}, {fmt}"], seqs, 0.7),
                "kl_target_to_draft_as_loaded_per_token": kl_per_token(target, drafts[f"{base}, none"], seqs, 0.7),
            }
            rows.append(row)
            print(json.dumps(row))
    print()
    print("| draft | mean ESS / N | lowest ESS / N | cycles resampled | KL(as loaded -> quantized) per token |")
    print("|---|---:|---:|---:|---:|")
    kl = {r["draft"]: r["kl_to_quantized_per_token"] for r in rows if "kl_to_quantized_per_token" in r}
    for r in rows:
        if "mean_ess_frac" in r:
            k = f"{kl[r['draft']]:.4f}" if r["draft"] in kl else "-"
            print(
                f"| {r['draft']} | {r['mean_ess_frac']:.3f} | {r['min_ess_frac']:.3f} | {r['resample_rate']:.1%} | {k} |"
            )
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
