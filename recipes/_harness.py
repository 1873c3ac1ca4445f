"""Shared harness of the grammar recipes: run each method on one task and print a Markdown table.

Methods (all on the embedded SmolLM2-135M-Instruct, prompt in its chat template, target p_tau):
- unconstrained: ancestral sampling from p_tau (plain SMC with one particle, no grammar);
- plain masking: one particle, every token drawn from p_tau masked to the grammar (what outlines
  and most servers do); it samples prod_t p(x_t | x_<t, mask), not p(x | x in the language);
- SMC N=4 / N=8: plain SMC with the masked target, weights log sum_{allowed} p (DESIGN.md),
  resampling at ESS < N/2; the answer is one particle drawn by weight;
- SMC-SD N=8, K=4 (``--draft``): the masked early-exit draft plus the masked bonus token.

Metrics per sample: validity (the task's own checker: jsonschema / ast.parse / sqlite3), the
target's per-token log-likelihood log p_tau(x) / |x| (EOS included), seconds per sample (wall
time of a batch of groups / samples in it; samples of one method run as groups of one batch).
A masked sample that hits the length limit before the grammar can end has weight zero; it is
returned as its partial text, counted invalid and listed in the "cut" column.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import smcgen
from smcgen import SMC, GrammarPotential, LMPotential, MaskedLMProposal, SMCConfig
from smcgen.api import load_model


@dataclass
class Task:
    title: str
    prompt: str
    grammar: GrammarPotential  # unbound; bound to the model here
    validate: Callable[[str], bool]
    max_new_tokens: int
    system: str | None = None
    prefix: str = ""  # the start of the assistant's reply, given (the grammar constrains what follows)


@dataclass
class Method:
    name: str
    n_particles: int
    masked: bool
    draft: bool = False


METHODS = {
    "unconstrained": Method("unconstrained", 1, False),
    "masking": Method("plain masking", 1, True),
    "smc4": Method("SMC N=4", 4, True),
    "smc8": Method("SMC N=8", 8, True),
    "smcsd8": Method("SMC-SD N=8, K=4", 8, True, draft=True),
}


@dataclass
class Sample:
    text: str
    tokens: list[int]
    valid: bool
    cut: bool
    loglik_per_token: float


def parse_args(description: str, default_samples: int) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--samples", type=int, default=default_samples, help="samples per method")
    ap.add_argument("--methods", default="unconstrained,masking,smc4,smc8",
                    help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--draft", action="store_true", help="also run SMC-SD N=8, K=4 with the masked draft")
    ap.add_argument("--temperature", type=float, default=0.7, help="target temperature tau")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64, help="particle rows per batch (groups x N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=1, help="example outputs printed per method")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.draft and "smcsd8" not in args.methods:
        args.methods += ",smcsd8"
    return args


def strip_fence(text: str, lang: str) -> str:
    """``text`` without a surrounding Markdown code fence (```lang ... ```), if it has one."""
    return re.sub(rf"^\s*```(?:{lang})?\s*|\s*```\s*$", "", text)


def chat_prompt(lm, task: Task) -> list[int]:
    messages = ([{"role": "system", "content": task.system}] if task.system else []) + [
        {"role": "user", "content": task.prompt}
    ]
    ids = list(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return ids + list(lm.tokenizer(task.prefix, add_special_tokens=False)["input_ids"]) if task.prefix else ids


def run_method(lm, draft_lm, task: Task, grammar: GrammarPotential, method: Method, ids: list[int],
               n_samples: int, args: argparse.Namespace) -> tuple[list[Sample], float, dict]:
    """``n_samples`` answers of one method, batched as groups; returns samples, s/sample, grammar stats."""
    cfg = SMCConfig(n_particles=method.n_particles, block_size=4, max_new_tokens=task.max_new_tokens,
                    target_temperature=args.temperature, draft_temperature=args.temperature, seed=args.seed)
    target = LMPotential(lm, temperature=args.temperature)
    per_batch = max(1, args.batch // method.n_particles)
    chooser = torch.Generator().manual_seed(args.seed + 1)
    samples: list[Sample] = []
    wall = 0.0
    grammar.stats.reset()
    done = 0
    while done < n_samples:
        groups = min(per_batch, n_samples - done)
        mask = grammar if method.masked else None
        proposal = MaskedLMProposal(draft_lm, grammar, temperature=args.temperature) if method.draft else None
        smc = SMC(target, cfg.model_copy(update={"seed": args.seed + done}), proposal=proposal, mask=mask)
        t0 = time.perf_counter()
        out = smc.run(ids, n_groups=groups, on_dead="flag")
        wall += time.perf_counter() - t0
        for b in range(groups):
            w = out.log_weights[b].exp()
            dead = bool(out.dead[b])
            i = 0 if dead else int(torch.multinomial(w, 1, generator=chooser))
            toks = out.tokens[b, i, : out.lengths[b, i]].tolist()
            text = lm.tokenizer.decode(toks, skip_special_tokens=True)
            samples.append(Sample(text, toks, (not dead) and task.validate(task.prefix + text), dead, math.nan))
        done += groups
    _score(lm, ids, samples, args.temperature)
    stats = {"mask_rows": grammar.stats.mask_rows, "mask_us": grammar.stats.mask_us_per_row,
             "forks": grammar.stats.forks, "fork_s": grammar.stats.fork_seconds}
    return samples, wall / n_samples, stats


@torch.inference_mode()
def _score(lm, ids: list[int], samples: list[Sample], temperature: float, chunk: int = 16) -> None:
    """log p_tau(x) / |x| of each sample, the prompt prefilled once per chunk (its KV cache shared)."""
    from smcgen.backends.transformers_lm import CausalLMRunner
    from smcgen.sampling import log_probs

    prompt = torch.tensor(ids)
    pad = lm.eos_token_ids[0] if lm.eos_token_ids else 0
    scored = [s for s in samples if s.tokens]
    for k in range(0, len(scored), chunk):
        part = scored[k : k + chunk]
        width = max(len(s.tokens) for s in part)
        cont = torch.tensor([s.tokens + [pad] * (width - len(s.tokens)) for s in part])
        runner = CausalLMRunner(lm)
        runner.start(prompt[None], len(part))
        logits = runner.forward_new(torch.cat([prompt.expand(len(part), -1), cont], dim=1))[:, -(width + 1) : -1]
        token_lp = log_probs(logits, temperature).gather(-1, cont[:, :, None]).squeeze(-1).double()
        for i, s in enumerate(part):
            s.loglik_per_token = float(token_lp[i, : len(s.tokens)].sum()) / len(s.tokens)


def mean_se(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
    return statistics.fmean(vals), se


def main(task: Task, default_samples: int, description: str) -> None:
    args = parse_args(description, default_samples)
    torch.manual_seed(args.seed)
    if args.max_new_tokens:
        task.max_new_tokens = args.max_new_tokens
    lm = load_model("smollm2-135m", "cpu")
    draft_lm = load_model("smollm2-135m-draft", "cpu") if "smcsd8" in args.methods else None
    grammar = task.grammar.bind(lm)
    ids = chat_prompt(lm, task)
    methods = [METHODS[m.strip()] for m in args.methods.split(",") if m.strip()]
    print(f"# {task.title}")
    print(f"model: SmolLM2-135M-Instruct (embedded), CPU, {torch.get_num_threads()} torch threads "
          f"({platform.machine()}); target temperature {args.temperature}; max_new_tokens {task.max_new_tokens}; "
          f"{args.samples} samples per method; seed {args.seed}; smcgen {smcgen.__version__}")
    print(f"grammar: {grammar.name}")
    rows, examples = [], []
    t_all = time.perf_counter()
    for method in methods:
        samples, s_per, stats = run_method(lm, draft_lm, task, grammar, method, ids, args.samples, args)
        valid = sum(s.valid for s in samples)
        m, se = mean_se([s.loglik_per_token for s in samples])
        mv, _ = mean_se([s.loglik_per_token for s in samples if s.valid])
        cut = sum(s.cut for s in samples)
        mask = f"{stats['mask_us']:.0f}" if method.masked and stats["mask_rows"] else "-"
        rows.append(f"| {method.name} | {len(samples)} | {valid / len(samples):.0%} ({valid}/{len(samples)}) | "
                    f"{m:.3f} ± {se:.3f} | {mv:.3f} | {statistics.fmean(len(s.tokens) for s in samples):.1f} | "
                    f"{cut} | {s_per:.2f} | {mask} |")
        examples.extend((method.name, s) for s in samples[: args.show])
    print()
    print("| method | samples | valid | per-token log p_tau (mean ± s.e., all) | ... valid only | tokens | cut | "
          "s / sample | mask µs / particle-step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")
    for name, s in examples:
        print(f"\n[{name}] valid={s.valid} log p/token={s.loglik_per_token:.3f}\n{task.prefix}{s.text}")
