"""``smcgen.distill``: train a small draft for a Llama/Qwen-family target from the target alone.

The draft is the target's architecture with a few decoder layers (initialised from chosen target
layers) on top of the target's own embedding and LM head, which stay frozen and shared, so the
draft file holds only the new layers and final norm. Training is sequence-level distillation on
the target's own samples: each round the target samples continuations of prompts (chat-template
prompts from a built-in list of varied instructions, plus optional corpus text, or given ids) at
the sampling temperature (``temperature``, 1 by default), and the draft minimises KL(target || draft)
of the full next-token distributions, both tempered the same way, at every generated position: a
draft meant for SMC-SD at temperature 0.7 is best trained at 0.7, since the importance weights
compare the tempered distributions. Because the samples come from the target, not the draft, a pool of them
can serve several optimiser steps.

Outputs (in ``out_dir``): ``draft.safetensors`` + ``config.json`` + ``manifest.json`` (see
:mod:`smcgen.models.draft_dir`), ``loss.png`` and ``checkpoint.pt`` for ``resume=True``.
"""

from __future__ import annotations

import math
import random
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from smcgen.models import draft_dir
from smcgen.runners.transformers import LanguageModel

# Varied instructions (writing, explaining, coding, math, lists, dialogue, rewriting) so the
# target's samples cover the registers a chat draft will meet.
INSTRUCTIONS: tuple[str, ...] = (
    "Write a short poem about the sea.",
    "Explain how photosynthesis works in simple terms.",
    "Give me three tips for staying focused while studying.",
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "What are the benefits of regular exercise?",
    "Tell me a short story about a robot who learns to paint.",
    "How do I make a cup of green tea?",
    "List five fruits that are high in vitamin C.",
    "What is 17 times 23? Show your work.",
    "Write a polite email declining a meeting invitation.",
    "Explain the difference between weather and climate.",
    "Describe a sunset over the mountains.",
    "What causes the seasons on Earth?",
    "Give me a recipe for a simple pancake breakfast.",
    "Write a haiku about autumn leaves.",
    "How does a computer store information?",
    "What should I pack for a weekend camping trip?",
    "Explain what a neural network is to a ten-year-old.",
    "Write a JavaScript function that checks whether a number is prime.",
    "What are some good habits for better sleep?",
    "Compare cats and dogs as pets.",
    "Why is the sky blue?",
    "Write a limerick about a cat who loves cheese.",
    "Explain the water cycle step by step.",
    "Suggest a name for a coffee shop and explain why.",
    "What is the Pythagorean theorem? Give an example.",
    "Write a short dialogue between a teacher and a student about homework.",
    "How can I reduce plastic waste at home?",
    "Describe the main features of the Roman Empire.",
    "What is the difference between a virus and a bacterium?",
    "Write a motivational message for someone starting a new job.",
    "Explain how to solve the equation 2x + 5 = 13.",
    "What are the planets of the solar system, in order?",
    "Rewrite this sentence to sound more formal: 'We gotta finish this soon.'",
    "Give me a list of ideas for a birthday party.",
    "How do vaccines help the immune system?",
    "Write a SQL query that selects all users older than 30.",
    "What is the meaning of the word 'ephemeral'? Use it in a sentence.",
    "Describe your ideal weekend.",
    "Explain why saving money is important.",
    "What happens when you boil water at high altitude?",
    "Write a short product description for a reusable water bottle.",
    "Give three arguments for and against homework in school.",
    "How do bees make honey?",
    "Write a thank-you note to a friend who helped you move.",
    "What is machine learning?",
    "Tell me a fun fact about octopuses.",
    "Explain what inflation is and how it affects people.",
    "Write a short speech for a school graduation.",
    "How do I change a flat tire?",
    "What are prime numbers? List the first ten.",
    "Describe the taste of a lemon to someone who has never had one.",
    "Write a bash command that counts the lines in a file.",
    "What is the role of the heart in the human body?",
    "Give me advice for a job interview.",
    "Write a story that begins with 'It was a dark and stormy night.'",
    "Explain recursion with an example.",
    "Hi! How are you today?",
    "What is the tallest mountain in the world?",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "Write a tweet announcing a new bakery opening.",
)


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


