"""fp32 prefill attention: time paged_attention_triton's tile choices for SmolLM2 shapes (one-off)."""

import json
import os

import torch

import smcgen.kernels.attention as A

dev = torch.device("cuda")
orig = A._launch_config
res = []


def variant(cap, bn, warps):
    def cfg(packed, dim, max_block_m=128):
        bm, bn0, w, st = orig(packed, dim)
        if cap is None:
            return bm, bn0, w, st
        bm = min(bm, cap)
        return bm, bn, warps, st

    return cfg


page = 16
for T in (32, 64, 128, 256):
    torch.manual_seed(0)
    pages = (T + page - 1) // page + 1
    q = torch.randn(1, T, 9, 64, device=dev)
    kp = torch.randn(pages, page, 3, 64, device=dev)
    vp = torch.randn(pages, page, 3, 64, device=dev)
    bt = torch.arange(pages, device=dev, dtype=torch.int32)[None]
    sp = torch.zeros(1, dtype=torch.int32, device=dev)
    ref = A.paged_attention_torch(q, kp, vp, bt, sp, 0.125)
    for name, cap, bn, w in (
        ("default", None, 0, 0),
        ("m64n32w4", 64, 32, 4),
        ("m32n32w4", 32, 32, 4),
        ("m32n64w4", 32, 64, 4),
        ("m16n64w4", 16, 64, 4),
        ("m16n32w2", 16, 32, 2),
        ("m32n32w2", 32, 32, 2),
    ):
        A._launch_config = variant(cap, bn, w)
        out = A.paged_attention_triton(q, kp, vp, bt, sp, 0.125, max_keys=T)
        err = (out - ref).abs().max().item()
        for _ in range(3):
            A.paged_attention_triton(q, kp, vp, bt, sp, 0.125, max_keys=T)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        for _ in range(50):
            A.paged_attention_triton(q, kp, vp, bt, sp, 0.125, max_keys=T)
        e.record()
        torch.cuda.synchronize()
        us = s.elapsed_time(e) / 50 * 1000
        res.append(dict(T=T, variant=name, us=round(us, 1), max_err=err))
        print(T, name, f"{us:.1f} us", f"err {err:.2e}", flush=True)
    qs = q[0].transpose(0, 1)[None]
    ks = kp.reshape(-1, 3, 64)[:T].transpose(0, 1)[None]
    vs = vp.reshape(-1, 3, 64)[:T].transpose(0, 1)[None]
    for be in ("efficient", "math"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        bk = SDPBackend.EFFICIENT_ATTENTION if be == "efficient" else SDPBackend.MATH
        try:
            with sdpa_kernel(bk):

                def f():
                    return torch.nn.functional.scaled_dot_product_attention(
                        qs, ks, vs, is_causal=True, scale=0.125, enable_gqa=True
                    )

                f()
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(True), torch.cuda.Event(True)
                s.record()
                for _ in range(50):
                    f()
                e.record()
                torch.cuda.synchronize()
            us = s.elapsed_time(e) / 50 * 1000
            res.append(dict(T=T, variant="sdpa_" + be, us=round(us, 1)))
            print(T, "sdpa_" + be, f"{us:.1f} us", flush=True)
        except Exception as ex:
            print(T, be, "failed", ex)
A._launch_config = orig
out = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out, "attn_fp32.json"), "w"), indent=1)
