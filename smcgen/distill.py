"""``smcgen.distill``: train a small draft for a Llama/Qwen-family target from the target alone.

The draft is the target's architecture with a few decoder layers (initialised from chosen target
layers) on top of the target's own embedding and LM head, which stay frozen and shared, so the
draft file holds only the new layers and final norm. Training is sequence-level distillation:
each round the target (or, in a share ``on_policy`` of the rounds, none by default, the draft) samples
continuations of prompts (chat-template prompts from a built-in list of varied instructions, plus
optional corpus text, or given ids) at the sampling temperature (``temperature``, 1 by default),
and the draft minimises a divergence from the target's full next-token distributions, both
tempered the same way, at every generated position: a draft meant for SMC-SD at temperature 0.7 is
best trained at 0.7, since the importance weights compare the tempered distributions.
``divergence`` is the forward KL(target || draft), the reverse KL(draft || target) or their mean
(the default: SMC-SD's few particles cannot resample away mass the draft puts where the target has
little, which the forward KL never penalises).
A pool of samples serves ``reuse`` optimiser steps.

Outputs (in ``out_dir``): ``draft.safetensors`` + ``config.json`` + ``manifest.json`` (see
:mod:`smcgen.models.draft_dir`), the loss curve (``loss.csv``, and ``loss.png`` with matplotlib
installed) and ``checkpoint.pt`` for ``resume=True``.
"""

from __future__ import annotations

import math
import random
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from smcgen.distill_samples import (
    DIVERGENCES,
    INSTRUCTIONS,
    SampleBatch,
    _logits,
    chat_prompts,
    corpus_prompts,
    divergence_terms,
    evaluate_draft,
    kl_terms,
    sample_from_target,
)
from smcgen.models import draft_dir
from smcgen.runners.transformers import LanguageModel


@dataclass
class DistillConfig:
    """Recipe of a distillation run (every field is validated by :func:`check_config`)."""

    layers: int | None = None  # decoder layers of the draft; None: default_layers(target)
    init: str = "first"  # which target layers initialise the draft: first, last or spaced (see init_layer_indices)
    steps: int | None = None  # optimiser steps; None: until `minutes` run out
    minutes: float | None = None  # wall-clock training budget; None: until `steps`
    batch_size: int = 8  # sequences per optimiser step
    micro_batch: int | None = None  # sequences per forward (gradient accumulation); None: batch_size
    sample_batch: int = 32  # sequences the target samples per round (reused over several steps)
    reuse: int = 1  # optimiser steps each sampled sequence serves (passes over a pool)
    max_new_tokens: int = 64  # length of each target sample
    temperature: float = 1.0  # sampling temperature the draft is trained for (samples and KL both tempered)
    # symmetric: at equal budget, SMC-SD's answers came out 1.0 nats/token closer to the target's than
    # with the forward KL; on-policy rounds changed little beside it (docs/distill.md)
    divergence: str = "symmetric"  # forward KL(p || q), reverse KL(q || p) or symmetric (their mean)
    on_policy: float = 0.0  # share of sampling rounds whose sequences the draft samples (its own continuations)
    init_from: str | None = None  # a trained draft directory whose weights start the run (instead of target layers)
    lr: float = 5e-4
    warmup: float = 0.05  # fraction of the run with a linear warm-up; cosine decay to 10% after
    weight_decay: float = 0.0
    seed: int = 0
    eval_sequences: int = 16  # held-out target samples for the final KL / agreement figures
    checkpoint_minutes: float = 3.0
    dtype: str = "bfloat16"  # dtype of the saved weights


