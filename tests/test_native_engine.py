"""The native engine against the exactly enumerated target, on the CPU with the kernels' torch twins.

The same unbiasedness and consistency checks as tests/test_exactness.py, for every target the
native engine runs (no potentials): plain SMC, SMC-SD with K = 1, 2, 3, power sampling with and
without a draft, and a target temperature. On the GPU host the same file runs with
``SMCGEN_TEST_DEVICE=cuda`` (models in float32 on CUDA, Triton kernels).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_exactness import MAX_NEW, assert_matches_target
from tiny_models import EOS, PROMPT, tiny_lm

from smcgen import SMCConfig
from smcgen.exact import enumerate_target
from smcgen.potentials.lm import LMPotential
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC

RUNS = 6000

CASES = {
    # name: (use draft, block, alpha, tau)
    "plain": (False, 1, 1.0, 1.0),
    "smc_sd_k1": (True, 1, 1.0, 1.0),
    "smc_sd_k2": (True, 2, 1.0, 1.0),
    "smc_sd_k3": (True, 3, 1.0, 1.0),
    "power_alpha2": (False, 1, 2.0, 1.0),
    "power_with_draft": (True, 2, 2.0, 1.0),
    "target_temperature": (True, 2, 1.0, 0.7),
}


@pytest.fixture(scope="module")
def models(device):
    # head_dim 16: the smallest the Triton attention kernel takes, so the file also runs on CUDA;
    # the draft is the target at temperature 2 (same body, flatter head): it covers every outcome with
    # bounded p/q, so the z-tests are not at the mercy of rare huge weights
    target, draft = tiny_lm(0, logit_scale=2.0, hidden=32), tiny_lm(0, logit_scale=1.0, hidden=32)
    return (
        target,
        NativeCausalLM.from_hf(target.model, device=device),
        NativeCausalLM.from_hf(draft.model, device=device),
    )


def native_runs(native_target, native_draft, n, block, alpha, tau, seed, page_size=4, draft_tau=1.0):
    cfg = SMCConfig(
        n_particles=n,
        block_size=block,
        max_new_tokens=MAX_NEW,
        seed=seed,
        ess_threshold=0.5,
        alpha=alpha,
        target_temperature=tau,
        draft_temperature=draft_tau,
    )
    engine = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=page_size)
    return engine.run(PROMPT, n_groups=RUNS)


@pytest.mark.parametrize("case", list(CASES))
def test_native_engine_matches_enumerated_target(case, models):
    use_draft, block, alpha, tau = CASES[case]
    target_lm, native_target, native_draft = models
    exact = enumerate_target(LMPotential(target_lm, temperature=tau, alpha=alpha), PROMPT, MAX_NEW, [])
    outs = {
        n: native_runs(native_target, native_draft if use_draft else None, n, block, alpha, tau, seed)
        for n, seed in ((1, 21), (4, 22), (16, 23))
    }
    assert_matches_target(case, exact, outs)


def test_native_engine_with_a_tempered_draft_matches_the_target(models):
    """Draft and target both at temperature 0.7 (the main job's setting): the draft samples from
    q^(1/0.7) and the weights must divide by that same tempered q, or the output drifts from the target
    at any N."""
    target_lm, native_target, native_draft = models
    exact = enumerate_target(LMPotential(target_lm, temperature=0.7), PROMPT, MAX_NEW, [])
    outs = {
        n: native_runs(native_target, native_draft, n, 2, 1.0, 0.7, seed, draft_tau=0.7)
        for n, seed in ((1, 31), (4, 32), (16, 33))
    }
    assert_matches_target("tempered_draft", exact, outs)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_a_quantized_draft_keeps_the_target_exact(models, fmt):
    """SMC-SD with every draft layer in fp8 / int8 (quantize_weights): the proposals come from the
    quantized draft and the weights use its own probabilities, so the output is still the target's."""
    import copy

    target_lm, native_target, native_draft = models
    draft8 = copy.deepcopy(native_draft)
    draft8.quantize_weights(fmt, NativeCausalLM.FP8_NAMES)
    exact = enumerate_target(LMPotential(target_lm), PROMPT, MAX_NEW, [])
    outs = {n: native_runs(native_target, draft8, n, 2, 1.0, 1.0, seed) for n, seed in ((1, 31), (4, 32), (16, 33))}
    assert_matches_target(f"{fmt}_draft", exact, outs)


def test_native_engine_resamples_and_reports(models):
    """ESS trace, resampling flags and weights have the documented shapes and meaning."""
    _, native_target, native_draft = models
    out = native_runs(native_target, native_draft, 8, 1, 1.0, 1.0, seed=5)
    steps = out.ess_history.shape[0]
    assert out.ess_history.shape == (steps, RUNS) and out.resampled.shape == (steps, RUNS)
    assert 1 <= steps <= math.ceil(MAX_NEW / 2)
    assert bool(((out.ess_history >= 1 - 1e-4) & (out.ess_history <= 8 + 1e-4)).all())
    # resampling happens exactly where the ESS fell under half the particles (never on the last step)
    assert torch.equal(out.resampled[:-1], out.ess_history[:-1] < 4.0)
    assert not bool(out.resampled[-1].any())
    assert torch.allclose(out.log_weights.exp().sum(1), torch.ones(RUNS, dtype=torch.float64))
    assert bool((out.lengths >= 1).all() and (out.lengths <= MAX_NEW).all())


def test_native_engine_is_reproducible(models):
    _, native_target, native_draft = models
    a = native_runs(native_target, native_draft, 4, 2, 1.0, 1.0, seed=9)
    b = native_runs(native_target, native_draft, 4, 2, 1.0, 1.0, seed=9)
    c = native_runs(native_target, native_draft, 4, 2, 1.0, 1.0, seed=10)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_z, b.log_z)
    assert not torch.equal(a.tokens, c.tokens)


