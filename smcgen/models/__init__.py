"""Models smcgen ships with or derives: the embedded SmolLM2 target and its early-exit draft."""

from smcgen.models.smollm2 import (
    DEFAULT_DRAFT_LAYERS,
    EMBEDDED_DRAFT,
    EMBEDDED_NAMES,
    EMBEDDED_TARGET,
    cache_dir,
    converted_path,
    derive_draft,
    ensure_converted,
    load_embedded,
    load_smollm2,
)

__all__ = [
    "DEFAULT_DRAFT_LAYERS",
    "EMBEDDED_DRAFT",
    "EMBEDDED_NAMES",
    "EMBEDDED_TARGET",
    "cache_dir",
    "converted_path",
    "derive_draft",
    "ensure_converted",
    "load_embedded",
    "load_smollm2",
]
