"""The native engine's host-guided cycle in pieces (smcgen/samplers/native_host_guide.py).

A guide without a device automaton runs its cycle as pieces with the host's masks between them (a
GPU replays the pieces as CUDA graphs; the CPU runs the same code eagerly). It must draw what the
engine's eager host-guided cycle draws for a seed (same masks, same Philox stream, same order of
operations) and stay exact: E[Z_hat] = Z and unbiased outcome masses on the enumerated target.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from test_grammar_exactness import MASKED_REGEX, TOKENS, check_unbiased, grammar
from tiny_models import EOS, PROMPT

from smcgen import LMPotential, SMCConfig
from smcgen.exact import enumerate_target
from smcgen.potentials.grammar import GrammarPotential
from smcgen.samplers.native import NativeSMC
from smcgen.samplers.native_host_guide import HostGuidedCycle

# a regex whose strings run past one cycle of K+1 tokens (a group loop: kept on the host anyway)
LONG_REGEX = "(a|b)(a|c)(a|b)(a|c)(a|b)(a|c)*b?"
# a recursive grammar (balanced a..b around c): no token automaton, always on the host
RECURSIVE = 'root ::= "a" root "b" | "aacbb" | "ab"'


def _engine(native_models, guide, block: int, n: int, max_new: int, seed: int, **kw) -> NativeSMC:
    """A native engine with the guide on the host (``device_guide=False``: a regex has an automaton)."""
    _, target, draft = native_models
    cfg = SMCConfig(n_particles=n, block_size=max(block, 1), max_new_tokens=max_new, seed=seed, **kw)
    return NativeSMC(
        target,
        cfg,
        draft=draft if block else None,
        eos_token_ids=(EOS,),
        page_size=4,
        guide=guide,
        device_guide=False,
    )


def _count_extended(guide: GrammarPotential) -> list[bool]:
    """Record whether each ``extend_bitmask`` call took the incremental path."""
    calls: list[bool] = []
    extend = guide.extend_bitmask

    def spy(*args):
        calls.append(extend(*args))
        return calls[-1]

    guide.extend_bitmask = spy
    return calls


@pytest.mark.parametrize("block", [0, 1, 3], ids=["plain", "sd_k1", "sd_k3"])
@pytest.mark.parametrize("source", ["regex", "recursive"])
def test_pieces_draw_what_the_eager_cycle_draws(native_models, block, source):
    """Same seed: identical tokens, lengths and weights from the pieces and from the eager cycle,
    resampling at every cycle (ess_threshold=1) so the guide's matchers are reordered too."""
    runs = {}
    for pieces in (True, False):
        if source == "regex":
            guide = grammar(LONG_REGEX)
        else:
            guide = GrammarPotential.ebnf(RECURSIVE, TOKENS, eos_token_ids=[EOS])
        engine = _engine(native_models, guide, block, 4, 8, seed=11, ess_threshold=1.0)
        assert engine.dfa is None and "between the cycle's pieces" in engine.guide_reason
        engine.host_guide_pieces = pieces
        fed = _count_extended(guide)
        runs[pieces] = engine.run(PROMPT, n_groups=6, on_dead="flag")
        if pieces:
            # every mask after the run's first came from one new token per row, none from whole rows
            assert fed and all(fed), fed
    a, b = runs[True], runs[False]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.dead, b.dead)
    assert torch.allclose(a.log_weights, b.log_weights, atol=1e-6, equal_nan=True)
    assert bool(a.resampled.any())  # the runs did resample (the reorder path ran)


def test_recursive_guide_takes_the_pieces_and_says_so(native_models):
    guide = GrammarPotential.ebnf(RECURSIVE, TOKENS, eos_token_ids=[EOS])
    engine = _engine(native_models, guide, 2, 4, 6, seed=3)
    assert engine.dfa is None and engine.host_guide_pieces
    assert "host between the cycle's pieces" in engine.guide_reason
    out = engine.run(PROMPT, n_groups=4, on_dead="flag")

    def in_language(text: str) -> bool:  # a^n (ab | aacbb) b^n
        n = len(text) - len(text.lstrip("a"))
        return any(text == "a" * m + mid + "b" * m for m in range(n + 1) for mid in ("ab", "aacbb"))

    kept = 0
    for g in range(4):
        for row, n, w in zip(out.tokens[g].tolist(), out.lengths[g].tolist(), out.log_weights[g].tolist()):
            text = "".join(TOKENS[t] for t in row[:n] if t != EOS)
            assert w == float("-inf") or in_language(text), text
            kept += w > float("-inf")
    assert kept > 0


