"""What a weight-only quantized *target* costs in fidelity, on real weights (SmolLM2-135M-Instruct).

A quantized draft costs SMC only efficiency (the weights correct for it); a quantized target
changes the distribution sampled: SMC is then exact for the quantized model, not the original.
This measures how far that moves against the model in its own dtype (bf16 on CUDA, fp32 on the
CPU), teacher-forced over a fixed English passage (``--generate``: over text the reference model
writes for chat prompts, AR at temperature 0.7): the mean per-token KL(reference || quantized)
of the next-token distributions at temperatures 0.7 and 1.0, and how often the two models' most likely next token agree. Configurations: every linear
layer and the LM head (what ``benchmarks/tp_70b.py`` runs on one GPU) and the draft's default set
(gate/up, down, LM head), each in int8 and fp8.

    python benchmarks/target_quantization.py [--device cpu] [--generate --new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draft_quality import PROMPTS, _logits  # noqa: E402

from smcgen import SMCConfig  # noqa: E402
from smcgen.models import smollm2  # noqa: E402
from smcgen.runners.native.model import NativeCausalLM  # noqa: E402
from smcgen.samplers.native import NativeSMC  # noqa: E402

PASSAGE = (
    "The lighthouse stood at the end of a narrow spit of rock, and for most of the year the only visitors "
    "were gulls and the occasional fisherman sheltering from a squall. The keeper kept a logbook in which "
    "he wrote the weather twice a day, the ships he saw, and, when nothing else happened, the books he was "
    "reading. Over forty years the logbook grew to eleven volumes. Historians later used it to reconstruct "
    "the storms of the period, because his notes on wind and pressure were more careful than those of the "
    "nearest official station. To compute the area of a circle, multiply pi by the square of the radius; "
    "a circle of radius three has an area of about twenty-eight square units."
)


@torch.no_grad()
def compare(p_model, q_model, sequences) -> dict:
    """KL(p || q) per generated position at temperatures 0.7 and 1, and top-1 agreement."""
    kl = {0.7: 0.0, 1.0: 0.0}
    agree = count = 0
    for n_prompt, seq in sequences:
        ids = torch.tensor([seq], device=p_model.device)
        lp_raw = _logits(p_model, ids)[n_prompt - 1 : -1].float()
        lq_raw = _logits(q_model, ids)[n_prompt - 1 : -1].float()
        for temp in kl:
            logp, logq = lp_raw.div(temp).log_softmax(-1), lq_raw.div(temp).log_softmax(-1)
            kl[temp] += float((logp.exp() * (logp - logq)).sum())
        agree += int((lp_raw.argmax(-1) == lq_raw.argmax(-1)).sum())
        count += lp_raw.shape[0]
    return {"kl_t0.7": kl[0.7] / count, "kl_t1.0": kl[1.0] / count, "top1_agreement": agree / count, "positions": count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument(
        "--generate",
        action="store_true",
        help="score text the reference model writes for the chat prompts instead of the fixed passage",
    )
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="the reference model's dtype (default: bf16 on CUDA, float32 on the CPU, where bf16 is slow)",
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "target_quantization.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    target_hf, tok = smollm2.load_embedded(smollm2.EMBEDDED_TARGET)

    def native_copy() -> NativeCausalLM:
        return NativeCausalLM.from_hf(target_hf, dtype=dtype, device=dev).eval()

    ref = native_copy()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in PROMPTS[: args.prompts]
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    seqs = []
    if args.generate:
        for i, prompt in enumerate(prompts):
            cfg = SMCConfig(n_particles=1, max_new_tokens=args.new_tokens, seed=i, target_temperature=0.7)
            out = NativeSMC(ref, cfg, eos_token_ids=[tok.eos_token_id]).run(prompt)
            seqs.append((len(prompt), prompt + out.tokens[0, 0, : int(out.lengths[0, 0])].tolist()))
    else:
        # a fixed passage of ordinary English, scored from its second token on: no generation needed
        seqs.append((1, tok.encode(PASSAGE)))
    rows = []
    for layers, names in (
        ("all linear + head", NativeCausalLM.FP8_NAMES),
        ("gate_up, down, head", NativeCausalLM.FP8_DEFAULT),
    ):
        for fmt in ("int8", "fp8"):
            q = native_copy()
            q.quantize_weights(fmt, names)
            rows.append({"layers": layers, "format": fmt, **compare(ref, q, seqs)})
            del q
    info = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "model": f"SmolLM2-135M-Instruct ({dtype} reference)",
        "text": "generated" if args.generate else "fixed passage",
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(json.dumps(info))
    print("| quantized layers | format | KL t=0.7 | KL t=1.0 | top-1 agreement | positions |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['format']} | {r['kl_t0.7']:.4f} | {r['kl_t1.0']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {r['positions']} |"
        )


if __name__ == "__main__":
    main()
