"""``smcgen.distill`` on a tiny random target: the KL falls, the files load back onto the target,
SMC-SD runs with the loaded draft, seeded runs reproduce and an interrupted run resumes exactly."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from tiny_models import tiny_lm

import smcgen
from smcgen.api import load_model
from smcgen.distill import (
    DistillConfig,
    build_draft,
    check_config,
    distill,
    divergence_terms,
    evaluate_draft,
    init_layer_indices,
    kl_terms,
    sample_from_target,
)
from smcgen.models import draft_dir

PROMPTS = [[0, 1], [1, 2, 0], [2], [0, 0, 1, 2]]
RECIPE = {
    "layers": 1,
    "steps": 30,
    "batch_size": 8,
    "sample_batch": 16,
    "reuse": 2,
    "max_new_tokens": 10,
    "lr": 3e-3,
    "eval_sequences": 8,
    "warmup": 0.1,
    "dtype": "float32",
}


def _target(layers: int = 3):
    return tiny_lm(seed=3, vocab=12, eos=11, layers=layers, hidden=32)


def _run(tmp_path, name, **kw):
    target = kw.pop("target", None) or _target()
    losses = []
    manifest = distill(
        target,
        tmp_path / name,
        DistillConfig(**{**RECIPE, **kw.pop("cfg", {})}),
        prompts=PROMPTS,
        target_name="tiny",
        progress=False,
        on_step=lambda s, loss: losses.append(loss),
        **kw,
    )
    return target, manifest, losses


def test_loss_falls_files_load_and_smc_sd_runs(tmp_path):
    target, manifest, losses = _run(tmp_path, "a")
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5, losses
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} >= {"draft.safetensors", "config.json", "manifest.json", "loss.png"}
    curve = (out / "loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 31
    assert [float(line.split(",")[1]) for line in curve[1:]] == pytest.approx(losses, rel=1e-5)
    from safetensors.torch import load_file

    stored = load_file(str(out / "draft.safetensors"))
    assert stored and all(k.startswith(("model.layers.0.", "model.norm.")) for k in stored)  # no embedding/head
    assert manifest["steps"] == 30 and manifest["layers"] == 1
    assert 0 < manifest["sample_seconds"] <= manifest["train_seconds"]  # the split of the time is reported
    assert (
        json.loads((out / "manifest.json").read_text())["target_embedding_sha256"]
        == manifest["target_embedding_sha256"]
    )

    draft = draft_dir.load_draft(out, target.model)
    assert draft.get_input_embeddings() is target.model.get_input_embeddings()
    assert draft.lm_head is target.model.lm_head
    # The loaded draft is the trained one: on fresh target samples its KL is far below the untrained copy's.
    held = sample_from_target(target.model, PROMPTS, 32, 10, (11,), torch.Generator().manual_seed(99))
    before = evaluate_draft(target.model, build_draft(target.model, manifest["init_layers"]), held)
    after = evaluate_draft(target.model, draft, held)
    assert after["kl"] < 0.3 * before["kl"] and after["overlap"] > before["overlap"] + 0.1, (before, after)
    assert after["kl"] == pytest.approx(manifest["held_out"]["kl"], rel=0.5)

    res = smcgen.generate(
        target.model, [0, 1], draft=str(out), n_particles=4, block_size=3, max_new_tokens=8, seed=5, engine="generic"
    )
    res2 = smcgen.generate(
        target.model, [0, 1], draft=draft, n_particles=4, block_size=3, max_new_tokens=8, seed=5, engine="generic"
    )
    assert res.sequences == res2.sequences and len(res.sequences) == 4

    # The native engine takes the loaded draft as a plain LlamaForCausalLM and gives its logits.
    from smcgen.runners.native.model import NativeCausalLM

    native = NativeCausalLM.from_hf(draft)
    assert native.cfg.n_layers == 1 and torch.equal(native.embed, target.model.get_input_embeddings().weight)
    seq = [0, 1, 2, 3, 4]
    cache = native.make_cache(n_pages=4, n_rows=1, max_pages=4, page_size=8)
    cache.reserve(len(seq))
    got = native(torch.tensor([seq]), torch.zeros(1, dtype=torch.int32), cache)[0]
    with torch.no_grad():
        want = draft(torch.tensor([seq])).logits[0]
    assert (got.float() - want).abs().max() < 1e-3


def test_without_matplotlib_the_run_still_writes_the_draft_and_the_curve(tmp_path, monkeypatch):
    """matplotlib is optional: without it the run warns, skips loss.png and finishes every other file."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        target, manifest, _ = _run(tmp_path, "no_plot", cfg={"steps": 3, "eval_sequences": 0})
    names = {p.name for p in (tmp_path / "no_plot").iterdir()}
    assert {"draft.safetensors", "config.json", "manifest.json", "loss.csv"} <= names and "loss.png" not in names
    assert manifest["steps"] == 3 and draft_dir.load_draft(tmp_path / "no_plot", target.model) is not None