@pytest.mark.parametrize("max_new", [4, 5, 6])
def test_pieces_apply_the_python_grammars_last_token_mask(max_new):
    """The Python grammar narrows its mask at the budget's last token to tokens that complete the
    text; the pieces, fed one new token per row, must do it as the eager cycle does (they once
    skipped it: 1 of 200 particles finished where the eager cycle had 20)."""
    from tiny_models import tiny_lm

    from smcgen.potentials import PythonGrammarPotential
    from smcgen.runners.native.model import NativeCausalLM

    pieces, eos = ["\n    x = (1", ")\n", "\n    # c", "\n"], 4
    target = NativeCausalLM.from_hf(tiny_lm(3, vocab=5, eos=eos, logit_scale=0.5).model, device=torch.device("cpu"))
    runs = {}
    for in_pieces in (True, False):
        g = PythonGrammarPotential.build([*pieces, None], eos_token_ids=[eos])
        g.finish_within = max_new
        cfg = SMCConfig(n_particles=4, block_size=1, max_new_tokens=max_new, seed=11, ess_threshold=1.0)
        engine = NativeSMC(target, cfg, eos_token_ids=(eos,), page_size=4, guide=g, device_guide=False)
        engine.host_guide_pieces = in_pieces
        runs[in_pieces] = engine.run([0, 1], n_groups=200, on_dead="flag")
    a, b = runs[True], runs[False]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(torch.isfinite(a.log_weights), torch.isfinite(b.log_weights))
    assert int(torch.isfinite(b.log_weights).sum()) > 10  # the mask lets many particles finish


def test_extend_bitmask_equals_whole_rows_and_refuses_rows_elsewhere():
    """One new token per row gives the masks the rows' whole tokens give (an EOS-ended row stays
    ended); a length the rows are not at is refused (False, nothing fed), so the engine reads whole
    rows instead."""
    from smcgen.core.sampling import bitmask_width

    g = grammar(LONG_REGEX)
    # ids of TOKENS: row 1 ends at EOS, row 2 leaves the language at "ab"
    rows = torch.tensor([[0, 0, 1], [1, 0, EOS], [0, 1, 0]])
    g.start(PROMPT, 3)
    out = torch.zeros(3, bitmask_width(g.vocab_size), dtype=torch.int32)
    assert not g.extend_bitmask(rows[:, 1], 2, out), "the rows have consumed nothing yet"
    assert g.extend_bitmask(rows[:, 0], 1, out)
    for k in (1, 2):
        assert not g.extend_bitmask(rows[:, k], k + 2, out), "a length the rows are not at"
        assert g.extend_bitmask(rows[:, k], k + 1, out)
        whole = grammar(LONG_REGEX)
        whole.start(PROMPT, 3)
        expect = whole.next_token_bitmask(rows[:, : k + 1], 0)
        assert torch.equal(out, expect), k
    assert torch.equal(out[2], torch.full_like(out[2], -1)), "a row out of the language draws unmasked (ignored)"
    assert not torch.equal(out[0], out[2])


def test_pieces_are_made_once_per_run(native_models, monkeypatch):
    made = []
    init = HostGuidedCycle.__init__

    def counting(self, *a, **k):
        made.append(1)
        init(self, *a, **k)

    monkeypatch.setattr(HostGuidedCycle, "__init__", counting)
    guide = GrammarPotential.ebnf(RECURSIVE, TOKENS, eos_token_ids=[EOS])
    engine = _engine(native_models, guide, 1, 2, 6, seed=5)
    engine.run(PROMPT, n_groups=2, on_dead="flag")
    engine.run(PROMPT, n_groups=2, on_dead="flag")
    # one per run, reused by every cycle of it; recorded ones (a GPU) also serve the next run of
    # the same shape (test_recorded_pieces_serve_the_next_run_of_the_same_shape)
    assert len(made) == (1 if HostGuidedCycle.captures(engine) else 2)


