"""Shared harness of the grammar recipes: run each method on one task and print a Markdown table.

Methods (all on the embedded SmolLM2-135M-Instruct, prompt in its chat template, target p_tau):
- unconstrained: ancestral sampling from p_tau (plain SMC with one particle, no grammar);
- plain masking: one particle, every token drawn from p_tau masked to the grammar (what outlines
  and most servers do); it samples prod_t p(x_t | x_<t, mask), not p(x | x in the language);
- SMC N=4 / N=8: plain SMC with the masked target, weights log sum_{allowed} p (docs/math.md),
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
from tqdm.auto import tqdm

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
    ap.add_argument(
        "--methods", default="unconstrained,masking,smc4,smc8", help=f"comma-separated, from {', '.join(METHODS)}"
    )
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


def run_method(
    lm,
    draft_lm,
    task: Task,
    grammar: GrammarPotential,
    method: Method,
    ids: list[int],
    n_samples: int,
    args: argparse.Namespace,
) -> tuple[list[Sample], float, dict]:
    """``n_samples`` answers of one method, batched as groups; returns samples, s/sample, grammar stats."""
    cfg = SMCConfig(
        n_particles=method.n_particles,
        block_size=4,
        max_new_tokens=task.max_new_tokens,
        target_temperature=args.temperature,
        draft_temperature=args.temperature,
        seed=args.seed,
    )
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
    stats = {
        "mask_rows": grammar.stats.mask_rows,
        "mask_us": grammar.stats.mask_us_per_row,
        "forks": grammar.stats.forks,
        "fork_s": grammar.stats.fork_seconds,
    }
    return samples, wall / n_samples, stats


@torch.inference_mode()
def _score(lm, ids: list[int], samples: list[Sample], temperature: float, chunk: int = 16) -> None:
    """log p_tau(x) / |x| of each sample, the prompt prefilled once per chunk (its KV cache shared)."""
    from smcgen.core.sampling import log_probs
    from smcgen.runners.transformers import CausalLMRunner

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
    print(
        f"model: SmolLM2-135M-Instruct (embedded), CPU, {torch.get_num_threads()} torch threads "
        f"({platform.machine()}); target temperature {args.temperature}; max_new_tokens {task.max_new_tokens}; "
        f"{args.samples} samples per method; seed {args.seed}; smcgen {smcgen.__version__}"
    )
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
        rows.append(
            f"| {method.name} | {len(samples)} | {valid / len(samples):.0%} ({valid}/{len(samples)}) | "
            f"{m:.3f} ± {se:.3f} | {mv:.3f} | {statistics.fmean(len(s.tokens) for s in samples):.1f} | "
            f"{cut} | {s_per:.2f} | {mask} |"
        )
        examples.extend((method.name, s) for s in samples[: args.show])
    print()
    print(
        "| method | samples | valid | per-token log p_tau (mean ± s.e., all) | ... valid only | tokens | cut | "
        "s / sample | mask µs / particle-step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")
    for name, s in examples:
        print(f"\n[{name}] valid={s.valid} log p/token={s.loglik_per_token:.3f}\n{task.prefix}{s.text}")


# ============================================================================================
# Reward recipes: SMC against best-of-N with the same generated tokens, and plain sampling.
#
# A RewardTask gives cases (prompts), a reward on the finished text (what best-of-N selects by),
# optionally a success test (the metric when given) and the potential SMC runs with (the reward
# as exp(beta R), with or without a prefix twist, or a hard constraint). Per case, G groups:
# - best-of-N: one run of 16 independent samples per group (plain SMC with no potential: uniform
#   weights, no resampling); "plain sampling" is each group's first sample and best-of-4 / -8 /
#   -16 the best by reward among its first 4 / 8 / 16 (nested subsets of i.i.d. samples);
# - SMC N = 4, 8, 16 with the task's potential, answer = one particle drawn by final weight.
# Compute = tokens generated per answer (every particle's tokens, counted by the step loop's
# recorder hook), wall time includes the reward's own cost (a judge model, running tests).
# ============================================================================================


@dataclass
class Case:
    """One prompt of a reward task; ``data`` is whatever the task's reward needs (keywords, tests)."""

    prompt: str
    data: object = None
    prefix: str = ""  # the start of the assistant's reply, given
    system: str | None = None


