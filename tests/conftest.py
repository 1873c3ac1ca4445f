"""Shared fixtures: the tiny target, draft and tokenizer used by the API tests."""

from __future__ import annotations

import os

# Triton kernels are checked against their torch twins in Triton's CPU interpreter unless the
# run targets a GPU (SMCGEN_TEST_DEVICE=cuda). The variable must be set before triton loads.
TEST_DEVICE = os.environ.get("SMCGEN_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import tiny_lm, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests run: the CPU (Triton interpreter) by default, CUDA on the GPU host."""
    if TEST_DEVICE != "cpu" and not torch.cuda.is_available():
        pytest.fail(f"SMCGEN_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")
    return torch.device(TEST_DEVICE)


@pytest.fixture(scope="session")
def target():
    """Tiny random Llama target (vocab a, b, c, </s>) as a bare transformers model."""
    return tiny_lm(0, logit_scale=2.0).model


@pytest.fixture(scope="session")
def draft():
    """A flatter, different tiny model with the same vocabulary."""
    return tiny_lm(1, logit_scale=0.7).model


@pytest.fixture(scope="session")
def tok():
    """Word-level tokenizer over the letters a, b, c plus </s>."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def native_models(device):
    """(a tiny target's LanguageModel, that target and a flatter draft as native models on ``device``):
    the native engine's grammar tests."""
    from smcgen.runners.native.model import NativeCausalLM

    target, draft = tiny_lm(0, logit_scale=1.0), tiny_lm(1, logit_scale=0.7)
    return (
        target,
        NativeCausalLM.from_hf(target.model, device=device),
        NativeCausalLM.from_hf(draft.model, device=device),
    )


class _ReplayedEagerly:
    """A stand-in for a captured CUDA graph: each replay runs the cycle eagerly."""

    def __init__(self, engine, state):
        self.engine, self.state = engine, state

    def replay(self) -> None:
        self.engine._cycle(self.state)


@pytest.fixture
def warm_up_capture(monkeypatch):
    """``warm_up_capture(engine)``: the engine takes its CUDA-graph path on any device, with the
    real warm-up (``_warm_up``) and a stand-in graph whose replays run the cycle eagerly, so the
    graph path's bookkeeping is tested on the CPU too. Returns the list of captured states."""

    def patch(engine) -> list:
        captured: list = []

        def capture(s):
            captured.append(s)
            engine._warm_up(s)
            return _ReplayedEagerly(engine, s)

        monkeypatch.setattr(engine, "cuda_graph", True)
        monkeypatch.setattr(engine, "_capture", capture)
        return captured

    return patch
