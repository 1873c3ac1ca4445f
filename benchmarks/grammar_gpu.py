"""Grammar-constrained SMC on a GPU with the generic (transformers) backend.

1. Exactness on CUDA: the regex-conditioned target of tests/test_grammar_exactness.py, masked
   target and masked draft + bonus (K = 2), N = 4, 3000 runs: E[Z_hat] = Z and every outcome's
   unnormalized mass (z-tests).
2. Overlap: SmolLM2-135M's architecture with random weights on the GPU (its real tokenizer), the
   JSON recipe's schema, plain SMC N = 8 with the masked target, 64 new tokens. The step loop asks
   for the bonus token's masks before the forward and computes them after it, while the GPU works;
   "serial" computes them at the request instead (before the forward is launched). Reports ms per
   step for unconstrained, masked (overlapped) and masked (serial) runs, medians of 3.

    python benchmarks/grammar_gpu.py --tokenizer DIR [--device cuda]
    # DIR: tokenizer.json, tokenizer_config.json, chat_template.jinja and config.json, copied from
    # ~/.cache/smcgen/smollm2-135m-instruct (the weights are not needed)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "recipes"))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def exactness(device: torch.device) -> None:
    from test_grammar_exactness import (
        MASKED_REGEX,
        RegexOracle,
        check_unbiased,
        grammar,
    )
    from tiny_models import PROMPT, tiny_lm

    from smcgen import SMC, LanguageModel, LMPotential, MaskedLMProposal, SMCConfig
    from smcgen.exact import enumerate_target

    def on(lm):
        return LanguageModel(lm.model.to(device), lm.tokenizer, lm.eos_token_ids, lm.context_length)

    target_lm, draft_lm = on(tiny_lm(0, logit_scale=1.0)), on(tiny_lm(1, logit_scale=0.7))
    target = LMPotential(target_lm)
    exact = enumerate_target(target, PROMPT, 4, [RegexOracle(MASKED_REGEX)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    for name, block, use_draft in (("masked target", 1, False), ("masked draft + bonus, K=2", 2, True)):
        g = grammar(MASKED_REGEX)
        cfg = SMCConfig(n_particles=4, block_size=block, max_new_tokens=4, seed=5, ess_threshold=1.0)
        smc = SMC(target, cfg, proposal=MaskedLMProposal(draft_lm, g) if use_draft else None, mask=g)
        out = smc.run(PROMPT, n_groups=3000)
        tv, noise = check_unbiased(f"CUDA {name}", out, exact, index)
        z = torch.exp(out.log_z - exact.log_z)
        print(
            f"exactness on {device_name(device)}, {name}, N=4, 3000 runs: mean Z_hat/Z = "
            f"{z.mean():.4f} ± {z.std() / len(z) ** 0.5:.4f}, per-outcome z-tests pass, TV {tv:.4f} (noise {noise:.4f})"
        )


def overlap(device: torch.device, tokenizer_dir: str, repeats: int) -> None:
    from _harness import chat_prompt
    from json_record import TASK
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import smcgen.potentials.grammar as grammar_mod
    from smcgen import SMC, LanguageModel, LMPotential, SMCConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    lm = LanguageModel.wrap(model, tok)
    lm = LanguageModel(lm.model, tok, (2,), lm.context_length)
    g = TASK.grammar.bind(lm)
    ids = chat_prompt(lm, TASK)
    target = LMPotential(lm, temperature=0.7)
    original = grammar_mod.GrammarPotential.request_bitmask

    def serial(self, sequences, n_prompt):
        pending = original(self, sequences, n_prompt)
        pending.result()  # computed before the forward is launched
        return pending

    rows = []
    for name, masked, order in (
        ("unconstrained", False, None),
        ("masked, overlapped", True, "overlap"),
        ("masked, serial", True, "serial"),
    ):
        grammar_mod.GrammarPotential.request_bitmask = serial if order == "serial" else original
        per_step, mask_us = [], []
        for seed in range(repeats + 1):
            g.stats.reset()
            cfg = SMCConfig(n_particles=8, max_new_tokens=64, target_temperature=0.7, seed=seed)
            smc = SMC(target, cfg, mask=g if masked else None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = smc.run(ids, on_dead="flag")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if seed:  # the first run warms up
                per_step.append((time.perf_counter() - t0) / out.ess_history.shape[0])
                mask_us.append(g.stats.mask_us_per_row)
        grammar_mod.GrammarPotential.request_bitmask = original
        rows.append((name, 1000 * statistics.median(per_step), statistics.median(mask_us) if masked else None))
    print(
        f"\nSmolLM2-135M architecture, random bf16 weights, {device_name(device)}, plain SMC N=8, "
        f"64 new tokens, JSON schema grammar, medians of {repeats}"
    )
    print("| run | ms / step | mask µs / particle-step |")
    print("|---|---|---|")
    for name, ms, us in rows:
        print(f"| {name} | {ms:.1f} | {'-' if us is None else f'{us:.0f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files and config.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    exactness(device)
    overlap(device, args.tokenizer, args.repeats)


if __name__ == "__main__":
    main()