def test_page_sizes_agree(models):
    """The page size is bookkeeping only: same seed, same particles and weights."""
    _, native_target, native_draft = models
    a = native_runs(native_target, native_draft, 4, 2, 1.0, 1.0, seed=3, page_size=2)
    b = native_runs(native_target, native_draft, 4, 2, 1.0, 1.0, seed=3, page_size=16)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.log_z, b.log_z, atol=1e-4)


def test_generate_runs_the_native_engine_when_asked(target, draft):
    """generate(engine='native') goes through NativeSMC (CPU twins here) and returns a normal result."""
    import smcgen

    res = smcgen.generate(
        target, [0, 1], draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=6, seed=0
    )
    again = smcgen.generate(
        target, [0, 1], draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=6, seed=0
    )
    assert res.n_particles == 4 and len(res.sequences) == 4 and len(res.log_weights) == 4
    assert res.engine == "native" and "engine: native" in res.summary()
    assert 1 <= len(res.token_ids) <= 6 and res.token_ids == again.token_ids
    assert math.isclose(sum(math.exp(w) for w in res.log_weights), 1.0, rel_tol=1e-6)
    assert res.n_steps == len(res.ess_history) >= 1


def test_generate_with_an_fp8_draft(target, draft):
    """draft_fp8=True: generate runs the native engine on an fp8 copy of the draft (the bf16 copy
    stays as it was); without a draft, or on the generic engine, it is refused by name."""
    import smcgen
    from smcgen.samplers.native_select import _NATIVE_COPIES

    kw = {"draft": draft, "engine": "native", "n_particles": 4, "block_size": 2, "max_new_tokens": 6, "seed": 0}
    plain = smcgen.generate(target, [0, 1], draft_quantization="none", **kw)
    res = smcgen.generate(target, [0, 1], draft_fp8=True, **kw)
    assert res.engine == "native" and 1 <= len(res.token_ids) <= 6
    copies = _NATIVE_COPIES[draft]  # keyed by the transformers model object, then by format
    assert copies["fp8"].fp8_weights == NativeCausalLM.FP8_DEFAULT and copies[None].quantized_weights == {}
    again = smcgen.generate(target, [0, 1], draft_quantization="none", **kw)
    assert plain.token_ids == again.token_ids, "the bf16 draft is untouched"
    with pytest.raises(ValueError, match="draft_fp8"):
        smcgen.generate(target, [0, 1], engine="native", draft_fp8=True, max_new_tokens=3)
    with pytest.raises(ValueError, match="draft_fp8"):
        smcgen.generate(target, [0, 1], **{**kw, "engine": "generic"}, draft_fp8=True)
    if next(target.parameters()).device.type == "cpu":  # 'auto' off the GPU: the generic engine, draft as loaded
        auto = smcgen.generate(target, [0, 1], **{**kw, "engine": "auto"}, draft_fp8=True)
        assert auto.engine == "generic" and 1 <= len(auto.token_ids) <= 6


def test_auto_quantizes_narrow_batches_on_the_gpu_only():
    """draft_quantization='auto' (the default): int8 for draft steps of at most 16 rows on CUDA, as
    loaded for wider ones and off the GPU; explicit formats and draft_fp8 win."""
    from smcgen import SMCConfig
    from smcgen.samplers.native_select import AUTO_INT8_MAX_ROWS, draft_format

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = SMCConfig()
    assert auto.draft_quantization == "auto"
    from smcgen.kernels._triton import HAS_TRITON

    want = "int8" if HAS_TRITON else None  # the composed path would dequantize at every call
    assert draft_format(auto, 8, cuda) == want and draft_format(auto, AUTO_INT8_MAX_ROWS, cuda) == want
    assert draft_format(auto, AUTO_INT8_MAX_ROWS + 1, cuda) is None and draft_format(auto, 8, cpu) is None
    assert draft_format(SMCConfig(draft_quantization="none"), 8, cuda) is None
    assert draft_format(SMCConfig(draft_quantization="fp8"), 64, cpu) == "fp8"
    assert draft_format(SMCConfig(draft_fp8=True), 8, cuda) == "fp8"


