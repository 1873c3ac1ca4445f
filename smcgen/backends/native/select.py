"""Choosing the engine: the native one when it can run the request, the generic one otherwise."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from smcgen.backends.native.model import NativeCausalLM, NativeConfig
from smcgen.backends.transformers_lm import LanguageModel
from smcgen.config import SMCConfig

# One native copy per transformers model object, dropped with the model.
_NATIVE_COPIES: weakref.WeakKeyDictionary[Any, NativeCausalLM] = weakref.WeakKeyDictionary()


def native_model(lm: LanguageModel) -> NativeCausalLM:
    """The native runner for ``lm``'s transformers model, converted once and cached.

    The native runner fuses the q/k/v and gate/up weights, so the copy costs the model's size in
    memory again while the transformers model is alive. The copy is keyed by the model object and
    taken once: after changing that model's weights, device or dtype in place, call
    ``forget_native_copies()`` (or pass a new model object).
    """
    model = lm.model
    native = _NATIVE_COPIES.get(model)
    if native is None:
        native = NativeCausalLM.from_hf(model).eval()
        _NATIVE_COPIES[model] = native
    return native


def forget_native_copies() -> None:
    """Drop every cached native copy (after modifying a transformers model in place)."""
    _NATIVE_COPIES.clear()


def native_unsupported(
    cfg: SMCConfig,
    target: LanguageModel,
    draft: LanguageModel | None,
    potentials: Any,
    custom_proposal: bool,
) -> str | None:
    """Why the native engine cannot run this request's models and options, or None when it can.

    Limits that depend on the prompt are the engine's own (``NativeSMC.unsupported_reason``)."""
    if potentials is not None and not (isinstance(potentials, Sequence) and len(potentials) == 0):
        return "potentials run on the generic engine only"
    if custom_proposal:
        return "a custom Proposal runs on the generic engine only (pass draft= for a draft model)"
    if cfg.resampler != "systematic":
        return f"resampler {cfg.resampler!r} (the native engine fuses systematic resampling)"
    for role, lm in (("target", target), ("draft", draft)):
        if lm is None:
            continue
        try:
            NativeConfig.from_hf(lm.model.config)
        except (ValueError, AttributeError) as err:
            return f"the {role} model is not supported natively ({err})"
    return None


def native_engine_or_reason(
    cfg: SMCConfig,
    target: LanguageModel,
    draft: LanguageModel | None,
    potentials: Any,
    custom_proposal: bool,
    prompt_len: int,
    mask: Any = None,
) -> tuple[Any, str | None]:
    """``(engine, None)`` when the native engine runs this request, else ``(None, reason)``.

    ``mask``: a bound grammar for locally constrained generation (the native engine runs it
    eagerly, without the cycle graph, since every step's mask depends on the tokens just drawn).

    ``engine='auto'`` picks native only on CUDA; ``engine='native'`` also runs it on the CPU (with
    the kernels' torch twins: for tests and debugging, not speed).
    """
    from smcgen.backends.native.engine import NativeSMC

    if cfg.engine == "generic":
        return None, "engine='generic' was asked for"
    reason = native_unsupported(cfg, target, draft, potentials, custom_proposal)
    if reason is None and cfg.engine == "auto" and target.device.type != "cuda":
        reason = "the model is not on a GPU"
    if reason is not None:
        return None, reason
    if draft is not None and draft.device != target.device:
        return None, f"target ({target.device}) and draft ({draft.device}) are on different devices"
    with torch.no_grad():
        engine = NativeSMC(
            native_model(target),
            cfg,
            draft=native_model(draft) if draft is not None else None,
            eos_token_ids=target.eos_token_ids,
            mask=mask,
        )
    reason = engine.unsupported_reason(prompt_len)
    return (None, reason) if reason is not None else (engine, None)
