"""The native runner's logits equal transformers' for the same weights, over a paged, shared KV cache.

Tolerance: fp32 on the CPU, max |native - transformers| <= 1e-4 over all logits compared (logits are
O(1) here: the weights are scaled so activations do not vanish and a wrong position, page or head
shows up far above it). Pages hold 4 tokens so prompts cross pages and partial pages get
copy-on-written on resampling.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from smcgen.runners.native import NativeCausalLM, PagedKVCache

TOL = 1e-4  # max abs logit difference, fp32
PAGE = 4
VOCAB = 61
PROMPT = [5, 17, 3, 42, 8, 29, 11]  # 7 tokens: one full page and a partial one

_DIMS = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: 2 query heads per KV head
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 32 with head_dim 16: one high-, one medium- and six low-frequency pairs (all three branches)
    "original_max_position_embeddings": 32,
}
CONFIGS = {
    "llama": lambda: (LlamaForCausalLM, LlamaConfig(**_DIMS, tie_word_embeddings=False)),
    "llama3-rope": lambda: (
        LlamaForCausalLM,
        LlamaConfig(**{**_DIMS, "num_key_value_heads": 1}, rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True),
    ),
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**_DIMS, tie_word_embeddings=False)),
    # head_dim 32 != hidden / heads = 16: the config's head_dim must win
    "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(**_DIMS, head_dim=32, tie_word_embeddings=True)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations: matrices ~ N(0, 1/fan_in), norms 1 + noise, biases noise (transformers zeros them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(transformers model, native copy) in fp32 on the CPU."""
    cls, config = CONFIGS[request.param]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = cls(config).eval()
    _randomize(hf, seed=len(request.param))
    native = NativeCausalLM.from_hf(hf)
    return hf, native


def reference(hf, seq: list[int]) -> torch.Tensor:
    """transformers' logits [len(seq), V] for one sequence, no cache."""
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


def assert_close(native: torch.Tensor, ref: torch.Tensor) -> None:
    assert native.shape == ref.shape
    diff = (native.float() - ref).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff:.3g} > {TOL}"


def pos(rows: int, n: int) -> torch.Tensor:
    return torch.full((rows,), n, dtype=torch.int32)