def test_generate_with_an_int8_draft(target, draft):
    """draft_quantization='int8': an int8 copy of the draft beside the others; draft_fp8=True with
    another format is refused, and 'fp8' equals the draft_fp8 shorthand."""
    import pydantic

    import smcgen
    from smcgen.samplers.native_select import _NATIVE_COPIES, forget_native_copies

    kw = {"draft": draft, "engine": "native", "n_particles": 4, "block_size": 2, "max_new_tokens": 6, "seed": 0}
    forget_native_copies()
    smcgen.generate(target, [0, 1], **kw)  # the default, 'auto': int8 on a GPU (4 rows), as loaded on the CPU
    on_gpu = next(target.parameters()).device.type == "cuda"
    assert set(_NATIVE_COPIES[draft]) == ({"int8"} if on_gpu else {None})
    res = smcgen.generate(target, [0, 1], draft_quantization="int8", **kw)
    assert res.engine == "native" and 1 <= len(res.token_ids) <= 6
    assert set(_NATIVE_COPIES[draft]["int8"].quantized_weights.values()) == {"int8"}
    fp8 = smcgen.generate(target, [0, 1], draft_quantization="fp8", **kw)
    assert fp8.token_ids == smcgen.generate(target, [0, 1], draft_fp8=True, **kw).token_ids
    for other in ("int8", "none"):
        with pytest.raises(pydantic.ValidationError, match="give one of them"):
            smcgen.SMCConfig(draft_fp8=True, draft_quantization=other)
    with pytest.raises(pydantic.ValidationError, match="draft_quantization"):
        smcgen.SMCConfig(draft_quantization="int4")
    with pytest.raises(ValueError, match="draft_quantization='int8'"):
        smcgen.generate(target, [0, 1], engine="native", draft_quantization="int8", max_new_tokens=3)


def test_native_engine_refuses_what_it_cannot_run(target, draft):
    import smcgen
    from smcgen import Proposal

    class Custom(Proposal):
        def propose(self, sequences, n_tokens, generator):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="a custom Proposal runs on the generic engine only"):
        smcgen.generate(target, [0, 1], engine="native", proposal=Custom(), max_new_tokens=3)
    # potentials and every resampler run natively (tests/test_native_potentials.py)
    res = smcgen.generate(target, [0, 1], engine="native", resampler="multinomial", max_new_tokens=3, seed=0)
    assert res.engine == "native"
    with pytest.raises(ValueError, match="at least 2 tokens"):
        smcgen.generate(target, [0], draft=draft, engine="native", max_new_tokens=3)
    # 'auto' on the CPU falls back to the generic engine, which runs all of these
    res = smcgen.generate(target, [0, 1], resampler="multinomial", max_new_tokens=3, seed=0)
    assert 1 <= len(res.token_ids) <= 3 and res.engine == "generic"


def test_no_resampling_after_every_particle_finished(models):
    """Runs that end early (every particle hit EOS) do not resample on their last step, like the
    generic engine. With N = 1 "finished before resampling" and "after" coincide, so it is exact."""
    _, native_target, native_draft = models
    ended_early = 0
    for seed in range(20):
        cfg = SMCConfig(n_particles=1, block_size=2, max_new_tokens=30, seed=seed, ess_threshold=1.0)
        out = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4).run(
            PROMPT, n_groups=1
        )
        assert not bool(out.resampled[-1].any())
        assert bool(out.resampled[:-1].all())  # threshold 1: every other step resamples
        ended_early += out.resampled.shape[0] < 10
    assert ended_early >= 10


def test_the_cycle_enqueued_past_the_end_changes_nothing(models):
    """With the lookahead the host enqueues cycle c + 1 before it reads cycle c's done flag: when
    every particle finished in cycle c, that extra cycle must leave tokens, weights, traces and the
    cycle count exactly as the host-waits-every-cycle loop leaves them (forced on, so that the CPU
    runs the extra cycle too)."""
    _, native_target, native_draft = models
    ended_early = 0
    for seed in range(6):
        cfg = SMCConfig(n_particles=3, block_size=2, max_new_tokens=30, seed=seed, ess_threshold=0.5)
        runs = []
        for lookahead in (True, False):
            engine = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4)
            engine.lookahead = lookahead
            runs.append((engine.run(PROMPT, n_groups=4), engine.last_timing["cycles"]))
        (a, cycles_a), (b, cycles_b) = runs
        assert cycles_a == cycles_b == a.ess_history.shape[0]
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.log_weights, b.log_weights)
        assert torch.equal(a.ess_history, b.ess_history) and torch.equal(a.resampled, b.resampled)
        ended_early += cycles_a < 10
    assert ended_early >= 3, "the case under test: runs that stop before their last cycle"


def test_only_one_token_cycles_look_ahead_by_default(models):
    """The lookahead's wasted last cycle costs a whole SMC-SD cycle (K draft steps and a verify),
    more than the host waits it saves over a run; one-token cycles (AR, plain SMC) keep it on a
    GPU. Nothing looks ahead on the CPU, and a setting of True / False wins."""
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=2, block_size=3, max_new_tokens=8, seed=0)
    sd = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4)
    plain = NativeSMC(native_target, cfg, eos_token_ids=(EOS,), page_size=4)
    assert (sd._looks_ahead(True), plain._looks_ahead(True)) == (False, True)
    assert (sd._looks_ahead(False), plain._looks_ahead(False)) == (False, False)
    sd.lookahead, plain.lookahead = True, False
    assert (sd._looks_ahead(True), plain._looks_ahead(True)) == (True, False)


