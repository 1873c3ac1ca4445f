"""trace=True on the native engine: the trace agrees with the result, and tracing changes nothing.

On the CPU with the kernels' torch twins (TRITON_INTERPRET=1 from conftest), tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import EOS, tiny_lm

import smcgen
from smcgen import SMCConfig
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native import NativeSMC
from smcgen.trace import Trace, TraceRecorder

_REWARD = smcgen.RewardPotential(lambda text: text.count("a") / 2, prefix=True)


def _settings(**extra):
    # a draft and uneven weights; ess_threshold 0.9 resamples on some cycles, not all
    return dict(
        draft=extra.pop("draft"),
        block_size=2,
        n_particles=6,
        max_new_tokens=12,
        seed=extra.pop("seed", 5),
        ess_threshold=0.9,
        engine="native",
        **extra,
    )


def _lineage_tokens(tr: Trace) -> list[list[int]]:
    """Each final particle's token ids, its blocks collected back through every resampling."""
    owner = list(range(tr.n_particles))
    pieces: list[list[list[int]]] = [[] for _ in owner]
    for s in reversed(tr.steps):
        if s.ancestors is not None:
            owner = [s.ancestors[o] for o in owner]
        for j, o in enumerate(owner):
            pieces[j].append(s.tokens[o])
    return [[t for block in reversed(p) for t in block] for p in pieces]


def _check_consistent(res, tr: Trace, lagged: bool = False) -> None:
    assert res.engine == "native"
    assert tr.n_particles == 6 and len(tr.steps) == res.n_steps
    assert [s.ess for s in tr.steps] == pytest.approx(res.ess_history, rel=1e-5)
    assert tr.n_resamples == res.n_resamples
    assert _lineage_tokens(tr) == [list(s) for s in res.sequences]
    for s in tr.steps:
        assert all(len(t) <= 3 for t in s.tokens)  # at most K + 1 tokens a cycle
        if all(math.isfinite(w) for w in s.log_weights):
            # the ESS the engine logged is the one of the weights the trace shows
            w = torch.tensor(s.log_weights, dtype=torch.float64).softmax(0)
            assert s.ess == pytest.approx(float(1 / (w * w).sum()), rel=1e-4)
    last = tr.steps[-1]
    if last.ancestors is None:
        # the last cycle did not resample: its step holds the result's final weights
        assert last.weights == pytest.approx([math.exp(w) for w in res.log_weights], abs=1e-5)
    if last.ancestors is None or not lagged:
        # resampling keeps log Z_hat; only host scores added after the last cycle can move it
        assert last.log_z == pytest.approx(res.log_z, abs=1e-5)


@pytest.mark.parametrize("seed", [5, 11])
def test_native_trace_matches_its_result_and_changes_nothing(target, draft, tok, seed):
    kw = _settings(draft=draft, seed=seed)
    traced = smcgen.generate(target, "ab", tokenizer=tok, trace=True, **kw)
    plain = smcgen.generate(target, "ab", tokenizer=tok, **kw)
    assert plain.trace is None and traced.trace is not None
    _check_consistent(traced, traced.trace)
    assert traced.n_resamples >= 1
    assert traced.sequences == plain.sequences
    assert traced.log_weights == plain.log_weights and traced.ess_history == plain.ess_history
    page = traced.trace.to_html(title="native trace")
    assert "native trace" in page and "6 particles" in page and f"{traced.n_steps} steps" in page
    assert page.count("<circle") == 6 * traced.n_steps
    for text in traced.trace.particle_texts():
        assert text.replace("</s>", "") in page.replace("&lt;/s&gt;", "")


