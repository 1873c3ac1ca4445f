"""The transformers runner's in-place KV cache and grouped-query attention leave the logits unchanged."""

from __future__ import annotations

import torch
from tiny_models import tiny_lm
from transformers import DynamicCache

from smcgen.runners.gqa_attention import NAME, gqa_attention
from smcgen.runners.row_cache import GrowingLayer, RowCache, changed_rows, row_cache
from smcgen.runners.transformers import CausalLMRunner


def _reference_logits(model, cache, ids):
    return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


@torch.inference_mode()
def test_runner_logits_match_transformers_cache_through_reorders_and_crops():
    lm = tiny_lm(3, vocab=11, hidden=32, layers=3)
    model = lm.model
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads == 1
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 11, (1, 6), generator=gen)
    rows = 5
    runner = CausalLMRunner(lm)
    runner.start(prompt, rows)
    assert isinstance(runner.cache, RowCache)
    ref = DynamicCache(config=model.config)
    model(input_ids=prompt[:, :-1], past_key_values=ref, use_cache=True, logits_to_keep=1)
    ref.batch_repeat_interleave(rows)
    seq, fed = prompt.expand(rows, -1), prompt.shape[1] - 1
    # blocks of several lengths (the masked multi-position path and the one-position path), the
    # identity, a permutation, duplications, and enough positions to regrow the buffers
    plan = [(5, [0, 0, 2, 3, 4]), (1, [0, 1, 2, 3, 4]), (3, [4, 3, 2, 1, 0]), (9, [1, 1, 1, 0, 0])] * 4
    for k, ancestors in plan:
        seq = torch.cat([seq, torch.randint(0, 11, (rows, k), generator=gen)], dim=1)
        got = runner.forward_new(seq)
        want = _reference_logits(model, ref, seq[:, fed:])
        fed = seq.shape[1]
        assert torch.equal(got, want)
        idx = torch.tensor(ancestors)
        runner.reorder(idx)
        ref.reorder_cache(idx)
        seq = seq[idx]
    assert runner.cache.layers[0].key_buffer.shape[2] > 64  # it grew past its first capacity
    runner.truncate(seq.shape[1] - 4)
    ref.crop(-4)
    fed -= 4
    assert torch.equal(runner.forward_new(seq), _reference_logits(model, ref, seq[:, fed:]))
    assert model.config._attn_implementation == "sdpa"  # the switch is undone after each forward


def test_identity_reorder_copies_nothing_and_changed_rows_are_the_moved_ones():
    layer = GrowingLayer()
    k = torch.arange(4 * 1 * 3 * 2, dtype=torch.float32).reshape(4, 1, 3, 2)
    layer.update(k, -k)
    before = layer.key_buffer.clone()
    assert changed_rows(torch.arange(4)).numel() == 0
    layer.reorder_cache(torch.arange(4))
    assert torch.equal(layer.key_buffer, before)
    assert changed_rows(torch.tensor([0, 0, 3, 3])).tolist() == [1, 2]
    layer.reorder_cache(torch.tensor([0, 0, 3, 3]))
    assert torch.equal(layer.keys, k[[0, 0, 3, 3]]) and torch.equal(layer.values, -k[[0, 0, 3, 3]])
    # a swap reads both sources before writing
    layer.reorder_cache(torch.tensor([2, 1, 0, 3]))
    assert torch.equal(layer.keys, k[[3, 0, 0, 3]])


def test_row_cache_falls_back_for_sliding_window_models():
    lm = tiny_lm(0)
    assert isinstance(row_cache(lm.model.config), RowCache)
    config = lm.model.config.__class__(**{**lm.model.config.to_dict(), "layer_types": ["sliding_attention"] * 2})
    config.sliding_window = 4
    cache = row_cache(config)
    assert not isinstance(cache, RowCache) and isinstance(cache, DynamicCache)


def test_gqa_attention_switches_only_sdpa_models_and_restores():
    lm = tiny_lm(1)
    config = lm.model.config
    with gqa_attention(lm.model):
        assert config._attn_implementation == NAME
    assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"
    try:
        with gqa_attention(lm.model):
            assert config._attn_implementation == "eager"
    finally:
        config._attn_implementation = "sdpa"


def test_to_dtype_copies_a_draft_and_leaves_shared_weights_alone():
    from smcgen.models.smollm2 import derive_draft
    from smcgen.runners.transformers import LanguageModel

    target = tiny_lm(2, vocab=11)
    draft = LanguageModel(derive_draft(target.model, 1), target.tokenizer, target.eos_token_ids)
    assert draft.model.lm_head.weight is target.model.lm_head.weight  # shared, as a trained draft's head is
    low = draft.to_dtype("bfloat16")
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in target.model.parameters()} == {torch.float32}
    assert low.eos_token_ids == draft.eos_token_ids and low.vocab_size == draft.vocab_size
    for bad in ("int8", "no_such_dtype"):
        try:
            draft.to_dtype(bad)
        except ValueError as err:
            assert "dtype" in str(err)
        else:
            raise AssertionError(f"to_dtype({bad!r}) did not raise")