def test_decode_kernels_give_the_run_of_the_cublas_path(device):
    """The exactness tests batch thousands of runs, so on the GPU their decode steps take the wide
    (cuBLAS) path; this runs decode-sized batches (8 rows) through the skinny GEMM, the fused
    QKV + RoPE kernel (64-wide heads) and PDL, and checks that the run equals the same run with all
    three off: same tokens, weights within fp32 rounding (fp32 models)."""
    if device.type != "cuda":
        pytest.skip("runs with SMCGEN_TEST_DEVICE=cuda (on the CPU both paths are the same torch twins)")
    target = NativeCausalLM.from_hf(tiny_lm(0, logit_scale=2.0, hidden=128).model, device=device)
    draft = NativeCausalLM.from_hf(tiny_lm(0, logit_scale=1.0, hidden=128).model, device=device)
    assert target.head_dim == 64
    for seed in range(4):
        cfg = SMCConfig(n_particles=8, block_size=3, max_new_tokens=24, seed=seed, ess_threshold=0.5)
        runs = []
        for fast in (True, False):
            for m in (target, draft):
                m.skinny_max_rows, m.pdl = (16, None) if fast else (0, False)
            runs.append(NativeSMC(target, cfg, draft=draft, eos_token_ids=(EOS,), page_size=4).run(PROMPT))
        a, b = runs
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.log_weights, b.log_weights, atol=1e-4, rtol=1e-4)
    for m in (target, draft):
        m.skinny_max_rows, m.pdl = 16, None


def test_context_bounds_are_checked_before_running(models):
    _, native_target, native_draft = models
    limit = native_target.max_positions  # 64 for the tiny models
    cfg = SMCConfig(n_particles=2, block_size=4, max_new_tokens=limit - 2, seed=0)
    with pytest.raises(ValueError, match="last cycle"):
        NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,)).run(PROMPT)
    cfg = SMCConfig(n_particles=2, block_size=4, max_new_tokens=limit, seed=0)
    with pytest.raises(ValueError, match="exceeds the model context"):
        NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,)).run(PROMPT)


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("resampler", ["systematic", "multinomial"])
def test_mixed_lengths_in_one_batch_equal_each_request_alone(models, resampler):
    """Prompts of different lengths, seeds and limits run as one batch (per-row positions, each
    prompt prefilled into its own pages); each request gets the tokens it gets alone, and its weights
    up to float rounding (a batch's matmuls may sum in another order than a single request's)."""
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9, resampler=resampler)
    engine = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4)
    prompts = [_prompt(n, i) for i, n in enumerate([5, 2, 13, 7, 2])]
    seeds, limits = [3, 1, 4, 1, 5], [9, 6, 9, 3, 8]
    mixed = engine.run(prompts, on_dead="flag", seeds=seeds, max_new_tokens=limits)
    assert mixed.tokens.shape == (5, 4, 9)
    resampled = 0
    for b, (prompt, seed, limit) in enumerate(zip(prompts, seeds, limits)):
        alone = engine.run([prompt], on_dead="flag", seeds=[seed], max_new_tokens=[limit])
        assert torch.equal(mixed.tokens[b, :, :limit], alone.tokens[0]), b
        assert (mixed.tokens[b, :, limit:] == EOS).all()  # past its own limit: padding
        assert torch.equal(mixed.lengths[b], alone.lengths[0])
        assert torch.allclose(mixed.log_weights[b], alone.log_weights[0], rtol=0, atol=1e-5)
        assert torch.allclose(mixed.log_z[b], alone.log_z[0], rtol=0, atol=1e-5)
        steps = alone.ess_history.shape[0]
        assert torch.allclose(mixed.ess_history[:steps, b], alone.ess_history[:, 0], rtol=0, atol=1e-4)
        assert torch.equal(mixed.resampled[:steps, b], alone.resampled[:, 0])
        assert torch.isnan(mixed.ess_history[steps:, b]).all()  # it had stopped: no steps after that
        resampled += int(alone.resampled.sum())
    assert resampled > 0, "the check must cover resampling"
    # a seed alone equals the config's seed
    again = NativeSMC(
        native_target,
        cfg.model_copy(update={"seed": 4, "max_new_tokens": 9}),
        draft=native_draft,
        eos_token_ids=(EOS,),
        page_size=4,
    ).run([prompts[2]], on_dead="flag")
    assert torch.equal(again.tokens[0], mixed.tokens[2])