def check_bookkeeping(cache: PagedKVCache, n_tokens: int) -> None:
    """Refcounts equal references in the block table, free + used = all pages, partial pages unshared."""
    n_cols = -(-n_tokens // cache.page_size)
    table = cache.block_table[:, :n_cols]
    assert (table >= 0).all(), "a row is missing a page"
    assert (cache.block_table[:, n_cols:] < 0).all(), "pages reserved beyond n_tokens"
    counts = torch.bincount(table.flatten().long(), minlength=cache.n_pages)
    assert torch.equal(counts.to(torch.int32), cache.refcount)
    assert int(cache.free_top.item()) + int((cache.refcount > 0).sum()) == cache.n_pages
    free = cache.free_stack[: int(cache.free_top.item())]
    assert (cache.refcount[free.long()] == 0).all()
    if n_tokens % cache.page_size:
        assert (cache.refcount[table[:, -1].long()] == 1).all(), "a partial page is shared"
    assert int(cache.status.item()) == 0


def decode_and_check(hf, native, cache, seqs, gen, steps):
    """Single-token steps, a random token per row: logits equal transformers'; ``seqs`` extended."""
    rows = len(seqs)
    for _ in range(steps):
        toks = torch.randint(0, VOCAB, (rows, 1), generator=gen)
        n = len(seqs[0])
        cache.reserve(n + 1)
        logits = native(toks, pos(rows, n), cache, last_only=True)
        for r in range(rows):
            seqs[r].append(int(toks[r, 0]))
            assert_close(logits[r], reference(hf, seqs[r])[-1])


def verify_and_check(hf, native, cache, seqs, gen, n_new):
    """One multi-token (verify) forward of ``n_new`` random tokens per row, checked like decode_and_check."""
    rows, n = len(seqs), len(seqs[0])
    block = torch.randint(0, VOCAB, (rows, n_new), generator=gen)
    cache.reserve(n + n_new)
    logits = native(block, pos(rows, n), cache)
    for r in range(rows):
        seqs[r] += block[r].tolist()
        assert_close(logits[r], reference(hf, seqs[r])[-n_new:])


def prefill(native, cache, prompt=PROMPT) -> torch.Tensor:
    cache.reserve(len(prompt))
    return native(torch.tensor([prompt]), pos(1, 0), cache)


def test_prefill(pair):
    hf, native = pair
    cache = native.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
    logits = prefill(native, cache)
    assert_close(logits[0], reference(hf, PROMPT))
    check_bookkeeping(cache, len(PROMPT))


@pytest.mark.parametrize("residual_in_place", [False, True])
def test_last_only_and_decode_steps(pair, monkeypatch, residual_in_place):
    hf, native = pair
    monkeypatch.setattr(native, "residual_in_place", residual_in_place)
    cache = native.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
    seq = list(PROMPT)
    cache.reserve(len(seq))
    last = native(torch.tensor([seq]), pos(1, 0), cache, last_only=True)
    assert last.shape == (1, VOCAB)
    assert_close(last[0], reference(hf, seq)[-1])
    for tok in [33, 2, 60, 14, 7]:  # crosses the page boundary at position 8 and 12
        cache.reserve(len(seq) + 1)
        logits = native(torch.tensor([[tok]]), pos(1, len(seq)), cache, last_only=True)
        seq.append(tok)
        assert_close(logits[0], reference(hf, seq)[-1])
    check_bookkeeping(cache, len(seq))


def test_verify_block(pair):
    hf, native = pair
    cache = native.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
    seq = PROMPT[:6]
    prefill(native, cache, seq)
    block = [9, 31, 4, 58, 22]  # T = 5 from position 6: spans the pages of positions 4..7 and 8..11
    cache.reserve(len(seq) + len(block))
    logits = native(torch.tensor([block]), pos(1, len(seq)), cache)
    seq += block
    assert_close(logits[0], reference(hf, seq)[-len(block) :])
    # the block's K/V were written where the next step reads them
    cache.reserve(len(seq) + 1)
    logits = native(torch.tensor([[40]]), pos(1, len(seq)), cache)
    seq.append(40)
    assert_close(logits[0, 0], reference(hf, seq)[-1])


def _share_prompt(native, rows: int) -> PagedKVCache:
    """Prefill the prompt in row 0 only, then share it with every row (ancestors = 0)."""
    cache = native.make_cache(n_pages=40, n_rows=rows, max_pages=8, page_size=PAGE)
    prefill(native, cache.rows(0, 1))
    cache.resample(torch.zeros(rows, dtype=torch.int64), len(PROMPT))
    check_bookkeeping(cache, len(PROMPT))
    # the full first page is shared by all rows, the partial second one was copied per row
    assert (cache.block_table[:, 0] == cache.block_table[0, 0]).all()
    assert int(cache.refcount[cache.block_table[0, 0]]) == rows
    assert len(set(cache.block_table[:, 1].tolist())) == rows
    return cache


def test_shared_prompt_then_diverging_rows(pair):
    hf, native = pair
    rows = 4
    cache = _share_prompt(native, rows)
    seqs = [list(PROMPT) for _ in range(rows)]
    gen = torch.Generator().manual_seed(1)
    decode_and_check(hf, native, cache, seqs, gen, steps=2)
    verify_and_check(hf, native, cache, seqs, gen, n_new=5)  # verify T = 5 from position 9
    check_bookkeeping(cache, len(seqs[0]))


def test_resample_mid_sequence(pair):
    hf, native = pair
    rows = 4
    cache = _share_prompt(native, rows)
    seqs = [list(PROMPT) for _ in range(rows)]
    gen = torch.Generator().manual_seed(2)
    block = torch.randint(0, VOCAB, (rows, 3), generator=gen)  # 10 tokens: page 2 is partial
    cache.reserve(10)
    native(block, pos(rows, 7), cache)
    for r in range(rows):
        seqs[r] += block[r].tolist()

    # identity changes nothing
    before = [t.clone() for t in (cache.block_table, cache.refcount, cache.free_top, cache.k_pool)]
    cache.resample(torch.arange(rows), 10)
    after = (cache.block_table, cache.refcount, cache.free_top, cache.k_pool)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))

    ancestors = [2, 0, 2, 1]  # row 3 dies, row 2 is duplicated, rows are permuted
    cache.resample(torch.tensor(ancestors), 10)
    seqs = [list(seqs[a]) for a in ancestors]
    check_bookkeeping(cache, 10)
    decode_and_check(hf, native, cache, seqs, gen, steps=2)
    # a second resample on a page boundary (12 tokens: no partial page to copy), then verify T = 5
    cache.resample(torch.tensor([1, 1, 3, 0]), 12)
    seqs = [list(seqs[a]) for a in [1, 1, 3, 0]]
    check_bookkeeping(cache, 12)
    verify_and_check(hf, native, cache, seqs, gen, n_new=5)
    check_bookkeeping(cache, 17)