@pytest.mark.parametrize("seed", [5, 7])  # 5: the last cycle resamples; 7: it does not
def test_native_trace_with_a_host_potential_keeps_the_lagged_run(target, draft, tok, seed):
    # host potentials are scored one cycle late (also on the CPU); tracing must not change that lag,
    # and the trace's last step carries the scores that arrive after the last cycle
    kw = _settings(draft=draft, potentials=_REWARD, seed=seed)
    traced = smcgen.generate(target, "ab", tokenizer=tok, trace=True, **kw)
    plain = smcgen.generate(target, "ab", tokenizer=tok, **kw)
    assert traced.sequences == plain.sequences and traced.log_weights == plain.log_weights
    assert traced.ess_history == plain.ess_history
    _check_consistent(traced, traced.trace, lagged=True)


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("per_request", [False, True])
def test_native_run_records_groups_in_the_callers_order(per_request, lookahead, device):
    # without seeds, groups are sorted into one segment per prompt length (batch order 0, 2, 1 here);
    # with them each request is its own segment: the recorder must see group b as the caller's b
    lm, dlm = tiny_lm(0, logit_scale=2.0, hidden=32), tiny_lm(0, logit_scale=1.0, hidden=32)
    # on CUDA (SMCGEN_TEST_DEVICE=cuda) the cycle is a captured graph with the lookahead on
    target = NativeCausalLM.from_hf(lm.model, device=device)
    draft = NativeCausalLM.from_hf(dlm.model, device=device)
    cfg = SMCConfig(n_particles=4, block_size=2, max_new_tokens=9, seed=3, ess_threshold=0.9)
    engine = NativeSMC(target, cfg, draft=draft, eos_token_ids=(EOS,), page_size=4)
    engine.lookahead = lookahead  # True: cycle c + 1 is enqueued before cycle c is read (also on the CPU)
    prompts = [[1, 2, 0], [0, 1], [2, 2, 1]]
    kw = {"seeds": [7, 8, 9], "max_new_tokens": [9, 6, 9]} if per_request else {}
    rec = TraceRecorder()
    run = engine.run(prompts, on_dead="flag", recorder=rec, **kw)
    alone = engine.run(prompts, on_dead="flag", **kw)
    assert torch.equal(run.tokens, alone.tokens) and torch.equal(run.log_weights, alone.log_weights)
    for b in range(len(prompts)):
        tr = rec.trace(b)
        assert tr.n_particles == 4 and len(tr.steps) == run.ess_history.shape[0]
        rows = [row[:n] for row, n in zip(run.tokens[b].tolist(), run.lengths[b].tolist())]
        assert _lineage_tokens(tr) == rows
        logged = run.ess_history[:, b]
        live = ~torch.isnan(logged)  # NaN: cycles after this request's particles all finished
        assert [s.ess for s, keep in zip(tr.steps, live) if keep] == pytest.approx(logged[live].tolist(), rel=1e-5)
        assert tr.n_resamples == int(run.resampled[:, b].sum())
        final = torch.tensor(tr.steps[-1].log_weights, dtype=torch.float64)
        if not bool(run.resampled[-1, b]):
            # BatchRun's log-weights are normalized
            assert torch.allclose(final.log_softmax(0), run.log_weights[b].double().cpu(), atol=1e-5)
    assert sum(rec.trace(b).n_resamples for b in range(3)) >= 1


@pytest.mark.parametrize("where", ["device", "host"])
def test_native_trace_of_a_guided_run(target, draft, tok, where):
    # a regex runs as a device automaton, a context-free grammar masks on the host between the
    # cycle's pieces: both go through the traced _finish; the grammar's completion factor, applied
    # after the last cycle, shows in the last step
    guide = (
        smcgen.GrammarPotential.regex("[ab]{1,5}")
        if where == "device"
        else smcgen.GrammarPotential.ebnf('root ::= "a" root "b" | "c"')
    )
    kw = _settings(draft=draft, guide=guide, on_dead="partial", seed=3)
    traced = smcgen.generate(target, "ab", tokenizer=tok, trace=True, **kw)
    plain = smcgen.generate(target, "ab", tokenizer=tok, **kw)
    assert (traced.engine_reason is None) == (where == "device")
    assert traced.sequences == plain.sequences and traced.log_weights == plain.log_weights
    _check_consistent(traced, traced.trace)
