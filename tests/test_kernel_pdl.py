"""Programmatic dependent launch (PDL) of the decode kernels.

On the CPU the kernels cannot run with PDL (the interpreter has no ``griddepcontrol``), so the CPU
check compiles them for an H100 with Triton's bundled ptxas and reads the PTX: each kernel waits
for its predecessor before its first global load, store or atomic and lets its successor launch
only after that wait. On CUDA a chain of PDL kernels replayed in a CUDA graph gives bit-for-bit the results of
the same chain without PDL: only the scheduling may change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smcgen.kernels import _triton
from smcgen.kernels._triton import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@needs_triton
def test_pdl_kernels_compile_for_hopper_with_the_wait_first():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("hopper_ptx.py"))],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = {f["kernel"]: f for f in map(json.loads, done.stdout.splitlines())}
    # every kernel that takes a PDL flag
    assert set(kernels) == {
        "skinny_linear",
        "skinny_linear_swapped",
        "qkv_rope",
        "paged_attention",
        "rms_norm",
        "rope_qk_write_kv",
        "silu_mul",
        "paged_attention_cascade",
        "prefix_attention",
        "prefix_attention_adjacent",
        "prefix_attention_one_split",
        "decode_layer",
        "decode_layer_prefetch",
    }
    for name, f in kernels.items():
        assert 0 <= f["wait"] < f["launch_dependents"], name
        assert f["first_access"] > f["wait"], f"{name} touches memory before waiting on its predecessor"
    # the one-launch layer lets its successor launch only past its first grid barrier, when every
    # program of its grid is resident (a successor's programs could otherwise take their SMs)
    for name in ("decode_layer", "decode_layer_prefetch"):
        layer = kernels[name]
        assert 0 <= layer["first_atomic"] < layer["launch_dependents"], name
        assert layer["trap"] >= 0, f"{name}: a barrier that waits too long must trap, not hang"
    # its L2 prefetches of weights (constants) may come before the wait; without the option, none
    assert kernels["decode_layer"]["prefetch"] == -1
    assert 0 <= kernels["decode_layer_prefetch"]["prefetch"] < kernels["decode_layer_prefetch"]["wait"]


def test_pdl_switches():
    assert not _triton.pdl_enabled(torch.zeros(1)), "never for CPU tensors"
    with _triton.pdl_scope(False):
        with _triton.pdl_scope(True):
            assert _triton._PDL
            with _triton.pdl_scope(None):  # None keeps the setting
                assert _triton._PDL
        assert not _triton._PDL, "the scope restores the setting"
        with pytest.raises(RuntimeError), _triton.pdl_scope(True):
            raise RuntimeError
        assert not _triton._PDL, "... also when the block raises"


@needs_triton
def test_pdl_chain_in_a_cuda_graph_equals_the_plain_chain(device, monkeypatch):
    if device.type != "cuda":
        pytest.skip("PDL runs on CUDA only; the CPU test above checks the compiled kernels instead")
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("this GPU has no programmatic dependent launch (needs sm_90+)")
    from smcgen.kernels.fused_ops import rms_norm
    from smcgen.kernels.linear import fused_linear_triton

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden, inter, layers = 1024, 2048, 6

    def w(n, k):
        return (torch.randn(n, k, generator=g) * k**-0.5).to(device, torch.bfloat16)

    weights = [(w(2 * inter, hidden), w(hidden, inter), torch.rand(hidden, generator=g).to(device, torch.bfloat16) + 0.5)
               for _ in range(layers)]  # fmt: skip
    x = torch.randn(8, hidden, generator=g).to(device, torch.bfloat16)
    counters = torch.zeros(4096, dtype=torch.int32, device=device)

    def chain():
        h = x
        for up, down, norm in weights:
            mlp = fused_linear_triton(h, up, norm_weight=norm, gated=True, counters=counters)
            h = fused_linear_triton(mlp, down, residual=h, plan=(16, 64, 128, 4, 3, 4, False), counters=counters)
            h = rms_norm(h, norm, 1e-5)
        return h

    def replay():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        outs = []
        for _ in range(3):
            graph.replay()
            outs.append(out.clone())
        return outs

    monkeypatch.setattr(_triton, "_PDL", False)
    plain = chain()
    monkeypatch.setattr(_triton, "_PDL", True)
    for out in replay():
        assert torch.equal(out, plain)
    assert int(counters.abs().sum()) == 0


def test_model_with_pdl_equals_the_model_without(device):
    """A whole model forward (norm folded into QKV, RoPE + KV write, split-KV attention merged in
    the kernel, skinny linear layers) with PDL, eager for prefill and a CUDA graph for decode steps,
    gives bit-for-bit the logits and cache of the same model without PDL."""
    if device.type != "cuda":
        pytest.skip("PDL runs on CUDA only; the CPU test above checks the compiled kernels instead")
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("this GPU has no programmatic dependent launch (needs sm_90+)")
    from transformers import LlamaConfig

    from smcgen.runners.native import NativeCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
    )
    model = NativeCausalLM.from_config(config, torch.bfloat16, device, seed=3)
    assert model.input_norm_folded
    rows, prompt, steps = 4, 600, 3  # 600 keys over 1024 slots: the attention splits 4 ways
    tokens = torch.randint(0, 512, (rows, prompt + steps), generator=torch.Generator().manual_seed(0)).to(device)

    def run(pdl: bool):
        model.pdl = pdl
        cache = model.make_cache(n_pages=rows * 64, n_rows=rows, max_pages=64, page_size=16)
        cache.reserve(prompt)
        start = torch.zeros(rows, dtype=torch.int32, device=device)
        logits = [model(tokens[:, :prompt], start, cache, last_only=True)]
        pos = torch.full((rows,), prompt, dtype=torch.int32, device=device)
        step_in = tokens[:, prompt : prompt + 1].clone()
        cache.reserve(prompt + steps)
        model(step_in, pos, cache, last_only=True)  # compile outside the capture (rewritten below)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(step_in, pos, cache, last_only=True)
        for s in range(steps):
            step_in.copy_(tokens[:, prompt + s : prompt + s + 1])
            pos.fill_(prompt + s)
            graph.replay()
            logits.append(out.clone())
        return torch.stack(logits), cache.k_pool.clone(), cache.v_pool.clone()

    plain, with_pdl = run(False), run(True)
    for a, b in zip(plain, with_pdl, strict=True):
        assert torch.equal(a, b)
    assert int(model.attn_counters.abs().sum()) == 0 and int(model.linear_counters.abs().sum()) == 0
