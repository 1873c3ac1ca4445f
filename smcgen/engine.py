"""``smcgen.Engine``: models loaded once, engines built once, many requests served.

An :class:`Engine` holds a target (and optional draft, potentials, proposal) and a base
:class:`SMCConfig`. It picks the engine family when built, before converting anything: when the
native GPU engine can run the models and options, it converts them to native runners then (once,
cached per model object) and keeps one :class:`NativeSMC` per distinct setting, so repeated
requests reuse it; otherwise every request runs on the generic engine. ``engine(prompt)`` runs one
request, ``engine.batch(prompts)`` many: requests whose settings agree (seeds and token limits may
differ) run as one native batch, prompts of every length together, each request with its own
random stream; the generic engine runs them one after another.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, as_completed
from typing import Any

from tqdm.auto import tqdm

from smcgen.core.config import SMCConfig
from smcgen.core.result import SMCResult
from smcgen.engine_build import NativeEngines, generic_engine
from smcgen.engine_requests import (  # noqa: F401 (re-exported: callers import them from here)
    PromptLike,
    Request,
    batch_key,
    chat_prompt_ids,
    is_chat,
    one_guide,
    prompt_ids,
)
from smcgen.engine_results import (  # noqa: F401 (re-exported)
    _WARNED,
    WEAK_DRAFT_ESS,
    _warn_fallback,
    group_result,
    posterior_of,
)
from smcgen.engine_stream import TextStream, _native_watcher, _StepWatcher
from smcgen.memory import check_request_memory
from smcgen.potentials.base import Potential
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.output import as_grammar
from smcgen.proposals.base import Proposal
from smcgen.runners.transformers import (
    LanguageModel,
    check_compatible,
)
from smcgen.samplers.generic import SMC
from smcgen.samplers.outcome import explained_dead_end
from smcgen.samplers.run import AllParticlesDeadError, BatchRun, length_problem
from smcgen.trace import TraceRecorder
from smcgen.validation import (
    as_config,
    as_potentials,
    check_model_device,
    check_on_dead,
    checked_proposal,
)

#: native engines kept per Engine (one per distinct setting: config without the seed, guide)
NATIVE_ENGINES_KEPT = 16

#: why the generic engine runs a request with a constraint (AWRS draws have no native kernel yet)
AWRS_REASON = "a constraint steered by AWRS runs on the generic engine"


class Engine:
    """Holds the models and runs SMC requests on them; build once, call many times.

    ``Engine(target, draft=..., potentials=..., proposal=..., constraint=..., config=..., tokenizer=...,
    guide=..., **config_overrides)`` takes what :func:`smcgen.generate` takes, without the prompt
    (``grammar=`` is ``guide``'s older name; a draft may be a trained draft directory, tied to the
    target). ``engine(prompt, **overrides)`` runs one request; ``overrides`` are :class:`SMCConfig`
    fields (``seed=1``, ``max_new_tokens=32``), ``guide=`` / ``grammar=`` and ``on_dead=``.
    ``engine.batch(prompts, ...)`` runs many. A prompt is text, token ids, a tensor, a tokenizer's
    output, or chat messages (``[{"role": "user", "content": ...}]``, formatted with the tokenizer's
    chat template and the assistant turn opened).

    Every argument is checked when the Engine is built and every request when it is resolved,
    before any model work (errors name the parameter). A guide is anything
    :func:`~smcgen.potentials.output.as_grammar` converts (bound to the target's tokenizer, its JSON
    budget checked against the request's ``max_new_tokens``) or any potential with a
    ``next_token_mask``. ``constraint`` (a :class:`Potential` without a cheap mask) steers every draw
    by adaptive weighted rejection sampling and runs on the generic engine.

    ``engine.submit(prompt, ...)`` queues a request for continuous batching and returns a future of
    its result: on the native engine requests join and leave a running batch between SMC cycles
    (``slots`` requests at once over one KV pool of ``kv_pages`` pages per model; see
    :mod:`smcgen.continuous`); ``engine.batch`` uses it there unless ``continuous=False``.

    Calls are serialized (a lock): one engine runs one batch (or one cycle of its slots) at a time.
    ``stats`` counts the native engines built and the requests run, ``engine_reason`` says why the
    generic engine runs (None when the native one can); a request that falls back under
    ``engine='auto'`` logs its reason once per distinct reason.
    """

    def __init__(
        self,
        target: Any,
        *,
        draft: Any = None,
        potentials: Potential | Sequence[Potential] = (),
        proposal: Proposal | None = None,
        config: SMCConfig | None = None,
        tokenizer: Any | None = None,
        guide: Any = None,
        grammar: Any = None,
        constraint: Potential | None = None,
        slots: int = 8,
        kv_pages: int | None = None,
        continuous: bool = True,
        **config_overrides: Any,
    ):
        from smcgen.api import as_language_model
        from smcgen.continuous import ContinuousBatcher

        # the checks that need no model first, so a bad argument fails before anything loads
        self.config = as_config(config, config_overrides)
        #: continuous batching (:meth:`submit`; :meth:`batch` on the native engine when ``continuous``)
        self.batcher = ContinuousBatcher(self, n_slots=slots, kv_pages=kv_pages)
        self.continuous = bool(continuous)
        self.potentials = as_potentials(potentials)
        if proposal is not None and not isinstance(proposal, Proposal):
            raise TypeError(f"proposal must be a smcgen.Proposal or None, got {type(proposal).__name__}")
        if draft is not None and proposal is not None:
            raise ValueError("give either draft or proposal, not both")
        if constraint is not None and not isinstance(constraint, Potential):
            raise TypeError(f"constraint must be a Potential, got {type(constraint).__name__}")
        guide = one_guide(guide, grammar)
        if constraint is not None and guide is not None:
            raise ValueError("give either grammar or constraint, not both (a grammar is a constraint with a mask)")
        check_model_device(target, "target")
        self.target = as_language_model(target, tokenizer)
        self.custom_proposal = proposal is not None
        self.proposal = checked_proposal(proposal, self.target.vocab_size)
        self.constraint = constraint
        self.draft: LanguageModel | None = None
        if draft is not None:
            check_model_device(draft, "draft")
            tok = tokenizer if tokenizer is not None else self.target.tokenizer
            draft_lm = as_language_model(draft, tok, self.target)  # a draft directory is tied to the target
            if draft_lm.tokenizer is None:  # the target's tokenizer; every other field (native_format too) kept
                draft_lm = dataclasses.replace(draft_lm, tokenizer=self.target.tokenizer)
            check_compatible(self.target, draft_lm)
            self.draft = draft_lm
        self.grammar = self.bind_grammar(guide, self.config.max_new_tokens)
        self._native = NativeEngines(NATIVE_ENGINES_KEPT)
        #: held for one batch or one cycle of the slots: hold it to keep other calls out
        self.lock = threading.Lock()
        self.stats = {"native_engines_built": 0, "requests": 0, "native_requests": 0, "generic_requests": 0}
        # decided before any conversion: the native engine only when it can run these models and options
        self.engine_reason = self._static_reason(self.config)
        if self.engine_reason is None:
            self._convert(self.config, rows=self.config.n_particles)

    # -------------------------------------------------------------------------- decisions

    def bind_grammar(self, guide: Any, max_new_tokens: int | None = None) -> Potential | None:
        """``guide`` ready to run: a potential with its own ``next_token_mask`` as it is; anything
        else converted by :func:`~smcgen.potentials.output.as_grammar` and compiled for the target's
        vocabulary (with ``max_new_tokens``, a JSON schema's shortest document is checked to fit)."""
        if guide is None:
            return None
        if isinstance(guide, Potential) and not isinstance(guide, GrammarPotential):
            return guide
        return as_grammar(guide, self.target, max_new_tokens=max_new_tokens)

    def _static_reason(self, cfg: SMCConfig) -> str | None:
        """Why the native engine cannot run requests with ``cfg`` on these models (None: it can).

        Raises for an explicit draft format that cannot apply (as the native selection does)."""
        from smcgen.samplers.native_select import native_reason

        if self.constraint is not None or (self.proposal is not None and self.proposal.target_constraint() is not None):
            return AWRS_REASON
        return native_reason(cfg, self.target, self.draft, self.potentials, self.custom_proposal)

    def _convert(self, cfg: SMCConfig, rows: int) -> tuple[Any, Any]:
        """The native target and draft for a run of ``rows`` draft rows (converted once per model and format)."""
        from smcgen.samplers.native_select import native_draft, native_model

        target = native_model(self.target)
        draft = None
        if self.draft is not None:
            draft = native_draft(cfg, self.draft, rows, self.target.device)
        return target, draft

    def _native_engine(self, cfg: SMCConfig, guide: Potential | None, rows: int) -> Any:
        """The cached :class:`NativeSMC` for this setting (see :class:`~smcgen.engine_build.NativeEngines`)."""
        target, draft = self._convert(cfg, rows)
        engine, built = self._native.get(cfg, guide, target, draft, self.target, self.potentials)
        self.stats["native_engines_built"] += int(built)
        return engine

    def native_for(self, cfg: SMCConfig, guide: Potential | None, rows: int) -> Any | None:
        """The cached :class:`NativeSMC` for requests with ``cfg`` and ``guide`` over ``rows`` draft
        rows, or None when the native engine cannot run them on these models. Hold :attr:`lock`."""
        return None if self._static_reason(cfg) is not None else self._native_engine(cfg, guide, rows)

    def _generic(self, cfg: SMCConfig, guide: Potential | None) -> SMC:
        """The generic engine for one setting (cheap to build: it holds no per-run state)."""
        return generic_engine(self.target, self.draft, self.proposal, self.constraint, self.potentials, cfg, guide)

    def resolve(self, prompt: PromptLike, grammar: Any = None, *, guide: Any = None, **overrides: Any) -> Request:
        """Validate one request: its token ids, its config (base config + overrides), its guide.

        Raises ``ValueError`` (bad prompt, too long for the context), ``pydantic.ValidationError``
        (a config field out of range) or :class:`~smcgen.potentials.grammar.GrammarError` (a guide
        that does not compile, or a JSON budget too small for the schema).
        """
        cfg = as_config(self.config, overrides) if overrides else self.config
        asked = one_guide(guide, grammar)
        if asked is not None and self.constraint is not None:
            raise ValueError("give either grammar or constraint, not both (a grammar is a constraint with a mask)")
        g = self.bind_grammar(asked if asked is not None else self.grammar, cfg.max_new_tokens)
        ids = prompt_ids(prompt, self.target)
        problem = length_problem(len(ids), cfg.max_new_tokens, self.target.context_length)
        if problem is not None:
            raise ValueError(problem)
        return Request(ids, cfg, g)

    # ------------------------------------------------------------------------------ runs

    def __call__(
        self,
        prompt: PromptLike,
        *,
        guide: Any = None,
        grammar: Any = None,
        on_dead: str = "raise",
        progress: bool = False,
        trace: bool = False,
        **overrides: Any,
    ) -> SMCResult:
        """Run one request. When every particle ends at weight zero, ``on_dead="raise"`` raises
        :class:`AllParticlesDeadError` (with the dead prefixes' text); ``"flag"`` / ``"partial"``
        return the longest partial output with ``result.dead`` set. ``trace=True`` records the run
        step by step into ``result.trace`` (:class:`smcgen.trace.Trace`; on either engine)."""
        policy = check_on_dead(on_dead)
        request = self.resolve(prompt, grammar, guide=guide, **overrides)
        return self.run_group([request], progress=progress, on_dead=policy, trace=trace)[0]

    def stream(
        self, prompt: PromptLike, *, guide: Any = None, grammar: Any = None, on_dead: str = "raise", **overrides: Any
    ) -> TextStream:
        """Run one request and iterate over its text as it becomes stable (a :class:`TextStream`).

        What is streamed is the text of the longest token prefix that every live particle shares:
        every later particle descends from a live one, so the final answer starts with it and no
        streamed text is ever taken back (see :mod:`smcgen.streaming`). With much resampling
        diversity that prefix can lag far behind the particles, up to the whole answer arriving at
        the end. Concatenated, the deltas are ``result.text``; ``stream.result`` holds the
        :class:`SMCResult` once the iterator is exhausted. Same arguments as calling the engine.
        """
        policy = check_on_dead(on_dead)
        request = self.resolve(prompt, grammar, guide=guide, **overrides)
        return TextStream(self, request, policy)

    def submit(self, prompt: PromptLike, *, guide: Any = None, grammar: Any = None, **overrides: Any) -> Future:
        """Queue one request for continuous batching; returns a ``concurrent.futures.Future`` of its
        :class:`SMCResult` (``result.dead`` flagged, not raised).

        On the native engine the request joins the running batch between two SMC cycles, in a free
        request slot, when its worst-case KV pages fit beside the running requests' (else it waits;
        one that can never fit fails with a ``ValueError`` naming the page counts), and leaves it
        when its particles have all finished, so it never waits for a longer request. It draws the
        same tokens as the same request run alone with its seed, up to float rounding (which, on a
        GPU in bf16, now and then flips a draw: docs/serving.md). Requests the slots cannot run
        (the generic engine, host potentials, a guide computed on the host) run one at a time.
        The request is validated here (errors raise now, as :meth:`resolve` says)."""
        return self.batcher.submit(self.resolve(prompt, grammar, guide=guide, **overrides))

    def batch(
        self,
        prompts: Sequence[PromptLike],
        *,
        seed: int | None | Sequence[int | None] = None,
        max_new_tokens: int | Sequence[int] | None = None,
        grammar: Any = None,
        guide: Any = None,
        progress: bool = False,
        **overrides: Any,
    ) -> list[SMCResult]:
        """Run many requests; results in the order of ``prompts``.

        ``seed``, ``max_new_tokens`` and ``guide`` (or ``grammar``) take one value for all or a list
        (one per prompt); other overrides apply to all. Requests whose settings agree (config up to
        seed and limit, guide) run as one batch on the native engine (B requests x N particles,
        prompts of any length); on the generic engine, one after another. Each request draws from
        its own random stream, so it gets the same tokens as the same request run alone with the
        same seed (its weights to float rounding); its ``elapsed_s`` is the wall time of the batch
        it ran in. A request whose particles all end at weight zero is returned with
        ``result.dead`` set (no exception).
        """
        n = len(prompts)

        def per_request(value: Any, name: str) -> list[Any]:
            if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
                if len(value) != n:
                    raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
                return list(value)
            return [value] * n

        seeds = per_request(seed, "seed")
        limits = per_request(max_new_tokens, "max_new_tokens")
        asked = one_guide(guide, grammar)
        guides = list(asked) if isinstance(asked, (list, tuple)) else [asked] * n
        if len(guides) != n:
            raise ValueError(f"guide has {len(guides)} entries for {n} prompts")
        requests = []
        for p, s, m, g in zip(prompts, seeds, limits, guides):
            extra = dict(overrides)
            if s is not None:
                extra["seed"] = s
            if m is not None:
                extra["max_new_tokens"] = m
            requests.append(self.resolve(p, g, **extra))
        if not self.continuous or self.engine_reason is not None:
            return self.run_requests(requests, progress=progress)
        # continuous batching: requests join and leave the native batch between cycles; the rest
        # (host guides or potentials) run grouped as before
        out: list[SMCResult | None] = [None] * n
        futures = {self.batcher.submit(r): i for i, r in enumerate(requests) if self.batcher.can_run(r)}
        rest = [i for i in range(n) if i not in futures.values()]
        if rest:
            for i, res in zip(rest, self.run_requests([requests[i] for i in rest], progress=progress)):
                out[i] = res
        for f in tqdm(as_completed(futures), total=len(futures), disable=not progress, desc="requests", leave=False):
            out[futures[f]] = f.result()
        return out  # type: ignore[return-value]

    def run_requests(
        self,
        requests: Sequence[Request],
        progress: bool = False,
        on_step: Callable[[list[list[int]], list[bool]], None] | None = None,
    ) -> list[SMCResult]:
        """Run resolved requests (:meth:`resolve`), grouped by setting as :meth:`batch` says; a request
        whose particles all end at weight zero comes back with ``result.dead`` set.

        ``on_step(sequences, alive)`` watches the first request step by step (for streaming: its
        particles' tokens so far and whether each has weight above zero); that request then runs
        in a batch of its own."""
        if on_step is not None:
            first = self.run_group([requests[0]], progress=progress, on_dead="flag", on_step=on_step)
            return first + (self.run_requests(requests[1:], progress) if len(requests) > 1 else [])
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(batch_key(r), []).append(i)
        out: list[SMCResult | None] = [None] * len(requests)
        for idx in groups.values():
            for i, res in zip(idx, self.run_group([requests[i] for i in idx], progress=progress, on_dead="flag")):
                out[i] = res
        return out  # type: ignore[return-value]

    def run_group(
        self,
        requests: list[Request],
        progress: bool,
        on_dead: str,
        trace: bool = False,
        on_step: Callable[[list[list[int]], list[bool]], None] | None = None,
    ) -> list[SMCResult]:
        """Requests sharing one config and guide (as :func:`batch_key` groups them): one native run,
        or generic runs one by one; results in the order of ``requests``. Takes :attr:`lock`.

        ``on_step(sequences, alive)``: after every step (cycle), the first request's particles'
        tokens so far and whether each has weight above zero (streaming)."""
        cfg, guide = requests[0].config, requests[0].grammar
        with self.lock:
            self.stats["requests"] += len(requests)
            reason = self._static_reason(cfg)
            native = None
            if reason is None:
                native = self._native_engine(cfg, guide, rows=cfg.n_particles * len(requests))
                reason = next(
                    (
                        r
                        for r in (native.unsupported_reason(len(q.ids), q.config.max_new_tokens) for q in requests)
                        if r
                    ),
                    None,
                )
                if reason is not None:
                    native = None
            if native is None and cfg.engine == "native":
                raise ValueError(f"engine='native' cannot run this request: {reason}")
            if native is None:
                if cfg.engine == "auto" and reason is not None:
                    _warn_fallback(reason, self.target.device)
                for q in requests:  # the native engine checks its own cache; the generic one is checked here
                    check_request_memory(q.config, self.target, self.draft, len(q.ids))
            if getattr(guide, "counts_down_budget", False):
                # the JSON budget twist and the Python grammar's last-token mask count down from this
                # request's limit (the guide object is shared by requests with other limits: set it
                # under the lock, right before the run)
                guide.finish_within = cfg.max_new_tokens
            try:
                if native is not None:
                    self.stats["native_requests"] += len(requests)
                    recorder = TraceRecorder(self.target.tokenizer) if trace else None
                    run = native.run(
                        [q.ids for q in requests],
                        progress=progress,
                        on_dead=on_dead,
                        seeds=[q.config.seed for q in requests],
                        max_new_tokens=[q.config.max_new_tokens for q in requests],
                        on_cycle=_native_watcher(on_step, cfg.n_particles) if on_step is not None else None,
                        recorder=recorder,
                    )
                    results = [
                        self.result(run, b, q.config, guide, "native", native.guide_reason)
                        for b, q in enumerate(requests)
                    ]
                    if recorder is None:
                        return results
                    return [dataclasses.replace(r, trace=recorder.trace(b)) for b, r in enumerate(results)]
                self.stats["generic_requests"] += len(requests)
                out = []
                for q in requests:  # a group's requests may differ in seed and limit: each its own config
                    recorder = TraceRecorder(self.target.tokenizer) if trace else None
                    if on_step is not None and q is requests[0]:
                        recorder = _StepWatcher(on_step, cfg.n_particles)
                    smc = self._generic(q.config, guide)
                    run = smc.run(q.ids, n_groups=1, progress=progress, on_dead=on_dead, recorder=recorder)
                    res = self.result(run, 0, q.config, guide, "generic", reason)
                    out.append(dataclasses.replace(res, trace=recorder.trace(0)) if trace else res)
                return out
            except AllParticlesDeadError as err:
                raise explained_dead_end(err, self.target.tokenizer, masked=guide is not None) from None

    def result(
        self,
        run: BatchRun,
        b: int,
        cfg: SMCConfig,
        guide: Potential | None,
        engine: str,
        engine_reason: str | None = None,
    ) -> SMCResult:
        """The :class:`SMCResult` of group ``b`` of a run (see :func:`smcgen.engine_results.group_result`)."""
        with_draft = self.draft is not None or self.proposal is not None
        decoder = self.target.tokenizer
        return group_result(run, b, cfg, guide, decoder, engine, engine_reason, with_draft=with_draft)


__all__ = [
    "Engine",
    "Request",
    "TextStream",
    "batch_key",
    "chat_prompt_ids",
    "is_chat",
    "one_guide",
    "posterior_of",
    "prompt_ids",
]
