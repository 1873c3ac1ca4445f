"""Cascade attention in the native model and engine: the same logits and the same seeded runs.

The engine declares each request's prompt as its group's shared prefix after the prefill; with
``NativeCausalLM.cascade`` on, every forward attends to it once per group. On the CPU the kernels'
torch twins run (the Triton kernels are checked against them in tests/test_kernel_cascade.py); with
``SMCGEN_TEST_DEVICE=cuda`` the same tests run the Triton kernels (fp32) and the engine's CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import EOS, tiny_lm

from smcgen import SMCConfig
from smcgen.kernels.attention import cascade_attention
from smcgen.runners.native import model as model_module
from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC

PROMPT = [0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1, 1, 0, 2, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2, 0]  # 27 tokens


@pytest.fixture(scope="module")
def models(device):
    target, draft = tiny_lm(0, logit_scale=2.0, hidden=32), tiny_lm(1, logit_scale=1.0, hidden=32)
    return NativeCausalLM.from_hf(target.model, device=device), NativeCausalLM.from_hf(draft.model, device=device)


def test_forward_logits_agree_with_plain_attention(models):
    """Rows of two groups sharing a 19-token prefix (pages of 4: a partial page copied per row)."""
    model, _ = models
    group, n_groups, prefix = 3, 2, 19
    cache = model.make_cache(n_pages=64, n_rows=group * n_groups, max_pages=10, page_size=4)
    dev = model.device
    prompts = torch.randint(0, 4, (n_groups, prefix), generator=torch.Generator().manual_seed(0)).to(dev)
    view = cache.rows(0, n_groups)
    view.reserve(prefix)
    model(prompts, torch.zeros(n_groups, dtype=torch.int32, device=dev), view)
    cache.resample(torch.arange(n_groups, device=dev).repeat_interleave(group), prefix)
    cache.share_prefix(group, prefix)
    cache.reserve(prefix + 5)
    tokens = torch.randint(0, 4, (group * n_groups, 5), generator=torch.Generator().manual_seed(1)).to(dev)
    start = torch.full((group * n_groups,), prefix, dtype=torch.int32, device=dev)
    logits = {}
    for on in (False, True):
        model.cascade = on
        assert (model.cascade_prefix(cache) is not None) == on
        logits[on] = model(tokens, start, cache)  # rewrites the same K/V at the same slots
    model.cascade = None
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("draft_on", [True, False])
def test_seeded_runs_give_the_same_tokens_with_cascade_on_and_off(models, draft_on, monkeypatch):
    target, draft = models
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[7])  # the group size
        return cascade_attention(*args, **kwargs)

    monkeypatch.setattr(model_module, "cascade_attention", counted)
    cfg = SMCConfig(n_particles=4, block_size=3, max_new_tokens=12, seed=7, ess_threshold=0.9)
    runs = []
    for on in (False, True):
        target.cascade = draft.cascade = on
        engine = NativeSMC(target, cfg, draft=draft if draft_on else None, eos_token_ids=(EOS,), page_size=4)
        runs.append(engine.run(PROMPT, n_groups=3))
        assert bool(calls) == on and set(calls) <= {4}  # the cycles (not the prefill) ran it, groups of N
    target.cascade = draft.cascade = None
    off, on = runs
    assert torch.equal(on.tokens, off.tokens) and torch.equal(on.lengths, off.lengths)
    torch.testing.assert_close(on.log_weights, off.log_weights, rtol=1e-5, atol=1e-5)
    if draft_on:  # (plain SMC proposes from the target itself: equal weights, no resampling)
        assert bool(off.resampled.any()), "the run should resample, so particles' ancestries diverge"


def test_automatic_choice_is_off_on_the_cpu_and_for_short_prefixes(models):
    model, _ = models
    cache = model.make_cache(n_pages=2400, n_rows=16, max_pages=300, page_size=4)
    assert model.cascade_prefix(cache) is None  # nothing declared
    cache.share_prefix(2, model.cascade_min_prefix - 1)
    assert model.cascade is None and model.cascade_prefix(cache) is None  # too short to pay
    cache.share_prefix(2, model.cascade_min_prefix)
    # automatic: on CUDA only (the twins gain nothing from reading the prefix once), 8 groups here
    assert (model.cascade_prefix(cache) is not None) == (model.device.type == "cuda")
    cache.share_prefix(4, model.cascade_min_prefix)
    assert model.cascade_prefix(cache) is None  # 4 requests: below cascade_min_groups, where it lost
    # the measured shapes: 8 requests from 1,024 tokens, any number from 16,384 (1 x 8 included)
    assert model.cascade_pays(8, model.cascade_min_prefix) and not model.cascade_pays(7, model.cascade_min_prefix)
    assert model.cascade_pays(1, model.cascade_long_prefix) and model.cascade_pays(1, model.cascade_decode_prefix)
    assert not model.cascade_pays(1, model.cascade_decode_prefix - 1)
    # a verify (9 queries a row) only from the long prefixes, whatever the number of requests
    assert model.cascade_pays(1, model.cascade_long_prefix, 9) and not model.cascade_pays(16, 15_999, 9)
    cache.share_prefix(2, model.cascade_min_prefix)
    if model.device.type == "cuda":
        assert model.cascade_prefix(cache, 1) is not None and model.cascade_prefix(cache, 9) is None
    # one length per group (requests of different prompt lengths in one batch); the smallest decides
    cache.share_prefixes(4, [1100, 1150, 1024, 1200])
    assert cache.shared_prefix.lengths.tolist() == [1100, 1150, 1024, 1200] and cache.shared_prefix.min_length == 1024
    with pytest.raises(ValueError, match="one length per group"):
        cache.share_prefixes(4, [1100, 1150])
    model.cascade = True
    try:
        assert model.cascade_prefix(cache) is cache.shared_prefix
        assert model.cascade_prefix(cache.rows(0, 2)) is None  # a view's rows need not line up with groups
        cache.share_prefix(2, model.cascade_min_prefix)
        assert model.cascade_prefix(cache) is cache.shared_prefix
        cache.share_prefix(1, 1100)
        assert model.cascade_prefix(cache) is None  # a group of one row has nothing to share
    finally:
        model.cascade = None
    cache.reset()
    assert cache.shared_prefix is None


def test_share_prefix_checks_its_arguments():
    cache = PagedKVCache(1, 1, 16, 4, 8, 6, 4)
    with pytest.raises(ValueError, match="group must divide"):
        cache.share_prefix(4, 8)
    with pytest.raises(ValueError, match="past a row's 16 slots"):
        cache.share_prefix(3, 17)
    cache.share_prefix(3, 9)
    assert cache.shared_prefix.lengths.tolist() == [9, 9] and cache.shared_prefix.min_length == 9
    lengths = cache.shared_prefix.lengths
    cache.share_prefix(3, 0)
    assert cache.shared_prefix is None
    # a cycle captured while the prefix was declared still reads that tensor: it must say "none"
    assert lengths.tolist() == [0, 0]
    cache.share_prefixes(3, [5, 7])
    assert cache.shared_prefix.lengths is lengths and lengths.tolist() == [5, 7]
    cache.share_prefixes(3, [0, 0])
    assert cache.shared_prefix is None and lengths.tolist() == [0, 0]
