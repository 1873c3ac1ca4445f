"""The int8 copy of the target as a draft (smcgen/models/self_draft.py): close to the target, found
by name everywhere a draft is named, and exact in SMC (tests/test_exactness.py, int8_self_draft)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPT, tiny_lm

import smcgen
from smcgen.api import load_draft
from smcgen.models.self_draft import SELF_INT8_DRAFT, Int8RowwiseLinear, int8_self_draft


@pytest.fixture(scope="module")
def target():
    return tiny_lm(0, logit_scale=2.0, hidden=32)


def test_every_linear_layer_is_int8_and_the_target_is_untouched(target):
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    draft = int8_self_draft(target)
    linears = [m for m in draft.model.modules() if isinstance(m, Int8RowwiseLinear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in draft.model.modules())
    after = target.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int8_self_draft(target) is draft  # built once per target


def test_the_draft_is_close_to_the_target(target):
    ids = torch.tensor([PROMPT + [1, 2, 0, 1]])
    with torch.no_grad():
        p = torch.log_softmax(target.model(ids).logits.float(), -1)
        q = torch.log_softmax(int8_self_draft(target).model(ids).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).max()
    assert float(kl) < 0.01  # rowwise int8 with bf16 activations: a small perturbation of the target
    assert float(kl) > 0  # and not the target itself


def test_named_as_a_draft(target):
    res = smcgen.generate(target, PROMPT, draft=SELF_INT8_DRAFT, n_particles=2, block_size=3, max_new_tokens=6, seed=0)
    assert res.engine == "generic" and len(res.token_ids) >= 1
    assert load_draft(SELF_INT8_DRAFT, target) is int8_self_draft(target)
    assert load_draft("none", target) is None
    with pytest.raises(ValueError, match="built from the target"):
        smcgen.api.as_language_model(SELF_INT8_DRAFT)


def test_the_cli_runs_the_main_job_with_it(capsys):
    from smcgen.cli import main

    argv = [
        "--draft",
        SELF_INT8_DRAFT,
        "-n",
        "2",
        "-k",
        "4",
        "--max-new-tokens",
        "6",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert "particles: 2" in capsys.readouterr().out


def test_the_main_job_drafts_with_the_self_draft_on_every_device():
    from smcgen.cli import MAIN_JOB, build_parser, main_job_draft, main_job_setting

    assert build_parser().parse_args([]).draft == "auto"
    assert main_job_draft("auto") == SELF_INT8_DRAFT
    assert main_job_draft("smollm2-135m-draft") == "smollm2-135m-draft"  # a named draft is kept
    assert main_job_draft("none") == "none"
    assert MAIN_JOB[0] >= 2  # SMC: more than one particle
    assert main_job_setting(SELF_INT8_DRAFT) == MAIN_JOB
    d = smcgen.SMCConfig()
    assert main_job_setting("smollm2-135m-draft") == (d.n_particles, d.block_size)


def test_auto_dtype_leaves_the_self_draft_as_it_is(target, monkeypatch):
    import smcgen.runners.transformers as tr

    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: True)
    assert tr.auto_draft_dtype(target) == "bfloat16"  # a float32 draft on a bf16 CPU
    assert tr.auto_draft_dtype(int8_self_draft(target)) is None  # already bf16 / int8


def test_on_a_gpu_it_is_the_target_marked_for_the_native_int8_copy(target, monkeypatch):
    """Off the CPU the self draft is the target's own model with native_format='int8' (no CPU int8
    layers), and the native engine's draft format follows that mark unless the config names one."""
    from smcgen.runners.transformers import LanguageModel
    from smcgen.samplers.native_select import draft_format

    monkeypatch.setattr(LanguageModel, "device", property(lambda self: torch.device("cuda")))
    draft = int8_self_draft(target)
    assert draft.model is target.model and draft.native_format == "int8"
    assert target.native_format is None  # the target itself stays as loaded
    cuda = torch.device("cuda")
    assert draft_format(smcgen.SMCConfig(), 64, cuda, draft.native_format) == "int8"  # past the auto row bound
    assert draft_format(smcgen.SMCConfig(), 64, cuda) is None
    assert draft_format(smcgen.SMCConfig(draft_quantization="fp8"), 8, cuda, "int8") == "fp8"
    assert draft_format(smcgen.SMCConfig(draft_quantization="none"), 8, cuda, "int8") is None


def test_the_native_engine_drafts_with_the_int8_copy_of_a_marked_draft(target):
    """A draft marked native_format='int8' runs natively on an int8 copy of its weights (the CPU's
    torch twins here), kept apart from the target's own copy, and the run completes."""
    import dataclasses

    from smcgen.samplers.native_select import _NATIVE_COPIES

    marked = dataclasses.replace(target, native_format="int8")
    res = smcgen.generate(
        target, PROMPT, draft=marked, n_particles=2, block_size=3, max_new_tokens=6, seed=0, engine="native"
    )
    assert res.engine == "native" and len(res.token_ids) >= 1
    copies = _NATIVE_COPIES[target.model]
    assert set(copies) >= {None, "int8"} and copies["int8"] is not copies[None]

    def int8_tensors(native):
        return [k for k, t in native.state_dict().items() if isinstance(t, torch.Tensor) and t.dtype == torch.int8]

    assert int8_tensors(copies["int8"]) and not int8_tensors(copies[None])
    # the fp32 target's copy stays fp32; its quantized copy, a draft's, computes in bf16 (tensor cores
    # on a GPU, where fp32 activations would make every dot an IEEE fp32 FMA loop)
    assert next(target.model.parameters()).dtype == torch.float32
    assert copies[None].dtype == torch.float32 and copies["int8"].dtype == torch.bfloat16


def test_a_dtype_copy_keeps_the_native_mark(target):
    import dataclasses

    marked = dataclasses.replace(target, native_format="int8")
    copy = marked.to_dtype("bfloat16")
    assert copy.native_format == "int8" and copy.model is not target.model
    assert next(copy.model.parameters()).dtype == torch.bfloat16


def test_the_gpu_mark_is_one_object_while_held(target, monkeypatch):
    """Off the CPU int8_self_draft returns the same marked object while something holds it, so an
    engine cache keyed by the draft is reused across calls."""
    from smcgen.runners.transformers import LanguageModel

    monkeypatch.setattr(LanguageModel, "device", property(lambda self: torch.device("cuda")))
    first = int8_self_draft(target)
    assert int8_self_draft(target) is first


def test_an_engine_keeps_the_mark_when_it_lends_the_target_tokenizer(target):
    """A draft without a tokenizer gets the target's; its native format must survive that."""
    import dataclasses

    bare = dataclasses.replace(target, tokenizer=None)
    eng = smcgen.Engine(bare, draft=dataclasses.replace(bare, native_format="int8"), engine="native")
    assert eng.draft.native_format == "int8"


def test_bad_native_format_and_integer_weights_on_the_native_engine(target):
    """A misspelt format is refused by name; the CPU self-int8 draft's integer weights are refused by
    the native engine (they would be copied without their scales) and run on the generic one."""
    import dataclasses

    with pytest.raises(ValueError, match="native_format must be None, 'int8' or 'fp8'"):
        dataclasses.replace(target, native_format="int4")
    with pytest.raises(ValueError, match="integer weights"):
        smcgen.generate(
            target, PROMPT, draft=SELF_INT8_DRAFT, n_particles=2, block_size=3, max_new_tokens=4, engine="native"
        )
    res = smcgen.generate(target, PROMPT, draft=SELF_INT8_DRAFT, n_particles=2, block_size=3, max_new_tokens=4, seed=0)
    assert res.engine == "generic"
