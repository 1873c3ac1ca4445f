"""``smcgen.generate``: the one-call entry point, and model loading by name."""

from __future__ import annotations

import difflib
import functools
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from smcgen.core.config import SMCConfig
from smcgen.core.result import SMCResult
from smcgen.engine import _WARNED, WEAK_DRAFT_ESS, _warn_fallback, one_guide, prompt_ids  # noqa: F401 (read here)
from smcgen.models import draft_dir
from smcgen.models.self_draft import SELF_INT8_DRAFT, int8_self_draft
from smcgen.potentials.base import Potential
from smcgen.proposals.base import Proposal
from smcgen.runners.transformers import LanguageModel, check_compatible
from smcgen.validation import check_request

logger = logging.getLogger("smcgen")

ModelLike = LanguageModel | PreTrainedModel | str


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def load_model(name: str, device: str | None = None) -> LanguageModel:
    """Load a model by name: the embedded ``smollm2-135m`` / ``smollm2-135m-draft`` (the shipped trained
    draft) / ``smollm2-135m-early-exit``, a trained draft
    directory (``smcgen distill``; its target is loaded too and shares its embedding and head) or any
    local path / hub id that ``transformers.AutoModelForCausalLM`` accepts. Cached per name."""
    from smcgen.models import smollm2

    dev = torch.device(device) if device else default_device()
    if draft_dir.is_draft_dir(name):  # a trained draft: load the target its manifest names and tie to it
        target = load_model(draft_dir.read_manifest(name)["target"], device)
        return LanguageModel.wrap(draft_dir.load_draft(name, target.model), target.tokenizer)
    if name in smollm2.EMBEDDED_NAMES:
        model, tokenizer = smollm2.load_embedded(name, device=dev)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        known = (*smollm2.EMBEDDED_NAMES, SELF_INT8_DRAFT)
        if name == SELF_INT8_DRAFT:
            raise ValueError(f"{SELF_INT8_DRAFT!r} is a draft built from its target: pass it as draft= with a target")
        local = Path(name).exists()
        close = [] if local else difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:  # a typo of a name this package knows: no hub lookup (which retries for seconds offline)
            raise ValueError(f"unknown model name {name!r}: did you mean {close[0]!r}? Known names: {', '.join(known)}")
        try:
            model = AutoModelForCausalLM.from_pretrained(name)
        except OSError as e:
            if local or e.errno is not None:  # a real file-system error (permissions, disk full): as raised
                raise
            # transformers' own "not found / cannot connect" errors: the same type, saying what was tried
            raise OSError(
                f"could not load model {name!r}: it is not one of this package's names ({', '.join(known)}), "
                f"not a trained draft directory, and transformers could not load it as a local model "
                f"directory or a Hugging Face hub id ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from e
        model = model.to(dev).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            tokenizer = None
    return LanguageModel.wrap(model, tokenizer)


def load_draft(name: str, target: LanguageModel, device: str | None = None) -> LanguageModel | None:
    """The draft named ``name`` for ``target``: None for ``"none"``, the int8 copy of the target for
    ``"self-int8"``, else :func:`load_model` (a trained draft directory finds its target itself)."""
    if name.lower() == "none":
        return None
    if name == SELF_INT8_DRAFT:
        return int8_self_draft(target)
    return load_model(name, device)


def as_language_model(
    model: ModelLike, tokenizer: Any | None = None, target: LanguageModel | None = None
) -> LanguageModel:
    """Accept a :class:`LanguageModel`, a transformers model (plus optional tokenizer) or a name.

    A trained draft directory given with ``target`` is tied to that target's embedding and head;
    ``"self-int8"`` with ``target`` is the target with int8 linear layers (models/self_draft.py)."""
    if isinstance(model, LanguageModel):
        return model
    if isinstance(model, PreTrainedModel):
        return LanguageModel.wrap(model.eval(), tokenizer)
    if isinstance(model, str) and target is not None and draft_dir.is_draft_dir(model):
        return LanguageModel.wrap(draft_dir.load_draft(model, target.model), target.tokenizer)
    if model == SELF_INT8_DRAFT:
        if target is None:
            raise ValueError(f"draft={SELF_INT8_DRAFT!r} is built from the target: give the target too")
        return int8_self_draft(target)
    if isinstance(model, str):
        return load_model(model)
    raise TypeError(f"expected a model name, a transformers model or a LanguageModel, got {type(model).__name__}")


def generate(
    target: ModelLike,
    prompt: str | Sequence[int] | Tensor | Sequence[dict[str, Any]],
    *,
    draft: ModelLike | None = None,
    potentials: Potential | Sequence[Potential] = (),
    proposal: Proposal | None = None,
    config: SMCConfig | None = None,
    tokenizer: Any | None = None,
    progress: bool = False,
    guide: Any = None,
    grammar: Any = None,
    on_dead: str = "raise",
    constraint: Potential | None = None,
    trace: bool = False,
    **config_overrides: Any,
) -> SMCResult:
    """Generate a continuation of ``prompt`` by SMC.

    ``target`` is the model whose (tempered, powered) distribution is sampled, times
    ``potentials``. ``draft`` turns on SMC speculative decoding: the draft proposes
    ``block_size`` tokens per step and the target verifies them in one forward. ``proposal``
    replaces the draft by any :class:`Proposal`; with neither, the target proposes one token per
    step (plain SMC). ``prompt`` is text (needs a tokenizer; used as is), chat messages
    (``[{"role": "user", "content": ...}]``: the tokenizer's chat template is applied), a list of
    ids, a ``[T]``/``[1, T]`` tensor or a tokenizer's output. ``config`` is an :class:`SMCConfig`, or
    :class:`SamplingParams` and/or :class:`EngineSettings` (a tuple of both); its fields can be overridden by
    keyword (``n_particles=16``). ``draft`` may also be a trained draft directory (``smcgen distill``).
    ``guide`` constrains generation locally: the draft and the target's own tokens are drawn
    masked to the guide's allowed tokens and the weights correct the masking bias (a grammar passed
    in ``potentials`` instead is a plain factor that only weights). It is a :class:`GrammarPotential`,
    any potential with a ``next_token_mask``, or anything :func:`smcgen.potentials.output.as_grammar`
    takes: a pydantic model, a JSON Schema, a Literal/Enum, a regex, a Lark/EBNF text (bound to the
    target's tokenizer here; ``result.parsed`` then holds the answer parsed as that type).
    ``grammar=`` is its older name. ``result.engine`` says which engine ran and
    ``result.engine_reason`` why the generic one did (also logged once per reason; a warning only on a GPU).
    ``constraint`` (any :class:`Potential`, typically a boolean one over text with no cheap mask,
    e.g. "no letter e") is a factor of the target that also steers every draw: the target's own
    tokens and the draft's are drawn by adaptive weighted rejection sampling
    (:class:`~smcgen.proposals.awrs.AWRSProposal`), which checks sampled tokens one by one and
    weights them by an unbiased estimate of the allowed mass, so particles rarely die.
    ``on_dead``: when every particle reaches weight zero, ``"raise"`` :class:`AllParticlesDeadError`
    (with the dead prefixes' text), or ``"flag"`` / ``"partial"``: return the longest partial output
    with ``SMCResult.dead`` set. ``trace=True`` records the run step by step into ``result.trace``
    (a :class:`smcgen.trace.Trace`; either engine, one step per native cycle).

    A thin wrapper over :class:`smcgen.Engine`, cached per (engine family, target, draft, potentials,
    proposal, tokenizer, constraint): repeated calls with the same models reuse its converted models
    and native engines. For many requests build an ``Engine`` yourself.
    """
    # the request's checks that need no model run before an Engine is built or found; the Engine
    # checks the rest (draft/proposal, constraint) before it loads anything
    asked = one_guide(guide, grammar)
    cfg, _, _ = check_request(config, config_overrides, potentials, proposal, asked, on_dead)
    if cfg.method == "sd":
        target_lm = as_language_model(target, tokenizer)
        draft_lm = None
        if draft is not None:
            draft_lm = as_language_model(draft, tokenizer if tokenizer is not None else target_lm.tokenizer, target_lm)
            check_compatible(target_lm, draft_lm)
        return _speculative(
            cfg, target_lm, draft_lm, prompt_ids(prompt, target_lm), potentials, asked, proposal is not None, progress
        )
    engine = cached_engine(
        target,
        draft=draft,
        potentials=potentials,
        proposal=proposal,
        tokenizer=tokenizer,
        constraint=constraint,
        engine=cfg.engine,
    )
    return engine(prompt, guide=asked, on_dead=on_dead, progress=progress, trace=trace, **cfg.model_dump())


#: Engines behind generate(), most recent last. Each holds its models: clear_engine_cache() drops them.
_ENGINES: OrderedDict[tuple, Any] = OrderedDict()
ENGINES_KEPT = 4


def _identity(obj: Any) -> Any:
    """A cache-key part: names by value, objects by identity (the entry holds the object, so its id stays unique)."""
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (list, tuple)):
        return tuple(_identity(o) for o in obj)
    return ("id", id(obj))