@dataclass
class RewardTask:
    """A reward recipe: ``reward(case, texts) -> list[float]`` (batched), ``success(case, text)``
    (optional), ``potential(case, lm, args) -> Potential`` for SMC, and how to sample."""

    title: str
    cases: list[Case]
    reward: Callable
    potential: Callable
    max_new_tokens: int
    success: Callable | None = None
    temperature: float = 1.0
    metric_note: str = ""


@dataclass
class Answer:
    case: int
    group: int
    text: str
    tokens: list[int]
    reward: float
    success: float
    loglik_per_token: float = math.nan


@dataclass
class MethodResult:
    name: str
    kind: str  # "plain", "best-of-N", "SMC"
    n: int
    answers: list[Answer]
    tokens_per_answer: float
    seconds: float  # wall time of the method over all answers (generation + reward)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_answer * len(self.answers) / self.seconds if self.seconds else math.nan


class TokenCounter:
    """A recorder for ``SMC.run``: counts the tokens every particle generated (the compute spent)."""

    def __init__(self):
        self.tokens = 0

    def record(self, block, valid, log_weights, ess, ancestors) -> None:
        self.tokens += int(valid.sum())


def reward_args(description: str, groups: int, cases: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="target model: embedded name, local path or hub id")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--groups", type=int, default=groups, help="independent runs (seeds) per prompt and method")
    ap.add_argument("--cases", type=int, default=cases, help="prompts used (the first ones of the task)")
    ap.add_argument("--particles", default="4,8,16", help="SMC particle counts (best-of-N uses the same N)")
    ap.add_argument("--temperature", type=float, default=None, help="target temperature tau (default: the task's)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--plot", default=None, help="PNG path of the quality-vs-compute plot (default: <recipe>.png)")
    ap.add_argument("--show", type=int, default=1, help="example answers printed per method")
    ap.add_argument(
        "--best-particle",
        action="store_true",
        help="also report each SMC run's final particle with the highest reward (SMC used as a search)",
    )
    return ap


