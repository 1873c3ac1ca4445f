"""Speed of the native engine on real architectures with random weights (GPU host).

SMC-SD's cost does not depend on the weights, so the target and draft are built from their
published configs with random bf16 weights (no download). Per configuration: tokens/s per request
(decode only: prefill and graph capture are reported apart), the ratio to this engine's AR in the
same run, the fraction of the weight-bandwidth roofline ((K+1) tokens per cycle over
(W_target + K * W_draft) / copy bandwidth, the bandwidth measured in the same run) and peak GPU
memory. Hugging Face ``generate`` on the same target weights is the external anchor.

    python benchmarks/native_speed.py                       # Llama-3.1-8B / Llama-3.2-1B, full sweep
    python benchmarks/native_speed.py --pair qwen3 --quick  # Qwen3-8B / Qwen3-0.6B, a few rows
    python benchmarks/native_speed.py --profile             # + per-kernel profile of N=8, K=8

Writes a markdown table to stdout and JSON rows to ``--out`` (default: $OUT/native_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch
from architectures import LLAMA_3_1_8B, LLAMA_3_2_1B
from hf_baseline import hf_generate_speed

from smcgen.core.config import SMCConfig
from smcgen.kernels import attention, linear
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC
from smcgen.samplers.native_select import AUTO_INT8_MAX_ROWS

# Engine settings compared side by side (--variants): each changes one thing from the default.
VARIANTS = {
    "fused": {},  # the engine's defaults
    "cublas": {"skinny_max_rows": 0},  # every linear layer on cuBLAS with the fused elementwise kernels
    "pdl": {"pdl": True},  # programmatic dependent launch in both models
    "pdldraft": {"pdl_draft": True},  # ... in the draft only
    "nopdl": {"pdl": False, "pdl_draft": False},  # in neither
    "nofold": {"fold": False},  # a separate RMSNorm kernel before each QKV projection
    "inplace": {"residual_in_place": True},  # residual adds in place (the default since d2075d7)
    "copyres": {"residual_in_place": False},  # addmm with the copy of its C operand (the earlier default)
    "split128": {"keys_per_split": 128},  # split-KV attention: at least 128 keys per split (default 256)
    "split64": {"keys_per_split": 64},
    "grid0": {"min_grid": 0.0},
    "rows64": {"skinny_max_rows": 64},  # the skinny kernel up to 64 rows (8 x 8's draft steps)
    # decode attention in 64- / 32-key tiles, split as finely (a split covers whole tiles)
    "attn64": {"keys_per_split": 64, "decode_block_n": 64},
    "attn32": {"keys_per_split": 32, "decode_block_n": 32},
    "dbn64": {"decode_block_n": 64},
    # decode grids with fewer programs than SMs tiled and split as wider ones (128-key tiles, >= 256-key splits)
    "tile128": {"small_grid_block_n": 128},
    # a copy of the draft with weight-only fp8 layers (NativeCausalLM.quantize_fp8): its default
    # set (gate_up, down, LM head), or every linear layer
    "fp8draft": {"fp8_draft": "default"},
    # the skinny kernel's operand order: weight tile x rows (rows padded to 8) or rows x weight tile
    "swap": {"swap_ab": True},
    "noswap": {"swap_ab": False},
    "skinnyqkv": {"skinny_qkv": True},  # QKV in the skinny kernel on decode-sized batches (the default)
    "cublasqkv": {"skinny_qkv": False},  # QKV on cuBLAS at every size
    "nofusedrope": {"fused_qkv_rope": False},  # 64-wide heads: QKV and RoPE + KV write as two kernels
    "cublashead": {"skinny_head": False},  # the LM head on cuBLAS (after a norm kernel) at every size
    "int8draft": {"fp8_draft": "int8"},  # the same layers in weight-only int8 (quantize_int8)
    "int8all": {"fp8_draft": "int8all"},  # every linear layer of the draft in int8
    # what generate() runs by default (draft_quantization='auto'): the int8 draft for <= 16 rows
    "auto": {"fp8_draft": "auto"},
    "fp8all": {"fp8_draft": "all"},  # the skinny kernel for every decode-sized layer, however few its programs
    "nolookahead": {"lookahead": False},  # the host waits for each cycle before enqueuing the next
}


def apply_variant(name: str, models, defaults: dict, rows: int = 1):
    """Reset the models and kernel switches to ``defaults``, apply variant ``name``; return (target, draft).

    ``models`` = (target, bf16 draft, quantized copies of the draft by kind): the draft returned is
    the one the variant runs; ``rows``: the draft rows of the run (particles x requests), for "auto".
    """
    settings = dict(defaults)
    for part in name.split("+"):  # "a+b": both changes
        settings.update(VARIANTS[part])
    target, draft, drafts_fp8 = models
    if settings["fp8_draft"] == "auto":
        settings["fp8_draft"] = "int8" if rows <= AUTO_INT8_MAX_ROWS else False
    if settings["fp8_draft"]:
        draft = drafts_fp8[settings["fp8_draft"]]
    for m in (target, draft):
        m.skinny_max_rows = settings["skinny_max_rows"]
        if not settings["fold"]:
            # exact only because from_config's norms are all 1 (so W * g == W): no unfolding needed
            assert all(bool((layer.input_norm == 1).all()) for layer in m.layers)
        m.input_norm_folded = settings["fold"] and not m.cfg.qkv_bias
        m.residual_in_place = settings["residual_in_place"]
        m.skinny_qkv = settings["skinny_qkv"]
        m.skinny_head = settings["skinny_head"]
        m.fused_qkv_rope = settings["fused_qkv_rope"]
    target.pdl = settings["pdl"]
    draft.pdl = True if settings["pdl_draft"] else settings["pdl"]
    linear.MIN_GRID_FRACTION = settings["min_grid"]
    linear.SWAP_AB = settings["swap_ab"]
    attention.MIN_KEYS_PER_SPLIT = settings["keys_per_split"]
    attention.DECODE_BLOCK_N = settings["decode_block_n"]
    attention.SMALL_GRID_BLOCK_N = settings["small_grid_block_n"]
    ENGINE_SETTINGS["lookahead"] = settings["lookahead"]
    return target, draft


PAIRS = {
    "llama": (
        (
            "Llama-3.1-8B",
            "llama",
            LLAMA_3_1_8B,
        ),
        (
            "Llama-3.2-1B",
            "llama",
            LLAMA_3_2_1B,
        ),
    ),
    "qwen3": (
        (
            "Qwen3-8B",
            "qwen3",
            dict(
                hidden_size=4096,
                intermediate_size=12288,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                vocab_size=151936,
                rope_theta=1000000.0,
                max_position_embeddings=40960,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
            ),
        ),
        (
            "Qwen3-0.6B",
            "qwen3",
            dict(
                hidden_size=1024,
                intermediate_size=3072,
                num_hidden_layers=28,
                num_attention_heads=16,
                num_key_value_heads=8,
                head_dim=128,
                vocab_size=151936,
                rope_theta=1000000.0,
                max_position_embeddings=40960,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
            ),
        ),
    ),
}


def hf_config(kind: str, fields: dict):
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**fields)
    from transformers import Qwen3Config

    return Qwen3Config(**fields)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write): the fastest of 20 copies of 1 GiB.

    The fastest, not the median: a roofline against a low reading would flatter every row (one
    run's median read 2.85 TB/s where the others read 2.97-2.99, BENCHMARKS.md)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * 2**30 / min(times)


# engine attributes of the variant being measured (apply_variant sets them)
ENGINE_SETTINGS: dict = {}


def make_engine(target, draft, n, k, new_tokens, prompt_len, requests=1, seed=0, **engine_kw):
    """The engine of one benchmark row (K = 0: AR, no draft; EOS off) and its random prompts."""
    cfg = SMCConfig(
        n_particles=n,
        block_size=max(k, 1),
        max_new_tokens=new_tokens,
        seed=seed,
        draft_temperature=0.7,
        target_temperature=0.7,
    )
    engine = NativeSMC(target, cfg, draft=draft if k > 0 else None, eos_token_ids=(), **engine_kw)
    for name, value in ENGINE_SETTINGS.items():
        setattr(engine, name, value)
    gen = torch.Generator().manual_seed(seed)
    return engine, torch.randint(0, target.vocab_size, (requests, prompt_len), generator=gen).tolist()


def run_engine(target, draft, n, k, requests, prompt_len, new_tokens, seed=0):
    engine, prompts = make_engine(target, draft, n, k, new_tokens, prompt_len, requests, seed)
    torch.cuda.reset_peak_memory_stats()
    out = engine.run(prompts)
    t = engine.last_timing
    assert int(out.lengths.min()) == new_tokens, "every particle must generate the full budget (EOS is off)"
    return {
        "decode_s": t["decode_s"],
        "prefill_s": t["prefill_s"],
        "capture_s": t["capture_s"],
        "tok_s_per_request": new_tokens / t["decode_s"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "resample_rate": float(out.resampled.float().mean()),
    }


def profile_cycle(target, draft, n, k, prompt_len, top=25):
    """Per-kernel CUDA time of three eager cycles (graphs hide kernels from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    engine, prompts = make_engine(target, draft, n, k, 3 * (k + 1), prompt_len, cuda_graph=False)
    engine.run(prompts)  # warm-up: Triton compiles
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.run(prompts)
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            totals[ev.key[:90]] += ev.device_time_total
    total = sum(totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return total, rows


def profile_graph(target, draft, n, k, prompt_len, new_tokens, top=30):
    """Kernel time per cycle inside the replayed CUDA graphs, and how busy the GPU is between them.

    The window is from the first ``cudaGraphLaunch`` to the last kernel: only the decode cycles
    (one graph replay each; the host reads each cycle's done flag while the next one runs, see
    ``NativeSMC.lookahead``). ``busy`` = the union of kernel intervals; the rest of the window is
    launch gaps inside the graph plus any wait on the host between cycles.
    """
    from torch.profiler import ProfilerActivity, profile

    engine, prompts = make_engine(target, draft, n, k, new_tokens, prompt_len)
    engine.run(prompts)  # warm-up: Triton compiles, cuBLAS picks its kernels
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.run(prompts)
    cycles = int(engine.last_timing["cycles"])
    events = prof.events()
    launches = [e.time_range.start for e in events if e.name.startswith("cudaGraphLaunch")]
    first = min(launches, default=0)
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.start >= first
    )
    if not kernels:
        return {"error": f"no kernels recorded after the first graph launch ({len(launches)} launches)"}
    per_name: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    busy, edge = 0.0, kernels[0][0]
    for start, end, name in kernels:
        per_name[name[:90]] += end - start
        count[name[:90]] += 1
        busy += max(0.0, end - max(start, edge))
        edge = max(edge, end)
    window = edge - kernels[0][0]
    return {
        "cycles": cycles,
        "kernels_per_cycle": len(kernels) / cycles,
        "window_ms_per_cycle": window / cycles / 1e3,
        "busy_ms_per_cycle": busy / cycles / 1e3,
        "kernel_ms_per_cycle": sum(per_name.values()) / cycles / 1e3,
        "top": [(name, us / cycles / 1e3) for name, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]],
        # launches per cycle by name: where the many short kernels come from
        "launches": sorted(((name, n / cycles) for name, n in count.items()), key=lambda kv: -kv[1])[:top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="llama")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--hf-tokens", type=int, default=128, help="new tokens for the HF generate anchor")
    ap.add_argument("--quick", action="store_true", help="AR, N=8 K=8, 8x8 only")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument(
        "--grid",
        default=None,
        help="comma-separated NxKxREQUESTS rows instead of the default grid (K = 0: AR), e.g. 1x0x1,8x8x1",
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--profile-graph",
        action="store_true",
        help="per-kernel time per cycle inside the replayed graphs of N=8, K=8 (one per variant)",
    )
    ap.add_argument(
        "--skinny-max-rows",
        type=int,
        default=None,
        help="widest batch for the skinny kernel (default: the model's own setting)",
    )
    ap.add_argument(
        "--linear",
        choices=("fused", "cublas", "both"),
        default="fused",
        help="decode-sized linear layers in the fused skinny Triton kernel (the engine's default), "
        "in cuBLAS with separate elementwise kernels, or both side by side",
    )
    ap.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated engine variants measured side by side ({', '.join(VARIANTS)}); overrides --linear",
    )
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "native_speed.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    dev = torch.device("cuda")
    (t_name, t_kind, t_fields), (d_name, d_kind, d_fields) = PAIRS[args.pair]
    max_pos = args.prompt_len + args.new_tokens + 64
    target = NativeCausalLM.from_config(hf_config(t_kind, t_fields), torch.bfloat16, dev, seed=0, max_positions=max_pos)
    draft = NativeCausalLM.from_config(hf_config(d_kind, d_fields), torch.bfloat16, dev, seed=1, max_positions=max_pos)
    if args.skinny_max_rows is None:
        args.skinny_max_rows = target.skinny_max_rows
    defaults = {
        "skinny_max_rows": args.skinny_max_rows,
        "pdl": target.pdl,
        "pdl_draft": draft.pdl,
        "fold": target.input_norm_folded,
        "residual_in_place": target.residual_in_place,
        "keys_per_split": attention.MIN_KEYS_PER_SPLIT,
        "decode_block_n": attention.DECODE_BLOCK_N,
        "small_grid_block_n": attention.SMALL_GRID_BLOCK_N,
        "fp8_draft": False,
        "swap_ab": linear.SWAP_AB,
        "skinny_qkv": target.skinny_qkv,
        "skinny_head": target.skinny_head,
        "fused_qkv_rope": target.fused_qkv_rope,
        "min_grid": linear.MIN_GRID_FRACTION,
        "lookahead": None,  # the library's default: AR and plain SMC look ahead, SMC-SD does not
    }
    bw = copy_bandwidth(dev)
    w_t, w_d = target.weight_bytes(), draft.weight_bytes()
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "pair": f"{t_name} / {d_name}",
        "copy_bw_TBs": bw / 1e12,
        "target_GB": w_t / 1e9,
        "draft_GB": w_d / 1e9,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(info))

    grid = [(1, 0, 1)]  # (N, K, requests); K = 0 is AR
    if args.grid:
        grid = [tuple(int(v) for v in row.split("x")) for row in args.grid.split(",")]
    elif args.quick:
        grid += [(8, 8, 1), (8, 8, 8)]
    else:
        grid += [(n, k, 1) for n in (1, 4, 8, 16) for k in (4, 8, 16)] + [(8, 8, 8)]
    rows = []
    ar = {}
    if args.variants:
        variants = tuple(v.strip() for v in args.variants.split(","))
        unknown = [p for v in variants for p in v.split("+") if p not in VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    else:
        variants = ("fused", "cublas") if args.linear == "both" else (args.linear,)
    drafts_fp8 = {}
    for kind, names, fmt in (
        ("default", NativeCausalLM.FP8_DEFAULT, "fp8"),
        ("all", NativeCausalLM.FP8_NAMES, "fp8"),
        ("int8", NativeCausalLM.FP8_DEFAULT, "int8"),
        ("int8all", NativeCausalLM.FP8_NAMES, "int8"),
    ):
        modes = {VARIANTS[p].get("fp8_draft") for v in variants for p in v.split("+")}
        if kind in modes or (kind == "int8" and "auto" in modes):
            d8 = NativeCausalLM.from_config(
                hf_config(d_kind, d_fields), torch.bfloat16, dev, seed=1, max_positions=max_pos
            )
            d8.quantize_weights(fmt, names)
            drafts_fp8[kind] = d8
            info[f"draft_{fmt}_{kind}_GB"] = d8.weight_bytes() / 1e9
    models = (target, draft, drafts_fp8)
    for n, k, reqs in grid:
        for variant in variants:
            t_model, d_model = apply_variant(variant, models, defaults, n * reqs)
            r = run_engine(t_model, d_model, n, k, reqs, args.prompt_len, args.new_tokens)
            roof = (k + 1) * bw / (w_t + k * d_model.weight_bytes())
            r.update(
                {
                    "N": n,
                    "K": k,
                    "requests": reqs,
                    "variant": variant,
                    "roofline_tok_s": roof,
                    "roofline_frac": r["tok_s_per_request"] / roof,
                    "aggregate_tok_s": r["tok_s_per_request"] * reqs,
                }
            )
            if k == 0:
                ar[variant] = r["tok_s_per_request"]
            r["vs_AR"] = r["tok_s_per_request"] / ar[variant] if variant in ar else float("nan")
            rows.append(r)
            print(json.dumps(r), flush=True)
    apply_variant("fused", models, defaults)
    ar = ar.get("fused", next(iter(ar.values()), float("nan")))
    # the bandwidth again after the grid; the rooflines use the higher of the two readings
    bw_after = copy_bandwidth(dev)
    info["copy_bw_before_after_TBs"] = [bw / 1e12, bw_after / 1e12]
    if bw_after > bw:
        for r in rows:
            r["roofline_tok_s"] *= bw_after / bw
            r["roofline_frac"] = r["tok_s_per_request"] / r["roofline_tok_s"]
        bw = bw_after
        info["copy_bw_TBs"] = bw / 1e12

    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        with torch.device(dev):
            hf_model = AutoModelForCausalLM.from_config(hf_config(t_kind, t_fields), dtype=torch.bfloat16).eval()
        ids = torch.randint(0, target.vocab_size, (1, args.prompt_len), device="cuda")
        hf = hf_generate_speed(hf_model, ids, args.hf_tokens)
        del hf_model
        torch.cuda.empty_cache()
        print(json.dumps({"hf_generate_tok_s": hf}))

    print(
        f"\n{info['pair']} on {info['device']}, copy bandwidth {bw / 1e12:.2f} TB/s, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, bf16, random weights\n"
    )
    print(
        "| mode | variant | N | K | requests | tok/s per request | aggregate tok/s | x AR | roofline tok/s | "
        "% roofline | peak GiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mode = "AR" if r["K"] == 0 else "SMC-SD"
        print(
            f"| {mode} | {r['variant']} | {r['N']} | {r['K']} | {r['requests']} | {r['tok_s_per_request']:.1f} | "
            f"{r['aggregate_tok_s']:.1f} | {r['vs_AR']:.2f} | {r['roofline_tok_s']:.0f} | "
            f"{100 * r['roofline_frac']:.0f}% | {r['peak_gib']:.1f} |"
        )
    if hf is not None:
        print(
            f"| HF generate (sampling) | HF | 1 | - | 1 | {hf:.1f} | {hf:.1f} | {hf / ar:.2f} | {bw / w_t:.0f} | "
            f"{100 * hf / (bw / w_t):.0f}% | - |"
        )

    prof = None
    if args.profile:
        total, top = profile_cycle(target, draft, 8, 8, args.prompt_len)
        print(f"\nprofile: N=8, K=8, 3 eager cycles, {total / 1e3:.1f} ms of kernel time")
        for name, us in top:
            print(f"  {us / 1e3:8.2f} ms  {100 * us / total:5.1f}%  {name}")
        prof = {"total_ms": total / 1e3, "top": [(n, us / 1e3) for n, us in top]}
    graph_prof = {}
    if args.profile_graph:
        for variant, n, k in [(variants[0], 1, 0)] + [(v, 8, 8) for v in variants]:
            t_model, d_model = apply_variant(variant, models, defaults, n)
            g = profile_graph(t_model, d_model, n, k, args.prompt_len, args.new_tokens)
            graph_prof[f"{variant} N={n} K={k}"] = g
            if "error" in g:
                print(f"\ngraph profile ({variant}, N={n}, K={k}): {g['error']}")
                continue
            print(
                f"\ngraph profile ({variant}): N={n}, K={k}, {g['cycles']} cycles; per cycle: window "
                f"{g['window_ms_per_cycle']:.2f} ms, GPU busy {g['busy_ms_per_cycle']:.2f} ms, kernel time "
                f"{g['kernel_ms_per_cycle']:.2f} ms, {g['kernels_per_cycle']:.0f} kernels"
            )
            for name, ms in g["top"]:
                print(f"  {ms:7.3f} ms  {100 * ms / g['kernel_ms_per_cycle']:5.1f}%  {name}")
            print("  launches per cycle:")
            for name, n in g["launches"]:
                print(f"  {n:7.1f}  {name}")
        apply_variant("fused", models, defaults)
    with open(args.out, "w") as f:
        json.dump(
            {"info": info, "rows": rows, "hf_generate_tok_s": hf, "profile": prof, "graph_profile": graph_prof},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
