"""Trained draft directories: a few decoder layers stored alone, tied to their target's embedding and head.

A draft directory (written by :mod:`smcgen.distill`) holds

- ``draft.safetensors``: the draft's decoder layers and final norm only (``model.layers.*``,
  ``model.norm.weight``); the token embedding and LM head are the target's and are not stored.
  Matrices may be stored as int8 with one float32 scale per output row (``<name>`` int8 beside
  ``<name>.row_scale``, metadata ``storage: int8-rowwise``): half the bytes of bf16. The draft *is*
  the dequantized weights, so nothing about exactness changes; only the proposal moves slightly;
- ``config.json``: the transformers config of the draft (the target's, with fewer layers);
- ``manifest.json``: which target it belongs to (name and a checksum of its embedding), which
  target layers initialised it, and how it was trained (steps, seed, commit).

Loading rebuilds a standard ``*ForCausalLM`` whose embedding, LM head and rotary embedding *are*
the target's modules, so the draft runs on every engine that takes a transformers model.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from smcgen.kernels.linear import quantize_int8

WEIGHTS_FILE = "draft.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "smcgen-draft/1"
_SCALE = ".row_scale"


def is_draft_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a draft manifest and weights."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a draft directory; ValueError when it is not one of ours."""
    manifest = json.loads((Path(path) / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: manifest format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def embedding_checksum(model: PreTrainedModel) -> str:
    """SHA-256 (first 16 hex digits) of the target's input embedding in float32: names the vocabulary geometry
    the draft was trained against, whatever the device or dtype the target is loaded in."""
    w = model.get_input_embeddings().weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]


def shell_draft(target: PreTrainedModel, n_layers: int) -> PreTrainedModel:
    """A draft of ``n_layers`` fresh layers (on meta, to be filled) sharing the target's embedding, head,
    rotary embedding and everything else that is not a decoder layer or the final norm."""
    config = copy.deepcopy(target.config)
    total = config.num_hidden_layers
    config.num_hidden_layers = n_layers
    if isinstance(getattr(config, "layer_types", None), (list, tuple)) and len(config.layer_types) == total:
        config.layer_types = list(config.layer_types[:n_layers])
    with torch.device("meta"):
        draft = type(target)(config)
    for name, _child in list(draft.model.named_children()):
        if name not in ("layers", "norm"):
            setattr(draft.model, name, getattr(target.model, name))
    draft.lm_head = target.lm_head
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft


def own_state(draft: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors a draft directory stores: its layers and final norm (not the shared embedding/head)."""
    return {k: v for k, v in draft.state_dict().items() if k.startswith(("model.layers.", "model.norm."))}


def quantize_rowwise(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 storage of every matrix (symmetric, one float32 scale per output row); vectors stay as they are."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if v.dim() != 2:
            out[k] = v
            continue
        q, scale = quantize_int8(v.detach().to("cpu"))  # the native engine's own int8 weight format
        out[k] = q.contiguous()
        out[k + _SCALE] = scale.contiguous()
    return out


def dequantize_rowwise(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 matrices of :func:`quantize_rowwise`'s storage (other tensors as they are)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.endswith(_SCALE):
            continue
        scale = tensors.get(k + _SCALE)
        out[k] = v if scale is None else v.to(torch.float32) * scale[:, None]
    return out


def save_draft(draft: PreTrainedModel, out_dir: str | Path, manifest: dict[str, Any], dtype: torch.dtype) -> Path:
    """Write ``draft.safetensors`` (own tensors in ``dtype``), ``config.json`` and ``manifest.json``
    (:func:`quantize_draft_dir` turns a written directory into int8 storage)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in own_state(draft).items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS_FILE)  # atomic: a killed run never leaves half a weights file
    draft.config.to_json_file(str(out / CONFIG_FILE))
    (out / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, **manifest}, indent=2) + "\n")
    return out


def load_draft(path: str | Path, target: PreTrainedModel, *, check_target: bool = True) -> PreTrainedModel:
    """Load a draft directory onto ``target`` (its embedding and head are shared, not copied).

    Raises ValueError when the directory is not a draft, when its architecture does not match the
    target's, or (``check_target``) when the target's embedding checksum differs from the one the draft
    was trained against.
    """
    from safetensors.torch import load_file

    if not is_draft_dir(path):
        raise ValueError(
            f"draft path {str(path)!r} is not a draft directory (needs {MANIFEST_FILE} and {WEIGHTS_FILE})"
        )
    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(str(path))
    for key in ("model_type", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(config, key, None) != getattr(target.config, key, None):
            raise ValueError(
                f"draft {path} does not fit this target: {key} is {getattr(config, key, None)} in the draft and "
                f"{getattr(target.config, key, None)} in the target"
            )
    if check_target and manifest.get("target_embedding_sha256"):
        found = embedding_checksum(target)
        if found != manifest["target_embedding_sha256"]:
            raise ValueError(
                f"draft {path} was trained for target {manifest.get('target')!r} (embedding checksum "
                f"{manifest['target_embedding_sha256']}); this target's embedding has checksum {found}"
            )
    first = target.get_input_embeddings().weight
    draft = shell_draft(target, int(config.num_hidden_layers))
    draft.model.layers.to_empty(device=first.device)
    draft.model.norm.to_empty(device=first.device)
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    if any(k.endswith(_SCALE) for k in state):
        state = dequantize_rowwise(state)
    expected = set(own_state(draft))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"draft {path}: weights file does not match its config (missing {missing[:4]}, extra {extra[:4]})"
        )
    draft.load_state_dict({k: v.to(first.dtype) for k, v in state.items()}, strict=False)
    draft.eval().requires_grad_(False)
    return draft


def quantize_draft_dir(src: str | Path, dst: str | Path) -> Path:
    """Copy the draft directory ``src`` to ``dst`` with its matrices stored as int8 (rowwise scales).

    The manifest records the storage and the source file's SHA-256, so the shipped file can be traced
    to the trained one."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    state = load_file(str(src / WEIGHTS_FILE))
    if any(k.endswith(_SCALE) for k in state):
        raise ValueError(f"draft {src} is already stored as int8")
    # hashed before writing: with dst == src the trained file is about to be replaced
    source_sha = hashlib.sha256((src / WEIGHTS_FILE).read_bytes()).hexdigest()
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / (WEIGHTS_FILE + ".tmp")
    save_file(quantize_rowwise(state), str(tmp), metadata={"format": FORMAT, "storage": "int8-rowwise"})
    tmp.replace(dst / WEIGHTS_FILE)
    (dst / CONFIG_FILE).write_bytes((src / CONFIG_FILE).read_bytes())
    manifest["storage"] = "int8-rowwise"
    manifest["quantized_from_sha256"] = source_sha
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


__all__ = [
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "dequantize_rowwise",
    "embedding_checksum",
    "is_draft_dir",
    "load_draft",
    "quantize_draft_dir",
    "quantize_rowwise",
    "read_manifest",
    "save_draft",
    "shell_draft",
]
