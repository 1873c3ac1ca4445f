"""Generic backend on a GPU: exactness (E[Z_hat]=Z) on tiny models and SMC-SD on random Llama-3.2-1B / 8B shapes.

    python benchmarks/gpu_smoke.py
Not the fast engine (issue 3): this records what the exact reference path costs on a GPU.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import PROMPT, tiny_lm  # noqa: E402

from smcgen import SMC, LanguageModel, LMPotential, LMProposal, SMCConfig  # noqa: E402
from smcgen.exact import enumerate_target  # noqa: E402


def exactness(device: str) -> None:
    t = tiny_lm(0, logit_scale=2.0)
    d = tiny_lm(1, logit_scale=0.7)
    t = LanguageModel(t.model.to(device), t.tokenizer, t.eos_token_ids, t.context_length)
    d = LanguageModel(d.model.to(device), d.tokenizer, d.eos_token_ids, d.context_length)
    target = LMPotential(t)
    exact = enumerate_target(target, PROMPT, 4)
    out = SMC(target, SMCConfig(n_particles=8, block_size=2, max_new_tokens=4, seed=0), proposal=LMProposal(d)).run(
        PROMPT, n_groups=4000
    )
    z = torch.exp(out.log_z - exact.log_z)
    se = float(z.std() / math.sqrt(len(z)))
    print(f"exactness on {device}: mean Z_hat/Z = {float(z.mean()):.4f} +- {se:.4f} (4000 runs, N=8, K=2)")
    assert abs(float(z.mean()) - 1) < 4.5 * se


def llama(layers: int, hidden: int, inter: int, heads: int, kv: int, device: str) -> LanguageModel:
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        eos_token_id=128001,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return LanguageModel.wrap(model)


def speed(device: str) -> None:
    target = llama(32, 4096, 14336, 32, 8, device)  # Llama-3.1-8B shape
    draft = llama(16, 2048, 8192, 32, 8, device)  # Llama-3.2-1B shape
    prompt = list(range(1000, 1256))
    print("| configuration | tokens/s per request | wall s |")
    print("|---|---|---|")
    for name, prop, n, k in [("AR (N=1, no draft)", None, 1, 1), ("SMC-SD N=8 K=8", draft, 8, 8)]:
        cfg = SMCConfig(
            n_particles=n, block_size=k, max_new_tokens=128, seed=0, draft_temperature=0.7, target_temperature=0.7
        )
        smc = SMC(LMPotential(target, temperature=0.7), cfg, proposal=LMProposal(prop, 0.7) if prop else None)
        smc.run(prompt)  # warm-up
        out = smc.run(prompt)
        n_tok = int(out.lengths[0].max())
        print(f"| {name} | {n_tok / out.elapsed_s:.1f} | {out.elapsed_s:.2f} |")


if __name__ == "__main__":
    dev = "cuda"
    print(torch.cuda.get_device_name(0), torch.__version__)
    t0 = time.time()
    exactness(dev)
    speed(dev)
    print(f"total {time.time() - t0:.1f} s")