def test_seeded_runs_reproduce_and_resume_is_exact(tmp_path):
    _, _m1, l1 = _run(tmp_path, "a", cfg={"steps": 6, "eval_sequences": 0})
    _, _m2, l2 = _run(tmp_path, "b", cfg={"steps": 6, "eval_sequences": 0})
    assert l1 == l2
    from safetensors.torch import load_file

    w1, w2 = load_file(str(tmp_path / "a/draft.safetensors")), load_file(str(tmp_path / "b/draft.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        distill(
            _target(),
            tmp_path / "c",
            DistillConfig(**{**RECIPE, "steps": 6, "eval_sequences": 0, "checkpoint_minutes": 0}),
            prompts=PROMPTS,
            target_name="tiny",
            progress=False,
            on_step=crash,
        )
    _, m3, l3 = _run(tmp_path, "c", cfg={"steps": 6, "eval_sequences": 0}, resume=True)
    assert m3["steps"] == 6 and l3 == l1[4:]
    w3 = load_file(str(tmp_path / "c/draft.safetensors"))
    assert all(torch.equal(w1[k], w3[k]) for k in w1)


def test_load_model_finds_target_by_manifest_and_rejects_a_wrong_target(tmp_path):
    target, _manifest, _ = _run(tmp_path, "a", cfg={"steps": 2, "eval_sequences": 0})
    target.model.save_pretrained(str(tmp_path / "tiny_target"))
    m = json.loads((tmp_path / "a/manifest.json").read_text())
    m["target"] = str(tmp_path / "tiny_target")
    (tmp_path / "a/manifest.json").write_text(json.dumps(m))
    lm = load_model(str(tmp_path / "a"), "cpu")
    assert lm.model.config.num_hidden_layers == 1
    other = tiny_lm(seed=4, vocab=12, eos=11, layers=3, hidden=32)
    with pytest.raises(ValueError, match="checksum"):
        draft_dir.load_draft(tmp_path / "a", other.model)


def test_bad_recipe_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="layers must be"):
        distill(_target(), tmp_path, layers=9, steps=1, prompts=PROMPTS, progress=False)
    with pytest.raises(ValueError, match="steps and/or minutes"):
        distill(_target(), tmp_path, prompts=PROMPTS, progress=False)
    assert init_layer_indices(30, 2, "spaced") == [0, 29]
    assert init_layer_indices(30, 3, "first") == [0, 1, 2] and init_layer_indices(30, 1, "last") == [29]


def test_cli_needs_a_budget(tmp_path, capsys):
    from smcgen.cli import main

    assert main(["distill", "--out", str(tmp_path)]) == 2
    assert "--steps and/or --minutes" in capsys.readouterr().err


