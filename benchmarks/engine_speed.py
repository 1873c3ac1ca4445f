"""What ``smcgen.Engine`` costs over the native engine it drives, and what ``engine.batch`` gives.

One run, random weights of the real architectures (Llama-3.1-8B target, Llama-3.2-1B draft, built
from their configs as transformers models on the GPU: the Engine converts them as a user's models
would be), N=8 K=8, 512 new tokens (EOS off), prompts of random ids:

1. ``NativeSMC`` directly on the Engine's own converted models, run twice: end-to-end wall tok/s
   and decode-only tok/s (``last_timing``, what benchmarks/native_speed.py reports).
2. ``engine(prompt)``: the first call and the second, wall tok/s (everything a user waits for:
   prompt checks, prefill, graph capture, decode, result); the target is second call >= 95% of (1).
3. ``smcgen.generate`` twice (the cached Engine behind it).
4. ``engine.batch`` of 8 prompts of lengths 64, 128, ..., 512 (aggregate tok/s = 8 x 512 / wall):
   one native batch, each request at its own position with its own seed; then the same 8 prompts
   one request after another (what the engine did before mixed lengths shared a batch: one batch
   per distinct length), 8 prompts of one length (512) for comparison, and those 8 as one
   ``NativeSMC.run`` sharing one random stream (the cost of a segment per request).

``--tiny`` runs the same steps on the CPU with a tiny Llama and the native engine's torch twins
(a check that the script works, not a speed figure). Writes JSON to ``--out`` (default $OUT or .)
and prints a markdown table last.

    python benchmarks/engine_speed.py              # GPU host
    python benchmarks/engine_speed.py --tiny       # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch
from architectures import LLAMA_3_1_8B, LLAMA_3_2_1B, build_llama

PAIR = {"target": ("Llama-3.1-8B", LLAMA_3_1_8B), "draft": ("Llama-3.2-1B", LLAMA_3_2_1B)}
TINY = {
    "target": (
        "tiny-target",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
            "max_position_embeddings": 256,
        },
    ),
    "draft": (
        "tiny-draft",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 256,
            "max_position_embeddings": 256,
        },
    ),
}


def build(fields: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """A random-weight Llama on ``device`` wrapped as a LanguageModel without EOS (full lengths)."""
    from smcgen import LanguageModel

    model = build_llama(fields, dtype, device, seed, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return LanguageModel(model, None, (), model.config.max_position_embeddings)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 512 (--tiny: 18)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (--tiny: 8)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import smcgen
    from smcgen import Engine, SMCConfig
    from smcgen.samplers.native import NativeSMC
    from smcgen.samplers.native_select import native_draft, native_model

    if args.tiny:
        device, dtype, pair = torch.device("cpu"), torch.float32, TINY
        new = args.new_tokens or 18
        plen = args.prompt_len or 8
        batch_lens = [4, 6, 8, 10, 12, 14, 16, 18]
        engine_name = "native"  # the CPU twins: 'auto' would pick the generic engine off the GPU
        n, k = min(args.n, 4), min(args.k, 2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --tiny)")
        device, dtype, pair = torch.device("cuda"), torch.bfloat16, PAIR
        new = args.new_tokens or 512
        plen = args.prompt_len or 256
        batch_lens = [64, 128, 192, 256, 320, 384, 448, 512]
        engine_name = "auto"
        n, k = args.n, args.k

    (t_name, t_fields), (d_name, d_fields) = pair["target"], pair["draft"]
    target, draft = build(t_fields, dtype, device, 0), build(d_fields, dtype, device, 1)
    vocab = t_fields["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(0, vocab, (length,), generator=gen).tolist()

    settings = {
        "n_particles": n,
        "block_size": k,
        "max_new_tokens": new,
        "draft_temperature": 0.7,
        "target_temperature": 0.7,
        "engine": engine_name,
    }
    rows: list[dict] = []

    def record(name: str, wall: float, tokens: int, **extra) -> None:
        rows.append({"case": name, "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, **extra})
        print(f"{name}: {tokens / wall:.1f} tok/s ({wall:.2f} s)", flush=True)

    # the Engine first: it converts the models (timed apart: a one-off cost)
    # continuous=False: engine.batch runs one whole native batch (benchmarks/continuous_batching.py
    # measures the request slots)
    (engine, build_s) = timed(lambda: Engine(target, draft=draft, continuous=False, **settings), device)
    print(
        f"Engine built in {build_s:.1f} s (conversions included); engine: "
        f"{'native' if engine.engine_reason is None else 'generic: ' + engine.engine_reason}",
        flush=True,
    )
    p = prompt(plen)

    # 1. NativeSMC directly on the same converted models (the draft in the format the Engine picks)
    cfg = SMCConfig(**settings, seed=0)
    nt = native_model(target)
    nd = native_draft(cfg, draft, n, device)
    native = NativeSMC(nt, cfg, draft=nd, eos_token_ids=())
    for i in range(2):
        _, wall = timed(lambda: native.run(p), device)
        t = native.last_timing
        record(
            f"NativeSMC.run, call {i + 1}",
            wall,
            new,
            decode_tok_s=new / t["decode_s"],
            prefill_s=t["prefill_s"],
            capture_s=t["capture_s"],
        )
    native_decode = rows[-1]["decode_tok_s"]
    native_wall = rows[-1]["tok_s"]

    # 2. engine(prompt), first and second call
    for i in range(2):
        res, wall = timed(lambda: engine(p, seed=0), device)
        assert len(res.token_ids) == new, "EOS is off: every answer has the full length"
        record(
            f"engine(prompt), call {i + 1}",
            wall,
            new,
            engine=res.engine,
            vs_native_wall=(new / wall) / native_wall,
            vs_native_decode=(new / wall) / native_decode,
        )

    # 3. generate twice (its cached Engine)
    for i in range(2):
        res, wall = timed(lambda: smcgen.generate(target, p, draft=draft, seed=0, **settings), device)
        record(f"generate, call {i + 1}", wall, new, engine=res.engine, vs_native_wall=(new / wall) / native_wall)

    # 4. batches: 8 prompts of different lengths, then 8 of one length
    mixed = [prompt(length) for length in batch_lens]
    same = [prompt(batch_lens[-1]) for _ in batch_lens]
    cases = [
        (f"engine.batch, 8 prompts of lengths {batch_lens[0]}..{batch_lens[-1]}", mixed),
        (f"engine.batch, 8 prompts of length {batch_lens[-1]}", same),
    ]
    for name, prompts in cases:
        for i in range(2):
            _, wall = timed(lambda prompts=prompts: engine.batch(prompts, seed=0), device)
            timing = engine._native.most_recent().last_timing  # the NativeSMC that ran it
            record(
                f"{name}, call {i + 1}",
                wall,
                new * len(prompts),
                per_request_tok_s=new / wall,
                decode_tok_s=new * len(prompts) / timing["decode_s"],
                prefill_s=timing["prefill_s"],
                capture_s=timing["capture_s"],
            )
    # the same-length prompts as one segment sharing one random stream (no per-request segments)
    _, wall = timed(lambda: native.run(same), device)
    t = native.last_timing
    record(
        f"NativeSMC.run, 8 prompts of length {batch_lens[-1]}, one shared stream",
        wall,
        new * len(same),
        per_request_tok_s=new / wall,
        decode_tok_s=new * len(same) / t["decode_s"],
        prefill_s=t["prefill_s"],
        capture_s=t["capture_s"],
    )
    # the old schedule: one batch per distinct length, one after another (here: one request each)
    _, wall = timed(lambda: [engine(q, seed=0) for q in mixed], device)
    record(f"{cases[0][0]}, one length at a time (old grouping)", wall, new * len(mixed), per_request_tok_s=new / wall)

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "models": f"{t_name} / {d_name} (random weights)",
        "n": n,
        "k": k,
        "new_tokens": new,
        "prompt_len": plen,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "native_engines_built": engine.stats["native_engines_built"],
        "engine_build_s": build_s,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_speed.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print()
    print(f"{meta['models']}, N={n} K={k}, {new} new tokens, prompt {plen}; {meta['device']}; commit {meta['commit']}")
    print("| case | wall s | tok/s (wall) | notes |")
    print("|---|---:|---:|---|")
    for r in rows:
        notes = []
        if "decode_tok_s" in r:
            notes.append(
                f"decode only {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_s']:.2f} s, "
                f"capture {r['capture_s']:.2f} s"
            )
        if "vs_native_wall" in r:
            notes.append(f"{r['vs_native_wall']:.1%} of NativeSMC wall")
        if "vs_native_decode" in r:
            notes.append(f"{r['vs_native_decode']:.1%} of NativeSMC decode-only")
        if "per_request_tok_s" in r:
            notes.append(f"aggregate; {r['per_request_tok_s']:.1f} tok/s per request")
        print(f"| {r['case']} | {r['wall_s']:.2f} | {r['tok_s']:.1f} | {'; '.join(notes)} |")


if __name__ == "__main__":
    main()
