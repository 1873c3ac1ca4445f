"""``smcgen.Engine``: models loaded once, engines built once, many requests served.

An :class:`Engine` holds a target (and optional draft, potentials, proposal) and a base
:class:`SMCConfig`. It picks the engine family when built, before converting anything: when the
native GPU engine can run the models and options, it converts them to native runners then (once,
cached per model object) and keeps one :class:`NativeSMC` per distinct setting, so repeated
requests reuse it; otherwise every request runs on the generic engine. ``engine(prompt)`` runs one
request, ``engine.batch(prompts)`` many: requests whose settings agree run as one native batch
(``NativeSMC.run`` takes prompts of different lengths and groups them by length); the generic
engine runs them one after another.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smcgen.backends.transformers_lm import (
    LanguageModel,
    check_compatible,
    encode_prompt,
)
from smcgen.config import SMCConfig
from smcgen.potentials.base import Potential
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.lm import LMPotential
from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal
from smcgen.proposals.masked import MaskedLMProposal
from smcgen.result import SMCResult
from smcgen.smc import SMC, BatchRun

#: a prompt: text, token ids, a [T] / [1, T] tensor, or chat messages ({"role", "content"} dicts)
PromptLike = str | Sequence[int] | Tensor | Sequence[Mapping[str, Any]]

#: native engines kept per Engine (one per distinct setting: config without the seed, grammar)
NATIVE_ENGINES_KEPT = 16


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages (mappings with a role)."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, (str, bytes))
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def chat_prompt_ids(messages: Sequence[Mapping[str, Any]], lm: LanguageModel) -> list[int]:
    """Token ids of ``messages`` under the model's chat template, ending with the assistant's turn."""
    tok = lm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("chat messages need a tokenizer with a chat template; pass text or token ids instead")
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"chat message {i} needs 'role' and 'content' keys, got {sorted(m)}")
    ids = tok.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(t) for t in ids]


def prompt_ids(prompt: PromptLike, lm: LanguageModel) -> list[int]:
    """Token ids of a prompt: chat messages get the chat template, the rest is :func:`encode_prompt`."""
    if is_chat(prompt):
        return chat_prompt_ids(prompt, lm)  # type: ignore[arg-type]
    return encode_prompt(prompt, lm)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Request:
    """One validated request (from :meth:`Engine.resolve`): its token ids, config and bound grammar (or None)."""

    ids: list[int]
    config: SMCConfig
    grammar: GrammarPotential | None


def batch_key(request: Request) -> tuple:
    """Requests with equal keys can share one native batch: the same config (seed included) and grammar."""
    return (request.config.model_dump_json(), id(request.grammar))


class Engine:
    """Holds the models and runs SMC requests on them; build once, call many times.

    ``Engine(target, draft=..., potentials=..., proposal=..., config=..., tokenizer=..., grammar=...,
    **config_overrides)`` takes what :func:`smcgen.generate` takes, without the prompt.
    ``engine(prompt, **overrides)`` runs one request; ``overrides`` are :class:`SMCConfig` fields
    (``seed=1``, ``max_new_tokens=32``) and ``grammar=``. ``engine.batch(prompts, ...)`` runs many.
    A prompt is text, token ids, a tensor, or chat messages (``[{"role": "user", "content": ...}]``,
    formatted with the tokenizer's chat template and the assistant turn opened).

    Calls are serialized (a lock): one engine runs one batch at a time. ``stats`` counts the native
    engines built and the requests run, ``engine_reason`` says why the generic engine runs (None
    when the native one can).
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
        grammar: GrammarPotential | None = None,
        **config_overrides: Any,
    ):
        from smcgen.api import as_language_model

        self.config = SMCConfig(**{**(config.model_dump() if config else {}), **config_overrides})
        self.target = as_language_model(target, tokenizer)
        if draft is not None and proposal is not None:
            raise ValueError("give either draft or proposal, not both")
        self.draft: LanguageModel | None = None
        if draft is not None:
            draft_lm = as_language_model(draft, tokenizer if tokenizer is not None else self.target.tokenizer)
            if draft_lm.tokenizer is None:
                draft_lm = LanguageModel(
                    draft_lm.model, self.target.tokenizer, draft_lm.eos_token_ids, draft_lm.context_length
                )
            check_compatible(self.target, draft_lm)
            self.draft = draft_lm
        self.potentials = potentials
        self.proposal = proposal
        self.grammar = self.bind_grammar(grammar)
        self._native: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"native_engines_built": 0, "requests": 0, "native_requests": 0, "generic_requests": 0}
        # decided before any conversion: the native engine only when it can run these models and options
        self.engine_reason = self._static_reason(self.config)
        if self.engine_reason is None:
            self._convert(self.config, rows=self.config.n_particles)

    # -------------------------------------------------------------------------- decisions

    def bind_grammar(self, grammar: GrammarPotential | None) -> GrammarPotential | None:
        """``grammar`` compiled for the target's vocabulary (unchanged when already bound)."""
        if grammar is None:
            return None
        if not isinstance(grammar, GrammarPotential):
            raise TypeError(f"grammar must be a GrammarPotential, got {type(grammar).__name__}")
        return grammar if grammar.bound else grammar.bind(self.target)

    def _static_reason(self, cfg: SMCConfig) -> str | None:
        """Why the native engine cannot run requests with ``cfg`` on these models (None: it can).

        Raises for an explicit draft format that cannot apply (as the native selection does)."""
        from smcgen.backends.native.select import _named_format, native_unsupported

        fmt = _named_format(cfg)
        asked = "draft_fp8=True" if cfg.draft_fp8 else f"draft_quantization={cfg.draft_quantization!r}"
        if fmt is not None and self.draft is None:
            raise ValueError(f"{asked} quantizes the draft model, but no draft was given")
        if cfg.engine == "generic":
            if fmt is not None:
                raise ValueError(f"{asked} needs the native engine; engine='generic' was asked for")
            return "engine='generic' was asked for"
        reason = native_unsupported(cfg, self.target, self.draft, self.potentials, self.proposal is not None)
        if reason is None and cfg.engine == "auto" and self.target.device.type != "cuda":
            reason = "the model is not on a GPU"
        if reason is None and self.draft is not None and self.draft.device != self.target.device:
            reason = f"target ({self.target.device}) and draft ({self.draft.device}) are on different devices"
        return reason

    def _convert(self, cfg: SMCConfig, rows: int) -> tuple[Any, Any]:
        """The native target and draft for a run of ``rows`` draft rows (converted once per model and format)."""
        from smcgen.backends.native.select import draft_format, native_model

        target = native_model(self.target)
        draft = None
        if self.draft is not None:
            draft = native_model(self.draft, draft_format(cfg, rows, self.target.device))
        return target, draft

    def _native_engine(self, cfg: SMCConfig, grammar: GrammarPotential | None, rows: int) -> Any:
        """The cached :class:`NativeSMC` for this setting (built on first use).

        Keyed by the config without its seed (the seed is set per run) and by the grammar object,
        so every request with the same settings reuses one engine and whatever it keeps per shape.
        """
        from smcgen.backends.native.engine import NativeSMC

        target, draft = self._convert(cfg, rows)
        key = (cfg.model_copy(update={"seed": None}), id(grammar), id(draft))
        hit = self._native.get(key)
        if hit is not None and hit[1] is grammar:
            self._native.move_to_end(key)
            engine = hit[0]
        else:
            with torch.no_grad():
                engine = NativeSMC(target, cfg, draft=draft, eos_token_ids=self.target.eos_token_ids, mask=grammar)
            self.stats["native_engines_built"] += 1
            # the grammar is held with its engine so its id cannot be reused by another object
            self._native[key] = (engine, grammar)
            while len(self._native) > NATIVE_ENGINES_KEPT:
                self._native.popitem(last=False)
        # the seed is read at run time: one engine serves every seed
        engine.config = cfg
        return engine

    def resolve(self, prompt: PromptLike, grammar: Any = None, **overrides: Any) -> Request:
        """Validate one request: its token ids, its config (base config + overrides), its bound grammar.

        Raises ``ValueError`` (bad prompt, too long for the context), ``pydantic.ValidationError``
        (a config field out of range) or :class:`~smcgen.potentials.grammar.GrammarError`.
        """
        from smcgen.smc import length_problem

        cfg = SMCConfig(**{**self.config.model_dump(), **overrides}) if overrides else self.config
        ids = prompt_ids(prompt, self.target)
        problem = length_problem(len(ids), cfg.max_new_tokens, self.target.context_length)
        if problem is not None:
            raise ValueError(problem)
        g = self.bind_grammar(grammar) if grammar is not None else self.grammar
        return Request(ids, cfg, g)

    # ------------------------------------------------------------------------------ runs

    def __call__(self, prompt: PromptLike, *, grammar: Any = None, progress: bool = False, **overrides: Any) -> SMCResult:
        """Run one request. Every particle at weight zero raises :class:`AllParticlesDeadError`."""
        request = self.resolve(prompt, grammar, **overrides)
        return self._run_group([request], progress=progress, on_dead="raise")[0]

    def batch(
        self,
        prompts: Sequence[PromptLike],
        *,
        seed: int | None | Sequence[int | None] = None,
        max_new_tokens: int | Sequence[int] | None = None,
        grammar: Any = None,
        progress: bool = False,
        **overrides: Any,
    ) -> list[SMCResult]:
        """Run many requests; results in the order of ``prompts``.

        ``seed``, ``max_new_tokens`` and ``grammar`` take one value for all or a list (one per
        prompt); other overrides apply to all. Requests whose settings agree (config, seed, grammar)
        run as one batch on the native engine (B requests x N particles, one batch per prompt
        length); on the generic engine, one after another. A batched request's result is seeded and
        reproducible, but not the same draw as the same request run alone (the batch shares one
        random stream), and its ``elapsed_s`` is the wall time of the batch it ran in. A request whose
        particles all end at weight zero is returned with ``result.dead`` set (no exception).
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
        grammars = grammar if isinstance(grammar, (list, tuple)) else [grammar] * n
        if len(grammars) != n:
            raise ValueError(f"grammar has {len(grammars)} entries for {n} prompts")
        requests = []
        for p, s, m, g in zip(prompts, seeds, limits, grammars):
            extra = dict(overrides)
            if s is not None:
                extra["seed"] = s
            if m is not None:
                extra["max_new_tokens"] = m
            requests.append(self.resolve(p, g, **extra))
        return self.run_requests(requests, progress=progress)

    def run_requests(self, requests: Sequence[Request], progress: bool = False) -> list[SMCResult]:
        """Run resolved requests (:meth:`resolve`), grouped by setting as :meth:`batch` says; a request
        whose particles all end at weight zero comes back with ``result.dead`` set."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(batch_key(r), []).append(i)
        out: list[SMCResult | None] = [None] * len(requests)
        for idx in groups.values():
            for i, res in zip(idx, self._run_group([requests[i] for i in idx], progress=progress, on_dead="flag")):
                out[i] = res
        return out  # type: ignore[return-value]

    def _run_group(self, requests: list[Request], progress: bool, on_dead: str) -> list[SMCResult]:
        """Requests sharing one config and grammar: one native run, or generic runs one by one."""
        cfg, grammar = requests[0].config, requests[0].grammar
        with self._lock:
            self.stats["requests"] += len(requests)
            reason = self._static_reason(cfg)
            native = None
            if reason is None:
                native = self._native_engine(cfg, grammar, rows=cfg.n_particles * len(requests))
                reason = next((r for r in (native.unsupported_reason(len(q.ids)) for q in requests) if r), None)
                if reason is not None:
                    native = None
            if native is None and cfg.engine == "native":
                raise ValueError(f"engine='native' cannot run this request: {reason}")
            if native is not None:
                self.stats["native_requests"] += len(requests)
                run = native.run([q.ids for q in requests], progress=progress, on_dead=on_dead)
                return [self.result(run, b, cfg, grammar, "native", None) for b in range(len(requests))]
            self.stats["generic_requests"] += len(requests)
            smc = self._generic(cfg, grammar)
            return [
                self.result(smc.run(q.ids, n_groups=1, progress=progress, on_dead=on_dead), 0, cfg, grammar, "generic",
                            reason)
                for q in requests
            ]

    def _generic(self, cfg: SMCConfig, grammar: GrammarPotential | None) -> SMC:
        """The generic engine for one setting (cheap to build: it holds no per-run state)."""
        proposal = self.proposal
        if self.draft is not None:
            proposal = (
                LMProposal(self.draft, temperature=cfg.draft_temperature)
                if grammar is None
                else MaskedLMProposal(self.draft, grammar, temperature=cfg.draft_temperature)
            )
        return SMC(
            LMPotential(self.target, temperature=cfg.target_temperature, alpha=cfg.alpha),
            cfg,
            proposal=proposal,
            potentials=self.potentials,
            mask=grammar,
        )

    def result(
        self,
        run: BatchRun,
        b: int,
        cfg: SMCConfig,
        grammar: GrammarPotential | None,
        engine: str,
        engine_reason: str | None = None,
    ) -> SMCResult:
        """The :class:`SMCResult` of group ``b`` of a run: the answer is one particle drawn by final weight.

        ``engine_reason``: why the generic engine ran (None on the native one)."""
        lengths = run.lengths[b].tolist()
        sequences = [row[:n] for row, n in zip(run.tokens[b].tolist(), lengths)]
        log_w = run.log_weights[b]
        alive = [bool(w > float("-inf")) for w in log_w.tolist()]
        dead = not any(alive)
        chooser = torch.Generator().manual_seed(
            cfg.seed + 1 if cfg.seed is not None else random.SystemRandom().getrandbits(63)
        )
        chosen = 0 if dead else int(torch.multinomial(log_w.exp(), 1, generator=chooser))
        ess = run.ess_history[:, b]
        ess = ess[~torch.isnan(ess)]  # NaN pads the steps after a shorter batch of a merged run stopped
        decoder = self.target.tokenizer
        text = decoder.decode(sequences[chosen], skip_special_tokens=True) if decoder is not None else ""
        texts = list(decoder.batch_decode(sequences, skip_special_tokens=True)) if decoder and cfg.return_all_particles else []
        return SMCResult(
            text=text,
            token_ids=sequences[chosen],
            sequences=sequences,
            log_weights=[float(x) for x in log_w],
            log_z=float(run.log_z[b]),
            ess_history=[float(x) for x in ess],
            n_resamples=int(run.resampled[:, b].sum()),
            n_steps=len(ess),
            elapsed_s=run.elapsed_s,
            n_particles=cfg.n_particles,
            texts=texts,
            engine=engine,
            engine_reason=engine_reason,
            alive=alive,
            posterior=posterior_of(sequences, log_w.tolist(), decoder),
            output_format="json" if grammar is not None and grammar.kind == "json_schema" else None,
        )


def posterior_of(sequences: list[list[int]], log_weights: list[float], decoder: Any) -> list[tuple[str, float]]:
    """Distinct decoded texts of the live particles with their merged normalized weights, largest first
    (particles that decode to the same text pool their weight, as genlm-control's decoded posterior)."""
    if decoder is None:
        return []
    mass: dict[tuple[int, ...], float] = {}
    for seq, lw in zip(sequences, log_weights):
        if lw > float("-inf"):
            key = tuple(seq)
            mass[key] = mass.get(key, 0.0) + float(torch.tensor(lw).exp())
    by_text: dict[str, float] = {}
    for seq, w in mass.items():
        t = decoder.decode(list(seq), skip_special_tokens=True)
        by_text[t] = by_text.get(t, 0.0) + w
    total = sum(by_text.values())
    if total <= 0:
        return []
    return sorted(((t, w / total) for t, w in by_text.items()), key=lambda tw: -tw[1])


__all__ = ["Engine", "Request", "batch_key", "chat_prompt_ids", "is_chat", "posterior_of", "prompt_ids"]