# ------------------------------------------------------------------------------ builders


def test_from_config_random_weights():
    config = LlamaConfig(**_DIMS, tie_word_embeddings=False, initializer_range=0.05)
    a = NativeCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=3)
    b = NativeCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=3)
    c = NativeCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=4)
    assert torch.equal(a.layers[1].qkv, b.layers[1].qkv)
    assert not torch.equal(a.layers[1].qkv, c.layers[1].qkv)
    assert abs(a.layers[0].gate_up.std().item() - 0.05) < 0.005
    assert torch.equal(a.norm, torch.ones_like(a.norm))
    assert (a.n_layers, a.n_kv_heads, a.head_dim, a.vocab_size) == (2, 2, 16, VOCAB)
    h, i, d, hq, hkv = 64, 96, 16, 4, 2
    per_layer = h + (hq + 2 * hkv) * d * h + h * hq * d + h + 2 * i * h + h * i
    assert a.weight_bytes() == 4 * (2 * per_layer + h + VOCAB * h)
    cache = a.make_cache(n_pages=8, n_rows=2, max_pages=4, page_size=PAGE)
    assert cache.k_pool.shape == (2, 8, PAGE, 2, 16) and cache.k_pool.dtype == torch.float32
    cache.reserve(6)
    logits = a(torch.randint(0, VOCAB, (2, 6)), pos(2, 0), cache)
    assert logits.shape == (2, 6, VOCAB) and torch.isfinite(logits).all()


def test_tied_head_counted_once():
    _, config = CONFIGS["qwen3"]()
    native = NativeCausalLM.from_config(config, dtype=torch.float32, device="cpu")
    assert native.lm_head is native.embed
    assert native.weight_bytes() == 4 * (sum(p.numel() for p in native.layers.parameters()) + 64 + VOCAB * 64)