@pytest.mark.parametrize("resampler", ["multinomial", "stratified"])
def test_the_graph_warm_up_leaves_the_run_as_it_was(models, warm_up_capture, resampler):
    """The cycle that warms up a CUDA graph's capture runs on a restored snapshot and must change
    nothing the run reads. Its resampling used to free a row's partial KV page and copy another
    row's into the page popped next, the freed one, live again after the restore (the KV pools are
    not in the snapshot): a request of a mixed batch then drew differently than alone. The warm-up
    runs here without the graph (CPU twins), where the torch resamplers showed it."""
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9, resampler=resampler)
    prompts = [_prompt(n, i) for i, n in enumerate([5, 2, 13, 7, 2])]
    seeds, limits = [3, 1, 4, 1, 5], [9, 6, 9, 3, 8]
    plain = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4, cuda_graph=False)
    expected = plain.run(prompts, on_dead="flag", seeds=seeds, max_new_tokens=limits)
    warmed = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4, cuda_graph=False)
    warmed.pad_prefill = False  # on CUDA the graph path pads prompts: prefill like the plain run, bit for bit
    captured = warm_up_capture(warmed)  # the warm-up, then replays that run the cycle eagerly
    got = warmed.run(prompts, on_dead="flag", seeds=seeds, max_new_tokens=limits)
    assert len(captured) == 1
    assert torch.equal(got.tokens, expected.tokens)
    assert torch.equal(got.resampled, expected.resampled)
    torch.testing.assert_close(got.log_weights, expected.log_weights, rtol=0, atol=0)


@pytest.mark.parametrize("resampler", ["systematic", "multinomial"])
def test_a_run_of_the_same_shape_replays_the_kept_capture(models, warm_up_capture, resampler):
    """A run with the last run's prompt lengths and limits (other prompts, other seeds) reuses its
    state, KV caches and captured cycle: no second capture, the draws of a fresh engine, and the
    earlier result left as it was. Another shape, or another engine's run in between, captures anew."""
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9, resampler=resampler)

    def engine() -> NativeSMC:
        e = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4, cuda_graph=False)
        e.pad_prefill = False  # as the fresh engines (no graph): the kept one's prefill must match them bit for bit
        return e

    lengths, limits = [5, 2, 13], [9, 6, 9]
    first_prompts = [_prompt(n, i) for i, n in enumerate(lengths)]
    second_prompts = [_prompt(n, i + 10) for i, n in enumerate(lengths)]
    kept = engine()
    captured = warm_up_capture(kept)
    first = kept.run(first_prompts, on_dead="flag", seeds=[3, 1, 4], max_new_tokens=limits)
    first_tokens, first_w, first_ess = first.tokens.clone(), first.log_weights.clone(), first.ess_history.clone()
    second = kept.run(second_prompts, on_dead="flag", seeds=[2, 7, 1], max_new_tokens=limits)
    assert len(captured) == 1 and captured[0] is kept._kept[1]
    assert kept.last_timing["capture_s"] < 0.05
    expected = engine().run(second_prompts, on_dead="flag", seeds=[2, 7, 1], max_new_tokens=limits)
    assert torch.equal(second.tokens, expected.tokens) and torch.equal(second.lengths, expected.lengths)
    assert torch.equal(second.resampled, expected.resampled)
    torch.testing.assert_close(second.log_weights, expected.log_weights, rtol=0, atol=0)
    # the first result is the caller's, not a view of the kept state
    assert torch.equal(first.tokens, first_tokens) and torch.equal(first.log_weights, first_w)
    assert torch.equal(first.ess_history.isnan(), first_ess.isnan())
    # another engine's run drops the kept one; then the same shape captures again
    engine().run(second_prompts, on_dead="flag", seeds=[2, 7, 1], max_new_tokens=limits)
    kept.run(second_prompts, on_dead="flag", seeds=[2, 7, 1], max_new_tokens=limits)
    assert len(captured) == 2
    kept.run(second_prompts[:2], on_dead="flag", seeds=[2, 7], max_new_tokens=limits[:2])
    assert len(captured) == 3
    # the config (but its seed) is part of the shape: a temperature is a constant of the graph
    kept.config = cfg.model_copy(update={"seed": 9})
    kept.run(second_prompts[:2], on_dead="flag", seeds=[2, 7], max_new_tokens=limits[:2])
    assert len(captured) == 3
    kept.config = cfg.model_copy(update={"target_temperature": 0.5})
    kept.run(second_prompts[:2], on_dead="flag", seeds=[2, 7], max_new_tokens=limits[:2])
    assert len(captured) == 4
    # request slots size their own pools from free memory: the kept run goes first
    from smcgen.samplers.native_slots import NativeSlots

    assert kept._kept is not None
    NativeSlots(engine(), n_slots=2, max_new_tokens=9)
    assert kept._kept is None
    # so does any other pool (standard SD's caches, the paged runner's): all are made by make_cache
    kept.run(second_prompts[:2], on_dead="flag", seeds=[2, 7], max_new_tokens=limits[:2])
    assert kept._kept is not None
    native_draft.make_cache(n_pages=4, n_rows=1, max_pages=4, page_size=4)
    assert kept._kept is None


