"""Tensor parallelism on 2 CPU processes (gloo): the sharded target gives the one-process logits,
tokens and weights, and every rank holds the same SMC state.

One ``spawn`` runs every check (starting processes costs seconds); the workers return plain
tensors and the assertions run here.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, Qwen2Config

from smcgen.core.config import SMCConfig
from smcgen.runners.native.model import NativeCausalLM
from smcgen.runners.native.parallel import TensorParallelLM, spawn, vocab_range
from smcgen.samplers.native import NativeSMC

VOCAB = 37  # odd: the two LM-head shards differ in size


def _config(kind: str):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2Config(**fields) if kind == "qwen2" else LlamaConfig(**fields)


def _full(kind: str, quantize: str | None = None) -> NativeCausalLM:
    full = NativeCausalLM.from_config(_config(kind), dtype=torch.float32, seed=1)
    with torch.no_grad():  # non-trivial norms and biases, so their sharding is checked too
        gen = torch.Generator().manual_seed(2)
        for name, p in full.named_parameters():
            if p.dim() == 1:
                p.copy_(
                    1 + 0.3 * torch.randn(p.shape, generator=gen)
                    if name.endswith("norm")
                    else 0.1 * torch.randn(p.shape, generator=gen)
                )
        # big logits: sampling depends on them, not on the Gumbel noise alone
        full.lm_head.mul_(20.0)
    if quantize is not None:
        full.quantize_weights(quantize, NativeCausalLM.FP8_NAMES)
    return full


def _logits(model: NativeCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    cache = model.make_cache(n_pages=16, n_rows=tokens.shape[0], max_pages=8, page_size=4)
    cache.reserve(tokens.shape[1] + 3)
    first = model(tokens, torch.zeros(tokens.shape[0], dtype=torch.int32), cache)
    # a decode-style second call over the cached prefix
    nxt = model(tokens[:, -3:], torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.int32), cache)
    return torch.cat([first, nxt], dim=1)


def _smc(target: NativeCausalLM, draft: NativeCausalLM, alpha: float):
    cfg = SMCConfig(n_particles=4, block_size=3, max_new_tokens=16, seed=5, alpha=alpha, ess_threshold=0.7)
    run = NativeSMC(target, cfg, draft=draft, eos_token_ids=(3,), page_size=4).run([1, 2, 3, 4, 5], n_groups=2)
    return run.tokens, run.lengths, run.log_weights, run.resampled


def _worker() -> dict:
    import torch.distributed as dist

    out: dict = {"rank_world": (dist.get_rank(), dist.get_world_size())}
    tokens = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    for kind, fmt in (("llama", None), ("qwen2", None), ("llama", "int8")):
        full = _full(kind, fmt)
        shard = TensorParallelLM.from_native(full)
        out[f"logits/{kind}/{fmt}"] = (_logits(full, tokens), shard.gather_logits(_logits(shard, tokens)))
    full = _full("llama")
    shard = TensorParallelLM.from_native(full)
    draft = NativeCausalLM.from_config(_config("llama"), dtype=torch.float32, seed=7)
    for alpha in (1.0, 2.0):
        one, tp = _smc(full, draft, alpha), _smc(shard, draft, alpha)
        out[f"smc/{alpha}"] = (one, tp)
        # every rank must hold the same particles and weights (no communication keeps them so)
        mine = torch.cat([tp[0].flatten().double(), tp[1].flatten().double(), tp[2].flatten()])
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        out[f"ranks_agree/{alpha}"] = all(torch.equal(every[0], e) for e in every)
    return out


def test_vocab_range_covers_the_vocabulary_once():
    for vocab, world in ((37, 2), (128256, 8), (5, 4)):
        ranges = [vocab_range(vocab, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(h - lo for lo, h in ranges) - min(h - lo for lo, h in ranges) <= 1


def test_two_gloo_ranks_match_one_process():
    out = spawn(_worker, 2)
    assert out["rank_world"] == (0, 2)
    for name in ("logits/llama/None", "logits/qwen2/None", "logits/llama/int8"):
        one, tp = out[name]
        assert tp.shape == one.shape == (3, 9, VOCAB), name
        torch.testing.assert_close(tp, one, rtol=1e-4, atol=1e-4, msg=name)
    for alpha in (1.0, 2.0):
        (tok1, len1, w1, res1), (tok2, len2, w2, res2) = out[f"smc/{alpha}"]
        assert torch.equal(tok1, tok2) and torch.equal(len1, len2) and torch.equal(res1, res2), alpha
        assert torch.isfinite(w1).any()
        torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-4)
        assert out[f"ranks_agree/{alpha}"], alpha
    # the runs resampled at least once and differ between alphas: the comparison is not vacuous
    assert bool(out["smc/1.0"][0][3].any()) or bool(out["smc/2.0"][0][3].any())
    assert not torch.equal(out["smc/1.0"][0][0], out["smc/2.0"][0][0])


def test_a_model_that_does_not_split_is_refused():
    import pytest

    from smcgen.runners.native.parallel import _local_config

    cfg = NativeCausalLM.from_config(_config("llama"), dtype=torch.float32).cfg
    with pytest.raises(ValueError, match="num_key_value_heads"):
        _local_config(cfg, 4)


def test_a_model_built_layer_by_layer_is_quantized_as_it_grows():
    from smcgen.runners.native.build import random_layerwise

    model = random_layerwise(_config("llama"), dtype=torch.float32, quantize="int8", progress=False)
    assert model.n_layers == 2 and len(model.layers) == 2
    assert model.quantized_weights == {name: "int8" for name in NativeCausalLM.FP8_NAMES}
    assert all(layer.down.dtype == torch.int8 for layer in model.layers)
    plain = random_layerwise(_config("llama"), dtype=torch.float32, progress=False)
    # one byte per quantized weight: the model streams a bit over a quarter of the fp32 bytes
    assert model.weight_bytes() < 0.3 * plain.weight_bytes()
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    got, want = _logits(model, tokens), _logits(plain, tokens)
    assert torch.isfinite(got).all()
    # the same random draws, rounded to int8: close to the unquantized model's logits, not equal
    assert 0 < float((got - want).abs().max()) < 0.1 * float(want.abs().max())
