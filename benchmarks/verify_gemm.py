"""cuBLAS orientations for the verify's GEMMs (GPU host): ``x @ W.T`` against ``(W @ x.T).T``.

The SMC-SD verify multiplies N*(K+1) rows (72 at N=8 K=8) by every target weight; cuBLAS picks
its kernel from the problem's orientation, so the transposed product may stream the weights
faster. Per layer kind of Llama-3.1-8B, all 32 layers' distinct weights in one CUDA graph (cold
in L2), median of graph replays.

    python benchmarks/verify_gemm.py --rows 64 72 80
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from skinny_gemm import graph_ms  # noqa: E402  (benchmarks/ on sys.path when run as a script)

KINDS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[72])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "verify_gemm.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    print("| kind | M | x @ W.T ms | (W @ x.T).T ms | TB/s (best) |")
    print("|---|---:|---:|---:|---:|")
    for kind, (n, k) in KINDS.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(args.layers)]
        for m in args.rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            plain = graph_ms(lambda: [torch.nn.functional.linear(x, w) for w in ws])
            swapped = graph_ms(lambda: [torch.mm(w, x.t()).t() for w in ws])
            gb = args.layers * n * k * 2 / 1e9
            result["rows"].append({"kind": kind, "M": m, "linear_ms": plain, "swapped_ms": swapped, "GB": gb})
            print(f"| {kind} | {m} | {plain:.3f} | {swapped:.3f} | {gb / min(plain, swapped):.2f} |", flush=True)
        ws.clear()  # frees this kind's weights before the next
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
