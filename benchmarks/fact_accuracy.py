"""A task with a checkable answer that the 135M model gets partly right: FreshQA's stable facts.

Which task, and why: FreshQA (Vu et al. 2023, shipped as a data file in the ``inspect-evals`` PyPI
package) labels each question by how its answer changes and whether it rests on a false premise,
and lists up to ten accepted answers. Its "never-changing" questions with a true premise (148 of
600: "What state is known as the Aloha State?", "Who wrote the book titled Orientalism?") have
short, settled answers that a small instruct model knows some of, unlike arithmetic, which
SmolLM2-135M-Instruct gets wrong every time at this size (0/20 in ``fidelity.py``). Nobody on this
team wrote the questions or the answers.

An answer counts as right when one of the accepted answers appears in it as whole words, after
lower-casing, dropping accents and punctuation (a lenient check: the same one for every method, so
the comparison between methods is fair even where the absolute figure is generous).

Methods, each sampling ``--samples`` answers per question at the main job's temperature:
  (a) the target alone (AR)   (b) SMC-SD with ``--draft``, N particles, K drafted tokens   (d) SD, K drafts
Accuracy per method with a 95% interval over questions (a question's samples are correlated, so
the question is the unit), and the paired difference (b) - (a) and (d) - (a) with a 95% interval
over questions (the same questions and seeds for every method). ``--from-json`` re-renders the
tables of a saved run.

    OMP_NUM_THREADS=2 python benchmarks/fact_accuracy.py --out benchmarks/results/DIR   # CPU main job's pair
    python benchmarks/fact_accuracy.py --device cuda --draft smollm2-135m-draft -n 8 -k 4 --samples 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import unicodedata

from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity import chat_ids, freshqa_rows, mean_se  # noqa: E402

import smcgen  # noqa: E402
from smcgen.api import load_draft, load_model  # noqa: E402
from smcgen.cli import main_job_draft, main_job_setting  # noqa: E402

#: appended to each question so that answers are short enough to check
INSTRUCTION = " Answer in a few words."


def stable_facts() -> list[tuple[str, list[str]]]:
    """(question, accepted answers) of FreshQA's never-changing, true-premise questions."""
    out = []
    for r in freshqa_rows():
        if r["fact_type"] != "never-changing" or r["false_premise"] != "FALSE":
            continue
        answers = [r[f"answer_{i}"].strip() for i in range(10) if (r.get(f"answer_{i}") or "").strip()]
        if answers:
            out.append((r["question"].strip(), answers))
    return out


def normalize(text: str) -> str:
    """Lower case, no accents, punctuation as spaces, single spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def is_right(answer: str, accepted: list[str]) -> bool:
    """One accepted answer appears in ``answer`` as whole words (after ``normalize``)."""
    padded = f" {normalize(answer)} "
    return any(f" {a} " in padded for a in map(normalize, accepted) if a)


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean of per-question values and its normal 95% interval over questions (the samples of one
    question are correlated, so the question, not the sample, is the unit)."""
    m, se = mean_se(xs)
    return m, m - 1.96 * se, m + 1.96 * se