@pytest.mark.parametrize("block", [0, 2], ids=["masked_target", "masked_draft_k2"])
def test_host_pieces_are_exact(native_models, block):
    """The host path (pieces) on the enumerated grammar target: z-tests of E[Z_hat] and the
    outcome masses (tests/test_grammar_exactness.py's checks)."""
    target_lm = native_models[0]
    exact = enumerate_target(LMPotential(target_lm), PROMPT, 4, [grammar(MASKED_REGEX)])
    index = {s: i for i, s in enumerate(exact.sequences)}
    engine = _engine(native_models, grammar(MASKED_REGEX), block, 4, 4, seed=31 + block, ess_threshold=1.0)
    out = engine.run(PROMPT, n_groups=1500)
    check_unbiased(f"host pieces K={block}", out, exact, index)


class _NoStream:
    def wait_stream(self, other) -> None:
        pass


class _GraphLike:
    """A piece replayed the way a CUDA graph replays it: its outputs land in the tensors the
    recording made (static addresses), whatever tensors the eager call returns."""

    def __init__(self, cycle: HostGuidedCycle, piece, args, statics: dict[str, torch.Tensor]):
        self.cycle, self.piece, self.args, self.statics = cycle, piece, args, statics

    replays = 0

    def replay(self) -> None:
        _GraphLike.replays += 1
        self.piece(*self.args)
        for name, static in self.statics.items():
            static.copy_(_outputs(self.cycle)[name])
        _put_back(self.cycle, self.statics)


def _outputs(c: HostGuidedCycle) -> dict[str, torch.Tensor]:
    out = {"pos": c.pos, "verify_logits": c.verify_logits, "anc": c.anc}
    for k in range(c.K):
        out |= {f"logits{k}": c.logits[k], f"drafted{k}": c.drafted[k], f"log_q{k}": c.log_q[k]}
    if c.K == 0:
        out["logits0"] = c.logits[0]
    return {k: v for k, v in out.items() if v is not None}


def _put_back(c: HostGuidedCycle, statics: dict[str, torch.Tensor]) -> None:
    for name, t in statics.items():
        if name[-1].isdigit():
            getattr(c, name.rstrip("0123456789"))[int(name[len(name.rstrip("0123456789")) :])] = t
        else:
            setattr(c, name, t)


def _record_graph_like(self: HostGuidedCycle) -> None:
    """Record every piece, keeping each one's outputs as its statics; like a CUDA graph capture, the
    recording leaves no trace (state, KV pools and host history restored)."""
    snapshot, history = self.s.snapshot(), self.s.host_history
    caches = [c for c in (self.s.tcache, self.s.dcache) if c is not None]
    pools = [(c.k_pool.clone(), c.v_pool.clone()) for c in caches]
    graphs, seen = {}, {}
    for name, piece, args in self._pieces():
        piece(*args)
        now = _outputs(self)
        new = {k: v for k, v in now.items() if k not in seen or seen[k] is not v}
        seen.update(now)
        graphs[name] = _GraphLike(self, piece, args, new)
    self.s.restore(snapshot)
    self.s.host_history = history
    for c, (k, v) in zip(caches, pools):
        c.k_pool.copy_(k)
        c.v_pool.copy_(v)
    self.graphs = graphs


def _emulate_graphs(monkeypatch) -> list[int]:
    """Pieces recorded and replayed as :class:`_GraphLike` on the CPU; returns a list that grows by
    one per recording."""
    records: list[int] = []

    def record(self: HostGuidedCycle) -> None:
        records.append(1)
        _record_graph_like(self)

    monkeypatch.setattr(HostGuidedCycle, "captures", staticmethod(lambda engine: True))
    monkeypatch.setattr(HostGuidedCycle, "_record", record)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: _NoStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    return records


