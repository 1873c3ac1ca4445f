"""``smcgen.generate``: the one-call entry point, and model loading by name."""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from smcgen.backends.transformers_lm import (
    LanguageModel,
    check_compatible,
    encode_prompt,
)
from smcgen.config import SMCConfig
from smcgen.models import draft_dir
from smcgen.potentials.base import Potential
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.lm import LMPotential
from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal
from smcgen.proposals.masked import MaskedLMProposal
from smcgen.result import SMCResult
from smcgen.smc import SMC

ModelLike = LanguageModel | PreTrainedModel | str

logger = logging.getLogger("smcgen")
_WARNED: set[str] = set()


def _warn_fallback(reason: str) -> None:
    """Log (once per distinct reason) that engine='auto' fell back to the generic engine."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning("smcgen: running on the generic engine, not the native one: %s", reason)


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def load_model(name: str, device: str | None = None) -> LanguageModel:
    """Load a model by name: the embedded ``smollm2-135m`` / ``smollm2-135m-draft``, a trained draft
    directory (``smcgen distill``; its target is loaded too and shares its embedding and head) or any
    local path / hub id that ``transformers.AutoModelForCausalLM`` accepts. Cached per name."""
    from smcgen.models import smollm2

    dev = torch.device(device) if device else default_device()
    if draft_dir.is_draft_dir(name):  # a trained draft: load the target its manifest names and tie to it
        target = load_model(draft_dir.read_manifest(name)["target"], device)
        return LanguageModel.wrap(draft_dir.load_draft(name, target.model), target.tokenizer)
    if name in (smollm2.EMBEDDED_TARGET, smollm2.EMBEDDED_DRAFT):
        model, tokenizer = smollm2.load_embedded(name, device=dev)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name).to(dev).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            tokenizer = None
    return LanguageModel.wrap(model, tokenizer)


def as_language_model(
    model: ModelLike, tokenizer: Any | None = None, target: LanguageModel | None = None
) -> LanguageModel:
    """Accept a :class:`LanguageModel`, a transformers model (plus optional tokenizer) or a name.

    A trained draft directory given with ``target`` is tied to that target's embedding and head."""
    if isinstance(model, LanguageModel):
        return model
    if isinstance(model, PreTrainedModel):
        return LanguageModel.wrap(model.eval(), tokenizer)
    if isinstance(model, str) and target is not None and draft_dir.is_draft_dir(model):
        return LanguageModel.wrap(draft_dir.load_draft(model, target.model), target.tokenizer)
    if isinstance(model, str):
        return load_model(model)
    raise TypeError(f"expected a model name, a transformers model or a LanguageModel, got {type(model).__name__}")


def generate(
    target: ModelLike,
    prompt: str | Sequence[int] | Tensor,
    *,
    draft: ModelLike | None = None,
    potentials: Potential | Sequence[Potential] = (),
    proposal: Proposal | None = None,
    config: SMCConfig | None = None,
    tokenizer: Any | None = None,
    progress: bool = False,
    guide: Potential | None = None,
    grammar: GrammarPotential | None = None,
    **config_overrides: Any,
) -> SMCResult:
    """Generate a continuation of ``prompt`` by SMC.

    ``target`` is the model whose (tempered, powered) distribution is sampled, times
    ``potentials``. ``draft`` turns on SMC speculative decoding: the draft proposes
    ``block_size`` tokens per step and the target verifies them in one forward. ``proposal``
    replaces the draft by any :class:`Proposal`; with neither, the target proposes one token per
    step (plain SMC). ``prompt`` is text (needs a tokenizer), a list of ids or a ``[T]``/``[1, T]``
    tensor. ``config`` fields can be overridden by keyword (``n_particles=16``).
    ``guide`` (a :class:`GrammarPotential`, bound to the target's tokenizer here if unbound, or
    any potential with a ``next_token_mask``; ``grammar=`` is its older name) constrains
    generation locally: the draft and the target's own tokens are drawn masked to the guide's
    allowed tokens and the weights correct the masking bias (a grammar passed in ``potentials``
    instead is a plain factor that only weights). ``result.engine`` says which engine ran and
    ``result.engine_reason`` why the generic one did (also logged once per reason).
    """
    cfg = SMCConfig(**{**(config.model_dump() if config else {}), **config_overrides})
    target_lm = as_language_model(target, tokenizer)
    if guide is not None and grammar is not None and guide is not grammar:
        raise ValueError("give guide= or grammar= (its older name), not both")
    grammar = guide if guide is not None else grammar
    if isinstance(grammar, GrammarPotential) and not grammar.bound:
        grammar = grammar.bind(target_lm)
    if draft is not None and proposal is not None:
        raise ValueError("give either draft or proposal, not both")
    custom_proposal = proposal is not None
    if draft is not None:
        draft_lm = as_language_model(draft, tokenizer if tokenizer is not None else target_lm.tokenizer, target_lm)
        if draft_lm.tokenizer is None:
            draft_lm = LanguageModel(draft_lm.model, target_lm.tokenizer, draft_lm.eos_token_ids, draft_lm.context_length)
        check_compatible(target_lm, draft_lm)
        proposal = (
            LMProposal(draft_lm, temperature=cfg.draft_temperature)
            if grammar is None
            else MaskedLMProposal(draft_lm, grammar, temperature=cfg.draft_temperature)
        )
    ids = encode_prompt(prompt, target_lm)
    if cfg.method == "sd":
        return _speculative(cfg, target_lm, draft_lm if draft is not None else None, ids, potentials, grammar,
                            custom_proposal, progress)

    from smcgen.backends.native.select import native_engine_or_reason

    native, why_not = native_engine_or_reason(
        cfg, target_lm, draft_lm if draft is not None else None, potentials, custom_proposal, len(ids), mask=grammar
    )
    if native is not None:
        run = native.run(ids, progress=progress)
    else:
        if cfg.engine == "native":
            raise ValueError(f"engine='native' cannot run this request: {why_not}")
        if cfg.engine == "auto" and why_not is not None:
            _warn_fallback(why_not)
        smc = SMC(
            LMPotential(target_lm, temperature=cfg.target_temperature, alpha=cfg.alpha),
            cfg,
            proposal=proposal,
            potentials=potentials,
            guide=grammar,
        )
        run = smc.run(ids, n_groups=1, progress=progress)

    lengths = run.lengths[0].tolist()
    sequences = [row[:n] for row, n in zip(run.tokens[0].tolist(), lengths)]
    log_w = run.log_weights[0]
    chooser = torch.Generator().manual_seed(cfg.seed + 1 if cfg.seed is not None else random.SystemRandom().getrandbits(63))
    chosen = int(torch.multinomial(log_w.exp(), 1, generator=chooser))
    decoder = target_lm.tokenizer
    text = decoder.decode(sequences[chosen], skip_special_tokens=True) if decoder is not None else ""
    texts = list(decoder.batch_decode(sequences, skip_special_tokens=True)) if decoder and cfg.return_all_particles else []
    result = SMCResult(
        text=text,
        token_ids=sequences[chosen],
        sequences=sequences,
        log_weights=[float(x) for x in log_w],
        log_z=float(run.log_z[0]),
        ess_history=[float(x) for x in run.ess_history[:, 0]],
        n_resamples=int(run.resampled[:, 0].sum()),
        n_steps=int(run.ess_history.shape[0]),
        elapsed_s=run.elapsed_s,
        n_particles=cfg.n_particles,
        texts=texts,
        engine="native" if native is not None else "generic",
        engine_reason=None if native is not None else why_not,
    )
    if proposal is not None:
        _warn_weak_draft(result)
    return result