def check_config(cfg: DistillConfig, n_target_layers: int) -> None:
    """Raise ValueError naming the bad field and its allowed range."""
    if cfg.layers is not None and not (isinstance(cfg.layers, int) and 1 <= cfg.layers <= n_target_layers):
        raise ValueError(f"layers must be an int in 1..{n_target_layers} (the target's layers), got {cfg.layers!r}")
    if cfg.init not in ("spaced", "first", "last"):
        raise ValueError(f"init must be 'spaced', 'first' or 'last', got {cfg.init!r}")
    if cfg.steps is None and cfg.minutes is None:
        raise ValueError("give steps and/or minutes (a budget for training)")
    if cfg.steps is not None and cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    if cfg.minutes is not None and not cfg.minutes > 0:
        raise ValueError(f"minutes must be > 0, got {cfg.minutes}")
    for name in ("batch_size", "sample_batch", "reuse", "max_new_tokens"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.micro_batch is not None and not 1 <= cfg.micro_batch <= cfg.batch_size:
        raise ValueError(f"micro_batch must be in 1..batch_size ({cfg.batch_size}), got {cfg.micro_batch}")
    if cfg.eval_sequences < 0:
        raise ValueError(f"eval_sequences must be >= 0, got {cfg.eval_sequences}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive finite number, got {cfg.lr}")
    if not 0 <= cfg.warmup < 1:
        raise ValueError(f"warmup must be in [0, 1), got {cfg.warmup}")
    if not (isinstance(cfg.temperature, (int, float)) and 0.05 <= cfg.temperature <= 10):
        raise ValueError(f"temperature must be in [0.05, 10], got {cfg.temperature!r}")
    if cfg.divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {cfg.divergence!r}")
    if not (isinstance(cfg.on_policy, (int, float)) and 0 <= cfg.on_policy <= 1):
        raise ValueError(f"on_policy must be in [0, 1], got {cfg.on_policy!r}")
    if cfg.dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {cfg.dtype!r}")


def default_layers(config: Any) -> int:
    """Default draft depth: 2 layers (whatever the target's depth).

    Measured for SmolLM2-135M on a 2-core CPU (``benchmarks/draft_cost_cpu.py``, OMP_NUM_THREADS=2):
    a transformers decode step of 8 rows costs 14.8 ms with 1 layer, 16.2 ms with 2 and 21.0 ms
    with 4, against 56.9 ms for the 30-layer target: the tied 576 x 49152 head and per-call
    overhead dominate, so a second layer is nearly free while 4 add a third. Two layers also keep
    the bf16 weights file at ~14 MB.
    """
    return min(2, int(config.num_hidden_layers))


def init_layer_indices(n_target: int, n_draft: int, how: str) -> list[int]:
    """Target layers copied into the draft: ``first``, ``last`` or ``spaced`` (evenly, first and last included).

    On SmolLM2-135M with 2 layers, before training, the held-out KL(target || draft) was 15.0
    nats/token for ``first``, 22.3 for ``last`` and 70.8 for ``spaced`` (4 sequences,
    ``benchmarks/distill_embedded.py --steps 2 --device cpu``): hence the default ``first``."""
    if how == "first":
        return list(range(n_draft))
    if how == "last":
        return list(range(n_target - n_draft, n_target))
    if n_draft == 1:
        return [n_target - 1]
    return [round(i * (n_target - 1) / (n_draft - 1)) for i in range(n_draft)]


def build_draft(target: PreTrainedModel, indices: Sequence[int]) -> PreTrainedModel:
    """A trainable draft: copies of the target layers ``indices`` and final norm, sharing the frozen
    embedding, head and rotary embedding of the target."""
    import copy

    draft = draft_dir.shell_draft(target, len(indices))
    layers = []
    for new_idx, old_idx in enumerate(indices):
        layer = copy.deepcopy(target.model.layers[old_idx])
        # The KV cache is indexed by layer_idx: the copy must use its new position.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
        layers.append(layer)
    draft.model.layers = nn.ModuleList(layers)
    draft.model.norm = copy.deepcopy(target.model.norm)
    for p in draft.parameters():
        p.requires_grad_(False)
    for p in [*draft.model.layers.parameters(), *draft.model.norm.parameters()]:
        p.requires_grad_(True)
    return draft


def _lr_scale(progress: float, warmup: float) -> float:
    if progress < warmup:
        return (progress + 1e-3) / warmup
    rest = (progress - warmup) / max(1e-9, 1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_curve(history: list[tuple[int, float]], out: Path, title: str, ylabel: str) -> None:
    """The loss curve as ``loss.csv`` and, when matplotlib is installed, ``loss.png`` (it is an
    optional dependency: without it the run warns and keeps going)."""
    lines = ["step,loss"] + [f"{s},{loss:.6g}" for s, loss in history]
    (out / "loss.csv").write_text("\n".join(lines) + "\n")
    try:
        _plot(history, out / "loss.png", title, ylabel)
    except ImportError:
        # the default warnings filter shows this once per process, not at every timed checkpoint
        warnings.warn(
            "smcgen distill: matplotlib is not installed, so loss.png is not drawn (the curve is in "
            "loss.csv); `pip install matplotlib` adds the plot",
            stacklevel=2,
        )


def _plot(history: list[tuple[int, float]], path: Path, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, lw=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def distill(
    target: LanguageModel | PreTrainedModel | str,
    out_dir: str | Path,
    config: DistillConfig | None = None,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    corpus: str | Path | None = None,
    target_name: str | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a draft for ``target`` and write it to ``out_dir``; returns the manifest.

    ``prompts`` (token ids) replace the built-in chat prompts (needed when the target has no
    tokenizer); ``corpus`` adds prompts cut from a text file. ``config`` fields can be overridden by
    keyword (``steps=100``). ``resume=True`` continues from ``out_dir/checkpoint.pt``; a run is
    deterministic given ``seed`` on one device (and resumes to the same weights as an unbroken run).
    ``on_step(step, loss)`` is called after every optimiser step (and after its checkpoint, if due).
    The target is trained against on its own device (bf16 autocast on CUDA).
    """
    from tqdm.auto import tqdm

    from smcgen.api import as_language_model

    cfg = DistillConfig(**{**(asdict(config) if config else {}), **overrides})
    lm = as_language_model(target)
    if target_name is None:
        target_name = target if isinstance(target, str) else getattr(lm.model.config, "_name_or_path", "") or None
    model = lm.model.eval()
    model.requires_grad_(False)
    n_target = int(model.config.num_hidden_layers)
    check_config(cfg, n_target)
    start_from = None
    if cfg.init_from is not None:  # continue a trained draft, e.g. with another divergence or on-policy rounds
        if not draft_dir.is_draft_dir(cfg.init_from):
            raise ValueError(f"init_from must be a draft directory (smcgen distill's output), got {cfg.init_from!r}")
        start_from = draft_dir.load_draft(cfg.init_from, model)  # checks it was trained for this target
        n_start = int(start_from.config.num_hidden_layers)
        if n_start > n_target:
            raise ValueError(f"init_from has {n_start} layers, more than the target's {n_target}")
        if cfg.layers is not None and cfg.layers != n_start:
            raise ValueError(f"layers ({cfg.layers}) must match init_from's {n_start} layers, or be left out")
    layers = cfg.layers or (n_start if start_from is not None else default_layers(model.config))
    device = model.get_input_embeddings().weight.device
    autocast = device.type == "cuda"

    pool_prompts: list[list[int]] = [list(p) for p in prompts] if prompts is not None else []
    if prompts is None and lm.tokenizer is not None and getattr(lm.tokenizer, "chat_template", None):
        pool_prompts += chat_prompts(lm.tokenizer)
    if corpus is not None:
        if lm.tokenizer is None:
            raise ValueError("corpus needs a target with a tokenizer")
        pool_prompts += corpus_prompts(lm.tokenizer, corpus)
    if not pool_prompts or any(len(p) == 0 for p in pool_prompts):
        raise ValueError(
            "no prompts: give prompts (non-empty id lists), a corpus, or a target whose tokenizer has a chat template"
        )

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    indices = init_layer_indices(n_target, layers, cfg.init)
    draft = build_draft(model, indices)
    if start_from is not None:
        with torch.no_grad():
            mine = draft.state_dict()
            for name, tensor in draft_dir.own_state(start_from).items():
                mine[name].copy_(tensor)
        del start_from
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eval_gen = torch.Generator(device=device).manual_seed(cfg.seed + 7919)
    eos = lm.eos_token_ids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    step, elapsed, history, skipped = 0, 0.0, [], 0
    sample_s = 0.0  # of elapsed: sampling the training sequences (the rest is optimiser steps)
    rounds = 0  # sampling rounds so far (which model samples a round follows from it and on_policy)
    pool: SampleBatch | None = None
    pool_cursor = 0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        # a checkpoint of another objective would switch it mid-run (older checkpoints: forward, no on-policy)
        old = {"divergence": "forward", "on_policy": 0.0, **ck.get("config", {})}
        changed = [k for k in ("divergence", "on_policy", "temperature") if old.get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(
                f"checkpoint {ckpt_path} was trained with "
                + ", ".join(f"{k}={old.get(k)!r}" for k in changed)
                + "; resume with the same settings or start a new out_dir"
            )
        if ck["indices"] != indices:
            raise ValueError(f"checkpoint {ckpt_path} is for draft layers {ck['indices']}, this run builds {indices}")
        draft.load_state_dict(ck["draft"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"].cpu())  # generator states are CPU byte tensors whatever the device
        step, elapsed, history = ck["step"], ck["elapsed"], ck["history"]
        sample_s, rounds = ck.get("sample_s", 0.0), ck.get("rounds", 0)
        pool = SampleBatch(*(t.to(device) for t in ck["pool"])) if ck["pool"] is not None else None
        pool_cursor = ck["pool_cursor"]
    elif resume and progress:
        print(f"[smcgen distill] no checkpoint in {out}; starting afresh")

    def save_checkpoint(plot: bool = False) -> None:
        state = {
            "indices": indices,
            "draft": draft_dir.own_state(draft),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "step": step,
            "elapsed": elapsed,
            "sample_s": sample_s,
            "rounds": rounds,
            "history": history,
            "pool": None if pool is None else (pool.ids, pool.real, pool.scored),
            "pool_cursor": pool_cursor,
            "config": asdict(cfg),
        }
        torch.save(state, out / "checkpoint.pt.tmp")
        (out / "checkpoint.pt.tmp").replace(ckpt_path)
        if plot:  # matplotlib costs a second or two: only at the end and on timed checkpoints
            ylabel = {"forward": "KL(target || draft)", "reverse": "KL(draft || target)"}.get(
                cfg.divergence, "mean of both KL directions"
            )
            _write_curve(
                history, out, f"smcgen distill: {layers}-layer draft of {target_name}", ylabel + ", nats/token"
            )

    budget_s = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    total_steps = cfg.steps if cfg.steps is not None else None
    micro = cfg.micro_batch or cfg.batch_size
    per_pool = max(1, cfg.sample_batch * cfg.reuse // cfg.batch_size)
    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc="distill", unit="step")
    last_ckpt = time.perf_counter()
    started = time.perf_counter() - elapsed
    draft.train()

    def done() -> bool:
        return (total_steps is not None and step >= total_steps) or (time.perf_counter() - started >= budget_s)

    while not done():
        if pool is None or pool_cursor >= per_pool:
            t_sample = time.perf_counter()
            # on-policy rounds train on the draft's own continuations: the prefixes SMC-SD's particles
            # condition on are the draft's, and target samples alone never show it its own mistakes
            by_draft = math.floor((rounds + 1) * cfg.on_policy) > math.floor(rounds * cfg.on_policy)
            sampler = draft.eval() if by_draft else model
            pool = sample_from_target(
                sampler, pool_prompts, cfg.sample_batch, cfg.max_new_tokens, eos, gen, autocast, cfg.temperature
            )
            draft.train()
            rounds += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so the sampling time is the sampling's, not the next step's
            sample_s += time.perf_counter() - t_sample
            pool_cursor = 0
        # Each step takes the next batch_size rows of the pool, wrapping for reuse passes.
        rows = [(pool_cursor * cfg.batch_size + i) % cfg.sample_batch for i in range(cfg.batch_size)]
        batch = SampleBatch(pool.ids[rows], pool.real[rows], pool.scored[rows])
        pool_cursor += 1
        elapsed_now = time.perf_counter() - started
        frac = max(step / total_steps if total_steps else 0.0, elapsed_now / budget_s)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_scale(frac, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        n_scored = max(1, int(batch.scored.sum()))
        loss_sum = 0.0
        for start in range(0, cfg.batch_size, micro):
            part = batch.slice(slice(start, start + micro))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                with torch.no_grad():
                    t_logits = _logits(model, part)[part.scored]
                d_logits = _logits(draft, part)[part.scored]
            loss = divergence_terms(t_logits, d_logits, cfg.temperature, cfg.divergence).sum() / n_scored
            loss.backward()
            loss_sum += float(loss.detach())
        if math.isfinite(loss_sum):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        else:  # one bad batch (e.g. a fully masked attention row on some kernel) must not poison the weights
            skipped += 1
            opt.zero_grad(set_to_none=True)
        step += 1
        history.append((step, loss_sum))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        elapsed = time.perf_counter() - started
        if time.perf_counter() - last_ckpt >= cfg.checkpoint_minutes * 60:
            save_checkpoint(plot=cfg.checkpoint_minutes >= 1)
            last_ckpt = time.perf_counter()
        if on_step is not None:
            on_step(step, loss_sum)
    bar.close()
    elapsed = time.perf_counter() - started
    draft.eval()
    save_checkpoint(plot=True)

    metrics: dict[str, float] = {}
    if cfg.eval_sequences:
        held_out = sample_from_target(
            model, pool_prompts, cfg.eval_sequences, cfg.max_new_tokens, eos, eval_gen, autocast, cfg.temperature
        )
        metrics = evaluate_draft(model, draft, held_out, micro, autocast, cfg.temperature)
    manifest = {
        "target": target_name,
        "target_embedding_sha256": draft_dir.embedding_checksum(model),
        "layers": layers,
        # a continued draft keeps the record of the target layers it first came from
        "init_layers": draft_dir.read_manifest(cfg.init_from).get("init_layers") if cfg.init_from else indices,
        "steps": step,
        "skipped_nonfinite_steps": skipped,
        "seed": cfg.seed,
        "train_seconds": round(elapsed, 1),
        "sample_seconds": round(sample_s, 3),
        "device": str(device),
        "commit": _git_commit(),
        "recipe": asdict(cfg),
        "held_out": metrics,
        "torch": torch.__version__,
    }
    draft_dir.save_draft(draft, out, manifest, getattr(torch, cfg.dtype))
    if progress:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(
            f"[smcgen distill] {step} steps in {elapsed:.0f} s; wrote {out / draft_dir.WEIGHTS_FILE}; held-out: {summary}"
        )
    return manifest


__all__ = [
    "INSTRUCTIONS",
    "DIVERGENCES",
    "DistillConfig",
    "SampleBatch",
    "build_draft",
    "chat_prompts",
    "check_config",
    "corpus_prompts",
    "default_layers",
    "divergence_terms",
    "distill",
    "evaluate_draft",
    "init_layer_indices",
    "kl_terms",
    "sample_from_target",
]
