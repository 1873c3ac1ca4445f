"""Models smcgen ships with or derives: the embedded SmolLM2 target, its trained draft and its early-exit draft."""

from smcgen.models.smollm2 import (
    DEFAULT_DRAFT_LAYERS,
    EARLY_EXIT_DRAFT,
    EMBEDDED_DRAFT,
    EMBEDDED_NAMES,
    EMBEDDED_TARGET,
    SHIPPED_DRAFT_DIR,
    cache_dir,
    converted_path,
    derive_draft,
    ensure_converted,
    load_embedded,
    load_smollm2,
)

__all__ = [
    "DEFAULT_DRAFT_LAYERS",
    "EARLY_EXIT_DRAFT",
    "EMBEDDED_DRAFT",
    "EMBEDDED_NAMES",
    "EMBEDDED_TARGET",
    "SHIPPED_DRAFT_DIR",
    "cache_dir",
    "converted_path",
    "derive_draft",
    "ensure_converted",
    "load_embedded",
    "load_smollm2",
]
