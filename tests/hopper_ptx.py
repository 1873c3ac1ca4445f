"""Compile smcgen's PDL kernels for an H100 (sm_90) on a machine without a GPU; print their PTX facts.

Run as a script without TRITON_INTERPRET (the interpreter replaces the kernels it compiles):
``python tests/hopper_ptx.py`` prints one JSON object per kernel with the offsets of its first
``griddepcontrol.wait`` / ``griddepcontrol.launch_dependents`` / global memory access (load,
store or atomic) in the PTX (-1: absent).
Triton ships ptxas, so the PTX is also assembled: an instruction sm_90 lacks fails here.
"""

from __future__ import annotations

import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from smcgen.kernels import attention, decode_layer, fused_ops, linear, qkv_rope

HOPPER = GPUTarget("cuda", 90, 32)


def signature(fn, constexprs: dict, pointers: dict, floats: tuple[str, ...]) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def facts(name, fn, constexprs, pointers, floats=(), **options) -> dict:
    src = ASTSource(fn, signature(fn, constexprs, pointers, floats), constexprs)
    ptx = triton.compile(src, target=HOPPER, options={"launch_pdl": True, **options}).asm["ptx"]
    body = ptx[ptx.index(".entry") :]
    return {
        "kernel": name,
        "wait": body.find("griddepcontrol.wait"),
        "launch_dependents": body.find("griddepcontrol.launch_dependents"),
        "first_atomic": body.find("atom."),
        "prefetch": body.find("prefetch.global.L2"),
        "trap": body.find("trap;"),
        "first_access": min(
            (i for i in (body.find(op) for op in ("ld.global", "st.global", "atom.", "red.", "cp.async")) if i >= 0),
            default=-1,
        ),
    }


