"""Registers and spills of the attention kernels on an H100 (sm_90), compiled on a machine without a GPU.

Triton compiles each kernel for sm_90 with the specialization a real launch gets (pointers and the
K/V and query strides divisible by 16, which is what turns the page gathers into 16-byte
``cp.async`` copies), and the ptxas that Triton ships assembles it with ``-v``. That prints the
registers per thread and the bytes spilled to local memory. Run it after changing a kernel or a
launch setting, before spending GPU time on it:

    python benchmarks/kernel_registers.py

Each row is one launch setting of ``_prefix_attention_kernel`` or ``_paged_attention_kernel`` as
the engine makes it for Llama-3.1-8B's verify (9 queries a row, 32 query / 8 KV heads of 128) and
Llama-3.2-1B's draft step (heads of 64), with variants of the merge's slots per step. Blocks per SM
are what the registers allow: 65,536 a SM, in 256-register units per warp.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the kernels

import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hopper_ptx import HOPPER, signature  # noqa: E402

from smcgen.kernels import attention  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
POINTERS = {n: "*bf16" for n in ("q", "k_pool", "v_pool", "out")} | {
    "bt": "*i32",
    "start_pos": "*i32",
    "prefix_len": "*i32",
    "part_o": "*fp32",
    "part_lse": "*fp32",
    "counters": "*i32",
}
#: what a launch on the engine's tensors specializes as divisible by 16
ALIGNED = set(POINTERS) | {f"s_{a}{b}" for a in "qkvo" for b in ("r", "t", "h", "p", "s")}

PREFIX = dict(G=4, PAGE=16, SLOT0=2, NSLOT=8, NSLOT_P2=8, IEEE=False, PDL=True, TILES_ADJACENT=True)
PLAIN = dict(G=4, PAGE=16, IEEE=False, PDL=True, CASCADE=False, NSLOT=1)
#: (row label, kernel, constexprs, warps, stages)
SETTINGS = [
    ("prefix, 8B verify, 64-row tiles (the launch)", "prefix", dict(PREFIX, D=128, BLOCK_M=64, BLOCK_N=64, NSPLIT=6, MERGE_PER_ITER=8), 4, 3),
    ("prefix, 8B verify, 64-row tiles, merge 2 slots a step", "prefix", dict(PREFIX, D=128, BLOCK_M=64, BLOCK_N=64, NSPLIT=6, MERGE_PER_ITER=2), 4, 3),
    ("prefix, 8B verify, 64-row tiles, 8 warps", "prefix", dict(PREFIX, D=128, BLOCK_M=64, BLOCK_N=64, NSPLIT=6, MERGE_PER_ITER=8), 8, 3),
    ("prefix, 8B verify, 128-row tiles (before 2026-12-07)", "prefix", dict(PREFIX, D=128, BLOCK_M=128, BLOCK_N=32, NSPLIT=6, MERGE_PER_ITER=2), 8, 3),
    ("prefix, 1B draft step, 16-row tiles (the launch)", "prefix", dict(PREFIX, D=64, BLOCK_M=16, BLOCK_N=128, NSPLIT=4, MERGE_PER_ITER=8), 4, 2),
    ("plain, 8B verify, 1 x 8 (4 key splits)", "plain", dict(PLAIN, D=128, BLOCK_M=64, BLOCK_N=64, NSPLIT=4, NSPLIT_P2=4), 4, 3),
    ("plain, 8B verify, 8 x 8 (no split)", "plain", dict(PLAIN, D=128, BLOCK_M=64, BLOCK_N=64, NSPLIT=1, NSPLIT_P2=1), 4, 3),
    ("plain, 1B draft step (4 key splits)", "plain", dict(PLAIN, D=64, BLOCK_M=16, BLOCK_N=64, NSPLIT=4, NSPLIT_P2=4), 4, 2),
]  # fmt: skip
KERNELS = {"prefix": "_prefix_attention_kernel", "plain": "_paged_attention_kernel"}


def assemble(kernel: str, constexprs: dict, warps: int, stages: int) -> dict:
    """Registers a thread and spill bytes of one launch setting, from ptxas -v on Triton's sm_90 PTX."""
    fn = getattr(attention, KERNELS[kernel])
    sig = signature(fn, constexprs, POINTERS, ("qk_scale",))
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ALIGNED}
    ptx = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=HOPPER, options={"num_warps": warps, "num_stages": stages}).asm["ptx"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run([str(PTXAS), "-v", "--gpu-name=sm_90a", str(path), "-o", os.devnull], capture_output=True, text=True)  # fmt: skip
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas gave no register report for {kernel}: {text[-500:]}")
    n_regs = int(regs.group(1))
    per_block = -(-n_regs * 32 // 256) * 256 * warps  # registers are allocated per warp in units of 256
    return {
        "registers": n_regs,
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "blocks_per_sm": 65536 // per_block,
        "cp_async": ptx.count("cp.async."),
    }


def main() -> None:
    print("| launch setting | warps | stages | registers | spill stores / loads, bytes | blocks a SM |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, kernel, constexprs, warps, stages in SETTINGS:
        r = assemble(kernel, constexprs, warps, stages)
        print(
            f"| {label} | {warps} | {stages} | {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | "
            f"{r['blocks_per_sm']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