@pytest.mark.parametrize("block", [0, 3], ids=["plain", "sd_k3"])
def test_replayed_pieces_read_static_outputs(native_models, block, monkeypatch):
    """The pieces' data flow as CUDA graphs see it (emulated on the CPU: each replay writes into
    the recorded output tensors, and the next cycle's first draft forward is launched ahead):
    the same draws as the eager cycle. On a GPU the real graphs replace the emulation, and
    test_pieces_draw_what_the_eager_cycle_draws checks them."""
    if native_models[1].device.type == "cuda":
        pytest.skip("emulates CUDA graphs on the CPU; on a GPU the real ones run in the test above")
    _emulate_graphs(monkeypatch)
    for batch in ({"prompt_ids": PROMPT, "n_groups": 5}, {"prompt_ids": [PROMPT, [*PROMPT, 2]], "seeds": [3, 4]}):
        runs = {}
        for pieces in (True, False):
            engine = _engine(native_models, grammar(LONG_REGEX), block, 4, 8, seed=13, ess_threshold=1.0)
            engine.host_guide_pieces = pieces
            before = _GraphLike.replays
            runs[pieces] = engine.run(**batch, on_dead="flag")
            assert (_GraphLike.replays > before) == pieces  # the pieces ran as recorded replays
        a, b = runs[True], runs[False]
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        assert torch.allclose(a.log_weights, b.log_weights, atol=1e-6, equal_nan=True)
        assert bool(a.resampled.any())


def test_recorded_pieces_serve_the_next_run_of_the_same_shape(native_models, monkeypatch):
    """A run with the last run's prompt lengths and limits (other seeds) replays the pieces that
    run recorded, with no eager first cycle and no recording, and draws what the eager cycle draws."""
    if native_models[1].device.type == "cuda":
        pytest.skip("emulates CUDA graphs on the CPU")
    records = _emulate_graphs(monkeypatch)
    prompts = [PROMPT, [*PROMPT, 2]]
    engine = _engine(native_models, grammar(LONG_REGEX), 3, 4, 8, seed=13, ess_threshold=1.0)
    engine.run(prompts, seeds=[3, 4], on_dead="flag")
    replays = _GraphLike.replays
    again = engine.run(prompts, seeds=[5, 6], on_dead="flag")
    assert len(records) == 1 and engine.last_timing["pieces_warm_up_s"] == 0.0
    assert _GraphLike.replays > replays
    eager = _engine(native_models, grammar(LONG_REGEX), 3, 4, 8, seed=13, ess_threshold=1.0)
    eager.host_guide_pieces = False
    expected = eager.run(prompts, seeds=[5, 6], on_dead="flag")
    assert torch.equal(again.tokens, expected.tokens) and torch.equal(again.lengths, expected.lengths)
    assert torch.allclose(again.log_weights, expected.log_weights, atol=1e-6, equal_nan=True)
    assert bool(again.resampled.any())
    engine.run([PROMPT, PROMPT], seeds=[5, 6], on_dead="flag")  # another shape records anew
    assert len(records) == 2


def test_the_kept_run_goes_with_its_engine(native_models, monkeypatch):
    """The run an engine keeps for its next one (state, KV pools, pieces) is freed with the engine:
    nothing global holds it (its GPU memory would outlive the user's engine)."""
    if native_models[1].device.type == "cuda":
        pytest.skip("emulates CUDA graphs on the CPU")
    _emulate_graphs(monkeypatch)
    engine = _engine(native_models, grammar(LONG_REGEX), 3, 4, 8, seed=13, ess_threshold=1.0)
    engine.run(PROMPT, on_dead="flag")
    state = weakref.ref(engine._kept[1])
    del engine
    assert state() is None  # at once: no reference cycle waits for the garbage collector


def test_pieces_follow_each_request_segment(native_models):
    """Requests with their own seeds and limits run as segments of one batch (each its own Philox
    stream and position): the pieces draw what the eager cycle draws for every request."""
    prompts = [PROMPT, [*PROMPT, 2], PROMPT]
    runs = {}
    for pieces in (True, False):
        engine = _engine(native_models, grammar(LONG_REGEX), 2, 4, 9, seed=0, ess_threshold=1.0)
        engine.host_guide_pieces = pieces
        runs[pieces] = engine.run(prompts, seeds=[5, 6, 7], max_new_tokens=[9, 6, 3], on_dead="flag")
    a, b = runs[True], runs[False]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.allclose(a.log_weights, b.log_weights, atol=1e-6, equal_nan=True)
    assert not torch.equal(a.tokens[0], a.tokens[2])  # distinct seeds, distinct draws
