"""decode_layer: a whole decoder layer of a decode step in one launch, against the five launches it fuses.

The fused kernel runs the five kernels' own work items (``qkv_rope_head``, ``paged_attention_tile``,
``skinny_linear_tile``) with their plans, so on the CPU interpreter its output and the K/V it writes
equal those of the five separate Triton launches bit for bit; against the torch twins it agrees
to the dtype's rounding. The one-launch form (grid barriers) runs one program on the interpreter;
the five-launch form runs several programs per phase (three, each taking several items, or one
per item of the largest phase), which exercises the work split and the last-arriving-program
merges. Cases: fp32 and fp16 activations; weights in the activations' dtype, int8 and fp8 (split-K
phases); one and two tokens per row; attention with one and with three KV splits; the input norm
folded or not, with a QKV bias and Qwen3's q/k norms. On CUDA (``SMCGEN_TEST_DEVICE=cuda``) also
bf16, one launch with many programs at once, the grid barrier alone, and a model's decode step.
"""

from __future__ import annotations

import pytest
import torch

from smcgen.kernels._triton import HAS_TRITON
from smcgen.kernels.attention import paged_attention_triton
from smcgen.kernels.decode_layer import MAX_ROWS, DecodeLayerWeights, decode_layer_torch, decode_layer_triton
from smcgen.kernels.linear import fused_linear_triton, quantize_fp8, quantize_int8
from smcgen.kernels.qkv_rope import qkv_rope_write_kv_triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

N_QH, N_KVH, D, HIDDEN, INTER, PAGE, MAX_PAGES = 4, 2, 64, 128, 192, 4, 16
EPS = 1e-5
SCALE = D**-0.5


def rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def make_weights(dtype, device, *, quant: str | None, folded: bool = True, qwen: bool = False) -> DecodeLayerWeights:
    """A random layer; ``quant`` 'int8' / 'fp8': every projection stored so, with row scales."""

    def mat(n, k, seed):
        return rand((n, k), dtype, seed, k**-0.5)

    w = {
        "qkv": mat((N_QH + 2 * N_KVH) * D, HIDDEN, 1),
        "o": mat(HIDDEN, N_QH * D, 2),
        "gate_up": mat(2 * INTER, HIDDEN, 3),
        "down": mat(HIDDEN, INTER, 4),
        "post_norm": rand((HIDDEN,), dtype, 5, 0.2) + 1,
    }
    if not folded:
        w["input_norm"] = rand((HIDDEN,), dtype, 6, 0.2) + 1
    if qwen:
        w["qkv_bias"] = rand(((N_QH + 2 * N_KVH) * D,), dtype, 7, 0.3)
        w["q_norm"] = rand((D,), dtype, 8, 0.2) + 1
        w["k_norm"] = rand((D,), dtype, 9, 0.2) + 1
    if quant is not None:
        quantize = {"int8": quantize_int8, "fp8": quantize_fp8}[quant]
        for name in ("qkv", "o", "gate_up", "down"):
            w[name], w[f"{name}_scale"] = quantize(w[name])
    return DecodeLayerWeights(**{k: v.to(device) for k, v in w.items()})