def main() -> None:
    bf16 = "*bf16"
    skinny = {
        "HAS_BIAS": False,
        "HAS_SCALE": True,
        "HAS_NORM": True,
        "HAS_RES": True,
        "GATED": True,
        "EVEN_N": True,
        "EVEN_K": True,
        "IEEE": False,
        "SPLIT": 2,
        "SLOT": 2 * 16 * 64 + 16,
        "BLOCK_M": 16,
        "BLOCK_N": 64,
        "BLOCK_K": 128,
        "SWAP": False,
        "PDL": True,
    }
    ptrs = {
        "x": bf16,
        "w": "*fp8e4nv",
        "w_scale": "*fp32",
        "b": bf16,
        "g": bf16,
        "res": bf16,
        "out": bf16,
        "ws": "*fp32",
        "counters": "*i32",
    }
    print(
        json.dumps(
            facts("skinny_linear", linear._skinny_linear_kernel, skinny, ptrs, ("eps",), num_warps=4, num_stages=3)
        )
    )
    # the default operand order (SWAP) on bf16 weights, 8 padded rows
    swapped = {**skinny, "HAS_SCALE": False, "BLOCK_M": 8, "SWAP": True}
    print(
        json.dumps(
            facts(
                "skinny_linear_swapped",
                linear._skinny_linear_kernel,
                swapped,
                {**ptrs, "w": bf16},
                ("eps",),
                num_warps=4,
                num_stages=3,
            )
        )
    )
    fused = {
        "HAS_BIAS": True,
        "HAS_SCALE": False,
        "HAS_NORM": False,
        "ROW_NORM": True,
        "QK_NORM": True,
        "EVEN_K": True,
        "IEEE": False,
        "SWAP": True,
        "BLOCK_M": 16,
        "D": 64,
        "BLOCK_K": 256,
        "PAGE": 16,
        "PDL": True,
    }
    ptrs_f = {n: bf16 for n in ("x", "w", "b", "g", "cos", "sin", "q_out", "k_pool", "v_pool", "q_norm", "k_norm")}
    print(
        json.dumps(
            facts(
                "qkv_rope",
                qkv_rope._qkv_rope_kernel,
                fused,
                {**ptrs_f, "w_scale": "*fp32", "bt": "*i32", "start_pos": "*i32"},
                ("eps",),
                num_warps=4,
                num_stages=4,
            )
        )
    )
    attn = {
        "G": 4,
        "D": 128,
        "PAGE": 16,
        "BLOCK_M": 16,
        "BLOCK_N": 128,
        "NSPLIT": 4,
        "NSPLIT_P2": 4,
        "IEEE": False,
        "PDL": True,
        "CASCADE": False,
        "NSLOT": 4,
    }
    ptrs = {
        "q": bf16,
        "k_pool": bf16,
        "v_pool": bf16,
        "bt": "*i32",
        "start_pos": "*i32",
        "out": bf16,
        "part_o": "*fp32",
        "part_lse": "*fp32",
        "counters": "*i32",
        "prefix_len": "*i32",
    }
    print(
        json.dumps(
            facts(
                "paged_attention",
                attention._paged_attention_kernel,
                attn,
                ptrs,
                ("qk_scale",),
                num_warps=4,
                num_stages=2,
            )
        )
    )
    # cascade attention: the suffix (the same kernel, CASCADE) and the prefix kernel with its merge
    print(
        json.dumps(
            facts(
                "paged_attention_cascade",
                attention._paged_attention_kernel,
                {**attn, "CASCADE": True, "NSLOT": 12},
                ptrs,
                ("qk_scale",),
                num_warps=4,
                num_stages=2,
            )
        )
    )
    prefix = {
        "G": 4,
        "D": 128,
        "PAGE": 16,
        "BLOCK_M": 128,
        "BLOCK_N": 32,
        "NSPLIT": 8,
        "SLOT0": 4,
        "NSLOT": 12,
        "NSLOT_P2": 16,
        "IEEE": False,
        "PDL": True,
        "MERGE_PER_ITER": 2,
    }
    print(
        json.dumps(
            facts(
                "prefix_attention",
                attention._prefix_attention_kernel,
                prefix,
                ptrs,
                ("qk_scale",),
                num_warps=8,
                num_stages=3,
            )
        )
    )
    # the grid order the library launches for one request and for 64-row tiles (prefix_tiles_adjacent)
    print(
        json.dumps(
            facts(
                "prefix_attention_adjacent",
                attention._prefix_attention_kernel,
                {**prefix, "BLOCK_M": 64, "BLOCK_N": 64, "MERGE_PER_ITER": 8, "TILES_ADJACENT": True},
                ptrs,
                ("qk_scale",),
                num_warps=4,
                num_stages=3,
            )
        )
    )
    # one prefix split (no counter election), the draft's 64-wide heads, the merge unrolled 8 slots a step
    print(
        json.dumps(
            facts(
                "prefix_attention_one_split",
                attention._prefix_attention_kernel,
                {
                    **prefix,
                    "D": 64,
                    "BLOCK_M": 32,
                    "BLOCK_N": 64,
                    "NSPLIT": 1,
                    "SLOT0": 2,
                    "NSLOT": 3,
                    "NSLOT_P2": 4,
                    "MERGE_PER_ITER": 8,
                },
                ptrs,
                ("qk_scale",),
                num_warps=4,
                num_stages=3,
            )
        )
    )
    norm = {"BLOCK": 4096, "SINGLE": True, "PDL": True}
    print(
        json.dumps(
            facts(
                "rms_norm", fused_ops._rms_norm_kernel, norm, {"x": bf16, "w": bf16, "out": bf16}, ("eps",), num_warps=8
            )
        )
    )
    rope = {
        "D": 128,
        "BLOCK_D": 128,
        "BLOCK_HQ": 32,
        "BLOCK_HK": 8,
        "HAS_NORM": True,
        "ROW_NORM": True,
        "BLOCK_X": 4096,
        "PAGE": 16,
        "PDL": True,
    }
    ptrs = {n: bf16 for n in ("q", "k", "v", "q_out", "k_pool", "v_pool", "cos", "sin", "q_norm", "k_norm", "xs")}
    print(
        json.dumps(
            facts(
                "rope_qk_write_kv",
                fused_ops._rope_qk_kernel,
                rope,
                {**ptrs, "bt": "*i32", "start_pos": "*i32"},
                ("eps",),
                num_warps=8,
            )
        )
    )
    silu = {"BLOCK": 1024, "PDL": True}
    print(json.dumps(facts("silu_mul", fused_ops._silu_mul_kernel, silu, {"gate_up": bf16, "out": bf16}, num_warps=4)))
    # the one-launch decoder layer as the SmolLM2-135M self-int8 draft's step plans it (2 rows at a
    # 160-token context: bf16 QKV and o, int8 gate/up and down; benchmarks/decode_layer_registers.py)
    layer = {
        "FIRST": 0, "LAST": 4, "ONE_ITEM": True, "PREFETCH": False, "HAS_NORM": False, "ROW_NORM": True, "QK_NORM": False,
        "A_BIAS": False, "A_SCALE": False, "A_EVEN_K": False, "A_SWAP": True, "A_M": 16, "A_K": 256,
        "IEEE": False, "D": 64, "PAGE": 16, "G": 3, "B_M": 16, "B_N": 64, "NSPLIT": 2, "NSPLIT_P2": 2,
        "PDL": True,
    }  # fmt: skip
    plans = (("O", False, 1, 0, 16, 256), ("GU", True, 3, 1032, 8, 128), ("DN", True, 4, 520, 8, 128))
    for prefix, scaled, split, slot, block_m, block_k in plans:
        layer.update({
            f"{prefix}_BIAS": False, f"{prefix}_SCALE": scaled, f"{prefix}_EVEN_N": True,
            f"{prefix}_EVEN_K": prefix == "DN", f"{prefix}_SPLIT": split, f"{prefix}_SLOT": slot,
            f"{prefix}_M": block_m, f"{prefix}_N": 64, f"{prefix}_K": block_k, f"{prefix}_SWAP": True,
        })  # fmt: skip
    one_byte = {n: "*i8" for n in ("gu", "dn")}
    fp32 = {n: "*fp32" for n in ("gu_scale", "dn_scale", "part_o", "part_lse")}
    fp32.update({n: "*fp32" for n in ("o_ws", "gu_ws", "dn_ws")})
    ints = {"start_pos": "*i32", "bt": "*i32", "counters": "*i32"}
    ptrs = {n: bf16 for n in decode_layer._decode_layer_kernel.arg_names} | one_byte | fp32 | ints
    scalars = {"c_attn", "c_o", "c_gu", "c_dn", "M", "H", "T", "n_qh", "n_kvh", "QS", "INTER", "s_qkv", "s_o"}
    scalars |= {"s_gu", "s_dn", "s_pos", "s_pp", "s_ps", "s_ph", "max_pages", "qk_scale", "n_qblocks", "eps"}
    scalars |= {"o_kper", "gu_kper", "dn_kper", "o_tiles", "gu_tiles", "dn_tiles"}
    ptrs = {n: t for n, t in ptrs.items() if n not in scalars}
    # and with its weight tiles prefetched into L2 before the wait (decode_layer.PREFETCH_WEIGHTS)
    for name, prefetch in (("decode_layer", False), ("decode_layer_prefetch", True)):
        print(
            json.dumps(
                facts(
                    name,
                    decode_layer._decode_layer_kernel,
                    {**layer, "PREFETCH": prefetch},
                    ptrs,
                    ("qk_scale", "eps"),
                    num_warps=4,
                    num_stages=3,
                )
            )
        )


if __name__ == "__main__":
    main()