def chat_prompts(tokenizer: Any, instructions: Sequence[str] = INSTRUCTIONS) -> list[list[int]]:
    """Token ids of each instruction wrapped in the tokenizer's chat template (generation prompt added)."""
    return [
        list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
        for text in instructions
    ]


def corpus_prompts(tokenizer: Any, path: str | Path, max_prompts: int = 2000, prefix_tokens: int = 48) -> list[list[int]]:
    """Prompts cut from a text file: each non-empty paragraph's first ``prefix_tokens`` tokens."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()] or [text]
    out = []
    for para in paragraphs[:max_prompts]:
        ids = tokenizer(para, add_special_tokens=False)["input_ids"][:prefix_tokens]
        if len(ids) >= 2:
            out.append(list(ids))
    if not out:
        raise ValueError(f"corpus {path} has no paragraph of at least 2 tokens")
    return out


@dataclass
class SampleBatch:
    """Left-padded target samples: ``ids`` [B, T]; ``real`` marks non-pad tokens (prompt and sample up to EOS);
    ``scored`` marks the positions whose next-token distributions enter the loss (last prompt token onward)."""

    ids: Tensor
    real: Tensor
    scored: Tensor

    def slice(self, rows: slice) -> SampleBatch:
        return SampleBatch(self.ids[rows], self.real[rows], self.scored[rows])


def _positions(real: Tensor) -> Tensor:
    return (real.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_from_target(
    target: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    generator: torch.Generator,
    autocast: bool = False,
    temperature: float = 1.0,
) -> SampleBatch:
    """``n`` samples of the target at ``temperature``, each continuing a prompt drawn (with ``generator``) from
    ``prompts``."""
    device = target.get_input_embeddings().weight.device
    pick = torch.randint(len(prompts), (n,), generator=generator, device=generator.device).tolist()
    chosen = [list(prompts[i]) for i in pick]
    width = max(len(p) for p in chosen)
    pad = int(eos_ids[0]) if eos_ids else 0
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    real = torch.zeros((n, width), dtype=torch.bool, device=device)
    for row, p in enumerate(chosen):
        ids[row, width - len(p):] = torch.tensor(p, device=device)
        real[row, width - len(p):] = True
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    cache = DynamicCache()
    new_ids, new_real = [], []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    attn = real.long()
    pos = _positions(real)
    step_in, step_pos = ids, pos
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(max_new_tokens):
            logits = target(input_ids=step_in, attention_mask=attn, position_ids=step_pos,
                            past_key_values=cache, use_cache=True).logits[:, -1].float()
            probs = torch.softmax(logits / temperature, -1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            new_ids.append(tok)
            new_real.append(~done)
            done = done | torch.isin(tok, eos)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            step_pos = step_pos[:, -1:] + 1
            step_in = tok[:, None]
    gen_ids, gen_real = torch.stack(new_ids, 1), torch.stack(new_real, 1)
    all_ids, all_real = torch.cat([ids, gen_ids], 1), torch.cat([real, gen_real], 1)
    scored = torch.zeros_like(all_real)
    scored[:, width - 1] = True  # the last prompt position predicts the first sampled token
    # A sampled token's position predicts the next one; the row's final token (EOS or cut) predicts nothing used.
    scored[:, width:-1] = gen_real[:, :-1] & gen_real[:, 1:]
    return SampleBatch(all_ids, all_real, scored)


def _logits(model: PreTrainedModel, batch: SampleBatch) -> Tensor:
    return model(input_ids=batch.ids, attention_mask=batch.real.long(), position_ids=_positions(batch.real)).logits


def kl_terms(target_logits: Tensor, draft_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-position KL(target || draft) in nats over the full vocabulary, both at ``temperature`` (float32 math)."""
    log_p = torch.log_softmax(target_logits.float() / temperature, -1)
    log_q = torch.log_softmax(draft_logits.float() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def evaluate_draft(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    batch: SampleBatch,
    micro_batch: int = 8,
    autocast: bool = False,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Mean over scored positions of KL(target || draft), top-1 agreement and sum_v min(p, q) (the
    expected acceptance of one drafted token; a per-token proxy of ESS/N), all at ``temperature``."""
    kl = agree = overlap = count = 0.0
    device = batch.ids.device
    for start in range(0, batch.ids.shape[0], micro_batch):
        part = batch.slice(slice(start, start + micro_batch))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            t, d = _logits(target, part), _logits(draft, part)
        m = part.scored
        t, d = t[m].float() / temperature, d[m].float() / temperature
        kl += float(kl_terms(t, d).sum())
        agree += float((t.argmax(-1) == d.argmax(-1)).sum())
        overlap += float(torch.minimum(t.softmax(-1), d.softmax(-1)).sum())
        count += float(m.sum())
    count = max(count, 1.0)
    return {"kl": kl / count, "top1_agreement": agree / count, "overlap": overlap / count, "positions": count}


def _lr_scale(progress: float, warmup: float) -> float:
    if progress < warmup:
        return (progress + 1e-3) / warmup
    rest = (progress - warmup) / max(1e-9, 1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=False,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _plot(history: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, lw=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("KL(target || draft), nats/token")
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
    layers = cfg.layers or default_layers(model.config)
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
        raise ValueError("no prompts: give prompts (non-empty id lists), a corpus, or a target whose tokenizer has a "
                         "chat template")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    indices = init_layer_indices(n_target, layers, cfg.init)
    draft = build_draft(model, indices)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eval_gen = torch.Generator(device=device).manual_seed(cfg.seed + 7919)
    eos = lm.eos_token_ids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    step, elapsed, history, skipped = 0, 0.0, [], 0
    pool: SampleBatch | None = None
    pool_cursor = 0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["indices"] != indices:
            raise ValueError(f"checkpoint {ckpt_path} is for draft layers {ck['indices']}, this run builds {indices}")
        draft.load_state_dict(ck["draft"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"].cpu())  # generator states are CPU byte tensors whatever the device
        step, elapsed, history = ck["step"], ck["elapsed"], ck["history"]
        pool = SampleBatch(*(t.to(device) for t in ck["pool"])) if ck["pool"] is not None else None
        pool_cursor = ck["pool_cursor"]
    elif resume and progress:
        print(f"[smcgen distill] no checkpoint in {out}; starting afresh")

    def save_checkpoint(plot: bool = False) -> None:
        state = {
            "indices": indices, "draft": draft_dir.own_state(draft), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "step": step, "elapsed": elapsed, "history": history,
            "pool": None if pool is None else (pool.ids, pool.real, pool.scored), "pool_cursor": pool_cursor,
            "config": asdict(cfg),
        }
        torch.save(state, out / "checkpoint.pt.tmp")
        (out / "checkpoint.pt.tmp").replace(ckpt_path)
        if plot:  # matplotlib costs a second or two: only at the end and on timed checkpoints
            _plot(history, out / "loss.png", f"smcgen distill: {layers}-layer draft of {target_name}")

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
            pool = sample_from_target(model, pool_prompts, cfg.sample_batch, cfg.max_new_tokens, eos, gen, autocast,
                                      cfg.temperature)
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
            loss = kl_terms(t_logits, d_logits, cfg.temperature).sum() / n_scored
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
        bar.set_postfix(kl=f"{loss_sum:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
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
        held_out = sample_from_target(model, pool_prompts, cfg.eval_sequences, cfg.max_new_tokens, eos, eval_gen,
                                      autocast, cfg.temperature)
        metrics = evaluate_draft(model, draft, held_out, micro, autocast, cfg.temperature)
    manifest = {
        "target": target_name,
        "target_embedding_sha256": draft_dir.embedding_checksum(model),
        "layers": layers,
        "init_layers": indices,
        "steps": step,
        "skipped_nonfinite_steps": skipped,
        "seed": cfg.seed,
        "train_seconds": round(elapsed, 1),
        "device": str(device),
        "commit": _git_commit(),
        "recipe": asdict(cfg),
        "held_out": metrics,
        "torch": torch.__version__,
    }
    draft_dir.save_draft(draft, out, manifest, getattr(torch, cfg.dtype))
    if progress:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[smcgen distill] {step} steps in {elapsed:.0f} s; wrote {out / draft_dir.WEIGHTS_FILE}; held-out: {summary}")
    return manifest


__all__ = [
    "INSTRUCTIONS",
    "DistillConfig",
    "SampleBatch",
    "build_draft",
    "chat_prompts",
    "check_config",
    "corpus_prompts",
    "default_layers",
    "distill",
    "evaluate_draft",
    "init_layer_indices",
    "kl_terms",
    "sample_from_target",
]
