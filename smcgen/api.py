"""``smcgen.generate``: the one-call entry point, and model loading by name."""

from __future__ import annotations

import functools
import logging
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
from smcgen.memory import check_request_memory
from smcgen.models import draft_dir
from smcgen.outcome import choose_answer, explained_dead_end
from smcgen.potentials.base import Potential
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.lm import LMPotential
from smcgen.potentials.output import as_grammar
from smcgen.proposals.awrs import AWRSProposal
from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal
from smcgen.proposals.masked import MaskedLMProposal
from smcgen.result import SMCResult
from smcgen.smc import SMC, AllParticlesDeadError
from smcgen.trace import TraceRecorder
from smcgen.validation import check_model_device, check_request, checked_proposal

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
    step (plain SMC). ``prompt`` is text (needs a tokenizer), a list of ids or a ``[T]``/``[1, T]``
    tensor. ``config`` fields can be overridden by keyword (``n_particles=16``).
    ``guide`` constrains generation locally: the draft and the target's own tokens are drawn
    masked to the guide's allowed tokens and the weights correct the masking bias (a grammar passed
    in ``potentials`` instead is a plain factor that only weights). It is a :class:`GrammarPotential`,
    any potential with a ``next_token_mask``, or anything :func:`smcgen.potentials.output.as_grammar`
    takes: a pydantic model, a JSON Schema, a Literal/Enum, a regex, a Lark/EBNF text (bound to the
    target's tokenizer here; ``result.parsed`` then holds the answer parsed as that type).
    ``grammar=`` is its older name. ``result.engine`` says which engine ran and
    ``result.engine_reason`` why the generic one did (also logged once per reason).
    ``constraint`` (any :class:`Potential`, typically a boolean one over text with no cheap mask,
    e.g. "no letter e") is a factor of the target that also steers every draw: the target's own
    tokens and the draft's are drawn by adaptive weighted rejection sampling
    (:class:`~smcgen.proposals.awrs.AWRSProposal`), which checks sampled tokens one by one and
    weights them by an unbiased estimate of the allowed mass, so particles rarely die.
    ``on_dead``: when every particle reaches weight zero, ``"raise"`` :class:`AllParticlesDeadError`
    (with the dead prefixes' text), or ``"flag"`` / ``"partial"``: return the longest partial output
    with ``SMCResult.dead`` set.
    ``trace=True`` records the run step by step into ``result.trace`` (a :class:`smcgen.trace.Trace`;
    generic engine only).
    """
    cfg, potentials, engine_on_dead = check_request(
        config, config_overrides, potentials, proposal, guide if guide is not None else grammar, on_dead
    )
    check_model_device(target, "target")
    target_lm = as_language_model(target, tokenizer)
    if guide is not None and grammar is not None and guide is not grammar:
        raise ValueError("give guide= or grammar= (its older name), not both")
    grammar = guide if guide is not None else grammar
    if not (isinstance(grammar, Potential) and not isinstance(grammar, GrammarPotential)):
        grammar = as_grammar(grammar, target_lm, max_new_tokens=cfg.max_new_tokens)
    if draft is not None and proposal is not None:
        raise ValueError("give either draft or proposal, not both")
    if constraint is not None and not isinstance(constraint, Potential):
        raise TypeError(f"constraint must be a Potential, got {type(constraint).__name__}")
    if constraint is not None and grammar is not None:
        raise ValueError("give either grammar or constraint, not both (a grammar is a constraint with a mask)")
    custom_proposal = proposal is not None
    proposal = checked_proposal(proposal, target_lm.vocab_size)
    if draft is not None:
        check_model_device(draft, "draft")
        draft_lm = as_language_model(draft, tokenizer if tokenizer is not None else target_lm.tokenizer, target_lm)
        if draft_lm.tokenizer is None:
            draft_lm = LanguageModel(draft_lm.model, target_lm.tokenizer, draft_lm.eos_token_ids, draft_lm.context_length)
        check_compatible(target_lm, draft_lm)
        if constraint is not None:
            proposal = AWRSProposal(draft_lm, constraint, temperature=cfg.draft_temperature)
        elif grammar is not None:
            proposal = MaskedLMProposal(draft_lm, grammar, temperature=cfg.draft_temperature)
        else:
            proposal = LMProposal(draft_lm, temperature=cfg.draft_temperature)
    ids = encode_prompt(prompt, target_lm)

    from smcgen.backends.native.select import native_engine_or_reason

    if trace:
        native, why_not = None, "trace=True records on the generic engine only"
    elif constraint is not None or (proposal is not None and proposal.target_constraint() is not None):
        # AWRS draws run on the generic engine only (for now)
        native, why_not = None, "a constraint steered by AWRS runs on the generic engine"
    else:
        native, why_not = native_engine_or_reason(
            cfg, target_lm, draft_lm if draft is not None else None, potentials, custom_proposal, len(ids), mask=grammar
        )
    if native is None and cfg.engine == "native":
        raise ValueError(f"engine='native' cannot run this request: {why_not}")
    if native is None:
        if cfg.engine == "auto" and why_not is not None:
            _warn_fallback(why_not)
        check_request_memory(cfg, target_lm, draft_lm if draft is not None else None, len(ids))
    recorder = TraceRecorder(target_lm.tokenizer) if trace else None
    try:
        if native is not None:
            run = native.run(ids, progress=progress, on_dead=engine_on_dead)
        else:
            run = SMC(
                LMPotential(target_lm, temperature=cfg.target_temperature, alpha=cfg.alpha),
                cfg,
                proposal=proposal,
                potentials=potentials,
                guide=grammar,
                constraint=constraint,
            ).run(ids, n_groups=1, progress=progress, on_dead=engine_on_dead, recorder=recorder)
    except AllParticlesDeadError as err:
        raise explained_dead_end(err, target_lm.tokenizer, masked=grammar is not None) from None

    lengths = run.lengths[0].tolist()
    sequences = [row[:n] for row, n in zip(run.tokens[0].tolist(), lengths)]
    log_w = run.log_weights[0]
    dead = bool(run.dead[0]) if run.dead is not None else False
    chosen = choose_answer(log_w, lengths, cfg.seed, dead)
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
        engine_reason=None if native is not None else why_not,
        dead=dead,
        parsed=grammar.parse(text) if isinstance(grammar, GrammarPotential) and not dead else None,
        trace=recorder.trace(0) if recorder is not None else None,
    )


__all__ = ["as_language_model", "default_device", "generate", "load_model"]
