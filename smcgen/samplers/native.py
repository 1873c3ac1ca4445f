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
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.core.config import SMCConfig
from smcgen.core.resampling import (
    Resampler,
    SystematicResampler,
    effective_sample_size,
    get_resampler,
    graph_safe,
)
from smcgen.kernels.weighting import smc_weight_update
from smcgen.potentials.base import (
    Potential,
    Product,
    SequenceBatch,
    as_guide,
    checked_scores,
    score_particles,
    scoring_error,
)
from smcgen.potentials.grammar_dfa import DEFAULT_MAX_BYTES
from smcgen.potentials.token import TokenPotential
from smcgen.potentials.token_dfa import TokenDFA
from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.native_host_guide import host_guided_cycle
from smcgen.samplers.native_state import (
    _as_prompts,
    _CycleState,
    _HostScorer,
    _PhiloxUniforms,
    _reordered,
    _Segment,
    _sync,
)
from smcgen.samplers.run import AllParticlesDeadError, BatchRun, dead_group_error, length_problem
from smcgen.samplers.step import (
    NonFiniteError,
    advance,
    bad_values,
    global_rows,
    potential_increment,
    resample_gate,
    reset_weights,
    token_weights,
)


class NativeSMC:
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
        #: the host enqueues cycle c + 1 before it reads cycle c's all-done flag, so the GPU never
        #: waits on the host between cycles; when every particle finished in cycle c, cycle c + 1
        #: runs without effect. None (default): on CUDA only (on the CPU a cycle runs as it is
        #: issued, so there is nothing to overlap); True / False: always / never
        self.lookahead: bool | None = None
        #: wall-clock split of the last run: prefill, graph capture, decode (seconds), cycles run
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

    def _positions_written(self, prompt_len: int, max_new_tokens: int | None = None) -> int:
        """Positions a row's cache holds at the end: the target all but the last token (the draft
        all but two) of the prompt and of every whole cycle of K+1 tokens."""
        T = self.block + 1
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        return prompt_len - 1 + -(-limit // T) * T

    # ------------------------------------------------------------------------------ setup

    def _make_cache(self, model: NativeCausalLM, segments: list[_Segment], lag: int, share: float) -> PagedKVCache:
        """A cache sized for the worst case of these segments (their needs add up); on CUDA checked
        against free memory. ``lag``: how many fewer prompt tokens this model's cache holds (the
        target 1, the draft 2)."""
        lengths = [self._positions_written(g.prompt_len, g.limit) for g in segments]
        max_pages = -(-max(lengths) // self.page_size)
        available, where = 1 << 62, "in the pool"
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # memory torch's allocator holds but no tensor uses (an earlier batch's pools) is free too
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            per_page = PagedKVCache.bytes_per_page(
                model.n_layers, model.n_kv_heads, model.head_dim, self.page_size, model.dtype
            )
            available = int(free * self.kv_memory_fraction * share // per_page)
            who = "the draft" if model is self.draft else "the target"
            where = f"for {who} in {share * self.kv_memory_fraction:.0%} of {free / 2**30:.1f} GiB free GPU memory"
        N = self.config.n_particles
        if len(segments) == 1:
            g = segments[0]
            needed = PagedKVCache.check_budget(
                g.n_rows, g.n_groups, max(g.prompt_len - lag, 1), lengths[0], self.page_size, available, where
            )
        else:
            # each segment's worst case, summed (a segment's prompt pages are shared only inside it)
            needed = sum(
                PagedKVCache.pages_needed(g.n_rows, g.n_groups, max(g.prompt_len - lag, 1), n, self.page_size)
                for g, n in zip(segments, lengths)
            )
            if needed > available:
                raise ValueError(
                    f"KV cache too small: {needed} pages of {self.page_size} tokens needed in the worst case "
                    f"({sum(g.n_groups for g in segments)} request(s) x {N} particles, prompts of "
                    f"{min(g.prompt_len for g in segments)}..{max(g.prompt_len for g in segments)} tokens, "
                    f"up to {max(lengths)} tokens per row), {available} available {where}; give the cache more "
                    f"memory or run fewer requests at once"
                )
        n_rows = sum(g.n_rows for g in segments)
        return model.make_cache(needed, n_rows, max_pages, self.page_size)

    # -------------------------------------------------------------------------------- run

    @torch.inference_mode()
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
        """
        if on_dead not in ("raise", "flag"):
            raise ValueError(f"on_dead must be 'raise' or 'flag', got {on_dead!r}")
        prompts = _as_prompts(prompt_ids, n_groups)
        order, segments = self._segments(prompts, seeds, max_new_tokens)
        for g in segments:
            reason = self.unsupported_reason(g.prompt_len, g.limit)
            if reason is not None:
                raise ValueError(reason)
        run, self.last_timing = self._run_segments([prompts[i] for i in order], segments, progress, on_cycle)
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

    def _segments(
        self,
        prompts: list[list[int]],
        seeds: Sequence[int | None] | None,
        limits: Sequence[int] | None,
    ) -> tuple[list[int], list[_Segment]]:
        """The batch order of the prompts (segments contiguous) and the segments."""
        n, N = len(prompts), self.config.n_particles
        for name, values in (("seeds", seeds), ("max_new_tokens", limits)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
        if limits is not None:
            for m in limits:
                if not isinstance(m, int) or m < 1:
                    raise ValueError(f"max_new_tokens must be integers >= 1, got {m!r}")
        if seeds is None and limits is None:
            by_length: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                by_length.setdefault(len(p), []).append(i)
            parts = [
                (idx, self.config.seed, stream, self.config.max_new_tokens)
                for stream, idx in enumerate(by_length.values())
            ]
        else:
            parts = [
                (
                    [i],
                    seeds[i] if seeds is not None else self.config.seed,
                    0,
                    limits[i] if limits is not None else self.config.max_new_tokens,
                )
                for i in range(n)
            ]
        order, segments, g0 = [], [], 0
        for idx, seed, stream, limit in parts:
            if seed is None:
                seed = random.SystemRandom().getrandbits(62)
            # another segment of the same seed: a key far from it (Philox streams of distinct keys are independent)
            key = (int(seed) + stream * 0x9E3779B97F4A7C15) % (2**62)
            segments.append(_Segment(g0, g0 + len(idx), N, len(prompts[idx[0]]), int(limit), key))
            order += idx
            g0 += len(idx)
        return order, segments

    def _run_segments(
        self,
        prompts: list[list[int]],
        segments: list[_Segment],
        progress: bool,
        on_cycle: Callable[[Tensor, Tensor, Tensor], None] | None = None,
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

        share_t = 1.0
        if self.draft is not None:
            kv_t = self.target.kv_bytes_per_token()
            kv_d = self.draft.kv_bytes_per_token()
            share_t = kv_t / (kv_t + kv_d)
        tcache = self._make_cache(self.target, segments, 1, share_t)
        dcache = self._make_cache(self.draft, segments, 2, 1.0 - share_t) if self.draft is not None else None

        state = _CycleState(self, prompts, segments, n_cycles, tcache, dcache)
        if self.potential is not None:
            self.potential.start(prompts[0], state.R)
        self._start_potentials(state, prompts)
        self._prefill(state, prompts)
        _sync(dev)
        t_prefill = time.perf_counter()

        graph = None
        self._step = 1  # the step a device potential's error names (the capture runs cycle 1)
        if self.cuda_graph:
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
        ahead = on_gpu if self.lookahead is None else self.lookahead
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
        # dead during the run (the weight update leaves a dead group's -inf weights as they are), or
        # (with a grammar) no particle ended inside the language
        dead = torch.isneginf(state.log_w).all(dim=1).cpu()
        ess = state.ess_history[:n_cycles].cpu()
        resampled = state.resampled_history[:n_cycles].cpu()
        finished = state.done_history[:n_cycles].cpu()
        for g in segments:
            # a segment's cycles after all its particles finished: the run alone would have stopped
            ended = finished[:, g.g0 : g.g1].all(dim=1).nonzero()
            if ended.numel():
                after = int(ended[0]) + 1
                ess[after:, g.g0 : g.g1] = math.nan
                resampled[after:, g.g0 : g.g1] = False
        run = BatchRun.from_log_weights(
            state.history[:, :limit].reshape(B, N, limit),
            state.lengths.view(B, N),
            state.log_w.double(),
            ess,
            resampled,
            elapsed,
            dead,
        )
        return run, timing

    # ---------------------------------------------------------------------------- prefill

    def _prefill(self, s: _CycleState, prompts: list[list[int]]) -> None:
        """Prefill every segment's prompts (one batched forward per segment, each prompt into its
        own pages) and share each prompt's pages with its group.

        A segment's B prompts go into its first B rows (a ``rows`` view of the cache); one resample
        of the segment's rows then makes row b*N + i a copy of row b: full pages shared, partial
        last page copied.
        """
        N = self.config.n_particles
        for i, g in enumerate(s.segments):
            self._prefill_segment(s, i, prompts[g.g0 : g.g1])
        # each group's rows now hold the same prompt K/V (resampling stays inside a group): cascade
        # attention may read it once per request (NativeCausalLM.cascade), each at its own length
        for cache, unfed in ((s.tcache, 1), (s.dcache, 2)):
            if cache is not None:
                cache.share_prefixes(N, [g.prompt_len - unfed for g in s.segments for _ in range(g.n_groups)])

    def _prefill_segment(self, s: _CycleState, i: int, prompts: list[list[int]]) -> None:
        """Prefill segment ``i``'s prompts (all of one length) into its first rows' own pages, share
        them with each group's rows and set the segment's pending tokens and position."""
        N = self.config.n_particles
        dev = self.device
        g = s.segments[i]
        P = len(prompts[0])
        tail = 2 if self.draft is not None else 1
        ids = torch.tensor(prompts, dtype=torch.long, device=dev)
        owner = torch.arange(g.n_groups, device=dev).repeat_interleave(N)
        for model, cache, n_fed in ((self.target, s.tcache, P - 1), (self.draft, s.dcache, P - 2)):
            if model is None or cache is None or n_fed == 0:
                continue
            view = cache.rows(g.r0, g.r0 + g.n_groups)
            view.reserve(n_fed)
            model(ids[:, :n_fed], torch.zeros(g.n_groups, dtype=torch.int32, device=dev), view, last_only=True)
            cache.rows(g.r0, g.r1).resample(owner, n_fed)
        s.pending[g.r0 : g.r1].copy_(ids[:, P - tail :].repeat_interleave(N, dim=0))
        s.pos[i : i + 1].fill_(P - 1)

    # ------------------------------------------------------------------------------ cycle

    def _cycle(self, s: _CycleState) -> None:
        """One cycle on device tensors only (what the CUDA graph records), unless a grammar masks it.

        With a grammar, the draft's tokens and the bonus token are drawn from the masked
        distributions (the host computes each mask from the tokens so far), the draft's log q is the
        masked one, and the bonus weighs in with the masked log-normalizer.
        """
        cfg = self.config
        K, T = self.block, self.block + 1
        R = s.R
        pos = s.pos[s.seg_of_row]  # [R] int32: tokens in each row's target cache (per segment)
        masked = self.mask is not None
        host_masked = self._host_guide
        if host_masked and self.host_guide_pieces:
            return host_guided_cycle(self, s)
        # a device guide: each row's automaton state after the tokens drawn so far (no host sync)
        state = s.guide_state

        for i, view in enumerate(s.tviews):
            view.reserve(s.pos[i : i + 1] + T)
        drafted: list[Tensor] = []
        log_q: list[Tensor] = []
        if host_masked:
            # the continuation so far on the host (kept there across cycles), extended by each
            # drafted token (eager path: syncs)
            host_tokens = [s.host_history]
        if self.draft is not None:
            for i, view in enumerate(s.dviews):
                view.reserve(s.pos[i : i + 1] + K)
            feed, start = s.pending, pos - 1
            for k in range(K):
                # the mask is requested (token ids read) before the forward and computed after its
                # launch, so on a GPU the host builds it while the device runs the draft
                pending = self.mask.request_bitmask(torch.cat(host_tokens, dim=1), 0) if host_masked else None
                logits = self.draft(feed, start, s.dcache, last_only=True)
                allowed = self._allowed(pending, state)
                tok, lp, ln = self._sample(s, logits, 1.0 / cfg.draft_temperature, 1.0, allowed, self.draft)
                drafted.append(tok)
                if state is not None:
                    state = self.dfa.step(state, tok)
                if host_masked:
                    host_tokens.append(tok[:, None].cpu())
                if masked:
                    # a row with no allowed token is a dead end: weight zero, never NaN
                    log_q.append(torch.where(torch.isneginf(ln), torch.full_like(ln, math.inf), lp - ln))
                else:
                    log_q.append(lp - ln)
                feed = tok[:, None]
                # step 0 fed two tokens at pos-1 and pos; step k >= 1 feeds one at pos + k
                start = pos + (k + 1)
            y = torch.stack(drafted, dim=1)
            verify_in = torch.cat([s.pending[:, 1:], y], dim=1)
        else:
            y = s.pending[:, :0]
            verify_in = s.pending
        pending = self.mask.request_bitmask(torch.cat(host_tokens, dim=1), 0) if host_masked else None
        logits = self.target(verify_in, pos, s.tcache)  # [R, T, V]
        scale = 1.0 / cfg.target_temperature
        allowed = self._allowed(pending, state)
        bonus, _, bonus_norm = self._sample(s, logits[:, K], scale, cfg.alpha, allowed, self.target)
        # bonus_norm is exactly 0 unmasked at alpha = 1 (fused_sample's contract), so Z_hat does not
        # drift; a masked bonus weighs in with log sum_{allowed v} p(v)^alpha
        if K > 0:
            log_p = self.target.token_logprobs(logits[:, :K], y, scale, cfg.alpha)
            q = torch.stack(log_q, dim=1)
            # NaN logits show as NaN log-probabilities (+inf log q is a masked dead end, not an error);
            # one flag update for both models keeps the captured cycle's extra kernels few
            nan_t = torch.isnan(torch.cat([log_p, bonus_norm[:, None]], dim=1)).any()
            self._flag(s, 0, torch.stack([nan_t, torch.isnan(q).any()]))
        else:
            log_p = q = bonus_norm.new_zeros(R, 0)
            self._flag(s, 0, torch.isnan(bonus_norm).any())
        token_w = token_weights(log_p, q, bonus_norm)
        anc = self._finish(s, y, bonus, token_w)
        if host_masked:
            anc_host = anc.cpu()
            self.mask.reorder(anc_host)
            # the device history after the cycle is (history, block)[anc]: copy only this cycle's block
            done_w = s.host_history.shape[1]
            s.host_history = torch.cat([s.host_history[anc_host], s.history[:, done_w : done_w + T].cpu()], dim=1)

    def _sample(
        self, s: _CycleState, logits: Tensor, scale: float, alpha: float, allowed: Tensor | None, model: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``fused_sample`` of each segment's rows from the segment's own Philox stream (its key and
        offset), so a request's draws do not depend on what else runs in the batch. ``model.sample``
        draws (a tensor-parallel target reduces across its vocabulary shards); offsets advance by the
        full vocabulary, whatever width of logits this rank holds."""
        V = model.vocab_size
        parts = []
        for i, g in enumerate(s.segments):
            rows = slice(g.r0, g.r1)
            mine = allowed[rows] if allowed is not None else None
            parts.append(model.sample(logits[rows], scale, alpha, s.seed[i : i + 1], s.offset[i : i + 1], mine))
            s.offset[i : i + 1].add_(g.n_rows * V)
        if len(parts) == 1:
            return parts[0]
        tok, lp, ln = (torch.cat(x) for x in zip(*parts))
        return tok, lp, ln

    def _allowed(self, pending: Any, state: Tensor | None) -> Tensor | None:
        """The next-token bitmask of every row: the host guide's (collected after the forward's
        launch), a gather from the device guide's automaton, or None unguided."""
        if pending is not None:
            return pending.result().to(self.device)
        return self.dfa.masks(state) if state is not None else None

    def _finish(self, s: _CycleState, y: Tensor, bonus: Tensor, token_w: Tensor) -> Tensor:
        """Record the block, add the weights, resample and update the caches (device only).

        Returns the ancestors (global row ids) of the resampling step (identity when none).
        """
        cfg = self.config
        K, T = self.block, self.block + 1
        block = torch.cat([y, bonus[:, None]], dim=1)

        # [R, T] positions of this block in each row's continuation (one cycle counter per run, or
        # per request slot when requests join between cycles: NativeSlots)
        gen_idx = s.cycle[s.cycle_of_row][:, None] * T + s.arange_t
        limit = cfg.max_new_tokens if s.limits is None else s.limits
        in_budget = gen_idx < (limit if s.limits is None else limit[:, None])
        adv = advance(block, token_w, s.done, s.lengths, s.eos, limit, self.pad_id, in_budget)
        s.history.scatter_(1, gen_idx, adv.block)
        s.lengths.copy_(adv.lengths)
        inc = adv.inc
        # device potentials see the block: complete scores for rows that just finished
        for i, p in enumerate(self.device_potentials):
            new = self._device_scores(s, p, adv.done)
            self._flag(s, 2 + i, bad_values(new))
            p_inc, prev = potential_increment(new, s.device_prev[i], ~s.done)
            s.device_prev[i].copy_(prev)
            inc = inc + p_inc
        s.done.copy_(adv.done)
        if self.host_potential is not None:
            # host potentials' increments of an earlier cycle, consumed once
            inc = inc + s.host_inc
            s.host_inc.zero_()
        # a NaN / +inf was flagged where it arose; the weights get a zero there, so resampling and
        # log Z never see NaN, and the run raises when it ends (a device flag: no sync here)
        inc = torch.where(torch.isnan(inc) | torch.isposinf(inc), torch.full_like(inc, -math.inf), inc)

        # no resampling once every particle has finished (at the latest the last cycle, where every
        # row reaches max_new_tokens): it would only add noise to the final weights; decided on
        # the device, so graphs keep it
        inc = inc.view(s.B, -1).float()
        parts = []
        for i, g in enumerate(s.segments):
            groups = slice(g.g0, g.g1)
            if self.resampler is None:
                allow = (~s.done[g.r0 : g.r1].all()).to(torch.int32).reshape(1)
                anc, ess, resampled, _ = smc_weight_update(
                    s.log_w[groups], inc[groups], cfg.ess_threshold, s.seed[i : i + 1], s.offset[i : i + 1], allow
                )
                s.offset[i : i + 1].add_(g.n_groups)
            else:
                anc, ess, resampled = self._torch_resample(s, i, inc[groups])
            parts.append((anc + g.r0 if g.r0 else anc, ess, resampled))
        anc, ess, resampled = parts[0] if len(parts) == 1 else (torch.cat(x) for x in zip(*parts))
        at = (s.cycle[s.cycle_of_group], s.group_ids)  # each group's row of the histories
        s.ess_history.index_put_(at, ess)
        s.resampled_history.index_put_(at, resampled)

        if s.guide_state is not None:
            # the kept block (pads, i.e. EOS, where a position does not count) moves the automaton
            # exactly as the host guide's matchers follow the history
            s.guide_state.copy_(self.dfa.fold(s.guide_state, adv.block)[anc])
        s.history.copy_(s.history[anc])
        s.lengths.copy_(s.lengths[anc])
        s.done.copy_(s.done[anc])
        if K > 0:
            s.pending.copy_(torch.stack([y[:, -1], bonus], dim=1)[anc])
        else:
            s.pending.copy_(bonus[anc][:, None])
        if self.device_potentials:
            s.device_prev.copy_(s.device_prev[:, anc])
        if self.host_potential is not None:
            s.last_anc.copy_(anc)
        for i, g in enumerate(s.segments):
            local = anc[g.r0 : g.r1] - g.r0 if g.r0 else anc[g.r0 : g.r1]
            s.tviews[i].resample(local, s.pos[i : i + 1] + T)
            if self.draft is not None:
                s.dviews[i].resample(local, s.pos[i : i + 1] + K)
        s.all_done.copy_(s.done.all().reshape(1))
        s.done_history.index_put_(at, s.done.view(s.B, -1).all(dim=1))
        # a segment whose particles have all finished keeps its position: its rows take no more pages
        # and stay inside the context while longer requests of the batch go on (its worst case, which
        # sized the pool, ends with its own limit)
        live = torch.zeros_like(s.pos).index_add_(0, s.seg_of_row, (~s.done).to(s.pos.dtype)) > 0
        s.pos.add_(live.to(s.pos.dtype) * T)
        s.cycle.add_(1)
        if s.slot_mode:  # an idle slot's counter stops at the histories' spare last row
            s.cycle.clamp_(max=s.max_cycle)
        return anc

    def _torch_resample(self, s: _CycleState, i: int, inc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Segment ``i``'s weight update with a torch resampler (any scheme but the fused systematic
        one): the same gate as the kernel; dead groups keep their -inf weights and are not resampled.
        ``inc``: the segment's increments [groups, N]; the ancestors are the segment's own row ids."""
        assert self.resampler is not None
        g = s.segments[i]
        log_w = s.log_w[g.g0 : g.g1]
        log_w.add_(inc)
        lw = log_w.double()
        dead = torch.isneginf(lw).all(dim=1)
        ess = effective_sample_size(lw).float()
        want = resample_gate(ess, self.config.ess_threshold, self.config.n_particles, s.done[g.r0 : g.r1].all(), dead)
        # a dead group's weights would be NaN in the resampler: give it uniform ones, its result is unused;
        # the built-in schemes draw from the segment's Philox stream (graph-safe), a user one from a generator
        source = (
            _PhiloxUniforms(s.seed[i : i + 1], s.offset[i : i + 1]) if graph_safe(self.resampler) else s.generators[i]
        )
        local = self.resampler.ancestors(torch.where(dead[:, None], torch.zeros_like(lw), lw), source)
        keep = torch.arange(lw.shape[1], device=lw.device).expand_as(local)
        anc = global_rows(torch.where(want[:, None], local.to(lw.device), keep))
        log_w.copy_(reset_weights(lw, want).float())
        return anc, ess, want

    def _flag(self, s: _CycleState, source: int, bad: Tensor) -> None:
        """Remember on the device that ``self._sources[source:]`` (one per entry of ``bad``) produced
        NaN / +inf, and the first cycle each did."""
        bad = bad.reshape(-1)
        end = source + bad.numel()
        first = s.bad_step[source:end]
        first.copy_(torch.where(bad & (first < 0), s.cycle.amax(), first))  # request slots: the furthest slot's
        s.bad[source:end].logical_or_(bad)

    def _check_flags(self, s: _CycleState) -> None:
        """Raise for the first source flagged NaN / +inf during the run (one read, after the last cycle)."""
        bad = s.bad.cpu()
        if bool(bad.any()):
            steps = s.bad_step.cpu()
            i = int(bad.nonzero()[0])
            raise NonFiniteError(self._sources[i], int(steps[i]) + 1)

    def _device_scores(self, s: _CycleState, p: TokenPotential, finished: Tensor) -> Tensor:
        """A device potential's scores ``[R]`` (float32) on the run's tokens, checked for shape (no sync)."""
        try:
            new = p.log_potential(s.history, s.lengths, finished)
            if not isinstance(new, Tensor) or new.shape != (s.R,):
                shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(f"potential {p.name} returned {shape} scores for {s.R} particles; expected [{s.R}]")
        except Exception as err:
            raise scoring_error(p, err, self._step) from err
        return new.to(device=self.device, dtype=torch.float32)

    def _start_potentials(self, s: _CycleState, prompts: list[list[int]]) -> None:
        """Every potential's score of the empty continuation enters the weights (as the generic engine does)."""
        N = self.config.n_particles
        start = torch.zeros(s.R, dtype=torch.float32, device=self.device)
        nothing = torch.zeros(s.R, dtype=torch.bool, device=self.device)
        self._step = 0
        for i, p in enumerate(self.device_potentials):
            s0 = self._device_scores(s, p, nothing)
            if bool(bad_values(s0)):
                raise NonFiniteError(f"potential {p.name}", 0)
            s.device_prev[i].copy_(s0)
            start += s0
        if self.host_potential is not None:
            s0 = torch.cat(
                [
                    score_particles(self.host_potential, [[]], [False], prompt, self.tokenizer).expand(N)
                    for prompt in prompts
                ]
            )
            s.host_start = s0
            start += s0.to(self.device, torch.float32)
        if bool(torch.isneginf(start).any()):
            raise AllParticlesDeadError("the potentials give the empty continuation weight zero")
        s.log_w.add_(start.view(s.B, N))

    def _apply_end_potential(self, s: _CycleState, p: TokenPotential) -> None:
        """An end-only device potential's complete score of every particle (after the last cycle)."""
        self._step = int(s.cycle)
        final = self._device_scores(s, p, torch.ones_like(s.done))
        if bool(bad_values(final)):
            raise NonFiniteError(f"potential {p.name}", int(s.cycle))
        s.log_w.add_(final.view(s.B, -1))

    def _apply_final_factor(self, s: _CycleState, prompt: list[int]) -> None:
        """The guide's factor of every finished particle (a grammar: 0 when its text is in the
        language, else -inf); without twists along the way, which the masked draws make unneeded."""
        assert self.mask is not None
        N = self.config.n_particles
        lengths = s.lengths.cpu().tolist()
        hist = s.history.cpu().tolist()
        # rows= lets the grammar reuse each particle's matcher instead of re-parsing its whole text
        batch = SequenceBatch(
            [h[:n] for h, n in zip(hist, lengths)], prompt, self.tokenizer, rows=list(range(len(hist)))
        )
        try:
            final = checked_scores(self.mask, self.mask.log_complete(batch), len(batch))
        except Exception as err:
            raise scoring_error(self.mask, err, int(s.cycle)) from err
        final = final.to(device=self.device, dtype=s.log_w.dtype)
        s.log_w.add_(final.view(-1, N))

    def _capture(self, s: _CycleState) -> torch.cuda.CUDAGraph:
        """Warm up (Triton compiles, cuBLAS picks kernels) on a side stream, then record one cycle.

        The warm-up cycle runs on a snapshot that is restored afterwards, so the run itself is
        unchanged by it.
        """
        snapshot = s.snapshot()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._cycle(s)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        s.restore(snapshot)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._cycle(s)
        return graph  # capturing runs nothing: the state is still the restored one