def test_prompts_of_two_buckets_in_turn_replay_both_kept_runs(models, warm_up_capture, monkeypatch):
    """An engine keeps its last KEPT_RUNS runs of different shapes: prompts whose lengths switch
    between two buckets capture each bucket once, and every run draws what a fresh engine draws.
    A fourth shape evicts the least recently used one; kept runs whose pools take more than their
    share of memory are freed before a new run sizes its pools."""
    from smcgen.samplers import native as native_module
    from smcgen.samplers import native_setup

    _, native_target, native_draft = models
    monkeypatch.setattr(native_setup, "PROMPT_BUCKET_FLOOR", 8)
    cfg = SMCConfig(n_particles=3, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9)

    def engine() -> NativeSMC:
        e = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4, cuda_graph=False)
        e.pad_prefill = False  # as the fresh engines (no graph): the kept ones must match them bit for bit
        return e

    # buckets 8, 16, 8, 16, 8, then 32 and 55 (a third and a fourth shape), then 16 again
    lengths = [5, 13, 7, 9, 3, 20, 40, 11]
    captures_after = [1, 2, 2, 2, 2, 3, 4, 5]
    prompts = [_prompt(n, 40 + i) for i, n in enumerate(lengths)]
    fresh = [engine().run([p], on_dead="flag", seeds=[i]) for i, p in enumerate(prompts)]
    kept = engine()
    captured = warm_up_capture(kept)
    for i, (prompt, expected, captures) in enumerate(zip(prompts, fresh, captures_after)):
        got = kept.run([prompt], on_dead="flag", seeds=[i])
        assert len(captured) == captures, (lengths[i], len(captured))
        assert len(kept._kept_runs) == min(len(set(captures_after[: i + 1])), native_module.KEPT_RUNS)
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.lengths, expected.lengths)
        torch.testing.assert_close(got.log_weights, expected.log_weights, rtol=0, atol=0)
    # the fourth shape (55) evicted bucket 16, the least recently used, and 16 then evicted 8
    kept.run([prompts[0]], on_dead="flag", seeds=[0])
    assert len(captured) == 6
    # new pools that do not fit beside the kept runs: those go, and the pools are sized again
    sized_beside = []
    make_caches = kept._make_caches

    def tight(*args):
        sized_beside.append(len(kept._kept_runs))
        if kept._kept_runs:
            raise ValueError("KV cache too small")
        return make_caches(*args)

    monkeypatch.setattr(kept, "_make_caches", tight)
    kept.run([prompts[5]], on_dead="flag", seeds=[5])
    assert sized_beside == [3, 0] and len(captured) == 7 and len(kept._kept_runs) == 1
    monkeypatch.setattr(kept, "_make_caches", make_caches)
    # kept pools over their share of memory: the other kept runs go before a new shape's pools
    kept.run([prompts[1]], on_dead="flag", seeds=[1])
    assert len(captured) == 8 and len(kept._kept_runs) == 2
    monkeypatch.setattr(native_module, "KEPT_RUNS_MEMORY_FRACTION", 0.0)
    kept.run([prompts[0]], on_dead="flag", seeds=[0])
    assert len(captured) == 9 and len(kept._kept_runs) == 1


@pytest.mark.parametrize("cascade", [None, True])
def test_prompts_of_one_bucket_replay_the_kept_capture(models, device, warm_up_capture, monkeypatch, cascade):
    """Pools are sized for a bucket of prompt lengths, so a prompt of another length in the same
    bucket reuses the kept run and its captured cycle, and draws what a fresh engine draws. On CUDA
    the real graph, captured over the bucket's first prompt, replays for the others: positions and
    shared-prefix lengths are read on the device. A two-token prompt leaves the draft no shared
    prefix; a cascade graph captured over a longer one must then find that prefix empty."""
    from smcgen.samplers import native_setup

    _, native_target, native_draft = models
    monkeypatch.setattr(native_setup, "PROMPT_BUCKET_FLOOR", 8)  # buckets 8, 16, 32 and 55 (the context's cap)
    for m in (native_target, native_draft):
        monkeypatch.setattr(m, "cascade", cascade)
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9)

    def engine() -> NativeSMC:
        return NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4)

    # (prompt length, captures so far): 13, 9 and 16 share bucket 16; 5, 2 and 8 bucket 8; 20 and 32
    # bucket 32; 40 and 55 the cap
    plan = [(13, 1), (9, 1), (16, 1), (5, 2), (2, 2), (8, 2), (20, 3), (32, 3), (40, 4), (55, 4)]
    prompts = [_prompt(n, 20 + i) for i, (n, _) in enumerate(plan)]
    # first: a fresh engine's run drops another engine's kept one
    fresh = [engine().run([p], on_dead="flag", seeds=[i]) for i, p in enumerate(prompts)]
    kept = engine()
    if device.type == "cuda":
        captured, capture = [], kept._capture
        monkeypatch.setattr(kept, "_capture", lambda s: captured.append(s) or capture(s))
    else:
        captured = warm_up_capture(kept)
    resampled = 0
    for i, ((n, captures), prompt, expected) in enumerate(zip(plan, prompts, fresh)):
        got = kept.run([prompt], on_dead="flag", seeds=[i])
        assert len(captured) == captures, (n, len(captured))
        if device.type == "cuda" and i > 0 and captures == plan[i - 1][1]:
            # a prompt of the kept bucket: the prefill, padded to it, replays the graph its second use recorded
            assert kept._kept[1].prefill.graph is not None, n
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.lengths, expected.lengths), n
        torch.testing.assert_close(got.log_weights, expected.log_weights, rtol=0, atol=1e-5)
        resampled += int(got.resampled.sum())
    assert resampled > 0, "the check must cover resampling"