def cached_engine(
    target: ModelLike,
    *,
    draft: ModelLike | None = None,
    potentials: Potential | Sequence[Potential] = (),
    proposal: Proposal | None = None,
    tokenizer: Any | None = None,
    constraint: Potential | None = None,
    engine: str = "auto",
) -> Any:
    """The :class:`smcgen.Engine` for these models, built on first use and kept (``ENGINES_KEPT`` at most).

    ``engine`` is the engine family asked for ('auto', 'native', 'generic'): part of the key, since an
    Engine converts the models for the native engine when it is built (not for 'generic')."""
    from smcgen.engine import Engine

    parts = (target, draft, potentials, proposal, tokenizer, constraint)
    key = (engine, *(_identity(x) for x in parts))
    hit = _ENGINES.get(key)
    if hit is not None:
        _ENGINES.move_to_end(key)
        return hit[0]
    built = Engine(
        target,
        draft=draft,
        potentials=potentials,
        proposal=proposal,
        tokenizer=tokenizer,
        constraint=constraint,
        engine=engine,
    )
    # the objects ride along so the ids in the key cannot be reused while the entry lives
    _ENGINES[key] = (built, parts)
    while len(_ENGINES) > ENGINES_KEPT:
        _ENGINES.popitem(last=False)
    return built