def _params_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters only: ``Module.to(bf16)`` would also round transformers' rotary ``inv_freq``
    buffer to bf16, which moves its RoPE angles by ~0.4% (0.4 rad at position 100)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def test_bf16_close_to_transformers():
    """bf16 end to end; judged against fp32 math on the same bf16-rounded weights, the native error is
    no worse than 1.5x transformers' own bf16 error in mean abs and 2x in max abs (logits are O(1))."""
    cls, config = CONFIGS["qwen3"]()
    config._attn_implementation = "eager"
    hf = cls(config).eval()
    _randomize(hf, seed=9)
    hf = _params_to(_params_to(hf, torch.bfloat16), torch.float32)
    seq = PROMPT + [33, 2, 60, 14, 7, 21, 50, 1, 19]
    truth = reference(hf, seq)
    hf = _params_to(hf, torch.bfloat16)
    hf_err = (reference(hf, seq) - truth).abs()
    native = NativeCausalLM.from_hf(hf)
    assert native.dtype == torch.bfloat16 and native.rope_cos.dtype == torch.bfloat16
    cache = native.make_cache(n_pages=8, n_rows=1, max_pages=8, page_size=PAGE)
    assert cache.k_pool.dtype == torch.bfloat16
    logits = [prefill(native, cache)]
    cache.reserve(len(seq))  # then a verify block of the remaining 9 tokens
    logits.append(native(torch.tensor([seq[len(PROMPT) :]]), pos(1, len(PROMPT)), cache))
    assert logits[0].dtype == torch.bfloat16
    err = (torch.cat(logits, 1)[0].float() - truth).abs()
    assert err.mean() <= 1.5 * hf_err.mean(), (err.mean().item(), hf_err.mean().item())
    assert err.max() <= 2 * hf_err.max(), (err.max().item(), hf_err.max().item())


# ---------------------------------------------------------------------------- bad input


def test_unsupported_model_type():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    with pytest.raises(ValueError, match="gpt2"):
        NativeCausalLM.from_hf(gpt2)


def test_unsupported_rope_and_activation():
    yarn = LlamaConfig(**_DIMS, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="yarn"):
        NativeCausalLM.from_config(yarn, dtype=torch.float32, device="cpu")
    gelu = LlamaConfig(**_DIMS, hidden_act="gelu")
    with pytest.raises(ValueError, match="gelu"):
        NativeCausalLM.from_config(gelu, dtype=torch.float32, device="cpu")


def test_check_budget():
    # 2 requests x 4 rows, prompt 7 (1 shared full page each), up to 20 tokens (5 pages) per row:
    # 2 * 1 + 8 * (5 - 1) = 34, + 8 copy-on-write pages in flight = 42 > 40
    assert PagedKVCache.pages_needed(8, 2, 7, 20, PAGE) == 42
    with pytest.raises(ValueError, match=r"42 pages .* 40 available"):
        PagedKVCache.check_budget(8, 2, 7, 20, PAGE, available=40)
    assert PagedKVCache.check_budget(8, 2, 7, 16, PAGE, available=40) == 34  # 2 + 8 * 3 + 8 fits
    assert PagedKVCache.bytes_per_page(2, 2, 16, PAGE, torch.float32) == 2 * 2 * PAGE * 2 * 16 * 4
    # a long prompt is stored once per request, not once per row: 10 shared pages + 16 rows x 2 + 16
    assert PagedKVCache.pages_needed(16, 1, 41, 45, PAGE) == 58


def test_pool_exhaustion_reported():
    cache = PagedKVCache(1, 1, 8, PAGE, n_pages=5, n_rows=2, max_pages=4, dtype=torch.float32)
    cache.reserve(8)  # 2 rows x 2 pages = 4 of 5
    cache.check_status()
    cache.reserve(12)  # 2 more pages needed, 1 left
    with pytest.raises(RuntimeError, match=r"ran out: about 6 pages .* 5 available"):
        cache.check_status()
    cache.reset()
    cache.check_status()
    assert int(cache.free_top.item()) == 5 and (cache.block_table < 0).all()


