"""A lipogram ("no letter e") on SmolLM2-135M-Instruct: a hard constraint with no mask.

The constraint is a 4-line :class:`smcgen.Potential` over decoded text. Three ways to meet it:

- AWRS-SMC: ``smcgen.generate(..., constraint=NoLetterE())``; every token is drawn by adaptive
  weighted rejection sampling inside the constraint and weighted by its allowed-mass estimate;
- SMC, weight only: the same potential as a plain factor (``potentials=[NoLetterE()]``); particles
  that write an 'e' get weight zero and die, and the run fails when all of them do;
- best-of-N: N independent samples from the model, keep the likeliest one without an 'e'.

Per method: success rate (a returned text without 'e', 95% Wilson interval), the model's
per-token log-likelihood log p_tau(x)/|x| of the returned texts, and tokens/s (tokens returned
per second of wall time; the samples of one method run as groups of one batch).

    python recipes/lipogram.py [--samples 10] [--n 8] [--max-new-tokens 32] [--plot lipogram.png]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from _harness import Sample, _score, mean_se

import smcgen
from smcgen import SMC, LMPotential, Potential, SequenceBatch, SMCConfig


class NoLetterE(Potential):
    """Zero once the text holds an 'e' or 'E'."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([-math.inf if "e" in t.lower() else 0.0 for t in batch.texts])


PROMPT = "Write a short story about a cat."


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_method(lm, ids: list[int], method: str, args: argparse.Namespace) -> tuple[list[Sample], float]:
    """``args.samples`` answers of one method as groups of one batch; returns samples and wall seconds."""
    n = 1 if method == "best-of-N" else args.n
    groups = args.samples * (args.n if method == "best-of-N" else 1)
    cfg = SMCConfig(
        n_particles=n, max_new_tokens=args.max_new_tokens, target_temperature=args.temperature, seed=args.seed
    )
    target = LMPotential(lm, temperature=args.temperature)
    if method == "AWRS-SMC":
        smc = SMC(target, cfg, constraint=NoLetterE())
    elif method == "SMC, weight only":
        smc = SMC(target, cfg, potentials=[NoLetterE()])
    else:
        smc = SMC(target, cfg)
    t0 = time.perf_counter()
    out = smc.run(ids, n_groups=groups, on_dead="flag", progress=args.progress)
    wall = time.perf_counter() - t0
    chooser = torch.Generator().manual_seed(args.seed + 1)
    samples = []
    for b in range(groups):
        dead = bool(out.dead[b])
        i = 0 if dead else int(torch.multinomial(out.log_weights[b].exp(), 1, generator=chooser))
        toks = out.tokens[b, i, : out.lengths[b, i]].tolist()
        text = lm.tokenizer.decode(toks, skip_special_tokens=True)
        samples.append(Sample(text, toks, (not dead) and "e" not in text.lower(), dead, math.nan))
    _score(lm, ids, samples, args.temperature)
    if method == "best-of-N":
        # keep, of each N draws, the likeliest one without an 'e' (else the likeliest one)
        best = []
        for k in range(args.samples):
            draws = samples[k * args.n : (k + 1) * args.n]
            valid = [s for s in draws if s.valid] or draws
            best.append(max(valid, key=lambda s: s.loglik_per_token if not math.isnan(s.loglik_per_token) else -1e9))
        samples = best
    return samples, wall


def fmt_ll(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [r["method"] for r in rows]
    rate = [r["rate"] for r in rows]
    err = [[r["rate"] - r["lo"] for r in rows], [r["hi"] - r["rate"] for r in rows]]
    a.bar(names, rate, yerr=err, capsize=4, color=["tab:green", "tab:red", "tab:gray"][: len(rows)])
    a.set_ylim(0, 1.05)
    a.set_ylabel("success rate (no 'e'), 95% CI")
    b.bar(names, [r["tok_s"] for r in rows], color=["tab:green", "tab:red", "tab:gray"][: len(rows)])
    b.set_ylabel("tokens / s")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Lipogram (no letter e), SmolLM2-135M-Instruct, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10, help="answers per method")
    ap.add_argument("--n", type=int, default=8, help="particles (AWRS-SMC, weight-only SMC) and N of best-of-N")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0, help="target temperature tau")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--plot", default="lipogram.png", help="where to save the PNG ('' for none)")
    ap.add_argument("--progress", action="store_true", help="show a progress bar per method")
    args = ap.parse_args()
    for name in ("samples", "n", "max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lm = smcgen.load_model("smollm2-135m", "cpu")
    msgs = [{"role": "user", "content": PROMPT}]
    ids = list(lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    print("# Lipogram: no letter e")
    print(
        f"model: SmolLM2-135M-Instruct (embedded), CPU, {torch.get_num_threads()} torch threads ({platform.machine()}); "
        f"N {args.n}; max_new_tokens {args.max_new_tokens}; tau {args.temperature}; {args.samples} answers per "
        f"method; seed {args.seed}; smcgen {smcgen.__version__}\nprompt: {PROMPT!r}\n"
    )
    rows, examples = [], []
    for method in ("AWRS-SMC", "SMC, weight only", "best-of-N"):
        samples, wall = run_method(lm, ids, method, args)
        ok = sum(s.valid for s in samples)
        lo, hi = wilson(ok, len(samples))
        m, se = mean_se([s.loglik_per_token for s in samples if s.valid])
        toks = sum(len(s.tokens) for s in samples)
        rows.append(
            {
                "method": method,
                "rate": ok / len(samples),
                "lo": lo,
                "hi": hi,
                "ok": ok,
                "n": len(samples),
                "dead": sum(s.cut for s in samples),
                "ll": m,
                "ll_se": se,
                "tok_s": toks / wall,
                "wall": wall,
            }
        )
        examples.append((method, next((s for s in samples if s.valid), samples[0])))
    print("| method | success (95% CI) | all particles died | log p / token (valid, mean ± s.e.) | tokens/s | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dead = f"{r['dead']}/{r['n']}" if r["method"] != "best-of-N" else "-"
        print(
            f"| {r['method']} | {r['rate']:.0%} ({r['ok']}/{r['n']}; {r['lo']:.2f}-{r['hi']:.2f}) | {dead} | "
            f"{fmt_ll(r['ll'], r['ll_se'])} | {r['tok_s']:.1f} | {r['wall']:.1f} |"
        )
    for name, s in examples:
        print(f"\n[{name}] valid={s.valid}\n{s.text}")
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