def make_state(dtype, device, n_rows, n_new, seed=0):
    """(h, start, cos, sin, k_pool, v_pool, table) on ``device``: earlier context already in the pools."""
    h = rand((n_rows, n_new, HIDDEN), dtype, seed + 10, 2.0)
    start = torch.tensor([5, 22, 37][:n_rows], dtype=torch.int32)
    inv = 1.0 / (500.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(MAX_PAGES * PAGE, dtype=torch.float)[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)
    k_pool = rand((n_rows * MAX_PAGES, PAGE, N_KVH, D), dtype, seed + 11)
    v_pool = rand((n_rows * MAX_PAGES, PAGE, N_KVH, D), dtype, seed + 12)
    perm = torch.randperm(n_rows * MAX_PAGES, generator=torch.Generator().manual_seed(seed))
    table = perm.view(n_rows, MAX_PAGES).to(torch.int32).contiguous()
    state = (h, start, emb.cos().to(dtype), emb.sin().to(dtype), k_pool, v_pool, table)
    return tuple(t.to(device) for t in state)


def five_launches(h, w, start, cos, sin, k_pool, v_pool, table, splits):
    """The native model's decode path: five Triton launches."""
    q = qkv_rope_write_kv_triton(
        h, w.qkv, cos, sin, start, k_pool, v_pool, table, n_heads=N_QH, n_kv_heads=N_KVH, bias=w.qkv_bias,
        norm_weight=w.input_norm, row_norm=w.input_norm is None, q_norm=w.q_norm, k_norm=w.k_norm, eps=EPS,
        weight_scale=w.qkv_scale,
    )  # fmt: skip
    att = paged_attention_triton(q, k_pool, v_pool, table, start, SCALE, num_splits=splits)
    n_rows, n_new = h.shape[:2]
    h1 = fused_linear_triton(att.reshape(n_rows, n_new, -1), w.o, w.o_bias, residual=h, weight_scale=w.o_scale)
    act = fused_linear_triton(
        h1, w.gate_up, w.gate_up_bias, norm_weight=w.post_norm, eps=EPS, gated=True, weight_scale=w.gate_up_scale
    )
    return fused_linear_triton(act, w.down, w.down_bias, residual=h1, weight_scale=w.down_scale)


KW = {"n_heads": N_QH, "n_kv_heads": N_KVH, "scale": SCALE, "eps": EPS}

CASES = [
    # dtype, weight format, rows, tokens per row, attention splits, folded input norm, qwen (bias + q/k norms)
    (torch.float16, "int8", 2, 1, 1, True, False),
    (torch.float16, "int8", 3, 2, 3, True, False),
    (torch.float16, None, 1, 1, 3, True, False),
    (torch.float32, None, 2, 1, 1, True, False),
    (torch.float32, "int8", 2, 2, 3, False, True),
    (torch.float16, "fp8", 3, 1, 3, True, False),
    (torch.bfloat16, "int8", 2, 1, 16, True, False),  # a draft step's dtypes, 16 splits (CUDA only)
]
TWIN_CASES = [CASES[i] for i in (0, 1, 4, 5, 6)]


def skip_bf16_on_cpu(dtype, device):
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 dots run on CUDA only (the interpreter's MMA takes fp32 and fp16)")


@pytest.mark.parametrize(("dtype", "quant", "n_rows", "n_new", "splits", "folded", "qwen"), CASES)
def test_equals_five_launches_bit_for_bit(device, dtype, quant, n_rows, n_new, splits, folded, qwen):
    skip_bf16_on_cpu(dtype, device)
    w = make_weights(dtype, device, quant=quant, folded=folded, qwen=qwen)
    h, start, cos, sin, k_pool, v_pool, table = make_state(dtype, device, n_rows, n_new)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    want = five_launches(h, w, start, cos, sin, k_ref, v_ref, table, splits)

    k_one, v_one = k_pool.clone(), v_pool.clone()
    counters = torch.zeros(256, dtype=torch.int32, device=device)
    got = decode_layer_triton(
        h, w, cos, sin, start, k_one, v_one, table, **KW, counters=counters, attention_splits=splits
    )
    assert torch.equal(got, want)
    assert torch.equal(k_one, k_ref) and torch.equal(v_one, v_ref)
    assert not counters.any(), "the kernel must leave its counters zeroed for the next launch"

    k_five, v_five = k_pool.clone(), v_pool.clone()
    got5 = decode_layer_triton(
        h, w, cos, sin, start, k_five, v_five, table, **KW, one_launch=False, programs=3, attention_splits=splits
    )
    assert torch.equal(got5, want)
    assert torch.equal(k_five, k_ref) and torch.equal(v_five, v_ref)

    # a program per item of the largest phase: each program takes at most one item (ONE_ITEM)
    k_all, v_all = k_pool.clone(), v_pool.clone()
    got_all = decode_layer_triton(
        h, w, cos, sin, start, k_all, v_all, table, **KW, one_launch=False, attention_splits=splits
    )
    assert torch.equal(got_all, want)
    assert torch.equal(k_all, k_ref) and torch.equal(v_all, v_ref)


@pytest.mark.parametrize(("dtype", "quant", "n_rows", "n_new", "splits", "folded", "qwen"), TWIN_CASES)
def test_agrees_with_torch_twin(device, dtype, quant, n_rows, n_new, splits, folded, qwen):
    skip_bf16_on_cpu(dtype, device)
    w = make_weights(dtype, device, quant=quant, folded=folded, qwen=qwen)
    h, start, cos, sin, k_pool, v_pool, table = make_state(dtype, device, n_rows, n_new)
    k_twin, v_twin = k_pool.clone(), v_pool.clone()
    want = decode_layer_torch(h, w, cos, sin, start, k_twin, v_twin, table, **KW)
    got = decode_layer_triton(h, w, cos, sin, start, k_pool, v_pool, table, **KW, attention_splits=splits)
    tol = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(k_pool.float(), k_twin.float(), atol=tol, rtol=tol)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(("programs", "prefetch"), [(3, False), (None, False), (None, True)])
def test_one_launch_with_many_programs_on_a_gpu(device, programs, prefetch):
    """On CUDA the one launch runs many programs at once, so its grid barriers decide the result:
    3 programs that loop over each phase's items, and a grid of one program per SM (up to the
    largest phase) that takes one item each, also with its weight tiles prefetched into L2; 32 KV
    splits make the attention phase the widest."""
    if device.type != "cuda":
        pytest.skip("the interpreter runs one program at a time: a one launch with barriers takes one program there")
    dtype = torch.bfloat16
    w = make_weights(dtype, device, quant="int8")
    h, start, cos, sin, k_pool, v_pool, table = make_state(dtype, device, 2, 1)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    want = five_launches(h, w, start, cos, sin, k_ref, v_ref, table, 32)
    counters = torch.zeros(256, dtype=torch.int32, device=device)
    for _ in range(3):  # the counters are re-zeroed for the next launch
        k_one, v_one = k_pool.clone(), v_pool.clone()
        got = decode_layer_triton(
            h, w, cos, sin, start, k_one, v_one, table, **KW, counters=counters, programs=programs,
            attention_splits=32, prefetch=prefetch,
        )  # fmt: skip
        assert torch.equal(got, want)
        assert torch.equal(k_one, k_ref) and torch.equal(v_one, v_ref)
        assert not counters.any()


def test_grid_sync_orders_every_programs_writes(device):
    """On CUDA: 64 rounds in which every program writes its slot, waits at the grid barrier and
    reads the slot of the program after it with a plain load; each read must see that round's write
    (a line the SM kept from the round before would show)."""
    if device.type != "cuda":
        pytest.skip("the barrier needs every program resident at once (one program at a time in the interpreter)")
    import triton
    import triton.language as tl

    from smcgen.kernels.decode_layer import grid_sync

    @triton.jit
    def rounds(slots, seen, bar, ROUNDS: tl.constexpr):
        pid = tl.program_id(0)
        n = tl.num_programs(0)
        for r in range(ROUNDS):
            tl.store(slots + pid, r * n + pid)
            grid_sync(bar, (2 * r + 1) * n)
            tl.store(seen + r * n + pid, tl.load(slots + (pid + 1) % n))  # a plain load, as the layer's phases read
            grid_sync(bar, (2 * r + 2) * n)

    n = torch.cuda.get_device_properties(device).multi_processor_count
    slots = torch.zeros(n, dtype=torch.int32, device=device)
    seen = torch.full((64, n), -1, dtype=torch.int32, device=device)
    bar = torch.zeros(1, dtype=torch.int32, device=device)
    rounds[(n,)](slots, seen, bar, ROUNDS=64)
    want = torch.arange(64, device=device)[:, None] * n + (torch.arange(n, device=device)[None, :] + 1) % n
    assert torch.equal(seen, want.to(torch.int32))


def test_default_split_choice_matches_attention(device):
    """Without an override, the fused layer picks the attention's own split count (a long table)."""
    dtype = torch.float16
    w = make_weights(dtype, device, quant="int8")
    h, start, cos, sin, k_pool, v_pool, table = make_state(dtype, device, 2, 1)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    want = five_launches(h, w, start, cos, sin, k_ref, v_ref, table, None)
    got = decode_layer_triton(h, w, cos, sin, start, k_pool, v_pool, table, **KW)
    assert torch.equal(got, want)


def test_bad_input_names_the_limit(device):
    dtype = torch.float16
    w = make_weights(dtype, device, quant=None)
    h, start, cos, sin, k_pool, v_pool, table = make_state(dtype, device, 2, 1)
    too_many = torch.zeros((2, MAX_ROWS // 2 + 1, HIDDEN), dtype=dtype, device=device)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} token rows"):
        decode_layer_triton(too_many, w, cos, sin, start, k_pool, v_pool, table, **KW)
    too_wide = 2 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count + 1
    with pytest.raises(ValueError, match="programs"):
        decode_layer_triton(h, w, cos, sin, start, k_pool, v_pool, table, **KW, programs=too_wide)
    with pytest.raises(ValueError, match="start_pos"):
        decode_layer_triton(h, w, cos, sin, start.long(), k_pool, v_pool, table, **KW)
    with pytest.raises(ValueError, match="down"):
        decode_layer_triton(h, w._replace(down=w.down[:, :-1]), cos, sin, start, k_pool, v_pool, table, **KW)


def test_model_step_fused_equals_five_launches(device, monkeypatch):
    """On CUDA, a bf16 model with int8 MLP layers (the self-int8 draft's layout) takes the same logits
    and writes the same K/V with ``fused_layers`` as with its five launches per layer."""
    if device.type != "cuda":
        pytest.skip("the model runs its Triton kernels on CUDA only; on the CPU test_native_model forces this path")
    from transformers import LlamaConfig

    from smcgen.runners.native import NativeCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip
    model = NativeCausalLM.from_config(cfg, dtype=torch.bfloat16, device=device, seed=0).eval()
    model.quantize_weights("int8")
    from smcgen.runners.native import model as model_mod

    calls = []
    real = model_mod.decode_layer_triton
    monkeypatch.setattr(model_mod, "decode_layer_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(0)).to(device)
    logits, pools = [], []
    for fused in (False, True):
        model.fused_layers = fused
        cache = model.make_cache(n_pages=32, n_rows=2, max_pages=8)
        cache.reserve(37)
        model(prompt.expand(2, -1).contiguous(), torch.zeros(2, dtype=torch.int32, device=device), cache)
        cache.reserve(38)
        step = torch.tensor([[7], [11]], device=device)
        logits.append(model(step, torch.full((2,), 37, dtype=torch.int32, device=device), cache, last_only=True))
        pools.append(torch.stack([cache.k_pool[-1], cache.v_pool[-1]]))
    assert len(calls) == model.n_layers, "only the fused run's decode step takes the one-launch layer"
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(pools[0], pools[1])
    assert int(model.layer_counters.abs().sum()) == 0
