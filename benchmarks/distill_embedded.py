"""Train the shipped draft for the embedded SmolLM2-135M-Instruct and compare it with the early-exit draft.

One run on the GPU host (about ``--minutes`` of training plus a minute of sampling and evaluation):

1. loads ``smcgen.load_model("smollm2-135m")``;
2. picks the initialisation (``spaced``, ``first`` or ``last`` target layers) with the lowest KL on
   held-out target samples, unless ``--init`` is given;
3. runs :func:`smcgen.distill` (target samples at temperature 1, full-vocabulary KL, AdamW, warm-up
   and cosine decay, bf16 autocast);
4. on held-out target samples (other seed, same prompt set), reports for the early-exit draft
   (28 layers, the current default), the untrained initialisation and the trained draft: KL(target ||
   draft) per token, top-1 agreement and sum_v min(p, q) (the chance one drafted token is kept by
   rejection sampling; a per-token proxy of ESS/N);
5. runs ``smcgen.generate`` once with the trained draft directory (the native engine on CUDA) and
   records the engine and mean ESS/N.

Writes ``OUT/draft/{draft.safetensors,config.json,manifest.json,loss.png}``, ``OUT/distill_embedded.json``
and ``OUT/distill_embedded.md``; prints the table last. CPU smoke test:
``python benchmarks/distill_embedded.py --steps 2 --device cpu --out /tmp/d``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import smcgen
from smcgen.distill import (
    DistillConfig,
    build_draft,
    chat_prompts,
    distill,
    evaluate_draft,
    init_layer_indices,
    sample_from_target,
)
from smcgen.models.smollm2 import DEFAULT_DRAFT_LAYERS, derive_draft


def generate_check(target, draft_out: Path) -> dict:
    """One SMC-SD run with the draft directory (native engine on CUDA): engine used and mean ESS/N."""
    try:
        msg = [{"role": "user", "content": "Write a short poem about the sea."}]
        ids = list(
            target.tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        res = smcgen.generate(
            target,
            ids,
            draft=str(draft_out),
            n_particles=8,
            block_size=4,
            max_new_tokens=96,
            seed=0,
            draft_temperature=1.0,
            target_temperature=1.0,
        )
    except Exception as err:  # noqa: BLE001 -- the training result must survive a failure of this check
        return {"error": f"{type(err).__name__}: {err}"}
    ess = res.ess_history
    return {
        "engine": res.engine,
        "mean_ess_over_n": sum(ess) / max(1, len(ess)) / res.n_particles,
        "tokens": len(res.token_ids),
        "elapsed_s": res.elapsed_s,
        "text": res.text[:300],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "distill_out"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training budget (default 6 on CUDA, so the whole run fits a 10-minute job)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/draft/checkpoint.pt")
    p.add_argument("--no-generate", action="store_true", help="skip the final smcgen.generate check")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--init", default=None, choices=["spaced", "first", "last"], help="default: best held-out KL")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature the draft is trained and evaluated for (the main job samples at 0.7)",
    )
    d = DistillConfig()
    p.add_argument("--divergence", default=d.divergence, choices=["forward", "reverse", "symmetric"])
    p.add_argument("--on-policy", type=float, default=d.on_policy, help="share of sampling rounds the draft samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-sequences", type=int, default=None)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.steps is None and args.minutes is None:
        args.minutes = 6.0 if cuda else 1.0
    # GPU recipe: 512 samples of up to 192 tokens per round (sampling dominates the time), each used by two
    # steps of 64 sequences.
    batch = args.batch_size or (64 if cuda else 4)
    sample_batch = args.sample_batch or (512 if cuda else 8)
    max_new = args.max_new_tokens or (192 if cuda else 16)
    n_eval = args.eval_sequences or (128 if cuda else 4)
    micro = min(batch, 32 if cuda else 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    target = smcgen.load_model("smollm2-135m", device=args.device)
    model = target.model
    autocast = cuda
    prompts = chat_prompts(target.tokenizer)
    n_target = model.config.num_hidden_layers
    held = sample_from_target(
        model,
        prompts,
        n_eval,
        max_new,
        target.eos_token_ids,
        torch.Generator(device=args.device).manual_seed(10_000 + args.seed),
        autocast,
        args.temperature,
    )
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "layers": args.layers,
        "held_out_sequences": n_eval,
        "temperature": args.temperature,
        "held_out_positions": int(held.scored.sum()),
    }

    inits = {}
    for how in ("spaced", "first", "last"):
        d = build_draft(model, init_layer_indices(n_target, args.layers, how))
        inits[how] = evaluate_draft(model, d, held, micro, autocast, args.temperature)
        del d
    init = args.init or min(inits, key=lambda k: inits[k]["kl"])
    results["init_candidates"] = inits
    results["init"] = init

    cfg = DistillConfig(
        layers=args.layers,
        init=init,
        steps=args.steps,
        minutes=args.minutes,
        batch_size=batch,
        micro_batch=micro,
        sample_batch=sample_batch,
        reuse=2,
        max_new_tokens=max_new,
        lr=args.lr,
        warmup=0.05,
        seed=args.seed,
        eval_sequences=0,
        checkpoint_minutes=3.0,
        dtype="bfloat16",
        temperature=args.temperature,
        divergence=args.divergence,
        on_policy=args.on_policy,
    )
    draft_out = out / "draft"
    t_train = time.perf_counter()
    manifest = distill(target, draft_out, cfg, target_name="smollm2-135m", progress=True, resume=args.resume)
    results["train_wall_s"] = round(time.perf_counter() - t_train, 1)
    results["steps"] = manifest["steps"]
    (draft_out / "checkpoint.pt").unlink(missing_ok=True)  # optimiser state: large, not shipped

    trained = smcgen.load_model(str(draft_out), device=args.device).model
    early = derive_draft(model, DEFAULT_DRAFT_LAYERS)
    rows = {
        f"early exit ({DEFAULT_DRAFT_LAYERS} layers)": evaluate_draft(
            model, early, held, micro, autocast, args.temperature
        ),
        f"init '{init}' ({args.layers} layers, untrained)": inits[init],
        f"distilled ({args.layers} layers, {manifest['steps']} steps)": evaluate_draft(
            model, trained, held, micro, autocast, args.temperature
        ),
    }
    results["drafts"] = rows
    results["draft_file_bytes"] = (draft_out / "draft.safetensors").stat().st_size
    results["manifest"] = manifest
    (out / "distill_embedded.json").write_text(json.dumps(results, indent=2) + "\n")  # kept if generate hangs

    results["generate"] = {"skipped": True} if args.no_generate else generate_check(target, draft_out)
    results["total_wall_s"] = round(time.perf_counter() - t0, 1)

    (out / "distill_embedded.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        (
            f"Held-out target samples: {n_eval} sequences, {results['held_out_positions']} positions; "
            f"device {results['device']}; training {results['train_wall_s']} s ({manifest['sample_seconds']} s of it "
            f"sampling the target), {results['steps']} steps; "
            f"draft file {results['draft_file_bytes'] / 2**20:.1f} MiB"
        ),
        "",
        "| draft | KL(target‖draft) nats/token | KL(draft‖target) | Rényi-2 | top-1 agreement | Σ min(p, q) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['kl']:.3f} | {v['reverse_kl']:.3f} | {v['renyi2']:.3f} | {v['top1_agreement']:.3f} "
        f"| {v['overlap']:.3f} |"
        for k, v in rows.items()
    ]
    lines.append("")
    candidates = ", ".join(f"{k} {v['kl']:.2f}" for k, v in inits.items())
    lines.append(f"init candidates (KL): {candidates}")
    gen_summary = json.dumps({k: v for k, v in results["generate"].items() if k != "text"})
    lines.append(f"generate with the distilled draft: {gen_summary}")
    table = "\n".join(lines)
    (out / "distill_embedded.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
