"""A 70B-class target: one large GPU with a weight-only int8 / fp8 target, or tensor parallel under torchrun.

Llama-3.1-70B target and Llama-3.2-1B draft architectures with random weights (the speed does not
depend on them), 256-token random prompt, 512 new tokens, EOS off, temperature 0.7. Rows: AR
(the target alone, N = 1) and SMC-SD N = 8, K = 8 in the same run; tokens/s per request (decode
only), the ratio to AR, and the fraction of the weight-bandwidth roofline: (K+1) tokens per cycle
over (W_target_per_GPU + K * W_draft) / B, B the copy bandwidth of one GPU measured in the same
run (each GPU streams its target shard and the whole replicated draft), AR: B / W_target_per_GPU.
``--profile`` adds the all-reduce / all-gather (NCCL) kernel time per cycle from an eager run.

    # one H200, target layers and LM head in weight-only int8 (~71 GB), built layer by layer
    # (int8 moved SmolLM2's next-token distributions ~6x less than fp8: benchmarks/target_quantization.py):
    python benchmarks/tp_70b.py --out $OUT
    python benchmarks/tp_70b.py --quantize fp8 --out $OUT
    # tensor parallel over 4 (or 2) GPUs, bf16 target shards (35 GB each at TP=4):
    torchrun --nproc-per-node=4 benchmarks/tp_70b.py --quantize none --profile --out $OUT
    # TP=2 on 80 GB cards: the bf16 shards (70 GB) leave no room, so quantize them:
    torchrun --nproc-per-node=2 benchmarks/tp_70b.py --quantize fp8 --profile --out $OUT
    # a CPU smoke test of the script itself (tiny architectures, 2 gloo ranks):
    torchrun --nproc-per-node=2 benchmarks/tp_70b.py --arch tiny

Writes JSON and markdown under ``--out`` (default $OUT, else benchmarks/results) from rank 0,
and prints the table last.
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
from architectures import LLAMA_3_1_70B, LLAMA_3_2_1B, TINY_LLAMA  # noqa: E402
from native_speed import copy_bandwidth, hf_config  # noqa: E402

from smcgen.core.config import SMCConfig  # noqa: E402
from smcgen.runners.native.build import random_layerwise  # noqa: E402
from smcgen.runners.native.model import NativeCausalLM  # noqa: E402
from smcgen.runners.native.parallel import TensorParallelLM, init_tensor_parallel  # noqa: E402
from smcgen.samplers.native import NativeSMC  # noqa: E402

LLAMA_70B, LLAMA_1B = LLAMA_3_1_70B, LLAMA_3_2_1B
# the script's own smoke test on the CPU: same code path, tiny shapes
TINY_T = dict(TINY_LLAMA, vocab_size=301, max_position_embeddings=2048)
TINY_D = dict(TINY_T, num_hidden_layers=1, tie_word_embeddings=True)


def run_row(target, draft, n: int, k: int, prompt: list[int], new_tokens: int, device, cuda_graph=None) -> dict:
    """One engine run (K = 0: AR without the draft); decode tokens/s per request."""
    cfg = SMCConfig(
        n_particles=n,
        block_size=max(k, 1),
        max_new_tokens=new_tokens,
        seed=0,
        draft_temperature=0.7,
        target_temperature=0.7,
    )
    engine = NativeSMC(target, cfg, draft=draft if k > 0 else None, eos_token_ids=(), cuda_graph=cuda_graph)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = engine.run(prompt)
    t = engine.last_timing
    assert int(out.lengths.min()) == new_tokens, "every particle must generate the full budget (EOS is off)"
    return {
        "N": n,
        "K": k,
        "decode_s": t["decode_s"],
        "prefill_s": t["prefill_s"],
        "capture_s": t["capture_s"],
        "cycles": t["cycles"],
        "tok_s": new_tokens / t["decode_s"],
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
        "resample_rate": float(out.resampled.float().mean()),
    }


def collective_ms_per_cycle(target, draft, k: int, prompt: list[int], device) -> dict:
    """NCCL kernel time per cycle (and all kernels' time) over 3 eager cycles after a warm-up run."""
    from torch.profiler import ProfilerActivity, profile

    n_new = 3 * (k + 1)
    run_row(target, draft, 8, k, prompt, n_new, device, cuda_graph=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = run_row(target, draft, 8, k, prompt, n_new, device, cuda_graph=False)
    total = comm = 0.0
    for ev in prof.key_averages():
        total += ev.device_time_total
        if "nccl" in ev.key.lower():
            comm += ev.device_time_total
    # the profile covers the prefill too: per cycle is an upper bound for the decode cycles
    return {"comm_ms_per_cycle": comm / r["cycles"] / 1e3, "kernel_ms_per_cycle": total / r["cycles"] / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=("llama70b", "tiny"), default="llama70b")
    ap.add_argument(
        "--quantize",
        choices=("fp8", "int8", "none"),
        default=None,
        help="target weights (every linear layer and the LM head); default: int8 on one GPU, none under TP",
    )
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="NCCL time per cycle from an eager profile (TP only)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, world, device = init_tensor_parallel()
    else:
        rank, device = 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantize = args.quantize or ("int8" if world == 1 else "none")
    tiny = args.arch == "tiny"
    t_cfg, d_cfg = hf_config("llama", TINY_T if tiny else LLAMA_70B), hf_config("llama", TINY_D if tiny else LLAMA_1B)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    max_pos = args.prompt_len + args.new_tokens + 2 * (args.block_size + 1)

    t0 = time.perf_counter()
    target = random_layerwise(
        t_cfg,
        cls=TensorParallelLM if world > 1 else NativeCausalLM,
        dtype=dtype,
        device=device,
        quantize=None if quantize == "none" else quantize,
        max_positions=max_pos,
        progress=rank == 0,
    )
    draft = NativeCausalLM.from_config(d_cfg, dtype=dtype, device=device, max_positions=max_pos)
    build_s = time.perf_counter() - t0
    prompt = torch.randint(
        0, target.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)
    ).tolist()

    # warm-up (Triton compiles, cuBLAS picks kernels) on a short run of each mode
    for k in (0, args.block_size):
        run_row(target, draft, 1 if k == 0 else args.particles, k, prompt, 2 * (args.block_size + 1), device)
    rows = [
        run_row(target, draft, 1, 0, prompt, args.new_tokens, device),
        run_row(target, draft, args.particles, args.block_size, prompt, args.new_tokens, device),
    ]
    bw = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    w_t, w_d = target.weight_bytes(), draft.weight_bytes()
    for r in rows:
        r["vs_AR"] = r["tok_s"] / rows[0]["tok_s"]
        per_cycle_bytes = w_t + r["K"] * w_d if r["K"] else w_t
        r["roofline_tok_s"] = (r["K"] + 1) * bw / per_cycle_bytes
        r["roofline_frac"] = r["tok_s"] / r["roofline_tok_s"]
    comm = collective_ms_per_cycle(target, draft, args.block_size, prompt, device) if args.profile and world > 1 else {}

    if rank != 0:
        return
    meta = {
        "arch": args.arch,
        "tp": world,
        "quantize": quantize,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bandwidth_gb_s": bw / 1e9,
        "target_gb_per_gpu": w_t / 1e9,
        "draft_gb": w_d / 1e9,
        "build_s": build_s,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        **comm,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"tp_70b_tp{world}_{quantize}"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"{meta['device']} x {world}, target {args.arch} ({quantize}), {w_t / 1e9:.1f} GB per GPU, draft "
        f"{w_d / 1e9:.2f} GB, copy bandwidth {bw / 1e9:.0f} GB/s per GPU"
        + (
            f", NCCL {comm['comm_ms_per_cycle']:.2f} of {comm['kernel_ms_per_cycle']:.2f} kernel ms per cycle"
            if comm
            else ""
        ),
        "",
        "| mode | N | K | tok/s | x AR | roofline tok/s | % roofline | peak GiB | resample rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'AR' if r['K'] == 0 else 'SMC-SD'} | {r['N']} | {r['K']} | {r['tok_s']:.1f} | "
            f"{r['vs_AR']:.2f} | {r['roofline_tok_s']:.1f} | {100 * r['roofline_frac']:.0f}% | "
            f"{r['peak_gib']:.1f} | {r['resample_rate']:.2f} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
