"""Registers and spills of the one-launch decoder layer and of the five kernels it replaces, for sm_90,
compiled on a machine without a GPU.

One layer of a decode step is called on CPU tensors of the engine's shapes (default: the SmolLM2-135M
self-int8 draft, bf16 activations with int8 gate/up and down, 2 rows of one token at a 160-token
context in 16-token pages) with an H100's 132 SMs patched in; each Triton launch it would make is
recorded instead of run, then compiled for sm_90 with the specialization a GPU launch gets and
assembled by Triton's ptxas (``kernel_registers.specialize`` / ``assemble``). The fused layer is
planned as on the GPU (its grid, the attention's split cap, one item a program where the grid
covers every phase: ``ONE_ITEM``); ``--loop`` also compiles the form whose programs loop over items,
``--prefetch`` the one that prefetches its weight tiles into L2 first.

    python benchmarks/decode_layer_registers.py
    python benchmarks/decode_layer_registers.py --rows 8 --tokens 2
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the kernels

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import SMOLLM2_135M  # noqa: E402
from kernel_registers import H100_SMS, assemble  # noqa: E402

from smcgen.kernels import attention, decode_layer, linear, qkv_rope  # noqa: E402
from smcgen.kernels.linear import quantize_int8  # noqa: E402

KERNELS = [
    (qkv_rope, "_qkv_rope_kernel", "QKV + RoPE + K/V write"),
    (attention, "_paged_attention_kernel", "paged attention"),
    (linear, "_skinny_linear_kernel", "skinny linear"),
    (decode_layer, "_decode_layer_kernel", "one-launch layer"),
]


def record(args) -> list[tuple]:
    """(label, fn, positional args, constexprs, warps, stages) of every launch of the five kernels and the fused one."""
    launches = []

    class Recorder:
        def __init__(self, fn, label):
            self.fn, self.label = fn, label

        def __getitem__(self, grid):
            def launch(*a, num_warps, num_stages, launch_pdl=False, **const):
                launches.append((self.label, self.fn, a, {**const, "PDL": True}, num_warps, num_stages))

            return launch

    hidden, n_qh, n_kvh, dim, inter = args.hidden, args.heads, args.kv_heads, args.head_dim, args.intermediate
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)

    def mat(n, k):
        return (torch.randn(n, k, generator=g) * k**-0.5).to(dt)

    gate_up, gu_scale = quantize_int8(mat(2 * inter, hidden))
    down, dn_scale = quantize_int8(mat(hidden, inter))
    w = decode_layer.DecodeLayerWeights(
        qkv=mat((n_qh + 2 * n_kvh) * dim, hidden), o=mat(hidden, n_qh * dim), gate_up=gate_up, down=down,
        post_norm=torch.ones(hidden, dtype=dt), gate_up_scale=gu_scale, down_scale=dn_scale,
    )  # fmt: skip
    rows, tokens, page = args.rows, args.tokens, 16
    pages = -(-(args.context + tokens) // page)
    h = torch.randn(rows, tokens, hidden, generator=g).to(dt)
    pool = torch.zeros(rows * pages, page, n_kvh, dim, dtype=dt)
    table = torch.arange(rows * pages, dtype=torch.int32).view(rows, pages)
    cos = torch.ones(pages * page, dim, dtype=dt)
    start = torch.full((rows,), args.context, dtype=torch.int32)
    kw = {"n_heads": n_qh, "n_kv_heads": n_kvh, "scale": dim**-0.5, "eps": 1e-5}
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(attention, "_sms", lambda device: H100_SMS))
        stack.enter_context(mock.patch.object(decode_layer, "_on_gpu", lambda device: True))
        stack.enter_context(mock.patch.object(decode_layer, "sm_count", lambda device: H100_SMS))
        for module, name, label in KERNELS:
            stack.enter_context(mock.patch.object(module, name, Recorder(getattr(module, name), label)))
        q = qkv_rope.qkv_rope_write_kv_triton(
            h, w.qkv, cos, cos, start, pool, pool.clone(), table, n_heads=n_qh, n_kv_heads=n_kvh, row_norm=True
        )
        att = attention.paged_attention_triton(q, pool, pool.clone(), table, start, dim**-0.5)
        h1 = linear.fused_linear_triton(att.reshape(rows, tokens, -1), w.o, residual=h)
        act = linear.fused_linear_triton(h1, gate_up, norm_weight=w.post_norm, gated=True, weight_scale=gu_scale)
        linear.fused_linear_triton(act, down, residual=h1, weight_scale=dn_scale)
        decode_layer.decode_layer_triton(h, w, cos, cos.clone(), start, pool, pool.clone(), table, **kw)
    fused = launches[-1]
    if args.loop:
        launches.append((*fused[:3], {**fused[3], "ONE_ITEM": not fused[3]["ONE_ITEM"], "PREFETCH": False}, *fused[4:]))
    if args.prefetch and fused[3]["ONE_ITEM"]:
        launches.append((*fused[:3], {**fused[3], "PREFETCH": True}, *fused[4:]))
    return launches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2, help="sequences (particles x requests)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per row (a cycle's first draft step feeds 2)")
    ap.add_argument("--context", type=int, default=160, help="tokens already in each row's cache")
    arch = SMOLLM2_135M  # the defaults: the embedded model's layer
    ap.add_argument("--hidden", type=int, default=arch["hidden_size"])
    ap.add_argument("--heads", type=int, default=arch["num_attention_heads"])
    ap.add_argument("--kv-heads", type=int, default=arch["num_key_value_heads"])
    ap.add_argument("--head-dim", type=int, default=arch["hidden_size"] // arch["num_attention_heads"])
    ap.add_argument("--intermediate", type=int, default=arch["intermediate_size"])
    ap.add_argument("--loop", action="store_true", help="also the fused kernel's other item form")
    ap.add_argument("--prefetch", action="store_true", help="also the fused kernel with its L2 weight prefetch")
    args = ap.parse_args()
    print("| kernel | launch | KV splits | warps | stages | registers | spill stores / loads, bytes | blocks a SM |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    names = ["QKV", "attention", "o", "gate/up", "down"]
    for i, (label, fn, a, const, warps, stages) in enumerate(record(args)):
        name = names[i] if i < len(names) else ("one item a program" if const["ONE_ITEM"] else "items in a loop")
        name += ", L2 prefetch" if const.get("PREFETCH") else ""
        r = assemble(fn, a, const, warps, stages)
        print(
            f"| {label} | {name} | {const.get('NSPLIT', '-')} | {warps} | {stages} | {r['registers']} "
            f"| {r['spill_stores']} / {r['spill_loads']} | {r['blocks_per_sm']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
