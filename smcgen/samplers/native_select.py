"""Choosing the engine: the native one when it can run the request, the generic one otherwise."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from smcgen.core.config import SMCConfig
from smcgen.kernels._triton import HAS_TRITON
from smcgen.runners.native.model import NativeCausalLM, NativeConfig
from smcgen.runners.transformers import LanguageModel

# Native copies per transformers model object (one per weight format: None = as loaded, 'int8',
# 'fp8'), dropped with the model.
_NATIVE_COPIES: weakref.WeakKeyDictionary[Any, dict[str | None, NativeCausalLM]] = weakref.WeakKeyDictionary()


#: the activations' dtype of a quantized copy of an fp32 model (the GPU ``self-int8`` draft of an
#: fp32 target). The kernels meet one-byte weights in the activations' dtype: fp32 activations make
#: every dot an IEEE fp32 loop of FMAs, bf16 ones run on the tensor cores. A draft needs no fp32
#: (SMC weighs its proposals by its own probabilities), and the CPU self-int8 draft runs in bf16 too.
QUANTIZED_DTYPE = torch.bfloat16


def native_model(lm: LanguageModel, fmt: str | None = None) -> NativeCausalLM:
    """The native runner for ``lm``'s transformers model, converted once and cached.

    The native runner fuses the q/k/v and gate/up weights, so the copy costs the model's size in
    memory again while the transformers model is alive. The copy is keyed by the model object and
    taken once: after changing that model's weights, device or dtype in place, call
    ``forget_native_copies()`` (or pass a new model object). ``fmt`` ('int8' / 'fp8'): a separate
    copy whose default layers (``NativeCausalLM.FP8_DEFAULT``) are quantized to that weight-only
    format, with bf16 activations when the model is in fp32 (a draft's, see ``QUANTIZED_DTYPE``).
    """
    model = lm.model
    copies = _NATIVE_COPIES.setdefault(model, {})
    native = copies.get(fmt)
    if native is None:
        loaded = next(model.parameters()).dtype
        dtype = QUANTIZED_DTYPE if fmt is not None and loaded == torch.float32 else None
        native = NativeCausalLM.from_hf(model, dtype=dtype).eval()
        if fmt is not None:
            native.quantize_weights(fmt)
        copies[fmt] = native
    return native


#: draft_quantization='auto' quantizes the draft to int8 for batches of at most this many rows:
#: there the skinny kernel streams the int8 layers faster than bf16 (H100, Llama-3.2-1B at 8 rows:
#: N=8 K=8 633 against 537 tok/s); wider batches run the draft's layers on cuBLAS in bf16, and the
#: int8 copy lost there (8 x 8: 2,179 against 2,449 tok/s aggregate). The native model's own
#: skinny_max_rows (16 for bf16 / fp16 models) is the same bound. Rows = particles x requests (a cycle's first draft step
#: feeds two tokens a row, the one-byte layers always stream in the skinny kernel).
AUTO_INT8_MAX_ROWS = 16


def _named_format(cfg: SMCConfig) -> str | None:
    """The format the config names outright ('int8' / 'fp8'), None for 'auto' and 'none'."""
    if cfg.draft_fp8:
        return "fp8"
    return cfg.draft_quantization if cfg.draft_quantization in ("int8", "fp8") else None


def draft_format(cfg: SMCConfig, rows: int, device: torch.device, preferred: str | None = None) -> str | None:
    """The draft's weight format on the native engine: 'int8', 'fp8' or None (as loaded), for a
    batch of ``rows`` draft rows (particles x requests) on ``device``. ``preferred`` (the draft's
    ``LanguageModel.native_format``, e.g. the ``self-int8`` draft's 'int8') replaces the automatic
    rule; a format the config names outright, or 'none', still wins."""
    if cfg.draft_quantization == "auto" and not cfg.draft_fp8:
        if preferred is not None:
            return preferred
        # without Triton the composed path would dequantize every int8 weight at every call
        return "int8" if device.type == "cuda" and HAS_TRITON and rows <= AUTO_INT8_MAX_ROWS else None
    return _named_format(cfg)


def native_draft(cfg: SMCConfig, draft: LanguageModel, rows: int, device: torch.device) -> NativeCausalLM:
    """The native copy ``draft`` drafts with for ``rows`` draft rows on ``device``: in the format
    :func:`draft_format` picks from the config and the draft's own ``native_format``."""
    return native_model(draft, draft_format(cfg, rows, device, draft.native_format))


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

    Limits that depend on the prompt are the engine's own (``NativeSMC.unsupported_reason``).
    Potentials, guides and every resampler run natively."""
    if cfg.block_size_policy == "adaptive" and draft is not None:
        return (
            "block_size_policy='adaptive' runs on the generic engine: the native engine captures one CUDA graph "
            "per block size"
        )
    if custom_proposal:
        return (
            "a custom Proposal runs on the generic engine only: the native engine drafts with a native "
            "draft model (pass draft= for a draft model)"
        )
    for role, lm in (("target", target), ("draft", draft)):
        if lm is None:
            continue
        try:
            NativeConfig.from_hf(lm.model.config)
        except (ValueError, AttributeError) as err:
            return f"the {role} model is not supported natively ({err})"
        # integer weights (the CPU's self-int8 layers) would be copied as raw codes, without their scales
        quantized = next(
            (n for n, t in lm.model.state_dict().items() if n.endswith("weight") and not t.is_floating_point()), None
        )
        if quantized is not None:
            return (
                f"the {role} model has integer weights ({quantized}), which the native engine cannot convert "
                "(a CPU self-int8 draft runs on the generic engine; on a GPU self-int8 uses the native int8 copy)"
            )
    return None


def native_reason(
    cfg: SMCConfig,
    target: LanguageModel,
    draft: LanguageModel | None,
    potentials: Any,
    custom_proposal: bool,
) -> str | None:
    """Why the native engine will not run requests with ``cfg`` on these models (None: it can),
    decided before converting anything; the prompt's own limits are ``NativeSMC.unsupported_reason``.

    Raises ``ValueError`` for a draft format named outright that cannot apply (no draft, or
    ``engine='generic'``). ``engine='auto'`` picks native only on CUDA; ``engine='native'`` also
    runs it on the CPU (with the kernels' torch twins: for tests and debugging, not speed)."""
    # what the caller asked for by name ('auto' never errs: it quantizes only where it pays)
    fmt = _named_format(cfg)
    asked = "draft_fp8=True" if cfg.draft_fp8 else f"draft_quantization={cfg.draft_quantization!r}"
    if fmt is not None and draft is None:
        raise ValueError(f"{asked} quantizes the draft model, but no draft was given")
    if cfg.engine == "generic":
        if fmt is not None:
            raise ValueError(f"{asked} needs the native engine; engine='generic' was asked for")
        return "engine='generic' was asked for"
    reason = native_unsupported(cfg, target, draft, potentials, custom_proposal)
    if reason is None and cfg.engine == "auto" and target.device.type != "cuda":
        reason = "the model is not on a GPU"
    if reason is None and draft is not None and draft.device != target.device:
        reason = f"target ({target.device}) and draft ({draft.device}) are on different devices"
    return reason