def load_for_recipe(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_model(args.model, args.device)


def prompt_ids(lm, case: Case) -> list[int]:
    """The case's prompt in the model's chat template (plain text when it has none), plus the reply prefix."""
    messages = ([{"role": "system", "content": case.system}] if case.system else []) + [
        {"role": "user", "content": case.prompt}
    ]
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    else:
        ids = list(tok(case.prompt + "\n", add_special_tokens=True)["input_ids"])
    return ids + list(tok(case.prefix, add_special_tokens=False)["input_ids"]) if case.prefix else ids


def _answers_of(lm, task: RewardTask, c: int, case: Case, out, picks: list[int]) -> list[Answer]:
    res = []
    for g, i in enumerate(picks):
        toks = out.tokens[g, i, : out.lengths[g, i]].tolist()
        res.append(Answer(c, g, lm.tokenizer.decode(toks, skip_special_tokens=True), toks, math.nan, math.nan))
    return res


def _fill_scores(task: RewardTask, case: Case, answers: list[Answer]) -> None:
    rewards = task.reward(case, [case.prefix + a.text for a in answers])
    for a, r in zip(answers, rewards):
        a.reward = float(r)
        a.success = float(task.success(case, case.prefix + a.text)) if task.success else math.nan


def run_reward_task(
    task: RewardTask,
    args: argparse.Namespace,
    lm,
    smc_variants: list[tuple[str, int, dict]] | None = None,
    select: Callable | None = None,
) -> list[MethodResult]:
    """Every method on every case; see the section comment. ``smc_variants``: (name, N, config
    overrides) for SMC (default: N from --particles, the task's potential); ``select(case, answers)``
    scores best-of-N candidates (default: their reward)."""
    tau = args.temperature if args.temperature is not None else task.temperature
    max_new = args.max_new_tokens or task.max_new_tokens
    ns = [int(x) for x in args.particles.split(",")]
    n_bon = max(ns)
    cases = task.cases[: args.cases]
    chooser = torch.Generator().manual_seed(args.seed + 1)
    variants = smc_variants or [(f"SMC N={n}", n, {}) for n in ns]
    results: dict[str, MethodResult] = {}

    def add(name: str, kind: str, n: int, answers: list[Answer], tokens: float, seconds: float) -> None:
        r = results.setdefault(name, MethodResult(name, kind, n, [], 0.0, 0.0))
        k = len(r.answers)
        r.tokens_per_answer = (r.tokens_per_answer * k + tokens * len(answers)) / (k + len(answers))
        r.answers.extend(answers)
        r.seconds += seconds

    target = LMPotential(lm, temperature=tau)
    bar = tqdm(total=len(cases) * (1 + len(variants)), desc=task.title[:30], unit="run")
    for c, case in enumerate(cases):
        ids = prompt_ids(lm, case)
        seed = args.seed + 1000 * c
        # ---- best-of-N and plain sampling from one run of n_bon i.i.d. samples per group
        cfg = SMCConfig(n_particles=n_bon, max_new_tokens=max_new, target_temperature=tau, seed=seed)
        t0 = time.perf_counter()
        out = SMC(target, cfg).run(ids, n_groups=args.groups)
        cands = [_answers_of(lm, task, c, case, out, [i] * args.groups) for i in range(n_bon)]  # [i][g]
        flat = [a for per_i in cands for a in per_i]
        _fill_scores(task, case, flat)
        scores = select(case, flat, lm, ids, tau) if select else [a.reward for a in flat]
        gen_s = time.perf_counter() - t0
        score_of = {id(a): s for a, s in zip(flat, scores)}
        lengths = out.lengths.double()  # [G, n_bon]
        for n in sorted({1, *ns}):
            best = [max((cands[i][g] for i in range(n)), key=lambda a: score_of[id(a)]) for g in range(args.groups)]
            toks = float(lengths[:, :n].sum(dim=1).mean())
            name = "plain sampling" if n == 1 else f"best-of-{n}"
            # best-of-n's share of the run's time: n of the n_bon samples
            add(name, "plain" if n == 1 else "best-of-N", n, best, toks, gen_s * n / n_bon)
        bar.update()
        # ---- SMC with the task's potential
        for name, n, over in variants:
            pot = task.potential(case, lm, args) if over.get("potential", True) else ()
            cfg_over = {k: v for k, v in over.items() if k != "potential"}
            cfg = SMCConfig(
                **{"n_particles": n, "max_new_tokens": max_new, "target_temperature": tau, "seed": seed, **cfg_over}
            )
            counter = TokenCounter()
            t0 = time.perf_counter()
            smc = SMC(LMPotential(lm, temperature=cfg.target_temperature, alpha=cfg.alpha), cfg, potentials=pot)
            out = smc.run(ids, n_groups=args.groups, on_dead="flag", recorder=counter)
            picks = [
                0 if bool(out.dead[g]) else int(torch.multinomial(out.log_weights[g].exp(), 1, generator=chooser))
                for g in range(args.groups)
            ]
            answers = _answers_of(lm, task, c, case, out, picks)
            _fill_scores(task, case, answers)
            for g, a in enumerate(answers):
                if bool(out.dead[g]):  # every particle ruled out: a failure whatever its partial text scores
                    a.success = 0.0 if task.success else math.nan
            add(name, "SMC", n, answers, counter.tokens / args.groups, time.perf_counter() - t0)
            if getattr(args, "best_particle", False):
                # the same run used as a search: of each group's final particles, the one with the highest reward
                best = []
                for g in range(args.groups):
                    finals = [
                        Answer(c, g, lm.tokenizer.decode(t, skip_special_tokens=True), t, math.nan, math.nan)
                        for t in (out.tokens[g, i, : out.lengths[g, i]].tolist() for i in range(n))
                    ]
                    _fill_scores(task, case, finals)
                    pick = max(finals, key=lambda a: a.reward)
                    if bool(out.dead[g]) and task.success:
                        pick.success = 0.0
                    best.append(pick)
                add(
                    f"{name} (best particle)",
                    "SMC-best",
                    n,
                    best,
                    counter.tokens / args.groups,
                    time.perf_counter() - t0,
                )
            bar.update()
        # target log-likelihood per token of every answer of this case (log p_tau, the prompt prefilled once)
        for r in results.values():
            todo = [a for a in r.answers if a.case == c and math.isnan(a.loglik_per_token) and a.tokens]
            samples = [Sample(a.text, a.tokens, True, False, math.nan) for a in todo]
            _score(lm, ids, samples, tau)
            for a, s in zip(todo, samples):
                a.loglik_per_token = s.loglik_per_token
    bar.close()
    return list(results.values())


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its normal 95% confidence interval."""
    m, se = mean_se(values)
    return m, 1.96 * se if not math.isnan(se) else math.nan


def paired_diff(a: MethodResult, b: MethodResult, attr: str) -> tuple[float, float]:
    """Mean and 95% half-width of a - b over the same (case, group) pairs."""
    bv = {(x.case, x.group): getattr(x, attr) for x in b.answers}
    return ci95([getattr(x, attr) - bv[(x.case, x.group)] for x in a.answers if (x.case, x.group) in bv])


def report(
    task: RewardTask, results: list[MethodResult], args: argparse.Namespace, plot_path: str, metric: str | None = None
) -> None:
    """Print the table, the SMC-8 vs best-of-8 verdict and examples; save the quality-vs-compute plot."""
    metric = metric or ("success" if task.success else "reward")
    tau = args.temperature if args.temperature is not None else task.temperature
    print(f"# {task.title}")
    print(
        f"model: {args.model} ({args.device}, {torch.get_num_threads()} torch threads, {platform.machine()}); "
        f"tau {tau}; max_new_tokens {args.max_new_tokens or task.max_new_tokens}; "
        f"{min(args.cases, len(task.cases))} prompts x {args.groups} groups = answers per method; seed {args.seed}"
    )
    if task.metric_note:
        print(task.metric_note)
    print()
    cols = (
        ["method", "answers"]
        + (["success (95% CI)"] if task.success else [])
        + ["mean reward (95% CI)", "log p_tau / token", "tokens generated / answer", "tokens/s"]
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        row = [r.name, str(len(r.answers))]
        if task.success:
            m, h = ci95([a.success for a in r.answers])
            row.append(f"{m:.1%} ± {h:.1%}")
        m, h = ci95([a.reward for a in r.answers])
        row.append(f"{m:.3f} ± {h:.3f}")
        m, h = ci95([a.loglik_per_token for a in r.answers])
        row.append(f"{m:.3f} ± {h:.3f}")
        row += [f"{r.tokens_per_answer:.0f}", f"{r.tokens_per_second:.0f}"]
        print("| " + " | ".join(row) + " |")
    by = {r.name: r for r in results}
    for smc8 in (r for r in results if r.kind in ("SMC", "SMC-best") and r.n == 8 and "best-of-8" in by):
        d, h = paired_diff(smc8, by["best-of-8"], metric)
        verdict = "beats" if d - h > 0 else ("loses to" if d + h < 0 else "does not beat (within the 95% CI)")
        print(
            f"\n{smc8.name} - best-of-8 on {metric}, paired over the same prompts and seeds: {d:+.3f} ± {h:.3f} "
            f"(95% CI): {smc8.name} {verdict} best-of-8."
        )
    for r in results:
        for a in r.answers[: args.show]:
            print(
                f"\n[{r.name}] reward={a.reward:.3f} success={a.success} log p/token={a.loglik_per_token:.3f}\n"
                f"{task.cases[a.case].prefix}{a.text}"
            )
    plot_quality(task, results, plot_path, metric)
    print(f"\nplot: {plot_path}")


def plot_quality(task: RewardTask, results: list[MethodResult], path: str, metric: str) -> None:
    """Quality (mean with 95% CI) against tokens generated per answer, one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    families: dict[str, list[MethodResult]] = {}
    for r in results:
        fam = "best-of-N" if r.name == "plain sampling" or r.kind == "best-of-N" else r.name.rsplit(" N=", 1)[0]
        families.setdefault(fam, []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r.tokens_per_answer)
        xs = [r.tokens_per_answer for r in rs]
        stats = [ci95([getattr(a, metric) for a in r.answers]) for r in rs]
        ax.errorbar(
            xs,
            [m for m, _ in stats],
            yerr=[0 if math.isnan(h) else h for _, h in stats],
            marker="o",
            capsize=3,
            label=fam,
        )
        for r, x, (m, _) in zip(rs, xs, stats):
            ax.annotate(f"N={r.n}", (x, m), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens generated per answer (compute)")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title(task.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