def clear_engine_cache() -> None:
    """Drop the engines ``generate`` keeps (and with them their references to the models)."""
    _ENGINES.clear()


def _speculative(
    cfg: SMCConfig,
    target_lm: LanguageModel,
    draft_lm: LanguageModel | None,
    ids: list[int],
    potentials: Potential | Sequence[Potential],
    guide: Potential | None,
    custom_proposal: bool,
    progress: bool,
) -> SMCResult:
    """``generate`` with ``method='sd'``: n_particles independent exact samples by speculative decoding,
    on the native engine when the engine choice allows it (``samplers.native_sd``), else the generic one."""
    from smcgen.samplers.native_sd import native_sd_unsupported, native_speculative_decode
    from smcgen.samplers.native_select import native_draft, native_model, native_reason
    from smcgen.samplers.speculative import check_speculative_request, speculative_decode

    if custom_proposal:
        raise ValueError("method='sd' needs a draft model (draft=), not a custom proposal")
    has_potentials = bool(potentials) if not isinstance(potentials, Potential) else True
    check_speculative_request(cfg.alpha, has_potentials, guide is not None, draft_lm is not None)
    assert draft_lm is not None
    kw = {
        "n_rows": cfg.n_particles,
        "block_size": cfg.block_size,
        "max_new_tokens": cfg.max_new_tokens,
        "target_temperature": cfg.target_temperature,
        "draft_temperature": cfg.draft_temperature,
        "seed": cfg.seed,
        "progress": progress,
    }
    reason = native_reason(cfg, target_lm, draft_lm, None, False)
    if reason is None:
        native_t = native_model(target_lm)
        native_d = native_draft(cfg, draft_lm, cfg.n_particles, target_lm.device)
        reason = native_sd_unsupported(native_t, native_d, len(ids), cfg.max_new_tokens)
    if reason is None:
        run = native_speculative_decode(native_t, native_d, ids, eos_token_ids=target_lm.eos_token_ids, **kw)
        engine, engine_reason = "native", None
    else:
        if cfg.engine == "native":
            raise ValueError(f"engine='native' cannot run this request: {reason}")
        engine_reason = f"method='sd' runs on the generic engine: {reason}"
        if cfg.engine == "auto":
            _warn_fallback(engine_reason, target_lm.device)
        run = speculative_decode(target_lm, draft_lm, ids, **kw)
        engine = "generic"
    n = cfg.n_particles
    chooser = random.Random(cfg.seed + 1 if cfg.seed is not None else None)
    chosen = chooser.randrange(n)  # rows are exact samples of equal weight
    decoder = target_lm.tokenizer
    text = decoder.decode(run.tokens[chosen], skip_special_tokens=True) if decoder is not None else ""
    texts = (
        list(decoder.batch_decode(run.tokens, skip_special_tokens=True)) if decoder and cfg.return_all_particles else []
    )
    return SMCResult(
        text=text,
        token_ids=run.tokens[chosen],
        sequences=run.tokens,
        log_weights=[-math.log(n)] * n,
        log_z=None,  # SD estimates no normalizing constant (never NaN in a result)
        ess_history=[],
        n_resamples=0,
        n_steps=run.steps[chosen],
        elapsed_s=run.elapsed_s,
        n_particles=n,
        texts=texts,
        engine=engine,
        engine_reason=engine_reason,
        method="sd",
        acceptance_rate=run.acceptance_rate,
    )


__all__ = ["as_language_model", "cached_engine", "clear_engine_cache", "default_device", "generate", "load_model"]
