"""Choosing the engine: the native one when it can run the request, the generic one otherwise."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from smcgen.backends.native.model import NativeCausalLM, NativeConfig
from smcgen.backends.transformers_lm import LanguageModel
from smcgen.config import SMCConfig

# Native copies per transformers model object (one per weight format: bf16 as loaded, fp8),
# dropped with the model.
_NATIVE_COPIES: weakref.WeakKeyDictionary[Any, dict[bool, NativeCausalLM]] = weakref.WeakKeyDictionary()


def native_model(lm: LanguageModel, fp8: bool = False) -> NativeCausalLM:
    """The native runner for ``lm``'s transformers model, converted once and cached.

    The native runner fuses the q/k/v and gate/up weights, so the copy costs the model's size in
    memory again while the transformers model is alive. The copy is keyed by the model object and
    taken once: after changing that model's weights, device or dtype in place, call
    ``forget_native_copies()`` (or pass a new model object). ``fp8``: a separate copy whose default
    layers (``NativeCausalLM.FP8_DEFAULT``) are quantized to weight-only fp8.
    """
    model = lm.model
    copies = _NATIVE_COPIES.setdefault(model, {})
    native = copies.get(fp8)
    if native is None:
        native = NativeCausalLM.from_hf(model).eval()
        if fp8:
            native.quantize_fp8()
        copies[fp8] = native
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

    if cfg.draft_fp8 and draft is None:
        raise ValueError("draft_fp8=True quantizes the draft model, but no draft was given")
    if cfg.engine == "generic":
        if cfg.draft_fp8:
            raise ValueError("draft_fp8=True needs the native engine; engine='generic' was asked for")
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
            draft=native_model(draft, fp8=cfg.draft_fp8) if draft is not None else None,
            eos_token_ids=target.eos_token_ids,
            mask=mask,
        )
    reason = engine.unsupported_reason(prompt_len)
    return (None, reason) if reason is not None else (engine, None)
