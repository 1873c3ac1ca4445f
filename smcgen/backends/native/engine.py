"""The native SMC engine: SMC speculative decoding (and plain SMC / AR) on the native runner.

One *cycle* is K draft steps, one target verify of the K+1 new positions, the importance weights,
the resample decision and the KV bookkeeping. Every tensor it touches is preallocated and every
value that changes between cycles (positions, the cycle index, RNG offsets) lives on the device,
so on a GPU the whole cycle is captured once as a CUDA graph and replayed; the host only reads
one flag per cycle to stop early when every particle has finished.

Layout of the token stream (all rows of a run have the same length):
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
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.backends.native.kv_cache import PagedKVCache
from smcgen.backends.native.model import NativeCausalLM
from smcgen.config import SMCConfig
from smcgen.kernels.philox import philox_uniform
from smcgen.kernels.sampling import fused_sample
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
from smcgen.potentials.token import TokenPotential
from smcgen.resampling import (
    Resampler,
    SystematicResampler,
    effective_sample_size,
    get_resampler,
    graph_safe,
)
from smcgen.run import AllParticlesDeadError, BatchRun, dead_group_error, length_problem
from smcgen.step import (
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
    weight zero). Masks are computed on the CPU from each step's tokens, so guided runs are not
    graphed.
    """

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
            # the masks depend on the tokens just drawn: the host takes part in every step
            self.cuda_graph = False
        self.mask = mask
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

    def unsupported_reason(self, prompt_len: int) -> str | None:
        """Why a prompt of ``prompt_len`` tokens cannot run here (None when it can).

        Checked before a run (``run`` raises it; ``engine='auto'`` falls back to the generic engine).
        """
        cfg = self.config
        T = self.block + 1
        min_prompt = 2 if self.draft is not None else 1
        if prompt_len < min_prompt:
            return f"the native engine needs a prompt of at least {min_prompt} tokens, got {prompt_len}"
        # the position tables actually built (from_hf/from_pretrained may shorten them), draft included
        context = min(m.max_positions for m in (self.target, self.draft) if m is not None)
        problem = length_problem(prompt_len, cfg.max_new_tokens, context)
        if problem is not None:
            return problem
        # every cycle writes all K+1 positions, so the last one may reach past max_new_tokens
        reach = self._positions_written(prompt_len)
        if reach > context:
            return (
                f"the last cycle of K+1 = {T} positions would reach position {reach - 1}, past the model context "
                f"({context}); lower max_new_tokens by {reach - context}, pick a block_size with "
                f"max_new_tokens % (block_size + 1) == 0, or use engine='generic'"
            )
        return None

    def _positions_written(self, prompt_len: int) -> int:
        """Positions a row's cache holds at the end: the target all but the last token (the draft
        all but two) of the prompt and of every whole cycle of K+1 tokens."""
        T = self.block + 1
        return prompt_len - 1 + -(-self.config.max_new_tokens // T) * T

    # ------------------------------------------------------------------------------ setup

    def _make_cache(
        self, model: NativeCausalLM, n_rows: int, n_requests: int, prompt_len: int, max_len: int, share: float
    ) -> PagedKVCache:
        """A cache sized for the worst case of this run; on CUDA checked against free memory."""
        max_pages = -(-max_len // self.page_size)
        available, where = 1 << 62, ""
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
        needed = PagedKVCache.check_budget(n_rows, n_requests, prompt_len, max_len, self.page_size, available, where)
        return model.make_cache(needed, n_rows, max_pages, self.page_size)

    # -------------------------------------------------------------------------------- run

    @torch.inference_mode()
    def run(
        self,
        prompt_ids: Sequence[int] | Sequence[Sequence[int]],
        n_groups: int | None = None,
        progress: bool = False,
        on_dead: str = "raise",
    ) -> BatchRun:
        """Run SMC on one prompt (``n_groups`` independent groups of it) or on a list of prompts.

        The cycle is one static shape, so prompts of different lengths run as one batch per
        distinct length (each with its own graph capture and its own random stream), merged back
        into the order given; ``ess_history`` / ``resampled`` of a batch that stopped earlier are
        padded with NaN / False, and ``elapsed_s`` and ``last_timing`` sum over the batches. A group whose particles all end at weight zero raises
        :class:`AllParticlesDeadError` after the run (``on_dead="raise"``), or (``on_dead="flag"``)
        is flagged in ``BatchRun.dead`` with log-weights ``-inf`` while the other groups' results
        are returned as usual. Unlike the generic engine, a dead group is not stopped early.
        """
        if on_dead not in ("raise", "flag"):
            raise ValueError(f"on_dead must be 'raise' or 'flag', got {on_dead!r}")
        prompts = _as_prompts(prompt_ids, n_groups)
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for length in by_length:
            reason = self.unsupported_reason(length)
            if reason is not None:
                raise ValueError(reason)
        parts, timings = [], []
        for stream, idx in enumerate(by_length.values()):
            run, timing = self._run_one_length([prompts[i] for i in idx], progress, stream)
            parts.append((idx, run))
            timings.append(timing)
        out = parts[0][1] if len(parts) == 1 else _merge_runs(parts, len(prompts))
        self.last_timing = {k: sum(t[k] for t in timings) for k in timings[0]}
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

    def _run_one_length(
        self, prompts: list[list[int]], progress: bool, stream: int
    ) -> tuple[BatchRun, dict[str, float]]:
        """One batch of prompts of one length: prefill, capture, cycles; dead groups flagged, not raised.
        Returns the run and its timing (prefill, capture and decode seconds, cycles).

        ``stream`` > 0 derives another seed from the config's (each batch of a call its own noise).
        """
        cfg = self.config
        B, N, K = len(prompts), cfg.n_particles, self.block
        R, T = B * N, K + 1
        P = len(prompts[0])
        n_cycles = -(-cfg.max_new_tokens // T)
        max_len = self._positions_written(P)
        dev = self.device
        t_start = time.perf_counter()

        share_t = 1.0
        if self.draft is not None:
            kv_t = self.target.kv_bytes_per_token()
            kv_d = self.draft.kv_bytes_per_token()
            share_t = kv_t / (kv_t + kv_d)
        tcache = self._make_cache(self.target, R, B, P - 1, max_len, share_t)
        dcache = (
            self._make_cache(self.draft, R, B, max(P - 2, 1), max_len, 1.0 - share_t)
            if self.draft is not None
            else None
        )

        state = _CycleState(self, prompts, n_cycles, tcache, dcache, stream)
        if self.potential is not None:
            self.potential.start(prompts[0], R)
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
        bar = tqdm(total=cfg.max_new_tokens, disable=not progress, desc="smc (native)", unit="tok", leave=False)
        # one done flag per cycle in flight, read by the host when that cycle's event has passed
        on_gpu = dev.type == "cuda"
        done_host = torch.zeros(2, dtype=torch.bool, pin_memory=on_gpu)
        flag_ready = [torch.cuda.Event() for _ in range(2)] if on_gpu else None
        # not with a grammar: its matchers would consume the extra cycle's tokens (and masked cycles
        # wait on the host at every step anyway)
        ahead = on_gpu if self.lookahead is None else self.lookahead
        lag = 1 if ahead and self.mask is None else 0
        host = None
        if self.host_potential is not None:
            # host potentials score cycle c - 1 while the device runs cycle c (always, also on the
            # CPU, so the CPU tests check the lagged weights the GPU uses); with a guide every cycle
            # waits on the host anyway, and they score each cycle right after it
            lag = 0 if self.mask is not None else 1
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
            bar.update(min(T, cfg.max_new_tokens - bar.n))
            seen = c - lag  # with the lookahead, cycle c runs while the host reads cycle c - 1's flag
            if seen < 0:
                continue
            if flag_ready is not None:
                flag_ready[seen % 2].synchronize()
            if host is not None:
                host.score(seen)
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
        if self.mask is not None:
            self._apply_final_factor(state, prompts[0])
        for p in self.end_potentials:
            self._apply_end_potential(state, p)
        # dead during the run (the weight update leaves a dead group's -inf weights as they are), or
        # (with a grammar) no particle ended inside the language
        dead = torch.isneginf(state.log_w).all(dim=1).cpu()
        width = cfg.max_new_tokens
        run = BatchRun.from_log_weights(
            state.history[:, :width].reshape(B, N, width),
            state.lengths.view(B, N),
            state.log_w.double(),
            state.ess_history[:n_cycles],
            state.resampled_history[:n_cycles],
            elapsed,
            dead,
        )
        return run, timing

    # ---------------------------------------------------------------------------- prefill

    def _prefill(self, s: _CycleState, prompts: list[list[int]]) -> None:
        """Prefill every request's prompt in one batched forward and share its pages with the group.

        The B prompts go into rows 0..B-1 (a ``rows`` view of the cache); one resample then makes
        row b*N + i a copy of row b: full pages shared, partial last page copied.
        """
        N = self.config.n_particles
        B = len(prompts)
        dev = self.device
        P = len(prompts[0])
        ids = torch.tensor(prompts, dtype=torch.long, device=dev)
        owner = torch.arange(B, device=dev).repeat_interleave(N)
        for model, cache, n_fed in ((self.target, s.tcache, P - 1), (self.draft, s.dcache, P - 2)):
            if model is None or cache is None or n_fed == 0:
                continue
            view = cache.rows(0, B)
            view.reserve(n_fed)
            model(ids[:, :n_fed], torch.zeros(B, dtype=torch.int32, device=dev), view, last_only=True)
            cache.resample(owner, n_fed)
        tail = 2 if self.draft is not None else 1
        s.pending.copy_(ids[:, P - tail :].repeat_interleave(N, dim=0))
        s.pos.fill_(P - 1)

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
        V = self.target.vocab_size
        pos = s.pos  # [1] int32: tokens in the target's cache
        masked = self.mask is not None

        s.tcache.reserve(pos + T)
        drafted: list[Tensor] = []
        log_q: list[Tensor] = []
        if masked:
            # the continuation so far on the host (kept there across cycles), extended by each
            # drafted token (eager path: syncs)
            host_tokens = [s.host_history]
        if self.draft is not None:
            s.dcache.reserve(pos + K)
            feed, start = s.pending, pos - 1
            for k in range(K):
                # the mask is requested (token ids read) before the forward and computed after its
                # launch, so on a GPU the host builds it while the device runs the draft
                pending = self.mask.request_bitmask(torch.cat(host_tokens, dim=1), 0) if masked else None
                logits = self.draft(feed, start.expand(R), s.dcache, last_only=True)
                allowed = pending.result().to(self.device) if masked else None
                tok, lp, ln = fused_sample(logits, 1.0 / cfg.draft_temperature, 1.0, s.seed, s.offset, allowed)
                s.offset.add_(R * V)
                drafted.append(tok)
                if masked:
                    host_tokens.append(tok[:, None].cpu())
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
        pending = self.mask.request_bitmask(torch.cat(host_tokens, dim=1), 0) if masked else None
        logits = self.target(verify_in, pos.expand(R), s.tcache)  # [R, T, V]
        scale = 1.0 / cfg.target_temperature
        allowed = pending.result().to(self.device) if masked else None
        bonus, _, bonus_norm = self.target.sample(logits[:, K], scale, cfg.alpha, s.seed, s.offset, allowed)
        s.offset.add_(R * V)
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
        if masked:
            anc_host = anc.cpu()
            self.mask.reorder(anc_host)
            # the device history after the cycle is (history, block)[anc]: copy only this cycle's block
            done_w = s.host_history.shape[1]
            s.host_history = torch.cat([s.host_history[anc_host], s.history[:, done_w : done_w + T].cpu()], dim=1)

    def _finish(self, s: _CycleState, y: Tensor, bonus: Tensor, token_w: Tensor) -> Tensor:
        """Record the block, add the weights, resample and update the caches (device only).

        Returns the ancestors (global row ids) of the resampling step (identity when none).
        """
        cfg = self.config
        K, T = self.block, self.block + 1
        R = s.R
        pos = s.pos
        block = torch.cat([y, bonus[:, None]], dim=1)

        gen_idx = s.cycle * T + s.arange_t  # [T] positions of this block in the continuation
        adv = advance(
            block, token_w, s.done, s.lengths, s.eos, cfg.max_new_tokens, self.pad_id, gen_idx < cfg.max_new_tokens
        )
        s.history.scatter_(1, gen_idx.expand(R, T), adv.block)
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
        if self.resampler is None:
            allow = (~s.done.all()).to(torch.int32).reshape(1)
            anc, ess, resampled, _ = smc_weight_update(
                s.log_w, inc.view(s.B, -1).float(), cfg.ess_threshold, s.seed, s.offset, allow
            )
            s.offset.add_(s.B)
        else:
            anc, ess, resampled = self._torch_resample(s, inc)
        s.ess_history.index_copy_(0, s.cycle, ess[None])
        s.resampled_history.index_copy_(0, s.cycle, resampled[None])

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
        s.tcache.resample(anc, pos + T)
        if self.draft is not None:
            s.dcache.resample(anc, pos + K)
        s.all_done.copy_(s.done.all().reshape(1))
        pos.add_(T)
        s.cycle.add_(1)
        return anc

    def _torch_resample(self, s: _CycleState, inc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The weight update with a torch resampler (any scheme but the fused systematic one):
        the same gate as the kernel; dead groups keep their -inf weights and are not resampled."""
        assert self.resampler is not None
        s.log_w.add_(inc.view(s.B, -1).float())
        lw = s.log_w.double()
        dead = torch.isneginf(lw).all(dim=1)
        ess = effective_sample_size(lw).float()
        want = resample_gate(ess, self.config.ess_threshold, self.config.n_particles, s.done.all(), dead)
        # a dead group's weights would be NaN in the resampler: give it uniform ones, its result is unused;
        # the built-in schemes draw from the run's Philox stream (graph-safe), a user one from a generator
        source = _PhiloxUniforms(s) if graph_safe(self.resampler) else s.generator
        local = self.resampler.ancestors(torch.where(dead[:, None], torch.zeros_like(lw), lw), source)
        keep = torch.arange(lw.shape[1], device=lw.device).expand_as(local)
        anc = global_rows(torch.where(want[:, None], local.to(lw.device), keep))
        s.log_w.copy_(reset_weights(lw, want).float())
        return anc, ess, want

    def _flag(self, s: _CycleState, source: int, bad: Tensor) -> None:
        """Remember on the device that ``self._sources[source:]`` (one per entry of ``bad``) produced
        NaN / +inf, and the first cycle each did."""
        bad = bad.reshape(-1)
        end = source + bad.numel()
        first = s.bad_step[source:end]
        first.copy_(torch.where(bad & (first < 0), s.cycle, first))
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
            s0 = torch.cat([
                score_particles(self.host_potential, [[]], [False], prompt, self.tokenizer).expand(N)
                for prompt in prompts
            ])
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


class _CycleState:
    """Every device tensor a cycle reads or writes, allocated once per run (static addresses)."""

    def __init__(
        self,
        engine: NativeSMC,
        prompts: list[list[int]],
        n_cycles: int,
        tcache: PagedKVCache,
        dcache: PagedKVCache | None,
        stream: int = 0,
    ):
        cfg = engine.config
        dev = engine.device
        self.B = len(prompts)
        self.R = self.B * cfg.n_particles
        T = engine.block + 1
        self.tcache, self.dcache = tcache, dcache
        i64 = {"dtype": torch.long, "device": dev}
        self.history = torch.full((self.R, n_cycles * T), engine.pad_id, **i64)
        # guided runs: the history's filled columns on the host, updated a block per cycle
        self.host_history = torch.zeros(self.R, 0, dtype=torch.long)
        self.lengths = torch.zeros(self.R, **i64)
        self.done = torch.zeros(self.R, dtype=torch.bool, device=dev)
        self.all_done = torch.zeros(1, dtype=torch.bool, device=dev)
        self.pending = torch.zeros(self.R, 2 if engine.draft is not None else 1, **i64)
        self.log_w = torch.zeros(self.B, cfg.n_particles, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int32, device=dev)
        self.cycle = torch.zeros(1, **i64)
        self.arange_t = torch.arange(T, **i64)
        self.eos = torch.tensor(engine.eos_ids, **i64).reshape(-1)
        seed = cfg.seed if cfg.seed is not None else random.SystemRandom().getrandbits(62)
        # another batch of the same call: a key far from this one (Philox streams of distinct keys are independent)
        seed += stream * 0x9E3779B97F4A7C15
        self.seed = torch.tensor([seed % (2**62)], **i64)
        self.offset = torch.zeros(1, **i64)
        self.ess_history = torch.zeros(n_cycles, self.B, dtype=torch.float32, device=dev)
        self.resampled_history = torch.zeros(n_cycles, self.B, dtype=torch.bool, device=dev)
        # potentials: each device potential's last score per row, the host potentials' pending
        # increment (added by the next cycle), the last cycle's ancestors
        self.device_prev = torch.zeros(len(engine.device_potentials), self.R, dtype=torch.float32, device=dev)
        self.host_inc = torch.zeros(self.R, dtype=torch.float64, device=dev)
        self.host_start: Tensor | None = None
        self.last_anc = torch.arange(self.R, **i64)
        # NaN / +inf flags per source (the models, each device potential) and the first cycle of each
        self.bad = torch.zeros(len(engine._sources), dtype=torch.bool, device=dev)
        self.bad_step = torch.full((len(engine._sources),), -1, **i64)
        # a torch resampler's randomness (eager runs only)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(seed % (2**62) + 1)

    def _tensors(self) -> list[Tensor]:
        caches = [c for c in (self.tcache, self.dcache) if c is not None]
        out = [
            self.history,
            self.lengths,
            self.done,
            self.all_done,
            self.pending,
            self.log_w,
            self.pos,
            self.cycle,
            self.offset,
            self.ess_history,
            self.resampled_history,
            self.device_prev,
            self.host_inc,
            self.last_anc,
            self.bad,
            self.bad_step,
        ]
        for c in caches:
            out += [c.block_table, c.refcount, c.free_stack, c.free_top, c.status, c.high_water]
        return out

    def snapshot(self) -> list[Tensor]:
        """Copies of the mutable state (KV pools excluded: a warm-up only writes slots it will rewrite)."""
        return [t.clone() for t in self._tensors()]

    def restore(self, snapshot: list[Tensor]) -> None:
        for t, saved in zip(self._tensors(), snapshot):
            t.copy_(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _merge_runs(parts: list[tuple[list[int], BatchRun]], n_groups: int) -> BatchRun:
    """One BatchRun in the callers' group order from runs over subsets of the groups."""
    n_cycles = max(run.ess_history.shape[0] for _, run in parts)
    first = parts[0][1]
    N, width = first.tokens.shape[1], first.tokens.shape[2]
    tokens = torch.empty(n_groups, N, width, dtype=first.tokens.dtype)
    lengths = torch.empty(n_groups, N, dtype=first.lengths.dtype)
    log_w = torch.empty(n_groups, N, dtype=first.log_weights.dtype)
    log_z = torch.empty(n_groups, dtype=first.log_z.dtype)
    ess = torch.full((n_cycles, n_groups), math.nan, dtype=first.ess_history.dtype)
    resampled = torch.zeros(n_cycles, n_groups, dtype=torch.bool)
    dead = torch.zeros(n_groups, dtype=torch.bool)
    for idx, run in parts:
        at = torch.tensor(idx)
        tokens[at], lengths[at], log_w[at], log_z[at], dead[at] = (
            run.tokens, run.lengths, run.log_weights, run.log_z, run.dead
        )
        ess[: run.ess_history.shape[0], at] = run.ess_history
        resampled[: run.resampled.shape[0], at] = run.resampled
    return BatchRun(
        tokens=tokens,
        lengths=lengths,
        log_weights=log_w,
        log_z=log_z,
        ess_history=ess,
        resampled=resampled,
        elapsed_s=sum(run.elapsed_s for _, run in parts),
        dead=dead,
    )


def _as_prompts(prompt_ids: Sequence[int] | Sequence[Sequence[int]], n_groups: int | None) -> list[list[int]]:
    """One prompt repeated ``n_groups`` times, or a list of prompts (then ``n_groups`` must be None/len)."""
    items = list(prompt_ids)
    if (
        items
        and isinstance(items[0], (list, tuple, Tensor))
        and not (isinstance(items[0], Tensor) and items[0].dim() == 0)
    ):
        prompts = [[int(t) for t in p] for p in items]
        if n_groups not in (None, len(prompts)):
            raise ValueError(f"n_groups={n_groups} but {len(prompts)} prompts were given")
        return prompts
    groups = 1 if n_groups is None else n_groups
    if groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {groups}")
    prompt = [int(t) for t in items]
    return [list(prompt) for _ in range(groups)]


class _PhiloxUniforms:
    """Uniforms from the run's counter-based Philox stream (seed and offset on the device): what the
    built-in resamplers draw from on the native engine, so a CUDA graph captures them."""

    def __init__(self, s: _CycleState):
        self.s = s

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        u = philox_uniform(self.s.seed, self.s.offset + torch.arange(n, device=self.s.offset.device))
        self.s.offset.add_(n)
        return u.view(shape)


class _HostScorer:
    """Host potentials on the native engine, scored one cycle late so the device never waits.

    After cycle c the host queues copies of the tokens, lengths, done flags and ancestors (pinned
    memory on a GPU); while the device runs cycle c + 1 it scores cycle c's particles (complete for
    finished ones), and its increment log Psi(new) - log Psi(previous) goes to the device, permuted
    by cycle c + 1's ancestors, where cycle c + 2 adds it before its resampling decision. The
    intermediate targets then carry the twist of the tokens one cycle back, which telescopes like
    any twist; :meth:`finish` adds what is left after the last cycle (the final complete scores),
    so the weights at the end are the ones the unlagged step gives. With ``lag = 0`` (a guided run,
    where every cycle waits on the host anyway) each cycle is scored right after it.
    """

    def __init__(self, engine: NativeSMC, s: _CycleState, prompts: list[list[int]], lag: int):
        assert engine.host_potential is not None and s.host_start is not None
        self.engine, self.s, self.lag = engine, s, lag
        self.potential = engine.host_potential
        self.prompts = [tuple(p) for p in prompts]
        self.N = engine.config.n_particles
        pin = engine.device.type == "cuda"
        R, W = s.R, s.history.shape[1]
        self.hist = torch.zeros(2, R, W, dtype=torch.long, pin_memory=pin)
        self.lengths = torch.zeros(2, R, dtype=torch.long, pin_memory=pin)
        self.done = torch.zeros(2, R, dtype=torch.bool, pin_memory=pin)
        self.anc = torch.zeros(2, R, dtype=torch.long, pin_memory=pin)
        self.staged = torch.zeros(2, R, dtype=torch.float64, pin_memory=pin)
        self.delta_dev = torch.zeros(R, dtype=torch.float64, device=engine.device)
        # the last scores and done flags, in the order of the last scored snapshot
        self.prev = s.host_start.clone()
        self.prev_done = torch.zeros(R, dtype=torch.bool)

    def snapshot(self, c: int) -> None:
        """Queue copies of cycle c's state (read by :meth:`score` once the cycle's event passed)."""
        i, s = c % 2, self.s
        self.hist[i].copy_(s.history, non_blocking=True)
        self.lengths[i].copy_(s.lengths, non_blocking=True)
        self.done[i].copy_(s.done, non_blocking=True)
        self.anc[i].copy_(s.last_anc, non_blocking=True)

    def _delta(self, c: int) -> Tensor:
        """Cycle c's increments (its row order), with the potentials' row states following its ancestors."""
        i = c % 2
        anc = self.anc[i].clone()
        self.prev, self.prev_done = self.prev[anc], self.prev_done[anc]
        self.potential.reorder(anc)
        active = ~self.prev_done & ~torch.isneginf(self.prev)
        rows = active.nonzero().squeeze(-1).tolist()
        new = self.prev.clone()
        if rows:
            hist_rows, lengths, done = self.hist[i].tolist(), self.lengths[i].tolist(), self.done[i]
            # one batched call per distinct prompt (usually one: n_groups runs of a prompt)
            by_prompt: dict[tuple[int, ...], list[int]] = {}
            for r in rows:
                by_prompt.setdefault(self.prompts[r // self.N], []).append(r)
            for prompt, mine in by_prompt.items():
                tokens = [hist_rows[r][: lengths[r]] for r in mine]
                try:
                    new[mine] = score_particles(
                        self.potential, tokens, done[mine].tolist(), list(prompt), self.engine.tokenizer, mine
                    )
                except Exception as err:
                    raise scoring_error(self.potential, err, c + 1) from err
        delta, self.prev = potential_increment(new, self.prev, active)
        self.prev_done = self.done[i].clone()
        return delta

    def score(self, c: int) -> None:
        """Score cycle c and queue its increment for the next cycle the device has not started."""
        delta = self._delta(c)
        staged = self.staged[c % 2]
        staged.copy_(delta)
        self.delta_dev.copy_(staged, non_blocking=True)
        s = self.s
        # lag 1: cycle c + 1 already reordered the rows; its ancestors are in last_anc (stream order)
        s.host_inc.copy_(self.delta_dev[s.last_anc] if self.lag else self.delta_dev)

    def finish(self, last: int, seen: int, ready: list[Any] | None) -> None:
        """After the last cycle: the increment still pending and the scores of the cycles not yet
        scored (the final, complete ones) go straight into the weights."""
        s = self.s
        s.log_w.add_(s.host_inc.view(s.B, -1).float())
        s.host_inc.zero_()
        for c in range(seen + 1, last + 1):
            if ready is not None:
                ready[c % 2].synchronize()
            s.log_w.add_(self._delta(c).to(s.log_w.device).view(s.B, -1).float())
