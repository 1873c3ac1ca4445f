"""Continuous batching on the native engine: requests join and leave a running batch between
cycles, each drawing what it draws alone with its seed; a short request beside a long one finishes
first; finished requests' pages return to the pool; a request that does not fit the pool waits (or,
if it never can, is refused) without touching the others. On the CPU with the kernels' torch twins;
the NativeSlots tests also run on CUDA (``SMCGEN_TEST_DEVICE=cuda``: one CUDA graph, captured with
every slot idle, replayed for every mix of requests)."""

from __future__ import annotations

import pytest
import torch
from test_engine import lm_with_tokenizer, same
from tiny_models import EOS, tiny_lm

from smcgen import Engine, LanguageModel, SMCConfig
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC
from smcgen.samplers.native_slots import NativeSlots


@pytest.fixture(scope="module")
def native_pair(device):
    # head_dim 16 for the Triton kernels: with SMCGEN_TEST_DEVICE=cuda the slots run on the GPU, the
    # cycle captured as a CUDA graph once and replayed for every mix of requests
    target, draft = tiny_lm(0, logit_scale=2.0, hidden=32), tiny_lm(0, logit_scale=1.0, hidden=32)
    return NativeCausalLM.from_hf(target.model, device=device), NativeCausalLM.from_hf(draft.model, device=device)


@pytest.fixture(scope="module")
def models():
    return lm_with_tokenizer(0), lm_with_tokenizer(1)


def drain(slots: NativeSlots) -> dict:
    """Cycles until every slot is free; each finished slot's run, in finishing order."""
    out = {}
    while slots.active():
        for slot in slots.step():
            out[slot] = (slots.collect(slot), slots.cycles)
            slots.retire(slot)
    return out


@pytest.mark.parametrize("capture", ["none", "warm-up"])
@pytest.mark.parametrize("resampler", ["systematic", "multinomial"])
def test_a_request_joining_mid_run_draws_what_it_draws_alone(native_pair, resampler, capture, warm_up_capture):
    """Each request draws in its slot what it draws alone (a separate engine, eager cycles).

    With ``capture='warm-up'`` the slots go through the graph path's warm-up (on the CPU too: a
    stand-in graph replays the cycle eagerly), captured at the first cycle with a request already
    in a slot: on an H100 the warm-up's resampling once left another row's keys and values in a
    live page, and this test failed there."""
    target, draft = native_pair
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=20, seed=0, ess_threshold=0.9, resampler=resampler)
    engine = NativeSMC(target, cfg, draft=draft, eos_token_ids=(), page_size=4)
    reference = NativeSMC(target, cfg, draft=draft, eos_token_ids=(), page_size=4)
    reference.pad_prefill = False  # a slot's prefill is never padded (on CUDA a kept run's is): compare like with like
    captured = warm_up_capture(engine) if capture == "warm-up" else []
    slots = NativeSlots(engine, n_slots=3, max_new_tokens=20)
    requests = {"long": ([0, 1, 2, 0, 1], 3, 20), "joins": ([1, 2], 7, 6), "later": ([2, 2, 1, 0, 0, 1, 2], 9, 11)}
    slot_of = {}
    if capture == "warm-up":  # the first cycle captures: with a live request in its slot
        slot_of["long"] = slots.admit(*requests["long"])
    slots.step()  # idle slots compute a dummy block: their pages are the pool's baseline
    baseline = slots.pages_free()
    if capture == "none":
        slot_of["long"] = slots.admit(*requests["long"])
    for _ in range(3):
        assert slots.step() == []
    slot_of["joins"] = slots.admit(*requests["joins"])
    slots.step()
    slot_of["later"] = slots.admit(*requests["later"])
    runs = drain(slots)
    assert len(captured) == (1 if capture == "warm-up" else 0)  # the slots captured once
    resampled = 0
    for name, (prompt, seed, limit) in requests.items():
        run, _ = runs[slot_of[name]]
        alone = reference.run([prompt], on_dead="flag", seeds=[seed], max_new_tokens=[limit])
        assert torch.equal(run.tokens, alone.tokens), name
        assert torch.equal(run.lengths, alone.lengths), name
        assert torch.allclose(run.log_weights, alone.log_weights, rtol=0, atol=1e-5), name
        assert torch.allclose(run.log_z, alone.log_z, rtol=0, atol=1e-5), name
        assert torch.allclose(run.ess_history, alone.ess_history, rtol=0, atol=1e-4), name
        assert torch.equal(run.resampled, alone.resampled), name
        resampled += int(alone.resampled.sum())
    assert resampled > 0, "the check must cover resampling"
    # the short request that joined after the long one left before it
    assert runs[slot_of["joins"]][1] < runs[slot_of["long"]][1]
    if capture == "none":  # (the baseline above held a live request under the warm-up variant)
        # every finished request's pages are back: the pool holds only the idle slots' dummy blocks
        slots.step()
        assert slots.pages_free() == baseline
        assert slots.budget_in_use() == 3 * slots.idle_pages


