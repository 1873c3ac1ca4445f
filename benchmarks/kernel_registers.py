"""Registers and spills of the attention kernels on an H100 (sm_90), compiled on a machine without a GPU.

The launch settings are the library's own: one layer's plain and cascade attention is called on CPU
tensors of the engine's shapes (``cascade_speed.layer_calls``: Llama-3.1-8B's verify, 9 queries a
row, 32 query / 8 KV heads of 128; Llama-3.2-1B's draft step, heads of 64; 1 and 8 requests of 8
rows at a 4,096-token prompt) with the GPU dispatch and an H100's 132 SMs patched in, and each
kernel launch it would make is recorded instead of run. Triton then compiles each recorded launch
for sm_90 with the specialization its arguments get on a GPU (every pointer 16-byte aligned, an
integer equal to 1 a constant, one divisible by 16 marked so, which turns the page gathers into
16-byte ``cp.async`` copies; the kernel's constexpr defaults; PDL on), and the ptxas Triton ships
assembles it with ``-v``: registers per thread and bytes spilled to local memory.
``--merge-per-iter 2`` also shows the prefix kernel with its small tiles merging 2 slots a step.
Run it after changing a kernel or a launch setting, before spending GPU time on it:

    python benchmarks/kernel_registers.py --merge-per-iter 2

Blocks per SM are what the registers allow: 65,536 a SM, allocated per warp in units of 256.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cascade_speed import layer_calls  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from smcgen.kernels import attention  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
HOPPER = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int8: "*i8",
}
H100_SMS = 132
SHAPES = {"8B verify": (9, 32, 8, 128), "1B draft step": (1, 32, 8, 64)}
KERNELS = {"_prefix_attention_kernel": "prefix", "_paged_attention_kernel": "plain"}


@contextmanager
def recorded_launches(merge_per_iter: int | None):
    """Patch attention so its Triton calls run on CPU tensors as on an H100, recording each kernel
    launch (kernel, positional arguments, constexprs, warps, stages) instead of running it."""
    saved = {n: getattr(attention, n) for n in ("_sms", "use_triton", "MERGE_PER_ITER_SMALL", *KERNELS)}
    launches: list[tuple[str, tuple, dict, int, int]] = []

    class Recorder:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, launch_pdl=False, **constexprs):
                launches.append((self.name, args, {**constexprs, "PDL": True}, num_warps, num_stages))

            return launch

    attention._sms = lambda device: H100_SMS
    attention.use_triton = lambda t: True
    if merge_per_iter is not None:
        attention.MERGE_PER_ITER_SMALL = merge_per_iter
    for name in KERNELS:
        setattr(attention, name, Recorder(name))
    try:
        yield launches
    finally:
        for name, value in saved.items():
            setattr(attention, name, value)


def launch_settings(call: str, requests: int, prompt: int, merge_per_iter: int | None = None):
    """The launches of one layer's plain and cascade attention for ``call`` (see ``SHAPES``)."""
    with recorded_launches(merge_per_iter) as launches:
        plain, cascade = layer_calls(
            prompt, requests, 8, *SHAPES[call], cascade_kw={"prefix_splits": None}, device="cpu", dtype=torch.bfloat16
        )
        plain()
        n_plain = len(launches)
        cascade()
    return [("plain" if i < n_plain else "cascade", *launch) for i, launch in enumerate(launches)]


def specialize(fn, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) of a launch of ``fn`` with these arguments, as Triton's JIT
    specializes them on a GPU: pointers aligned to 16 bytes (the caching allocator's blocks), integers
    equal to 1 turned into constants, integers divisible by 16 marked so, constexpr defaults filled in."""
    const = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default} | constexprs
    sig, attrs = {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            sig[name], attrs[(i,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in fn.arg_names[len(args) :]:
        sig[name] = "constexpr"
    return sig, const, attrs


def assemble(kernel, args: tuple, constexprs: dict, warps: int, stages: int) -> dict:
    """Registers a thread and spill bytes of one recorded launch, from ptxas -v on Triton's sm_90 PTX
    (``kernel``: an attention kernel's name or any ``@triton.jit`` function)."""
    fn = getattr(attention, kernel) if isinstance(kernel, str) else kernel
    sig, const, attrs = specialize(fn, args, constexprs)
    ptx = triton.compile(ASTSource(fn, sig, const, attrs), target=HOPPER, options={"num_warps": warps, "num_stages": stages}).asm["ptx"]  # fmt: skip
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
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=4096, help="shared prefix length (tokens)")
    ap.add_argument("--merge-per-iter", default="", help="also these MERGE_PER_ITER_SMALL values, comma separated")
    args = ap.parse_args()
    variants = [None] + [int(x) for x in args.merge_per_iter.split(",") if x]
    print("| call | requests | path | kernel | tile (rows x keys) | splits | merge slots a step | warps | stages "
          "| registers | spill stores / loads, bytes | blocks a SM |")  # fmt: skip
    print("|---|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    seen = set()
    for variant in variants:
        for call in SHAPES:
            for requests in (1, 8):
                for path, kernel, launch_args, const, warps, stages in launch_settings(
                    call, requests, args.prompt, variant
                ):
                    if variant is not None and kernel != "_prefix_attention_kernel":
                        continue  # the merge setting changes only the prefix kernel
                    scalars = tuple(a for a in launch_args if not isinstance(a, torch.Tensor))
                    key = (kernel, scalars, tuple(sorted(const.items())), warps, stages)
                    merge = str(const.get("MERGE_PER_ITER", "-")) if kernel == "_prefix_attention_kernel" else "-"
                    if key in seen:
                        continue
                    seen.add(key)
                    r = assemble(kernel, launch_args, const, warps, stages)
                    print(
                        f"| {call} | {requests} | {path} | {KERNELS[kernel]} | {const['BLOCK_M']} x {const['BLOCK_N']} "
                        f"| {const['NSPLIT']} | {merge} | {warps} | {stages} | {r['registers']} "
                        f"| {r['spill_stores']} / {r['spill_loads']} | {r['blocks_per_sm']} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
