"""The native SMC engine: SMC speculative decoding (and plain SMC / AR) on the native runner.

One *cycle* is K draft steps, one target verify of the K+1 new positions, the importance weights,
the resample decision and the KV bookkeeping. Every tensor it touches is preallocated and every
value that changes between cycles (positions, the cycle index, RNG offsets) lives on the device,
so on a GPU the whole cycle is captured once as a CUDA graph and replayed; the host only reads
one flag per cycle to stop early when every particle has finished.

A run is one batch of B requests x N particles; its requests may have prompts of different
lengths, seeds and token limits. The batch is cut into *segments* (one request, or the requests of
one prompt length sharing one seed), each with its own cache position and its own Philox stream, so
a request's draws do not depend on the others; the models run every row at once at its own position.

Layout of one row's token stream:
- the target's cache holds every token but the last one (the bonus of the previous cycle, or the
  last prompt token at the start), which the next verify feeds first;
- the draft's cache holds every token but the last two (the last drafted token and the bonus),
  which the next cycle's first draft step feeds together: the "deferred bonus", K draft forwards
  per cycle instead of K+1.
The weights follow docs/math.md: sum_k alpha*log p_T(y_k) - log q_D(y_k) over the drafted
tokens, plus the bonus token's log-normalizer log sum_v p_T(v)^alpha; positions after an EOS, after
the particle finished, or past ``max_new_tokens`` add nothing.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.core.config import SMCConfig
from smcgen.core.device_memory import device_memory_bytes, hold, keeping
from smcgen.core.resampling import (
    Resampler,
    SystematicResampler,
    get_resampler,
    graph_safe,
)
from smcgen.potentials.base import (
    Potential,
    Product,
    as_guide,
)
from smcgen.potentials.grammar_dfa import DEFAULT_MAX_BYTES
from smcgen.potentials.token import TokenPotential
from smcgen.potentials.token_dfa import TokenDFA
from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native_cycle import CycleSteps
from smcgen.samplers.native_scores import PotentialSteps
from smcgen.samplers.native_setup import RunSetup
from smcgen.samplers.native_state import (
    _as_prompts,
    _CycleState,
    _HostScorer,
    _reordered,
    _Segment,
    _sync,
)
from smcgen.samplers.native_trace import TraceFeed
from smcgen.samplers.run import BatchRun, dead_group_error, length_problem

#: runs of different shapes an engine keeps, each with its pools and graphs, for the next run of
#: its shape: prompts whose lengths fall in two buckets in turn then replay both buckets' graphs
#: instead of sizing pools and capturing anew at every switch
KEPT_RUNS = 3
#: the other kept runs stay beside a new run's pools only while their KV pools take at most this
#: share of the device's memory (an 8B target's long prompts: its pools are freed first, as before)
KEPT_RUNS_MEMORY_FRACTION = 0.05


class NativeSMC(RunSetup, CycleSteps, PotentialSteps):
    """SMC over a native target with an optional native draft; B requests x N particles per run.

    ``config`` is the same :class:`SMCConfig` as the generic engine. Systematic resampling is
    fused into the weighting kernel (the default); the other built-in resamplers run as torch ops
    on the device with uniforms from the run's Philox stream, captured in the cycle graph too; a
    ``resampler=`` :class:`Resampler` written in torch is captured when it is ``graph_safe``, else
    the run is eager (its torch generator is not captured).
    ``draft=None`` gives plain SMC (the target proposes one token per cycle), which with N = 1 is
    autoregressive decoding. ``eos_token_ids`` end a particle (empty: always run to the limit).
    ``cuda_graph`` (default: on for CUDA) captures one cycle and replays it.

    ``potentials`` multiply the target. A :class:`~smcgen.potentials.token.TokenPotential`
    (device potential) is scored inside the cycle on all rows at once, graph and all; any other
    potential (host potential: Python over token lists or decoded text, which needs
    ``tokenizer``) is scored on the host one cycle late, while the device runs the next cycle:
    its increment enters the weights a cycle after the tokens it scores (the twist telescopes,
    and ``log_complete`` is added at the end, so the target is unchanged; see docs/engine.md).

    ``guide`` (a potential with a next-token mask: a bound
    :class:`~smcgen.potentials.grammar.GrammarPotential` or any potential implementing
    ``next_token_mask``; ``mask=`` is its older name) constrains generation locally: the draft
    and the target's bonus token are drawn from their distributions restricted to the allowed
    tokens, weighted as docs/math.md's "masking bias" section says, and the guide is a factor of
    the target, applied at the end (a particle that stops outside a grammar's language gets
    weight zero). A guide with a token automaton (``guide.token_automaton``: a regex, a choice of
    literals) whose tables fit ``guide_table_bytes`` runs on the device: each particle's automaton
    state is a device tensor, masks and state updates are gathers, and the guided cycle is captured
    like any other. Other guides (or ``device_guide=False``) compute their masks on the CPU from
    each step's tokens, between the cycle's pieces (captured one by one; see
    samplers/native_host_guide.py); :attr:`guide_reason` says why.
    """

    #: a host guide's cycle runs in pieces (samplers/native_host_guide.py); False: the eager cycle
    host_guide_pieces: bool = True
    #: those pieces are replayed as CUDA graphs (set from ``cuda_graph`` when the guide is on the host)
    host_guide_graphs: bool = False

    def __init__(
        self,
        target: NativeCausalLM,
        config: SMCConfig,
        draft: NativeCausalLM | None = None,
        eos_token_ids: Sequence[int] = (),
        page_size: int = 16,
        cuda_graph: bool | None = None,
        kv_memory_fraction: float = 0.85,
        guide: Any = None,
        *,
        mask: Any = None,
        potentials: Potential | Sequence[Potential] = (),
        resampler: Resampler | None = None,
        tokenizer: Any = None,
        device_guide: bool = True,
        guide_table_bytes: int = DEFAULT_MAX_BYTES,
    ):
        mask = as_guide(guide, mask)
        if resampler is None:
            resampler = get_resampler(config.resampler)
        if not isinstance(resampler, Resampler):
            raise TypeError(f"resampler must be a smcgen Resampler, got {type(resampler).__name__}")
        # the fused kernel's systematic scheme; any other runs with torch ops (eagerly)
        self.resampler: Resampler | None = None if type(resampler) is SystematicResampler else resampler
        if draft is not None and draft.vocab_size != target.vocab_size:
            raise ValueError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if not 0.0 < kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
        self.target = target
        self.draft = draft
        self.config = config
        self.eos_ids = [int(t) for t in eos_token_ids]
        self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        self.page_size = page_size
        self.device = target.device
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the models on a CUDA device")
        self.kv_memory_fraction = kv_memory_fraction
        self.block = config.block_size if draft is not None else 0
        self.tokenizer = tokenizer
        if mask is not None:
            mask = mask.for_logits(target.vocab_size)
            mask.guide_context(tokenizer, self.eos_ids)
            missing = {int(e) for e in mask.eos_token_ids} - set(self.eos_ids)
            if missing:
                raise ValueError(
                    f"the grammar ends sequences with EOS ids {sorted(missing)} that the engine does not stop on "
                    f"(eos_token_ids={self.eos_ids}); pass the same EOS ids to both"
                )
        #: the guide's automaton on the device (None: no guide, or masks from the host)
        self.dfa: TokenDFA | None = None
        #: why a guide runs on the host, one eager cycle at a time (None: no guide, or on the device)
        self.guide_reason: str | None = None
        if mask is not None:
            automaton = mask.token_automaton(guide_table_bytes) if device_guide else "device_guide=False"
            if isinstance(automaton, TokenDFA):
                self.dfa = automaton.to(self.device)
            else:
                # the masks depend on the tokens just drawn: the host takes part in every step, between
                # the cycle's pieces (samplers/native_host_guide.py), which a GPU replays as graphs
                self.guide_reason = (
                    f"the guide's masks are computed on the host between the cycle's pieces: {automaton}"
                )
                self.host_guide_graphs = self.cuda_graph
                self.cuda_graph = False
        self.mask = mask
        self._host_guide = mask is not None and self.dfa is None
        if isinstance(potentials, Potential):
            potentials = [potentials]
        factors = [f for f in Product(list(potentials)).factors if f is not mask]
        #: scored inside the cycle (every step / once at the end) and on the host one cycle late
        self.device_potentials = [f for f in factors if isinstance(f, TokenPotential) and f.score_prefixes]
        self.end_potentials = [f for f in factors if isinstance(f, TokenPotential) and not f.score_prefixes]
        self.host_potentials = [f for f in factors if not isinstance(f, TokenPotential)]
        self.host_potential = Product(self.host_potentials) if self.host_potentials else None
        all_factors = factors + ([mask] if mask is not None else [])
        self.potential: Potential | None = Product(all_factors) if all_factors else None
        if self.resampler is not None and not graph_safe(self.resampler):
            # a user resampler drawing from a torch generator: eager (its generator is not captured)
            self.cuda_graph = False
        #: what a NaN / +inf flag of the cycle points at: the models, then each device potential
        self._sources = ["the target model's logits", "the draft model's logits"] + [
            f"potential {p.name}" for p in self.device_potentials
        ]
        #: pad every prompt to the length its pools are sized for, so that one CUDA graph of the
        #: prefill serves the whole bucket (samplers/native_prefill.py). None (default): where the
        #: cycle is captured on CUDA and the padded prompts are short; True / False: always / never
        self.pad_prefill: bool | None = None
        #: the host enqueues cycle c + 1 before it reads cycle c's all-done flag, so the GPU never
        #: waits on the host between cycles; when every particle finished in cycle c, cycle c + 1
        #: runs without effect. None (default): on CUDA, for cycles of one token only (see
        #: ``_looks_ahead``); True / False: always / never
        self.lookahead: bool | None = None
        #: the last captured runs, least recently used first: shape -> (state (with its KV caches
        #: and a host guide's recorded pieces), whole-cycle graph (None for pieces)); the next run
        #: of one of these shapes replays it
        self._kept_runs: OrderedDict[tuple, tuple[_CycleState, Any]] = OrderedDict()
        #: wall-clock split of the last run: prefill, graph capture, decode (seconds), cycles run, and
        #: the part of decode a host guide's pieces spent on their eager first cycle and recording
        self.last_timing: dict[str, float] = {}

    def unsupported_reason(self, prompt_len: int, max_new_tokens: int | None = None) -> str | None:
        """Why a prompt of ``prompt_len`` tokens cannot run here (None when it can).

        ``max_new_tokens``: the request's own limit (default: the config's). Checked before a run
        (``run`` raises it; ``engine='auto'`` falls back to the generic engine).
        """
        limit = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        T = self.block + 1
        min_prompt = 2 if self.draft is not None else 1
        if prompt_len < min_prompt:
            return f"the native engine needs a prompt of at least {min_prompt} tokens, got {prompt_len}"
        # the position tables actually built (from_hf/from_pretrained may shorten them), draft included
        context = min(m.max_positions for m in (self.target, self.draft) if m is not None)
        problem = length_problem(prompt_len, limit, context)
        if problem is not None:
            return problem
        # every cycle writes all K+1 positions, so the last one may reach past max_new_tokens
        reach = self._positions_written(prompt_len, limit)
        if reach > context:
            return (
                f"the last cycle of K+1 = {T} positions would reach position {reach - 1}, past the model context "
                f"({context}); lower max_new_tokens by {reach - context}, pick a block_size with "
                f"max_new_tokens % (block_size + 1) == 0, or use engine='generic'"
            )
        return None

    def run(
        self,
        prompt_ids: Sequence[int] | Sequence[Sequence[int]],
        n_groups: int | None = None,
        progress: bool = False,
        on_dead: str = "raise",
        *,
        seeds: Sequence[int | None] | None = None,
        max_new_tokens: Sequence[int] | None = None,
        on_cycle: Callable[[Tensor, Tensor, Tensor], None] | None = None,
        recorder: Any | None = None,
    ) -> BatchRun:
        """Run SMC on one prompt (``n_groups`` independent groups of it) or on a list of prompts,
        all in one batch: prompts of different lengths run together, each row at its own position
        over the shared paged KV pool (one prefill per request into its own pages, one cycle for all).

        The batch is cut into *segments*, each with its own positions and its own random stream:
        ``seeds`` / ``max_new_tokens`` (one per prompt; a seed None draws a fresh one) make every
        request its own segment, so each request gets exactly the tokens and weights it gets run
        alone with that seed and limit. Without them, the groups of one prompt length form one
        segment seeded by the config (the i-th distinct length with a key derived from it).
        ``tokens`` is as wide as the largest limit; ``ess_history`` / ``resampled`` are NaN / False
        for a request's cycles after all its particles finished. A group whose particles all end at
        weight zero raises :class:`AllParticlesDeadError` after the run (``on_dead="raise"``), or
        (``on_dead="flag"``) is flagged in ``BatchRun.dead`` with log-weights ``-inf`` while the
        other groups' results are returned as usual. Unlike the generic engine, a dead group is not
        stopped early. ``on_cycle(tokens [R, W], lengths [R], log_weights [B, N])`` (host tensors, rows
        in the callers' order when ``seeds`` or ``max_new_tokens`` are given) is called after every
        cycle, the cycle after it not yet enqueued (streaming; it costs a device sync per cycle).
        ``recorder`` (e.g. :class:`smcgen.trace.TraceRecorder`) records every cycle as the generic
        engine records its steps (samplers/native_trace.py: copies per cycle, no extra sync).
        """
        if on_dead not in ("raise", "flag"):
            raise ValueError(f"on_dead must be 'raise' or 'flag', got {on_dead!r}")
        prompts = _as_prompts(prompt_ids, n_groups)
        order, segments = self._segments(prompts, seeds, max_new_tokens)
        for g in segments:
            reason = self.unsupported_reason(g.prompt_len, g.limit)
            if reason is not None:
                raise ValueError(reason)
        feed = TraceFeed(recorder, order) if recorder is not None else None
        run, self.last_timing = self._run_segments([prompts[i] for i in order], segments, progress, on_cycle, feed)
        out = _reordered(run, order)
        if on_dead == "raise" and bool(out.dead.any()):
            groups = out.dead.nonzero().squeeze(-1).tolist()
            g = groups[0]
            partial = [row[:n] for row, n in zip(out.tokens[g].tolist(), out.lengths[g].tolist())]
            # a run ends with every particle finished (EOS or the token budget)
            finished = [True] * len(partial)
            cause = "no particle ended inside the grammar's language" if self.mask is not None else None
            if self.mask is None and self.potential is not None:
                cause = "the potentials rule out every continuation the proposal reached"
            raise dead_group_error(groups, partial, finished, self.potential, cause=cause)
        return out

    def _run_segments(
        self,
        prompts: list[list[int]],
        segments: list[_Segment],
        progress: bool,
        on_cycle: Callable[[Tensor, Tensor, Tensor], None] | None = None,
        feed: TraceFeed | None = None,
    ) -> tuple[BatchRun, dict[str, float]]:
        """One batch of segments: prefill, capture, cycles; dead groups flagged, not raised.

        Returns the run (in the order of ``prompts``) and its timing (prefill, capture and decode
        seconds, cycles).
        """
        cfg = self.config
        B, N = len(prompts), cfg.n_particles
        T = self.block + 1
        limit = max(g.limit for g in segments)
        n_cycles = -(-limit // T)
        dev = self.device
        t_start = time.perf_counter()

        # the last run's state, caches and captured cycle serve a run of the same shape (prompt-length
        # buckets, limits, batch layout; seeds may differ): no new pools, no warm-up, no capture.
        # Pools are sized for the prompts' buckets, kept or not: a traced run then draws bit for bit
        # what an untraced one draws (the attention's key range follows the pools' width)
        pool_lens = [self._pool_prompt_len(g.prompt_len, g.limit) for g in segments]
        exact = [g.prompt_len for g in segments]
        shape = self._run_shape(segments, pool_lens) if feed is None else None
        # pools sized for these exact prompt lengths (kept when their buckets did not fit) serve them too
        exact_shape = self._run_shape(segments, exact) if shape is not None else None
        # one engine's kept runs across all engines (their pools hold GPU memory,
        # smcgen.core.device_memory.hold); another engine's go where new pools are sized and made
        # (free_gpu_bytes, make_cache). A kept run is taken out while it runs: a failed run is not kept
        kept = next((k for k in (shape, exact_shape) if k is not None and k in self._kept_runs), None)
        if kept is not None:
            shape = kept
            state, graph = self._kept_runs.pop(kept)
            tcache, dcache = state.tcache, state.dcache
            for cache in (tcache, dcache):
                if cache is not None:
                    cache.reset()
            state.start(self, segments)
        else:
            graph = None
            tcache, dcache, pool_lens = self._new_caches(segments, pool_lens, exact)
            if pool_lens is exact:  # the buckets' worst case did not fit: pools sized for these prompts, kept as such
                shape = exact_shape
            state = _CycleState(self, prompts, segments, n_cycles, tcache, dcache, pool_lens)
        if feed is not None:
            feed.attach(state, T)
        if self.potential is not None:
            self.potential.start(prompts[0], state.R)
        self._start_potentials(state, prompts)
        self._prefill(state, prompts)
        _sync(dev)
        t_prefill = time.perf_counter()

        self._step = 1  # the step a device potential's error names (the capture runs cycle 1)
        if self.cuda_graph and graph is None:
            graph = self._capture(state)
        _sync(dev)
        t_decode = time.perf_counter()
        bar = tqdm(total=limit, disable=not progress, desc="smc (native)", unit="tok", leave=False)
        # one done flag per cycle in flight, read by the host when that cycle's event has passed
        on_gpu = dev.type == "cuda"
        done_host = torch.zeros(2, dtype=torch.bool, pin_memory=on_gpu)
        flag_ready = [torch.cuda.Event() for _ in range(2)] if on_gpu else None
        # not with a host guide: its matchers would consume the extra cycle's tokens (and its cycles
        # wait on the host at every step anyway); a device guide's states just absorb the padding
        ahead = self._looks_ahead(on_gpu)
        # nor when someone watches every cycle: they must see it before the next one overwrites it
        lag = 1 if ahead and not self._host_guide and on_cycle is None else 0
        host = None
        if self.host_potential is not None:
            # host potentials score cycle c - 1 while the device runs cycle c (always, also on the
            # CPU, so the CPU tests check the lagged weights the GPU uses); with a guide every cycle
            # waits on the host anyway, and they score each cycle right after it
            lag = 0 if self._host_guide or on_cycle is not None else 1
            host = _HostScorer(self, state, prompts, lag)
        seen = -1
        for c in range(n_cycles):
            self._step = c + 1
            if graph is not None:
                graph.replay()
            else:
                self._cycle(state)
            done_host[c % 2 : c % 2 + 1].copy_(state.all_done, non_blocking=True)
            if host is not None:
                host.snapshot(c)
            if feed is not None:
                feed.snapshot(c)
            if flag_ready is not None:
                flag_ready[c % 2].record(torch.cuda.current_stream(dev))  # the models' device, not the current one
            bar.update(min(T, limit - bar.n))
            seen = c - lag  # with the lookahead, cycle c runs while the host reads cycle c - 1's flag
            if seen < 0:
                continue
            if flag_ready is not None:
                flag_ready[seen % 2].synchronize()
            if host is not None:
                host.score(seen)
            if on_cycle is not None:
                on_cycle(state.history[:, : (seen + 1) * T].cpu(), state.lengths.cpu(), state.log_w.cpu())
            if feed is not None:
                feed.after_cycle(seen)
            if bool(done_host[seen % 2]):
                # a cycle enqueued after every particle finished changes nothing (no valid token, no
                # weight, no resampling) and is not counted
                n_cycles = seen + 1
                break
        if host is not None:
            host.finish(last=c, seen=seen, ready=flag_ready)
        bar.close()
        _sync(dev)
        t_end = time.perf_counter()
        elapsed = t_end - t_start
        timing = {
            "prefill_s": t_prefill - t_start,
            "capture_s": t_decode - t_prefill,
            "decode_s": t_end - t_decode,
            "cycles": n_cycles,
            # a host guide's pieces run their first cycle eagerly and are recorded inside decode_s
            "pieces_warm_up_s": state.host_guided.warm_up_s if state.host_guided is not None else 0.0,
        }
        tcache.check_status()
        if dcache is not None:
            dcache.check_status()
        self._check_flags(state)
        if self.dfa is not None and self.dfa.complete_is_exact:
            # the automaton's end state decides membership (pads after the end are EOS: absorbing)
            state.log_w.add_(self.dfa.log_complete(state.guide_state).view(B, N))
        elif self.mask is not None:
            self._apply_final_factor(state, prompts[0])
        for p in self.end_potentials:
            self._apply_end_potential(state, p)
        if feed is not None:
            feed.finish(n_cycles, state.log_w)
        # dead during the run (the weight update leaves a dead group's -inf weights as they are), or
        # (with a grammar) no particle ended inside the language
        dead = torch.isneginf(state.log_w).all(dim=1).cpu()
        # copies on every device: the state is kept for the next run (on the CPU ``.cpu()`` aliases it)
        ess = state.ess_history[:n_cycles].to("cpu", copy=True)
        resampled = state.resampled_history[:n_cycles].to("cpu", copy=True)
        finished = state.done_history[:n_cycles].cpu()
        for g in segments:
            # a segment's cycles after all its particles finished: the run alone would have stopped
            ended = finished[:, g.g0 : g.g1].all(dim=1).nonzero()
            if ended.numel():
                after = int(ended[0]) + 1
                ess[after:, g.g0 : g.g1] = math.nan
                resampled[after:, g.g0 : g.g1] = False
        run = BatchRun.from_log_weights(
            state.history[:, :limit].reshape(B, N, limit).to("cpu", copy=True),
            state.lengths.view(B, N).to("cpu", copy=True),
            state.log_w.double(),
            ess,
            resampled,
            elapsed,
            dead,
        )
        pieces = state.host_guided
        if shape is not None and (graph is not None or (pieces is not None and pieces.graphs is not None)):
            self._kept_runs[shape] = (state, graph)
            while len(self._kept_runs) > KEPT_RUNS:
                self._kept_runs.popitem(last=False)
            hold(self)  # releases another engine's kept runs, if some are still kept
        return run, timing

    @property
    def _kept(self) -> tuple[tuple, _CycleState, Any] | None:
        """The most recently kept run as (shape, state, graph), or None."""
        if not self._kept_runs:
            return None
        shape = next(reversed(self._kept_runs))
        return (shape, *self._kept_runs[shape])

    def _kept_bytes(self) -> int:
        """Bytes of the kept runs' KV pools."""
        caches = [c for state, _ in self._kept_runs.values() for c in (state.tcache, state.dcache) if c is not None]
        return sum(c.k_pool.nbytes + c.v_pool.nbytes for c in caches)

    def _new_caches(
        self, segments: list[_Segment], pool_lens: list[int], exact: list[int]
    ) -> tuple[PagedKVCache, PagedKVCache | None, list[int]]:
        """New caches for a run no kept run serves: (target's, draft's, the prompt lengths they are
        sized for: ``pool_lens``, or ``exact`` when the buckets' worst case does not fit).

        The other kept runs stay beside the new pools when theirs are small (see
        ``KEPT_RUNS_MEMORY_FRACTION``) and the new pools fit beside them; otherwise they are freed
        first, as another engine's are."""
        share_t = 1.0
        if self.draft is not None:
            kv_t = self.target.kv_bytes_per_token()
            kv_d = self.draft.kv_bytes_per_token()
            share_t = kv_t / (kv_t + kv_d)
        if self._kept_runs and self._kept_bytes() > KEPT_RUNS_MEMORY_FRACTION * device_memory_bytes(self.device):
            self._kept_runs.clear()
        if self._kept_runs:
            try:
                with keeping(self):
                    return (*self._make_caches(segments, pool_lens, share_t), pool_lens)
            except ValueError:
                self._kept_runs.clear()  # they do not fit beside the kept runs: free those and size again
        try:
            return (*self._make_caches(segments, pool_lens, share_t), pool_lens)
        except ValueError:
            return (*self._make_caches(segments, exact, share_t), exact)

    def _looks_ahead(self, on_gpu: bool) -> bool:
        """Whether the run enqueues each cycle before it reads the last one's done flag (a host
        potential's lagged scoring keeps one cycle in flight anyway; a host guide or a watcher of
        every cycle turns it off).

        The lookahead saves the host's wake-up and graph launch between cycles (tens of
        microseconds) and costs one wasted cycle when the run ends on EOS. A cycle of one token (AR,
        plain SMC) is short enough for the saving to add up over a run; an SMC-SD cycle (K draft
        steps and a verify) is K + 1 tokens long, and its wasted last cycle is expected to cost
        more than every wait it saves. On the CPU a cycle runs as it is issued: there is nothing to
        overlap."""
        if self.lookahead is not None:
            return self.lookahead
        return on_gpu and self.block == 0

    def release_held(self) -> None:
        """Free the kept runs (:func:`smcgen.core.device_memory.release_held` calls it before free memory is read)."""
        self._kept_runs.clear()

    def _run_shape(self, segments: list[_Segment], pool_lens: list[int]) -> tuple | None:
        """What a captured cycle fixes of a run: the batch layout, each segment's limit and the prompt
        length its pools are sized for (``pool_lens``: its bucket, or its own length when the bucket
        did not fit; the pools then serve any prompt up to it), the config but its seed
        (temperatures, alpha, the resampling threshold are constants of the graph) and the models'
        kernel choices; not the seeds. None: not kept (a device potential's ``start`` may make new
        tensors every run)."""
        if self.device_potentials or self.end_potentials:
            return None
        models = tuple(
            (m.cascade, m.skinny_max_rows, m.fused_layers_on()) for m in (self.target, self.draft) if m is not None
        )
        config = self.config.model_dump(exclude={"seed"})
        return (
            tuple((g.g0, g.g1, g.n_particles, p, g.limit) for g, p in zip(segments, pool_lens)),
            tuple(sorted((k, repr(v)) for k, v in config.items())),
            self.cuda_graph,
            models,
        )

    # ---------------------------------------------------------------------------- prefill
