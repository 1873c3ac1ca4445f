"""How many particles does SMC-SD need to keep the target's quality with a given draft, and what does it cost?

On real prompts (FreshQA questions, see ``benchmarks/fidelity.py``) the embedded SmolLM2-135M-Instruct
answers each prompt once per configuration, through ``smcgen.generate``:

- AR: the target alone (the reference: its samples *are* the target distribution);
- SMC-SD for every ``NxK`` in ``--configs``, with the draft under test (and, with
  ``--draft-temperatures``, each proposal temperature: the target stays at ``--temperature`` and the
  importance weights use the tempered draft's probabilities, so every choice is exact);
- SD: standard speculative decoding with the same draft (``method="sd"``; exact per sample);
- SMC-SD N=8 K=4 with the untrained early-exit draft (the old default) for comparison.

Per configuration: mean per-token log-likelihood under the tempered target (a sampler that matches
the target has the AR row's value, up to noise; a sampler pulled toward the draft scores lower), stop
rate, mean length, repeated 3-grams, mean ESS/N and tokens/s (wall time of the generate calls after
a warm-up call per prompt-length bucket; on the GPU the native engine runs SMC-SD). The gap column is the log-likelihood
difference to AR in units of its standard error; the last column names the statistics (log p, length, stop
rate, repeated 3-grams) more than 2 standard errors from AR's: a sampler that matches the target has none.

    python benchmarks/fidelity_sweep.py --device cuda --prompts 48 --configs 8x4,32x4,64x2,128x2 --out $OUT
    python benchmarks/fidelity_sweep.py --device cuda --draft DIR_A,DIR_B --configs 8x4 --no-sd --out $OUT
    python benchmarks/fidelity_sweep.py --configs 8x4 --draft-temperatures 0.7,0.5,0.35 --no-sd --no-early-exit
    OMP_NUM_THREADS=2 python benchmarks/fidelity_sweep.py --prompts 8 --max-new-tokens 32 --configs 8x1,32x1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from embedded_pair import FUSED, add_target_dtype, load_target, parse_configs, split_fused, use_fused_layers
from fidelity import (
    answer_each,
    chat_ids,
    gap_se,
    load_questions,
    off_by,
    summarize,
    warm_up_prompts,
    write_report,
)

import smcgen
from smcgen.api import load_draft, load_model
from smcgen.models.smollm2 import EARLY_EXIT_DRAFT, EMBEDDED_DRAFT


def draft_label(spec: str) -> str:
    """A row label for a draft: its manifest's layer count and directory for a trained draft, else its name."""
    path = Path(spec)
    manifest = path / "manifest.json"
    if manifest.is_file():
        layers = json.loads(manifest.read_text()).get("layers")
        where = path.parent.name if path.name == "draft" else path.name
        return f"{layers}-layer draft ({where})"
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--draft",
        default=EMBEDDED_DRAFT,
        help="draft name or trained draft directory; several, comma separated, each get the SMC-SD rows (SD: the first)",
    )
    ap.add_argument(
        "--configs",
        default="8x4,32x4,64x2",
        help="SMC-SD settings N x K, comma separated; 'NxK+fused': one launch per decoder layer",
    )
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--prompts-file", default=None, help="one JSON string per line (instead of inspect-evals)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument(
        "--draft-temperatures",
        default="",
        help="SMC-SD proposal temperatures to try, comma separated (default: --temperature); the target's stays",
    )
    ap.add_argument("--sd-block", type=int, default=4)
    ap.add_argument("--no-early-exit", action="store_true", help="skip the early-exit draft row")
    ap.add_argument("--no-sd", action="store_true", help="skip the standard SD row")
    ap.add_argument("--seed", type=int, default=0)
    add_target_dtype(ap)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()

    questions = load_questions(args.prompts_file)[: args.prompts]
    specs = [d for d in args.draft.split(",") if d]
    target = load_target(args.device, args.target_dtype, specs + ([] if args.no_early_exit else [EARLY_EXIT_DRAFT]))
    drafts = [(draft_label(d) if len(specs) > 1 else "", load_draft(d, target, args.device)) for d in specs]
    draft = drafts[0][1]
    prompts = [chat_ids(target.tokenizer, q) for q in questions]
    tau, T = args.temperature, args.max_new_tokens
    common = {"max_new_tokens": T, "target_temperature": tau, "draft_temperature": tau}

    runs: list[tuple[str, dict]] = [("AR (target alone)", {"n_particles": 1})]
    draft_taus = [float(x) for x in args.draft_temperatures.split(",") if x] or [tau]
    for label, d in drafts:
        for token in args.configs.split(","):
            text, fused = split_fused(token)
            ((n, k),) = parse_configs(text)
            for tau_q in draft_taus:
                name = f"SMC-SD N={n} K={k}" + (f", {label}" if label else "")
                name += f", draft tau={tau_q:g}" if draft_taus != [tau] else ""
                name += ", one launch per layer" if fused else ""
                kw = {"draft": d, "n_particles": n, "block_size": k, "draft_temperature": tau_q, FUSED: fused}
                runs.append((name, kw))
    if not args.no_sd:  # after the SMC-SD rows: a run cut short by a time limit keeps those first
        runs.append(
            (f"SD K={args.sd_block}", {"draft": draft, "method": "sd", "n_particles": 1, "block_size": args.sd_block})
        )
    if not args.no_early_exit:
        early = load_model(EARLY_EXIT_DRAFT, args.device)
        runs.append(("SMC-SD N=8 K=4, early-exit draft", {"draft": early, "n_particles": 8, "block_size": 4}))

    rows = []
    for name, kw in runs:
        kw = {**common, **kw}  # a row's own draft temperature wins over the shared one
        use_fused_layers(kw.pop(FUSED, False))
        for prompt in warm_up_prompts(prompts):  # engine build, each bucket's kernels and capture
            smcgen.generate(target, prompt, seed=10_000, **kw)
        each = answer_each(target, prompts, tau, args.seed, progress=name, **kw)
        # each call's prompt length, wall time and split (ms) and cycles: tells a cost of some calls
        # from one of every call
        times = ("wall_s", "prefill_s", "capture_s", "decode_s")
        split = [
            [len(p)] + [round(1e3 * a[k], 2) if a[k] is not None else None for k in times] + [a["cycles"]]
            for p, a in zip(prompts, each)
        ]
        rows.append({"name": name, **summarize(each), "per_call": split})
        if args.out:  # each finished row is kept, so a run cut short by a time limit still reports
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "fidelity_sweep.partial.json").write_text(json.dumps(rows, indent=1))

    ar_ll, ar_se = rows[0]["loglik"]
    ar_tps = rows[0]["tokens_per_s"]
    lines = [
        f"# SMC-SD fidelity sweep: {len(prompts)} FreshQA prompts, {T} new tokens, tau={tau}, draft={args.draft}, "
        f"device={args.device}, target dtype={args.target_dtype or 'as loaded'}",
        "",
        "| run | engine | log p/token | gap to AR (SE) | stop rate | length | repeated 3-grams | mean ESS/N "
        "| tokens/s | vs AR | prefill ms/call | capture ms/call | decode ms/token | off by > 2 SE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ll, se = r["loglik"]
        gap = gap_se(ll, se, ar_ll, ar_se) if r is not rows[0] else 0.0
        r["gap_se"] = gap
        r["off_by_2se"] = off_by(r, rows[0]) if r is not rows[0] else []
        ess = f"{r['mean_ess_over_n']:.2f}" if r["mean_ess_over_n"] is not None else "–"
        # where each call's time went (native engine only): the prefill (with new pools when a
        # prompt's length bucket changes), the warm-up cycle and graph capture (a prompt in another
        # bucket cannot replay the last call's graph) and the decode, per answer token
        split = [f"{1e3 * r[k] / len(prompts):.1f}" if r[k] is not None else "–" for k in ("prefill_s", "capture_s")]
        tokens = r["length"][0] * len(prompts)
        split.append(f"{1e3 * r['decode_s'] / tokens:.2f}" if r["decode_s"] is not None and tokens else "–")
        lines.append(
            f"| {r['name']} | {r['engine']} | {ll:.3f} ± {se:.3f} | {gap:+.1f} | {r['stop_rate'][0]:.2f} "
            f"| {r['length'][0]:.1f} | {r['repeated_3grams'][0]:.3f} | {ess} | {r['tokens_per_s']:.1f} "
            f"| {r['tokens_per_s'] / ar_tps:.2f}x | {' | '.join(split)} | {', '.join(r['off_by_2se']) or ('-' if r is rows[0] else 'none')} |"
        )
    report = "\n".join(lines)
    write_report(args.out, "fidelity_sweep", report, rows)
    print(report)


if __name__ == "__main__":
    main()