def test_temperature_tempers_samples_and_kl():
    """A draft trained for temperature tau is scored on the tempered distributions: near-zero tau samples the
    argmax path, the KL is that of softmax(logits / tau), and an out-of-range tau is refused by name."""
    torch.manual_seed(0)
    t, d = torch.randn(5, 11), torch.randn(5, 11)
    tau = 0.5
    p, q = torch.softmax(t / tau, -1), torch.softmax(d / tau, -1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(kl_terms(t, d, tau), expected, atol=1e-5)
    assert not torch.allclose(kl_terms(t, d, tau), kl_terms(t, d), atol=1e-3)

    target = _target()
    cold = [
        sample_from_target(target.model, PROMPTS[:1], 2, 6, (), torch.Generator().manual_seed(s), temperature=0.05).ids
        for s in (1, 2)
    ]
    assert torch.equal(cold[0], cold[1])  # at tau -> 0 the seed no longer matters: the greedy path
    with pytest.raises(ValueError, match="temperature"):
        check_config(DistillConfig(steps=1, temperature=0.0), 2)


def test_int8_storage_halves_the_file_and_loads_back_close(tmp_path):
    target, _manifest, _ = _run(tmp_path, "a", cfg={"steps": 4, "eval_sequences": 0})
    src, dst = tmp_path / "a", tmp_path / "q"
    draft_dir.quantize_draft_dir(src, dst)
    from safetensors import safe_open

    with safe_open(str(dst / draft_dir.WEIGHTS_FILE), "pt") as f:
        assert f.metadata()["storage"] == "int8-rowwise"
        assert any(f.get_tensor(k).dtype == torch.int8 for k in f.keys())  # noqa: SIM118 (safe_open has no iterator)
    manifest = draft_dir.read_manifest(dst)
    assert manifest["storage"] == "int8-rowwise" and len(manifest["quantized_from_sha256"]) == 64
    # float32 tiny weights: int8 plus a scale per row is well under half the bytes
    assert (dst / draft_dir.WEIGHTS_FILE).stat().st_size < 0.5 * (src / draft_dir.WEIGHTS_FILE).stat().st_size
    plain, quant = draft_dir.load_draft(src, target.model), draft_dir.load_draft(dst, target.model)
    seq = torch.tensor([[0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        p, q = plain(seq).logits.log_softmax(-1), quant(seq).logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).max()
    assert 0 < kl < 1e-2, kl  # not the same weights, but close
    with pytest.raises(ValueError, match="already stored as int8"):
        draft_dir.quantize_draft_dir(dst, tmp_path / "qq")


def test_int8_storage_in_place_records_the_source_checksum(tmp_path):
    import hashlib

    _run(tmp_path, "a", cfg={"steps": 2, "eval_sequences": 0})
    src = tmp_path / "a"
    before = hashlib.sha256((src / draft_dir.WEIGHTS_FILE).read_bytes()).hexdigest()
    draft_dir.quantize_draft_dir(src, src)  # dst == src: the trained file is replaced
    assert draft_dir.read_manifest(src)["quantized_from_sha256"] == before


def test_divergences_are_the_two_kl_directions_and_their_mean():
    torch.manual_seed(1)
    t, d = torch.randn(6, 9), torch.randn(6, 9)
    forward, reverse = kl_terms(t, d, 0.7), kl_terms(d, t, 0.7)
    assert torch.equal(divergence_terms(t, d, 0.7, "forward"), forward)
    assert torch.equal(divergence_terms(t, d, 0.7, "reverse"), reverse)
    assert torch.allclose(divergence_terms(t, d, 0.7, "symmetric"), (forward + reverse) / 2)
    assert (forward > 0).all() and not torch.allclose(forward, reverse)  # the directions differ
    with pytest.raises(ValueError, match="divergence must be one of"):
        divergence_terms(t, d, 0.7, "jsd")
    for bad, match in (
        ({"divergence": "kl"}, "divergence must be one of"),
        ({"on_policy": 1.5}, r"on_policy must be in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            check_config(DistillConfig(steps=1, **bad), 3)


def test_held_out_figures_match_their_formulas():
    """evaluate_draft's figures are the per-position formulas averaged over scored positions; the Renyi-2
    divergence (log E_q[(p/q)^2]) is zero for the target itself and at least the KL for another draft."""
    target, other = _target(), tiny_lm(seed=8, vocab=12, eos=11, layers=1, hidden=32)
    held = sample_from_target(target.model, PROMPTS, 6, 5, (11,), torch.Generator().manual_seed(4), temperature=0.7)
    same = evaluate_draft(target.model, target.model, held, temperature=0.7)
    assert abs(same["kl"]) < 1e-5 and abs(same["renyi2"]) < 1e-5 and same["overlap"] == pytest.approx(1.0)

    got = evaluate_draft(target.model, other.model, held, micro_batch=4, temperature=0.7)
    kw = {"attention_mask": held.real.long(), "position_ids": (held.real.long().cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():  # left-padded rows: the mask and positions the samples were drawn with
        t = target.model(held.ids, **kw).logits[held.scored].float()
        d = other.model(held.ids, **kw).logits[held.scored].float()
    log_p, log_q = torch.log_softmax(t / 0.7, -1), torch.log_softmax(d / 0.7, -1)
    p, q = log_p.exp(), log_q.exp()
    expected = {
        "kl": (p * (log_p - log_q)).sum(-1).mean(),
        "reverse_kl": (q * (log_q - log_p)).sum(-1).mean(),
        "overlap": torch.minimum(p, q).sum(-1).mean(),
        "renyi2": (p.pow(2) / q).sum(-1).log().mean(),
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-4, abs=1e-6), key
    assert got["renyi2"] >= got["kl"] > 0.01  # the order-2 divergence bounds the KL from above


def test_on_policy_rounds_train_on_the_drafts_own_samples(tmp_path, monkeypatch):
    """With on_policy=0.5 every other sampling round is the draft's: the sampler gets the draft, its
    samples are scored, and the reverse KL it is trained on falls like the forward one did."""
    distill_module = importlib.import_module("smcgen.distill")  # the package's `distill` is the function

    samplers = []
    real_sampler = distill_module.sample_from_target

    def recording(model, *args, **kwargs):
        samplers.append(model)
        return real_sampler(model, *args, **kwargs)

    monkeypatch.setattr(distill_module, "sample_from_target", recording)
    target, manifest, losses = _run(tmp_path, "onp", cfg={"on_policy": 0.5, "divergence": "reverse", "reuse": 1})
    training = samplers[:-1]  # the last call samples the held-out set, from the target
    assert len(training) == 15 and samplers[-1] is target.model  # 30 steps, 2 per pool of 16
    assert [m is target.model for m in training] == [i % 2 == 0 for i in range(15)]
    assert all(m is not target.model and m.config.num_hidden_layers == 1 for m in training[1::2])
    assert manifest["recipe"]["on_policy"] == 0.5 and manifest["recipe"]["divergence"] == "reverse"
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert manifest["held_out"]["reverse_kl"] < sum(losses[:5]) / 5


def test_a_run_can_start_from_a_trained_draft(tmp_path):
    """init_from loads a draft directory's layers as the starting point: with no steps the result is
    that draft; a layer count that disagrees, or a path that is no draft, is refused by name."""
    target, _, _ = _run(tmp_path, "first", cfg={"steps": 10, "eval_sequences": 0})
    distill(
        target,
        tmp_path / "again",
        DistillConfig(**{**RECIPE, "steps": 0, "eval_sequences": 0, "init_from": str(tmp_path / "first")}),
        prompts=PROMPTS,
        target_name="tiny",
        progress=False,
    )
    from safetensors.torch import load_file

    before, after = (
        load_file(str(tmp_path / "first" / "draft.safetensors")),
        load_file(str(tmp_path / "again" / "draft.safetensors")),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="must match init_from's 1 layers"):
        distill(
            target,
            tmp_path / "x",
            DistillConfig(**{**RECIPE, "layers": 2, "init_from": str(tmp_path / "first")}),
            prompts=PROMPTS,
            progress=False,
        )
    with pytest.raises(ValueError, match="init_from must be a draft directory"):
        distill(
            target,
            tmp_path / "y",
            DistillConfig(**{**RECIPE, "init_from": str(tmp_path)}),
            prompts=PROMPTS,
            progress=False,
        )


def test_the_training_loss_is_the_chosen_divergence(tmp_path):
    """The first step's loss (the untrained draft, the same target batch) is the forward KL, the reverse
    KL or their mean as configured; a checkpoint of one objective does not resume under another."""
    first = {}
    for kind in ("forward", "reverse", "symmetric"):
        _, _, losses = _run(tmp_path, kind, cfg={"steps": 1, "eval_sequences": 0, "divergence": kind, "on_policy": 0.0})
        first[kind] = losses[0]
    assert abs(first["forward"] - first["reverse"]) > 1e-3
    assert first["symmetric"] == pytest.approx((first["forward"] + first["reverse"]) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="was trained with divergence='forward'"):
        _run(tmp_path, "forward", cfg={"steps": 2, "divergence": "reverse", "on_policy": 0.0}, resume=True)
    # a checkpoint written while distill still had a `sampler` option resumes (the field is ignored)
    ck_path = tmp_path / "forward" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=False)
    ck["config"]["sampler"] = "engine"
    torch.save(ck, ck_path)
    _, resumed, _ = _run(
        tmp_path,
        "forward",
        cfg={"steps": 2, "divergence": "forward", "on_policy": 0.0, "eval_sequences": 0},
        resume=True,
    )
    assert resumed["steps"] == 2