def test_a_run_sized_for_its_own_prompt_replays_for_that_length(models, warm_up_capture, monkeypatch):
    """When a bucket's worst case does not fit, the pools are sized for the prompts themselves and
    kept under their exact lengths: the same length replays (without trying the bucket again) and
    draws what a fresh engine draws; another length of the bucket sizes and captures anew."""
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=9, seed=0, ess_threshold=0.9)
    tried = []

    def engine() -> NativeSMC:
        e = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4)
        make = e._make_caches

        def tight(segments, pool_lens, share_t):
            bucket = pool_lens != [g.prompt_len for g in segments]  # sized for longer prompts
            tried.append(bucket)
            if bucket:
                raise ValueError("KV cache too small (this test's bucket never fits)")
            return make(segments, pool_lens, share_t)

        monkeypatch.setattr(e, "_make_caches", tight)
        return e

    prompts = [_prompt(13, 40), _prompt(13, 41), _prompt(9, 42)]
    fresh = [engine().run([p], on_dead="flag", seeds=[i]) for i, p in enumerate(prompts)]
    kept = engine()
    captured = warm_up_capture(kept)
    tried.clear()
    # the third prompt tries its bucket beside the kept run, then alone, then its own length
    attempts_of = ([True, False], [], [True, True, False])
    for i, (prompt, captures, attempts) in enumerate(zip(prompts, (1, 1, 2), attempts_of)):
        got = kept.run([prompt], on_dead="flag", seeds=[i])
        assert len(captured) == captures and tried == attempts, (i, len(captured), tried)
        tried.clear()
        assert torch.equal(got.tokens, fresh[i].tokens) and torch.equal(got.lengths, fresh[i].lengths)
        torch.testing.assert_close(got.log_weights, fresh[i].log_weights, rtol=0, atol=0)


@pytest.mark.parametrize("with_draft", [True, False])
def test_prompts_padded_to_their_pools_draw_what_unpadded_ones_draw(models, warm_up_capture, monkeypatch, with_draft):
    """A prefill padded to the pools' length (what lets one CUDA graph serve a bucket) writes the
    prompt's keys and values as the unpadded one does: the pads sit past the prompt, attention is
    causal, and the cycles overwrite their positions before reading them. Same tokens and weights
    for prompts of every length in a bucket, batches of several lengths included; limits short
    enough that the pads' pages outlast the run's own (the pools, sized for the bucket plus a page
    of slack a row, hold them: an overrun would raise). A kept run reuses its padded buffers."""
    from smcgen.samplers import native_setup

    _, native_target, native_draft = models
    draft = native_draft if with_draft else None
    monkeypatch.setattr(native_setup, "PROMPT_BUCKET_FLOOR", 16)
    resampled = 0
    for limit in (2, 9):
        cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=limit, seed=0, ess_threshold=0.9)

        def engine(pad: bool, cfg: SMCConfig = cfg) -> NativeSMC:
            e = NativeSMC(native_target, cfg, draft=draft, eos_token_ids=(EOS,), page_size=4)
            e.pad_prefill = pad
            return e

        kept = engine(True)
        warm_up_capture(kept)
        batches = [[_prompt(n, n)] for n in (2, 3, 7, 13, 16)] + [[_prompt(5, 1), _prompt(11, 2), _prompt(5, 3)]]
        for i, prompts in enumerate(batches):
            seeds = list(range(i, i + len(prompts)))
            plain = engine(False).run(prompts, on_dead="flag", seeds=seeds)
            for e in (engine(True), kept):
                got = e.run(prompts, on_dead="flag", seeds=seeds)
                assert torch.equal(got.tokens, plain.tokens) and torch.equal(got.lengths, plain.lengths), (limit, i)
                torch.testing.assert_close(got.log_weights, plain.log_weights, rtol=0, atol=1e-5)
            resampled += int(plain.resampled.sum())
        buffers = kept._kept[1].prefill
        assert buffers is not None and buffers.lengths == [16, 16, 16]
        again = kept.run(batches[-1], on_dead="flag", seeds=[9, 8, 7])
        assert kept._kept[1].prefill is buffers and not bool(again.dead.any())
    # (plain SMC with no potential proposes from the target: equal weights, nothing to resample)
    assert resampled > 0 or draft is None, "the check must cover resampling"


def test_pools_sized_for_a_bucket_hold_every_prompt_in_it():
    """The worst case of any prompt up to the bucket's length needs at most one page per row more
    than the bucket's own (its partial last prompt page is each row's own): the slack the pools get.
    Padded to the bucket (samplers/native_prefill.py), each request's prefilled row also holds the
    pads' pages, past what its own run reaches when the run is short: still within the slack."""
    from smcgen.runners.native.kv_cache import PagedKVCache

    for page in (1, 4, 16):
        for rows, requests in ((4, 1), (8, 2), (1, 1)):
            for new in (1, 9, 31):
                for bucket in (8, 16, 64):
                    top = PagedKVCache.pages_needed(rows, requests, bucket, bucket + new, page)
                    for p in range(1, bucket + 1):
                        need = PagedKVCache.pages_needed(rows, requests, p, p + new, page)
                        assert need <= top + rows, (page, rows, requests, new, bucket, p)
                        pads = requests * max(0, -(-bucket // page) - -(-(p + new) // page))
                        assert need + pads <= top + rows, (page, rows, requests, new, bucket, p)


def test_mixed_lengths_without_seeds_share_a_stream_per_length(models):
    """Without per-request seeds the groups of one length share the config's stream (the i-th
    length another key), in the order given; reproducible."""
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=MAX_NEW, seed=7, ess_threshold=0.5)
    engine = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(EOS,), page_size=4)
    short, long = list(PROMPT), [*PROMPT, 2, 0]
    prompts = [short if i % 2 == 0 else long for i in range(24)]
    mixed = engine.run(prompts)
    assert mixed.tokens.shape == (24, 4, MAX_NEW) and not bool(mixed.dead.any())
    alone_short = engine.run([short] * 12)
    assert torch.equal(mixed.tokens[::2], alone_short.tokens)
    assert torch.allclose(mixed.log_z[::2], alone_short.log_z, rtol=0, atol=1e-5)
    alone_long = engine.run([long] * 12)  # the first length of its own call: the config's key, not the second's
    assert not torch.equal(mixed.tokens[1::2], alone_long.tokens)
    assert torch.equal(engine.run(prompts).tokens, mixed.tokens)


