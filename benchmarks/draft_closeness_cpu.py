"""How close must a draft be for SMC-SD to keep the target's quality at a given N? Drafts of set closeness.

A trained draft's distance from the target is whatever training reached. To see how SMC-SD's
answers depend on that distance alone, this script makes drafts at chosen distances: copies of the
embedded SmolLM2-135M-Instruct with Gaussian noise added to every decoder matrix (``sigma`` times
the matrix's RMS; embedding and head untouched). Their cost is the target's, so only fidelity is
measured here, not speed. For each draft:

- KL(target || draft), top-1 agreement and sum_v min(p, q) at the sampling temperature, on
  held-out target samples of the distill prompt set;
- SMC-SD N x K on FreshQA questions through ``smcgen.generate``: the tempered target's mean log
  p per token of the answers against AR's on the same prompts (gap in standard errors, unpaired as in
  ``fidelity_sweep.py``, and the per-prompt paired difference with its SE), repeated 3-grams (log p
  alone rewards text that loops on likely tokens) and mean ESS/N.

``--drafts`` adds rows for named drafts or draft directories (by default the self-int8 draft and the
shipped 2-layer one, for reference).

    OMP_NUM_THREADS=2 python benchmarks/draft_closeness_cpu.py --prompts 24 --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from fidelity import answer_each, chat_ids, freshqa_questions, gap_se, mean_se, summarize, write_report

import smcgen
from smcgen.distill_samples import chat_prompts, evaluate_draft, sample_from_target
from smcgen.runners.transformers import LanguageModel


@torch.no_grad()
def noisy_copy(target: LanguageModel, sigma: float, seed: int = 0) -> LanguageModel:
    """The target with N(0, (sigma * RMS(W))^2) noise added to each decoder matrix W."""
    model = copy.deepcopy(target.model)
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for param in layer.parameters():
            if param.dim() == 2:
                noise = torch.randn(param.shape, generator=gen).to(param.device, param.dtype)
                param.add_(sigma * param.float().pow(2).mean().sqrt().to(param.dtype) * noise)
    return LanguageModel.wrap(model.eval(), target.tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sigmas", default="0.015,0.03,0.05,0.08,0.12", help="noise levels ('' for none)")
    ap.add_argument("--drafts", default="self-int8,smollm2-135m-draft", help="named drafts or draft directories")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--n-particles", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--held-out", type=int, default=16, help="target samples for the KL figures")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    tau, T = args.temperature, args.max_new_tokens
    target = smcgen.load_model("smollm2-135m", "cpu")
    held = sample_from_target(
        target.model,
        chat_prompts(target.tokenizer),
        args.held_out,
        T,
        target.eos_token_ids,
        torch.Generator().manual_seed(1),
        False,
        tau,
    )
    prompts = [chat_ids(target.tokenizer, q) for q in freshqa_questions()[: args.prompts]]
    common = {"max_new_tokens": T, "target_temperature": tau, "draft_temperature": tau}

    ar_each = answer_each(target, prompts, tau, 0, n_particles=1, **common)
    ar = [a["loglik"] for a in ar_each]
    ar_stats = summarize(ar_each)
    (ar_m, ar_se), ar_rep = ar_stats["loglik"], ar_stats["repeated_3grams"]
    drafts: list[tuple[str, object]] = [(f"noise sigma={s}", float(s)) for s in args.sigmas.split(",") if s]
    drafts += [(spec, spec) for spec in args.drafts.split(",") if spec]
    rows = []
    for name, spec in drafts:
        draft = (
            noisy_copy(target, spec) if isinstance(spec, float) else smcgen.api.as_language_model(spec, target=target)
        )
        closeness = evaluate_draft(target.model, draft.model, held, 4, False, tau)
        each = answer_each(
            target, prompts, tau, 0, draft=draft, n_particles=args.n_particles, block_size=args.block_size, **common
        )
        stats = summarize(each)
        ok = [(a["loglik"], b) for a, b in zip(each, ar) if a["loglik"] is not None and b is not None]
        diff_m, diff_se = mean_se([a - b for a, b in ok])
        rows.append(
            {
                "draft": name,
                **{k: closeness[k] for k in ("kl", "reverse_kl", "renyi2", "top1_agreement", "overlap")},
                **{k: stats[k] for k in ("loglik", "repeated_3grams", "mean_ess_over_n")},
                "gap_se": gap_se(*stats["loglik"], ar_m, ar_se),
                "paired_diff": [diff_m, diff_se],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del draft
    lines = [
        f"# Draft closeness vs SMC-SD fidelity: N={args.n_particles} K={args.block_size}, {len(prompts)} FreshQA "
        f"prompts, {T} new tokens, tau={tau}, CPU ({torch.get_num_threads()} threads), {time.perf_counter() - t0:.0f} s",
        "",
        f"AR (target alone): log p/token {ar_m:.3f} ± {ar_se:.3f}, repeated 3-grams {ar_rep[0]:.3f} ± {ar_rep[1]:.3f}",
        "",
        "| draft | KL(target‖draft) | KL(draft‖target) | Rényi-2 | top-1 agreement | Σ min(p, q) | log p/token "
        "| gap to AR (SE) | paired diff to AR | repeated 3-grams | mean ESS/N |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ess = f"{r['mean_ess_over_n']:.2f}" if r["mean_ess_over_n"] is not None else "-"
        lines.append(
            f"| {r['draft']} | {r['kl']:.3f} | {r['reverse_kl']:.3f} | {r['renyi2']:.3f} | {r['top1_agreement']:.2f} "
            f"| {r['overlap']:.2f} "
            f"| {r['loglik'][0]:.3f} ± {r['loglik'][1]:.3f} | {r['gap_se']:+.1f} "
            f"| {r['paired_diff'][0]:+.3f} ± {r['paired_diff'][1]:.3f} | {r['repeated_3grams'][0]:.3f} | {ess} |"
        )
    report = "\n".join(lines)
    write_report(args.out, "draft_closeness", report, {"ar": [ar_m, ar_se], "ar_repeated_3grams": ar_rep, "rows": rows})
    print(report)


if __name__ == "__main__":
    main()