def test_a_short_request_beside_a_long_one_finishes_first(models):
    # no EOS: every request runs to its own limit
    target, draft = (LanguageModel(m.model, m.tokenizer, (), m.context_length) for m in models)
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=40, slots=4)
    with engine.lock:  # the batcher waits: both are queued before the first cycle
        long = engine.submit("ab", seed=1, max_new_tokens=40)
        short = engine.submit("ba", seed=2, max_new_tokens=4)
    assert [len(x) for x in short.result(timeout=120).sequences] == [4] * 4
    assert [len(x) for x in long.result(timeout=120).sequences] == [40] * 4
    order = engine.batcher.finished_order
    assert order.index(id(short)) < order.index(id(long))
    assert engine.batcher.stats["slot_builds"] == 1
    # each is the draw of the same request alone
    same(short.result(), engine("ba", seed=2, max_new_tokens=4))
    same(long.result(), engine("ab", seed=1, max_new_tokens=40))


def test_a_request_waits_for_pages_and_one_that_never_fits_is_refused(models):
    target, draft = models
    # 24 pages: one request of 40 new tokens (16 pages worst case) beside an idle slot (8), not two
    engine = Engine(
        target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=40, slots=2, kv_pages=24
    )
    with engine.lock:  # the batcher waits: all four are queued before the first cycle
        first = engine.submit("ab", seed=1)
        second = engine.submit("abab", seed=2)
        too_big = engine.submit([0, 1] * 10, seed=3)  # a 20-token prompt: 17 pages, more than one slot may hold
        after = engine.submit("ba", seed=4)
    with pytest.raises(ValueError, match="KV cache too small: the request needs 17 pages"):
        too_big.result(timeout=120)
    results = [f.result(timeout=120) for f in (first, second, after)]
    assert engine.batcher.stats["waited_for_pages"] > 0
    assert engine.batcher.stats["admitted"] == 3
    for res, (prompt, seed) in zip(results, [("ab", 1), ("abab", 2), ("ba", 4)]):
        same(res, engine(prompt, seed=seed))  # the refusal and the wait touched no running request
    assert engine.batcher.slots is not None and engine.batcher.slots.active() == 0


def test_batch_runs_through_the_slots_and_the_generic_engine_takes_submits(models):
    target, draft = models
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=9, slots=2)
    prompts, seeds, limits = ["ab", "abba", [0, 1, 0, 1, 1, 0, 5], "bab"], [11, 12, 13, 14], [9, 6, 9, 3]
    batched = engine.batch(prompts, seed=seeds, max_new_tokens=limits)  # 4 requests through 2 slots
    assert engine.batcher.stats["admitted"] == 4 and engine.stats["native_engines_built"] == 1
    for prompt, seed, limit, res in zip(prompts, seeds, limits, batched):
        same(res, engine(prompt, seed=seed, max_new_tokens=limit))
    generic = Engine(target, draft=draft, engine="generic", n_particles=4, block_size=2, max_new_tokens=6)
    res = generic.submit("ab", seed=5).result(timeout=120)
    assert res.engine == "generic"
    same(res, generic("ab", seed=5))


def test_slot_arguments_are_checked(native_pair, models):
    target, draft = native_pair
    engine = NativeSMC(target, SMCConfig(n_particles=2, max_new_tokens=8), draft=draft, eos_token_ids=(EOS,))
    with pytest.raises(ValueError, match="n_slots must be >= 1"):
        NativeSlots(engine, n_slots=0, max_new_tokens=8)
    with pytest.raises(ValueError, match="kv_pages=3 is smaller than"):
        NativeSlots(engine, n_slots=2, max_new_tokens=8, kv_pages=3)
    slots = NativeSlots(engine, n_slots=1, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens=9 is above these slots' limit of 8"):
        slots.admit([0, 1], 0, 9)
    slots.admit([0, 1], 0, 8)
    with pytest.raises(RuntimeError, match="no free slot"):
        slots.admit([0, 1], 1, 8)
    with pytest.raises(ValueError, match="slots must be an integer >= 1, got 0"):
        Engine(models[0], engine="native", slots=0)
    with pytest.raises(ValueError, match="kv_pages must be an integer >= 1 or None, got 0.5"):
        Engine(models[0], engine="native", kv_pages=0.5)


def test_a_finished_request_of_a_whole_batch_takes_no_more_pages(native_pair):
    """A request of a whole-batch run that reached its limit stops taking pages while a longer one
    goes on (the pool is sized for each request's own worst case: before, this ran out of pages)."""
    target, draft = native_pair
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=40, seed=0)
    engine = NativeSMC(target, cfg, draft=draft, eos_token_ids=(), page_size=4)
    run = engine.run([[0, 1], [1, 0]], seeds=[1, 2], max_new_tokens=[3, 40])
    assert run.lengths[0].tolist() == [3] * 4 and run.lengths[1].tolist() == [40] * 4