def test_segments_come_back_in_the_callers_order():
    from smcgen.samplers.generic import BatchRun
    from smcgen.samplers.native_state import _reordered

    n = 4
    run = BatchRun(
        tokens=torch.arange(n).view(n, 1, 1),
        lengths=torch.ones(n, 1, dtype=torch.long),
        log_weights=torch.zeros(n, 1),
        log_z=torch.arange(n).double(),
        ess_history=torch.arange(n).float()[None],
        resampled=torch.tensor([[True, False, False, True]]),
        elapsed_s=1.0,
        dead=torch.tensor([1, 0, 0, 0]).bool(),
    )
    back = _reordered(run, [2, 0, 3, 1])  # batch group j is the caller's order[j]
    assert back.tokens.flatten().tolist() == [1, 3, 0, 2] and back.log_z.tolist() == [1, 3, 0, 2]
    assert back.ess_history[0].tolist() == [1, 3, 0, 2] and back.dead.tolist() == [False, False, True, False]
    assert back.resampled[0].tolist() == [False, True, True, False]


def test_a_long_prompt_fits_the_pool_sized_for_it(models):
    """The pool holds exactly PagedKVCache.pages_needed pages; a prompt longer than the generation,
    shared by 16 particles that resample every cycle, runs in it without exhausting it."""
    _, native_target, native_draft = models
    cfg = SMCConfig(n_particles=16, block_size=2, max_new_tokens=4, seed=0, ess_threshold=1.0)
    prompt = [int(t) for t in torch.randint(0, 3, (41,), generator=torch.Generator().manual_seed(0))]
    out = NativeSMC(native_target, cfg, draft=native_draft, eos_token_ids=(), page_size=4).run(prompt, n_groups=2)
    assert out.tokens.shape[:2] == (2, 16) and bool(out.resampled.any())


def test_native_copies_are_cached_until_forgotten(target, tok):
    """One native copy per transformers model; forget_native_copies() makes the next request convert again."""
    import smcgen
    from smcgen.samplers.native_select import forget_native_copies, native_model

    lm = smcgen.api.as_language_model(target, tok)
    first = native_model(lm)
    assert native_model(lm) is first
    forget_native_copies()
    assert native_model(lm) is not first


def test_one_launch_layers_give_the_run_of_five_launches(models, device, monkeypatch):
    """SMC-SD with the draft's decode layers as one launch each (kernels.decode_layer; forced on in
    the interpreter on the CPU, a bf16 draft on CUDA): the same tokens, and weights within fp32
    rounding, as the run with five launches a layer. The cycle's two-token first draft step and the
    one-token steps both take the fused path (the target's layers keep five launches: its
    ``fused_layers`` stays off)."""
    from smcgen.kernels._triton import HAS_TRITON
    from smcgen.runners.native import model as model_mod

    if not HAS_TRITON or (device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs triton (its CPU interpreter on the CPU)")
    target_lm, native_target, native_draft = models
    if device.type == "cuda":
        draft = NativeCausalLM.from_hf(
            tiny_lm(0, logit_scale=1.0, hidden=32).model, dtype=torch.bfloat16, device=device
        )
    else:
        draft = native_draft
        monkeypatch.setattr(model_mod, "use_triton", lambda t: True)
        monkeypatch.setattr(draft, "FUSED_LAYER_DTYPES", (torch.float32,))
    fused_rows = []
    real = model_mod.decode_layer_triton
    monkeypatch.setattr(
        model_mod, "decode_layer_triton", lambda h, *a, **k: fused_rows.append(h.shape[:2]) or real(h, *a, **k)
    )
    cfg = SMCConfig(n_particles=2, block_size=3, max_new_tokens=8, seed=4, ess_threshold=0.5)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(draft, "fused_layers", fused)
        runs.append(NativeSMC(native_target, cfg, draft=draft, eos_token_ids=(EOS,), page_size=4).run(PROMPT))
    a, b = runs
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.log_weights, b.log_weights, atol=1e-5, rtol=1e-5)
    assert {tuple(s) for s in fused_rows} >= {(2, 1), (2, 2)}, fused_rows
