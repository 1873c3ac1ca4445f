"""``smcgen.generate``: the one-call entry point, and model loading by name."""

from __future__ import annotations

import functools
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
from smcgen.potentials.base import Potential
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.lm import LMPotential
from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal
from smcgen.proposals.masked import MaskedLMProposal
from smcgen.result import SMCResult
from smcgen.smc import SMC
from smcgen.trace import TraceRecorder

ModelLike = LanguageModel | PreTrainedModel | str


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def load_model(name: str, device: str | None = None) -> LanguageModel:
    """Load a model by name: the embedded ``smollm2-135m`` / ``smollm2-135m-draft`` or any
    local path / hub id that ``transformers.AutoModelForCausalLM`` accepts. Cached per name."""
    from smcgen.models import smollm2

    dev = torch.device(device) if device else default_device()
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


def as_language_model(model: ModelLike, tokenizer: Any | None = None) -> LanguageModel:
    """Accept a :class:`LanguageModel`, a transformers model (plus optional tokenizer) or a name."""
    if isinstance(model, LanguageModel):
        return model
    if isinstance(model, PreTrainedModel):
        return LanguageModel.wrap(model.eval(), tokenizer)
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
    grammar: GrammarPotential | None = None,
    trace: bool = False,
    **config_overrides: Any,
) -> SMCResult:
    """Generate a continuation of ``prompt`` by SMC.

    ``target`` is the model whose (tempered, powered) distribution is sampled, times
    ``potentials``. ``draft`` turns on SMC speculative decoding: the draft proposes
    ``block_size`` tokens per step and the target verifies them in one forward. ``proposal``
    replaces the draft by any :class:`Proposal`; with neither, the target proposes one token per
    step (plain SMC). ``prompt`` is text (needs a tokenizer), a list of ids or a ``[T]``/``[1, T]``
    tensor. ``config`` fields can be overridden by keyword (``n_particles=16``).
    ``grammar`` (a :class:`GrammarPotential`, bound to the target's tokenizer here if unbound)
    constrains generation locally: the draft and the target's own tokens are drawn masked to the
    grammar and the weights correct the masking bias (a grammar passed in ``potentials`` instead
    is a plain factor that only weights). ``trace=True`` records the run step by step into
    ``result.trace`` (a :class:`smcgen.trace.Trace`; generic engine only).
    """
    cfg = SMCConfig(**{**(config.model_dump() if config else {}), **config_overrides})
    target_lm = as_language_model(target, tokenizer)
    if grammar is not None and not grammar.bound:
        grammar = grammar.bind(target_lm)
    if draft is not None and proposal is not None:
        raise ValueError("give either draft or proposal, not both")
    custom_proposal = proposal is not None
    if draft is not None:
        draft_lm = as_language_model(draft, tokenizer if tokenizer is not None else target_lm.tokenizer)
        if draft_lm.tokenizer is None:
            draft_lm = LanguageModel(draft_lm.model, target_lm.tokenizer, draft_lm.eos_token_ids, draft_lm.context_length)
        check_compatible(target_lm, draft_lm)
        proposal = (
            LMProposal(draft_lm, temperature=cfg.draft_temperature)
            if grammar is None
            else MaskedLMProposal(draft_lm, grammar, temperature=cfg.draft_temperature)
        )
    ids = encode_prompt(prompt, target_lm)

    from smcgen.backends.native.select import native_engine_or_reason

    native, why_not = (None, "trace=True records on the generic engine only") if trace else native_engine_or_reason(
        cfg, target_lm, draft_lm if draft is not None else None, potentials, custom_proposal, len(ids), mask=grammar
    )
    recorder = TraceRecorder(target_lm.tokenizer) if trace else None
    if native is not None:
        run = native.run(ids, progress=progress)
    else:
        if cfg.engine == "native":
            raise ValueError(f"engine='native' cannot run this request: {why_not}")
        smc = SMC(
            LMPotential(target_lm, temperature=cfg.target_temperature, alpha=cfg.alpha),
            cfg,
            proposal=proposal,
            potentials=potentials,
            mask=grammar,
        )
        run = smc.run(ids, n_groups=1, progress=progress, recorder=recorder)

    lengths = run.lengths[0].tolist()
    sequences = [row[:n] for row, n in zip(run.tokens[0].tolist(), lengths)]
    log_w = run.log_weights[0]
    chooser = torch.Generator().manual_seed(cfg.seed + 1 if cfg.seed is not None else random.SystemRandom().getrandbits(63))
    chosen = int(torch.multinomial(log_w.exp(), 1, generator=chooser))
    decoder = target_lm.tokenizer
    text = decoder.decode(sequences[chosen], skip_special_tokens=True) if decoder is not None else ""
    texts = list(decoder.batch_decode(sequences, skip_special_tokens=True)) if decoder and cfg.return_all_particles else []
    return SMCResult(
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
        trace=recorder.trace(0) if recorder is not None else None,
    )


__all__ = ["as_language_model", "default_device", "generate", "load_model"]