# mean ESS/N below this means the draft's blocks are mostly corrected by a few particles: at this N the
# weighted particles then carry visibly more of the draft's text than the target's
WEAK_DRAFT_ESS = 0.5


def _warn_weak_draft(result: SMCResult) -> None:
    """Warn (once per process) when the draft is far from the target at this N (mean ESS/N low)."""
    frac = result.mean_ess_fraction
    if result.n_particles > 1 and frac is not None and frac < WEAK_DRAFT_ESS and "weak-draft" not in _WARNED:
        _WARNED.add("weak-draft")
        logger.warning(
            "smcgen: the draft limits fidelity at N=%d: mean ESS/N %.2f (< %.2f), weight variance %.2f; "
            "samples may look like the draft's text. Raise n_particles, lower block_size or use a better "
            "draft (smcgen distill)",
            result.n_particles, frac, WEAK_DRAFT_ESS, result.weight_variance,
        )


SD_ENGINE_REASON = "method='sd' runs on the generic engine (the native engine has no speculative decoding)"


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
    """``generate`` with ``method='sd'``: n_particles independent exact samples by speculative decoding."""
    from smcgen.speculative import check_speculative_request, speculative_decode

    if custom_proposal:
        raise ValueError("method='sd' needs a draft model (draft=), not a custom proposal")
    has_potentials = bool(potentials) if not isinstance(potentials, Potential) else True
    check_speculative_request(cfg.alpha, has_potentials, guide is not None, draft_lm is not None)
    assert draft_lm is not None
    if cfg.engine == "native":
        raise ValueError(f"engine='native' cannot run this request: {SD_ENGINE_REASON}")
    if cfg.engine == "auto":
        _warn_fallback(SD_ENGINE_REASON)
    run = speculative_decode(
        target_lm, draft_lm, ids, n_rows=cfg.n_particles, block_size=cfg.block_size,
        max_new_tokens=cfg.max_new_tokens, target_temperature=cfg.target_temperature,
        draft_temperature=cfg.draft_temperature, seed=cfg.seed, progress=progress,
    )
    n = cfg.n_particles
    chooser = random.Random(cfg.seed + 1 if cfg.seed is not None else None)
    chosen = chooser.randrange(n)  # rows are exact samples of equal weight
    decoder = target_lm.tokenizer
    text = decoder.decode(run.tokens[chosen], skip_special_tokens=True) if decoder is not None else ""
    texts = list(decoder.batch_decode(run.tokens, skip_special_tokens=True)) if decoder and cfg.return_all_particles else []
    return SMCResult(
        text=text,
        token_ids=run.tokens[chosen],
        sequences=run.tokens,
        log_weights=[-math.log(n)] * n,
        log_z=math.nan,
        ess_history=[],
        n_resamples=0,
        n_steps=run.steps[chosen],
        elapsed_s=run.elapsed_s,
        n_particles=n,
        texts=texts,
        engine="generic",
        engine_reason=SD_ENGINE_REASON,
        method="sd",
        acceptance_rate=run.acceptance_rate,
    )


__all__ = ["as_language_model", "default_device", "generate", "load_model"]
