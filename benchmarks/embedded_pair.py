"""The embedded SmolLM2-135M target as the SmolLM2 benchmarks load it, optionally in another dtype.

``fidelity_sweep.py``, ``smollm2_speed.py`` and ``smollm2_profile.py`` share the ``--target-dtype``
option and its rule: only the ``self-int8`` draft is built from the target, so only it follows the
target into the new dtype; any other draft would stay as loaded, tied to the fp32 target, while the
report named the new dtype.
"""

from __future__ import annotations

import argparse

from smcgen.api import load_model
from smcgen.models.self_draft import SELF_INT8_DRAFT
from smcgen.runners.transformers import LanguageModel


def add_target_dtype(ap: argparse.ArgumentParser) -> None:
    """The ``--target-dtype`` option (default: as loaded, fp32)."""
    ap.add_argument(
        "--target-dtype",
        default=None,
        help="run the target (and a self-int8 draft built from it) in this dtype, e.g. bfloat16 (default: as loaded, fp32)",
    )


def load_target(device: str, target_dtype: str | None, drafts: list[str]) -> LanguageModel:
    """The embedded target on ``device``, as a copy in ``target_dtype`` when one is given; every
    name in ``drafts`` (the drafts the run will use) must then be ``self-int8``."""
    others = sorted(set(drafts) - {SELF_INT8_DRAFT})
    if target_dtype and others:
        raise SystemExit(f"--target-dtype: only the self-int8 draft follows the target, not {', '.join(others)}")
    target = load_model("smollm2-135m", device)
    return target.to_dtype(target_dtype) if target_dtype else target


def parse_configs(text: str) -> list[tuple[int, int]]:
    """SMC-SD settings ``[(N, K), ...]`` from 'NxK,NxK'."""
    out = []
    for part in text.split(","):
        n, k = part.lower().split("x")
        out.append((int(n), int(k)))
    return out


#: a config token's suffix that runs it with one launch per decoder layer (``NativeCausalLM.fused_layers``)
FUSED = "+fused"


def split_fused(token: str) -> tuple[str, bool]:
    """('2x8', True) from '2x8+fused', ('AR', False) from 'AR'."""
    return (token[: -len(FUSED)], True) if token.endswith(FUSED) else (token, False)


def use_fused_layers(on: bool) -> None:
    """Every native model's default for ``fused_layers`` from now on (a kept run of the other
    setting is not reused: the setting is part of its key)."""
    from smcgen.runners.native import model

    model.FUSED_LAYERS = on