def test_a_device_guide_runs_in_the_slots_and_a_host_guide_as_a_whole_batch(models):
    from smcgen import GrammarPotential

    target, draft = models
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=8, slots=2)
    regex = GrammarPotential.regex("a[ab]{1,5}")
    prompts, seeds = ["ab", "abba", "ba"], [1, 2, 3]
    guided = engine.batch(prompts, seed=seeds, guide=regex)
    assert engine.batcher.stats["admitted"] == 3  # the automaton's states are per row: slots can run it
    for prompt, seed, res in zip(prompts, seeds, guided):
        assert res.text.startswith("a") and set(res.text) <= {"a", "b"}
        same(res, engine(prompt, seed=seed, guide=regex))
    nested = GrammarPotential.ebnf('root ::= "a" root "b" | "b"')  # no automaton: masks from the host
    host = engine.batch(prompts, seed=seeds, guide=nested)
    assert engine.batcher.stats["admitted"] == 3  # they ran grouped, outside the slots
    assert all(r.engine == "native" and "host" in r.engine_reason for r in host)


def test_slots_that_cannot_be_built_fail_the_request_and_the_next_one_runs(models):
    target, draft = models
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=8, kv_pages=3)
    with pytest.raises(ValueError, match="kv_pages=3 is smaller than"):
        engine.submit("ab", seed=1).result(timeout=120)
    engine.batcher.kv_pages = None  # the default pool: the next request runs
    same(engine.submit("ab", seed=1).result(timeout=120), engine("ab", seed=1))


def test_the_server_worker_joins_requests_and_streams_beside_them(models):
    import asyncio

    from smcgen.server.metrics import ServerMetrics
    from smcgen.server.scheduler import Scheduler

    target, draft = models
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=8, slots=2)
    plain = [engine.resolve(p, seed=s) for p, s in (("ab", 1), ("abab", 2), ("ba", 3))]
    streamed = engine.resolve("bb", seed=4)
    steps = []

    async def scenario():
        scheduler = Scheduler(engine, ServerMetrics(), max_queue=8, max_batch=8)
        assert scheduler.continuous
        scheduler.start()
        futures = [scheduler.submit(r) for r in plain] + [
            scheduler.submit(streamed, on_step=lambda s, a: steps.append(s))
        ]
        results = await asyncio.gather(*futures)
        await scheduler.stop()
        return results

    results = asyncio.run(scenario())
    assert engine.batcher.stats["admitted"] == 4  # the streamed one joined the slots too
    # its watcher saw its particles grow cycle by cycle, ending with the answer's tokens
    assert [max(len(x) for x in seqs) for seqs in steps] == sorted(max(len(x) for x in seqs) for seqs in steps)
    assert results[3].token_ids in steps[-1]
    for res, (prompt, seed) in zip(results, [("ab", 1), ("abab", 2), ("ba", 3), ("bb", 4)]):
        same(res, engine(prompt, seed=seed))


def test_a_failing_cycle_fails_the_running_requests_and_the_loop_goes_on(models, monkeypatch):
    target, draft = models
    engine = Engine(target, draft=draft, engine="native", n_particles=4, block_size=2, max_new_tokens=8)
    original, calls = NativeSlots.step, {"n": 0}

    def failing_once(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("KV page pool ran out (injected)")
        return original(self)

    monkeypatch.setattr(NativeSlots, "step", failing_once)
    with pytest.raises(RuntimeError, match="injected"):
        engine.submit("ab", seed=1).result(timeout=120)
    slots = engine.batcher.slots
    assert slots is not None and slots.active() == 0 and slots.pages_free() == slots.kv_pages  # emptied
    same(engine.submit("ab", seed=1).result(timeout=120), engine("ab", seed=1))