def test_from_pretrained_loads_a_checkpoint_directory(tmp_path):
    """A save_pretrained directory loads straight into the native layout, with the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from smcgen.runners.native.model import NativeCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    native = NativeCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")
    tokens = torch.tensor([[1, 5, 7, 9, 2]])
    cache = native.make_cache(n_pages=8, n_rows=1, max_pages=4, page_size=4)
    cache.reserve(5)
    got = native(tokens, torch.zeros(1, dtype=torch.int32), cache)
    with torch.no_grad():
        want = hf(tokens).logits
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("swap,skinny_qkv,fused_rope", [(True, True, True), (True, True, False), (False, False, False)])
def test_skinny_linear_path_equals_transformers(pair, monkeypatch, swap, skinny_qkv, fused_rope):
    """The fused skinny Triton linear path and the fused RoPE + KV write (forced on, in the interpreter) give
    transformers' logits for prefill (7 rows) and a decode step; split-K is
    forced on so the reducer election runs too. Both operand orders of the kernel (SWAP_AB), with
    QKV in the kernel or on cuBLAS, and QKV + RoPE + KV write in one kernel (kernels.qkv_rope;
    forced on for these head widths)."""
    import smcgen.kernels.linear as linear_mod
    from smcgen.kernels._triton import HAS_TRITON

    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "needs triton's CPU interpreter (the pair lives on the CPU; on CUDA the engine tests run this path)"
        )
    hf, native = pair
    import smcgen.kernels.fused_ops as fused_mod

    monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)
    monkeypatch.setattr(fused_mod, "use_triton", lambda t: True)  # RoPE + KV write, norms, SiLU-mul too
    plan = linear_mod.skinny_plan
    monkeypatch.setattr(linear_mod, "SWAP_AB", swap)
    monkeypatch.setattr(native, "skinny_qkv", skinny_qkv)
    monkeypatch.setattr(native, "skinny_max_rows", 16)  # an fp32 model's own default is cuBLAS
    import smcgen.kernels.qkv_rope as qkv_rope_mod

    monkeypatch.setattr(native, "fused_qkv_rope", fused_rope)
    monkeypatch.setattr(qkv_rope_mod, "use_triton", lambda t: True)
    monkeypatch.setattr(qkv_rope_mod, "FUSED_HEAD_DIM", native.cfg.head_dim)
    fused_calls = []
    real_fused = qkv_rope_mod.qkv_rope_write_kv_triton
    monkeypatch.setattr(
        qkv_rope_mod, "qkv_rope_write_kv_triton", lambda *a, **k: fused_calls.append(1) or real_fused(*a, **k)
    )
    monkeypatch.setattr(linear_mod, "skinny_plan", lambda *a, **k: (*plan(*a, **k)[:2], 16, 4, 2, 2, swap))
    calls = []
    real = linear_mod.fused_linear_triton
    monkeypatch.setattr(linear_mod, "fused_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = native.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
    assert_close(prefill(native, cache)[0], reference(hf, PROMPT))
    cache.reserve(len(PROMPT) + 1)
    step = native(torch.tensor([[PROMPT[0]]]), pos(1, len(PROMPT)), cache)
    assert_close(step[0, 0], reference(hf, [*PROMPT, PROMPT[0]])[-1])
    # o, gate_up, down, QKV when skinny_qkv (unless fused with RoPE), and the head (skinny_head)
    assert len(calls) == 2 * ((4 if skinny_qkv and not fused_rope else 3) * native.n_layers + 1)
    assert len(fused_calls) == (2 * native.n_layers if fused_rope else 0)  # prefill (7 rows) and the step
    assert int(native.linear_counters.abs().sum()) == 0


def test_fused_layers_equal_transformers(pair, monkeypatch):
    """``fused_layers``: each layer of a forward of at most 16 token rows runs as one launch of
    kernels.decode_layer (forced on, in the interpreter, fp32 allowed): prefill, a decode step and a
    two-row verify give transformers' logits for every family (Qwen2's bias and unfolded norm,
    Qwen3's q/k norms), and the layer's counters are left zeroed."""
    from smcgen.kernels._triton import HAS_TRITON
    from smcgen.runners.native import model as model_mod

    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton's CPU interpreter (on CUDA the GPU tests run this path)")
    hf, native = pair
    monkeypatch.setattr(model_mod, "use_triton", lambda t: True)
    monkeypatch.setattr(native, "FUSED_LAYER_DTYPES", (torch.float32,))
    monkeypatch.setattr(native, "fused_layers", True)
    calls = []
    real = model_mod.decode_layer_triton
    monkeypatch.setattr(model_mod, "decode_layer_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = native.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
    assert_close(prefill(native, cache)[0], reference(hf, PROMPT))
    assert len(calls) == native.n_layers
    gen = torch.Generator().manual_seed(3)
    decode_and_check(hf, native, cache, [list(PROMPT)], gen, steps=1)
    rows = _share_prompt(native, 2)
    verify_and_check(hf, native, rows, [list(PROMPT), list(PROMPT)], gen, n_new=3)
    assert len(calls) == 4 * native.n_layers  # the shared prompt's prefill fused too
    assert int(native.layer_counters.abs().sum()) == 0
    monkeypatch.setattr(native, "fused_layers", False)
    calls.clear()
    prefill(native, native.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE))
    assert not calls


def test_input_norm_folded_into_qkv_once(pair):
    """Models without a QKV bias carry W * input_norm (the fp32 logits above match transformers with
    it); folding again changes nothing; Qwen2 (QKV bias) keeps the separate norm."""
    hf, native = pair
    folded = not native.cfg.qkv_bias
    assert native.input_norm_folded == folded
    layer, theirs = native.layers[0], hf.model.layers[0]
    q_rows = theirs.self_attn.q_proj.weight.shape[0]
    expected = theirs.self_attn.q_proj.weight * (theirs.input_layernorm.weight if folded else 1.0)
    torch.testing.assert_close(layer.qkv[:q_rows], expected, rtol=1e-6, atol=1e-6)
    before = layer.qkv.clone()
    native.fold_input_norms()
    assert native.input_norm_folded == folded
    assert torch.equal(layer.qkv, before)


def test_state_dict_carries_the_weight_layout(pair):
    """load_state_dict into a bare model takes the folded layout along (extra state): same logits."""
    _, native = pair
    bare = NativeCausalLM(native.cfg, torch.float32, max_positions=native.max_positions)
    assert not bare.input_norm_folded
    bare.load_state_dict(native.state_dict())
    assert bare.input_norm_folded == native.input_norm_folded
    caches = [m.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE) for m in (native, bare)]
    a, b = (prefill(m, c) for m, c in zip((native, bare), caches, strict=True))
    assert torch.equal(a, b)


def test_fp8_weights_run_the_dequantized_model(pair):
    """quantize_fp8 stores e4m3 weights with row scales; the forward equals a model holding the
    dequantized weights (same layers, fp32), the LM head untied from the embedding."""
    import copy

    hf, native = pair
    quant = copy.deepcopy(native)
    assert native.fp8_weights == ()
    quant.quantize_fp8(("o", "down"))
    assert quant.fp8_weights == ("o", "down") and quant.layers[0].qkv.dtype == native.dtype
    quant.quantize_fp8(NativeCausalLM.FP8_NAMES)
    quant.quantize_fp8(NativeCausalLM.FP8_NAMES)  # what is fp8 already stays as it is
    assert quant.fp8_weights == NativeCausalLM.FP8_NAMES and quant.layers[0].qkv.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="unknown"):
        quant.quantize_fp8(("mlp",))
    # the scales travel in state_dict; a model in its own dtype refuses the fp8 state
    with pytest.raises(ValueError, match="quantized as"):
        copy.deepcopy(native).load_state_dict(quant.state_dict())
    again = copy.deepcopy(native)
    again.quantize_fp8(NativeCausalLM.FP8_NAMES)
    again.load_state_dict(quant.state_dict())
    assert torch.equal(again.layers[1].down_scale, quant.layers[1].down_scale)
    assert quant.lm_head.dtype == torch.float8_e4m3fn and quant.embed.dtype == native.embed.dtype
    assert quant.weight_bytes() < 0.3 * native.weight_bytes()  # fp32 -> one byte per weight
    deq = copy.deepcopy(native)
    with torch.no_grad():
        for ql, dl in zip(quant.layers, deq.layers, strict=True):
            for name in ("qkv", "o", "gate_up", "down"):
                getattr(dl, name).copy_(getattr(ql, name).float() * getattr(ql, f"{name}_scale")[:, None])
        deq.lm_head = torch.nn.Parameter(quant.lm_head.float() * quant.lm_head_scale[:, None], requires_grad=False)
    seq = PROMPT[:7]
    outs = []
    for model in (quant, deq):
        cache = model.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
        cache.reserve(len(seq))
        outs.append(model(torch.tensor([seq]), pos(1, 0), cache))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    # and fp8 is an approximation of the original weights, not another model
    assert (outs[0][0] - reference(hf, seq)).abs().max() < 0.25 * reference(hf, seq).abs().max()


def test_int8_weights_run_the_dequantized_model(pair):
    """quantize_int8: int8 weights with row scales, the forward equal to the dequantized model's and
    closer to the original than fp8's; one weight cannot hold both formats."""
    import copy

    hf, native = pair
    quant = copy.deepcopy(native)
    quant.quantize_int8(("gate_up", "down", "lm_head"))
    assert quant.quantized_weights == {"gate_up": "int8", "down": "int8", "lm_head": "int8"}
    assert quant.fp8_weights == () and quant.layers[0].down.dtype == torch.int8
    with pytest.raises(ValueError, match="already stored in int8"):
        quant.quantize_fp8(("down",))
    with pytest.raises(ValueError, match="fmt"):
        quant.quantize_weights("int4", ("o",))
    quant.quantize_fp8(("o",))  # another layer may take the other format
    assert quant.quantized_weights["o"] == "fp8"
    # one format's state never loads into the other's weights (same names and shapes: copy_ would cast)
    other = copy.deepcopy(native)
    other.quantize_fp8(("gate_up", "down", "lm_head", "o"))
    down_before = other.layers[0].down.clone()
    for src, dst in ((quant, other), (other, quant)):
        with pytest.raises(ValueError, match="quantized as"):
            dst.load_state_dict(src.state_dict())
    assert torch.equal(other.layers[0].down.view(torch.uint8), down_before.view(torch.uint8)), "nothing copied"
    same = copy.deepcopy(native)
    same.quantize_int8(("gate_up", "down", "lm_head"))
    same.quantize_fp8(("o",))
    same.load_state_dict(quant.state_dict())
    assert torch.equal(same.layers[1].down, quant.layers[1].down)
    deq = copy.deepcopy(native)
    with torch.no_grad():
        for ql, dl in zip(quant.layers, deq.layers, strict=True):
            for name in ("o", "gate_up", "down"):
                getattr(dl, name).copy_(getattr(ql, name).float() * getattr(ql, f"{name}_scale")[:, None])
        deq.lm_head = torch.nn.Parameter(quant.lm_head.float() * quant.lm_head_scale[:, None], requires_grad=False)
    fp8 = copy.deepcopy(native)
    fp8.quantize_fp8(("gate_up", "down", "lm_head"))
    seq = PROMPT[:7]
    outs = []
    for model in (quant, deq, fp8):
        cache = model.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
        cache.reserve(len(seq))
        outs.append(model(torch.tensor([seq]), pos(1, 0), cache)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    ref = reference(hf, seq)
    only_o = copy.deepcopy(native)
    only_o.quantize_fp8(("o",))
    cache = only_o.make_cache(n_pages=16, n_rows=1, max_pages=8, page_size=PAGE)
    cache.reserve(len(seq))
    ref_o = only_o(torch.tensor([seq]), pos(1, 0), cache)[0]  # the fp8 O alone, as in quant
    # the int8 layers move the logits less than the same layers in fp8
    assert (outs[0] - ref_o).abs().mean() < (outs[2] - ref).abs().mean()