def paired_diff(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Mean of y - x over questions and its normal 95% interval."""
    return mean_ci([b - a for a, b in zip(x, y, strict=True)])


def summarize(names: dict[str, str], score: dict[str, list[float]], samples: int, seconds: dict[str, float]):
    """(rows, paired differences) of per-question scores: accuracy with its 95% interval over
    questions, and (b) - (a), (d) - (a) paired by question."""
    rows = {}
    for m, name in names.items():
        acc, lo, hi = mean_ci(score[m])
        right = round(sum(score[m]) * samples)
        n = len(score[m]) * samples
        rows[m] = {"method": name, "right": right, "answers": n, "accuracy": acc, "ci95": [lo, hi]}
        rows[m]["seconds"] = seconds[m]
    diffs = {f"{m}-a": paired_diff(score["a"], score[m]) for m in names if m != "a"}
    return rows, diffs


def render(title: str, rows: dict, diffs: dict) -> str:
    lines = [
        title,
        "",
        "| method | right / answers | accuracy | 95% interval (over questions) | seconds |",
        "|---|---:|---:|---|---:|",
    ]
    for m, r in rows.items():
        lo, hi = r["ci95"]
        lines.append(
            f"| ({m}) {r['method']} | {r['right']} / {r['answers']} | {100 * r['accuracy']:.1f}% "
            f"| {100 * lo:.1f}-{100 * hi:.1f}% | {r['seconds']:.0f} |"
        )
    lines += ["", "| paired difference over questions | points | 95% interval |", "|---|---:|---|"]
    for key, (mean, lo, hi) in diffs.items():
        lines.append(f"| ({key[0]}) - (a) | {100 * mean:+.1f} | {100 * lo:+.1f} to {100 * hi:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--draft", default=None, help="draft name or directory (default: the main job's, --draft auto)")
    ap.add_argument("-n", "--n-particles", type=int, default=None, help="default: the main job's")
    ap.add_argument("-k", "--block-size", type=int, default=None, help="default: the main job's")
    ap.add_argument("--questions", type=int, default=None, help="first this many (default: all 148)")
    ap.add_argument("--samples", type=int, default=2, help="answers per question and method")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7, help="target and draft temperature (main job: 0.7)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--from-json", default=None, help="re-render the tables of a saved fact_accuracy.json")
    args = ap.parse_args()
    if args.from_json:
        saved = json.load(open(args.from_json))
        names = {m: r["method"] for m, r in saved["rows"].items()}
        seconds = {m: r["seconds"] for m, r in saved["rows"].items()}
        rows, diffs = summarize(names, saved["per_question"], saved["args"]["samples"], seconds)
        print(render(f"# FreshQA stable facts, re-rendered from {args.from_json}", rows, diffs))
        return
    if args.samples < 1:
        raise SystemExit(f"--samples must be >= 1, got {args.samples}")

    draft_name = args.draft or main_job_draft("auto")
    main_job = main_job_setting(draft_name)
    N = args.n_particles or main_job[0]
    K = args.block_size or main_job[1]
    facts = stable_facts()[: args.questions]
    t0 = time.perf_counter()
    target = load_model("smollm2-135m", args.device)
    draft = load_draft(draft_name, target, args.device)
    tok = target.tokenizer
    common = {
        "max_new_tokens": args.max_new_tokens,
        "target_temperature": args.temperature,
        "draft_temperature": args.temperature,
    }
    methods = {
        "a": ("target alone (AR)", {"n_particles": 1}),
        "b": (f"SMC-SD N={N} K={K}, draft {draft_name}", {"draft": draft, "n_particles": N, "block_size": K}),
        "d": (f"SD K={K}, draft {draft_name}", {"draft": draft, "method": "sd", "n_particles": 1, "block_size": K}),
    }
    # per method: the fraction right of each question's samples; one example answer per question
    score: dict[str, list[float]] = {m: [] for m in methods}
    examples: dict[str, list[str]] = {m: [] for m in methods}
    timing: dict[str, float] = {m: 0.0 for m in methods}
    for i, (question, accepted) in enumerate(tqdm(facts, desc="questions")):
        prompt = chat_ids(tok, question + INSTRUCTION)
        for m, (_, kw) in methods.items():
            right = 0
            for s in range(args.samples):
                t = time.perf_counter()
                res = smcgen.generate(target, prompt, seed=args.seed + 1000 * i + s, **common, **kw)
                timing[m] += time.perf_counter() - t
                text = tok.decode(res.token_ids, skip_special_tokens=True)
                right += is_right(text, accepted)
                if s == 0:
                    examples[m].append(text)
            score[m].append(right / args.samples)

    n_q, S = len(facts), args.samples
    rows, diffs = summarize({m: name for m, (name, _) in methods.items()}, score, S, timing)
    elapsed = time.perf_counter() - t0
    title = (
        f"# FreshQA stable facts: {n_q} questions x {S} samples, {args.max_new_tokens} new tokens, "
        f"tau={args.temperature}, device={args.device}, {elapsed:.0f} s"
    )
    report = render(title, rows, diffs)
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fact_accuracy.md"), "w") as f:
            f.write(report + "\n")
        with open(os.path.join(args.out, "fact_accuracy.json"), "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "rows": rows,
                    "paired": diffs,
                    "per_question": score,
                    "questions": [q for q, _ in facts],
                    "examples": examples,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
