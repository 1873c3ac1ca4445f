"""Python function completion with the Python grammar and the names potential, on any model.

For each problem the assistant's reply starts with the function's ``def`` line and docstring
(given, without the newline that ends it); the model writes the body. Methods, each giving one
answer per problem and sample:
- unconstrained: ancestral sampling from p_tau (one particle);
- grammar masking: one particle, every token drawn from p_tau masked to the grammar;
- grammar SMC: N particles, masked target, weights log sum_{allowed} p (the grammar as a factor);
- grammar + names SMC: the same with ``PythonGrammarPotential.build() * PythonNamesPotential(...)``,
  and the budget pieces (off with ``--no-budget``): ``PythonBudgetTwist(max_new_tokens)`` favours
  particles that can end in the tokens left, and the grammar's ``finish_within`` restricts each
  particle's last token to the tokens that end the body (both leave the target unchanged);
- best-of-N: N unconstrained samples, the first that parses and has no undefined name (the same
  checks, done after the fact; same number of sampled tokens as SMC up to resampling).
Reported per method: parse rate (``ast.parse`` + ``compile``), NameError rate (a NameError or
UnboundLocalError while running the unit tests), problems whose unit tests all pass, tokens/s.
The grammar is compiled lazily (``PythonGrammarPotential``): a mask position's token classes are
built the first time a mask is asked there, which the constrained methods' tokens/s include.

    python recipes/python_function.py [--model smollm2-135m] [--problems 2] [--samples 1] [--n 4] [--show]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _harness import chat_prompt, strip_fence

import smcgen
from smcgen import SMC, LMPotential, PythonNamesPotential, SMCConfig
from smcgen.api import load_model
from smcgen.potentials import PythonBudgetTwist, PythonGrammarPotential


@dataclass
class Problem:
    header: str
    tests: list[tuple[tuple, object]]

    @property
    def name(self) -> str:
        return self.header.split("(")[0][4:]


PROBLEMS = [
    Problem(
        'def is_prime(n):\n    """Return True if the integer n is a prime number, else False."""',
        [((2,), True), ((1,), False), ((9,), False), ((13,), True), ((0,), False), ((97,), True)],
    ),
    Problem(
        'def reverse_words(s):\n    """Return the words of s in reverse order, joined by single spaces."""',
        [(("a b c",), "c b a"), (("hello world",), "world hello"), (("one",), "one")],
    ),
    Problem(
        'def count_vowels(s):\n    """Return how many characters of s are vowels (a, e, i, o, u, either case)."""',
        [(("hello",), 2), (("AEIOU",), 5), (("xyz",), 0), (("",), 0)],
    ),
    Problem(
        'def running_max(xs):\n    """Return the list of the maxima of the prefixes of the list xs."""',
        [(([1, 3, 2, 5],), [1, 3, 3, 5]), (([],), []), (([4, 1],), [4, 4])],
    ),
    Problem(
        'def word_lengths(words):\n    """Return a dict mapping each word of the list words to its length."""',
        [((["a", "bb"],), {"a": 1, "bb": 2}), (([],), {})],
    ),
]


LABELS = {
    "unconstrained": "unconstrained",
    "masking": "grammar masking",
    "smc": "grammar SMC N={n}",
    "smc_names": "grammar + names SMC N={n}",
    "bestofn": "best-of-{n} unconstrained",
}


@dataclass
class Outcome:
    parses: bool
    name_error: bool
    passed: bool
    tokens: int
    cut: bool = False  # the answer reached max_new_tokens without an EOS
    dead: bool = False  # every particle of the sample had weight zero: the answer is particle 0's text


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def evaluate(problem: Problem, body: str, n_tokens: int, seconds: float = 1.0) -> Outcome:
    """Parse, then run the unit tests (each under a time limit) in a fresh namespace."""
    code = problem.header + strip_fence(body, "python").rstrip() + "\n"
    try:
        compile(ast.parse(code), "<completion>", "exec")
    except (SyntaxError, ValueError):
        return Outcome(False, False, False, n_tokens)
    name_error, passed = False, True
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        namespace: dict = {}
        signal.setitimer(signal.ITIMER_REAL, seconds)
        with contextlib.redirect_stdout(io.StringIO()):  # the model's code may print
            exec(code, namespace)  # noqa: S102 - the recipe runs the model's code, like any coding benchmark
        fn = namespace[problem.name]
        for args, want in problem.tests:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    got = fn(*args)
            except NameError:  # UnboundLocalError included
                name_error, passed = True, False
                break
            except _Timeout:
                passed = False
                break
            except Exception:  # noqa: BLE001 - any other failure fails the test
                passed = False
                continue
            passed = passed and got == want
    except NameError:
        name_error, passed = True, False
    except Exception:  # noqa: BLE001
        passed = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return Outcome(True, name_error, passed, n_tokens)


def static_ok(problem: Problem, body: str) -> bool:
    """The best-of-N verifier: parses and has no undefined name (no tests run)."""
    from smcgen.potentials.python_names import undefined_names

    code = problem.header + strip_fence(body, "python").rstrip() + "\n"
    errors = undefined_names(code)
    return errors is not None and not errors


def run(args: argparse.Namespace) -> dict[str, list[Outcome]]:
    """Run every method on the problems, print the table, and return each method's outcomes."""
    lm = load_model(args.model, "cpu")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(LABELS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(LABELS)}")
    t0 = time.perf_counter()
    grammar = PythonGrammarPotential.build(depth=args.depth, lazy=not args.eager)
    if set(methods) & {"masking", "smc", "smc_names"}:
        grammar = grammar.bind(lm)
    compile_s = time.perf_counter() - t0
    target = LMPotential(lm, temperature=args.temperature)
    results: dict[str, list[Outcome]] = {m: [] for m in methods}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    mask_us: dict[str, float] = {}
    problems = PROBLEMS[: args.problems]
    eos = set(lm.eos_token_ids)
    answers: list[dict] = []  # every answer, written to --out
    print(
        f"# Python function completion: {len(problems)} problems x {args.samples} samples; model {args.model}; "
        f"CPU {platform.machine()}, {torch.get_num_threads()} torch threads; tau {args.temperature}; "
        f"max_new_tokens {args.max_new_tokens}; N {args.n}; seed {args.seed}; smcgen {smcgen.__version__}"
    )
    how = "eagerly" if args.eager else "lazily"
    print(
        f"grammar: PythonGrammarPotential(depth={args.depth}), compiled {how} for the vocabulary in {compile_s:.3f} s; "
        f"grammar + names SMC budget twist and last-token mask {'off' if args.no_budget else 'on'}"
    )
    for pi, problem in enumerate(problems):
        task = argparse.Namespace(
            system=None,
            prompt="Complete this Python function. Reply with the code only.\n\n" + problem.header + "\n",
            prefix=problem.header,
        )
        ids = chat_prompt(lm, task)
        names = PythonNamesPotential(prefix=problem.header)
        for method in methods:
            n = 1 if method in ("unconstrained", "masking") else args.n
            cfg = SMCConfig(
                n_particles=n,
                max_new_tokens=args.max_new_tokens,
                target_temperature=args.temperature,
                seed=args.seed + 1000 * pi,
            )
            if method == "bestofn":  # N independent samples: SMC with no resampling = N separate chains
                cfg = cfg.model_copy(update={"ess_threshold": 0.0})
            kw: dict = {}
            if method in ("masking", "smc"):
                kw = {"mask": grammar}
            elif method == "smc_names":
                factors = grammar * names
                if not args.no_budget:
                    factors = factors * PythonBudgetTwist(args.max_new_tokens)
                kw = {"mask": grammar, "potentials": factors}
            # the last-token mask is part of the budget pieces: on for grammar + names SMC only
            grammar.finish_within = args.max_new_tokens if method == "smc_names" and not args.no_budget else None
            smc = SMC(target, cfg, **kw)
            grammar.stats.reset()
            t = time.perf_counter()
            out = smc.run(ids, n_groups=args.samples, on_dead="flag")
            seconds[method] += time.perf_counter() - t
            if grammar.stats.mask_rows:
                mask_us[method] = grammar.stats.mask_us_per_row
            chooser = torch.Generator().manual_seed(args.seed + pi)
            for b in range(args.samples):
                texts = [
                    lm.tokenizer.decode(out.tokens[b, i, : out.lengths[b, i]].tolist(), skip_special_tokens=True)
                    for i in range(n)
                ]
                total = int(out.lengths[b].sum())
                if method == "bestofn":
                    i = next((i for i, t in enumerate(texts) if static_ok(problem, t)), 0)
                elif bool(out.dead[b]):
                    i = 0
                else:
                    i = int(torch.multinomial(out.log_weights[b].exp(), 1, generator=chooser))
                outcome = evaluate(problem, texts[i], total)
                length = int(out.lengths[b, i])
                outcome.cut = length >= args.max_new_tokens and int(out.tokens[b, i, length - 1]) not in eos
                outcome.dead = method != "bestofn" and bool(out.dead[b])
                results[method].append(outcome)
                answers.append(
                    {"method": method, "problem": problem.name, "sample": b, "text": texts[i], **vars(outcome)}
                )
                if args.show and b == 0:
                    print(f"\n[{method}] {problem.name}:\n{problem.header}{texts[i]}")
    labels = {m: v.format(n=args.n) for m, v in LABELS.items()}
    print(
        "\n| method | answers | parse | cut at the limit | all particles dead | NameError | tests passed | "
        "tokens sampled | tokens/s | mask µs / particle-step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        rs = results[m]
        k = len(rs)
        toks = sum(r.tokens for r in rs)
        mu = f"{mask_us[m]:.0f}" if m in mask_us and not math.isnan(mask_us[m]) else "-"
        print(
            f"| {labels[m]} | {k} | {sum(r.parses for r in rs)}/{k} | {sum(r.cut for r in rs)}/{k} | "
            f"{sum(r.dead for r in rs)}/{k} | {sum(r.name_error for r in rs)}/{k} | "
            f"{sum(r.passed for r in rs)}/{k} | {toks} | {toks / seconds[m]:.1f} | {mu} |"
        )
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "answers.json").write_text(json.dumps(answers, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict[str, list[Outcome]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="any name smcgen.load_model accepts")
    ap.add_argument("--problems", type=int, default=2, help=f"how many of the {len(PROBLEMS)} problems")
    ap.add_argument("--samples", type=int, default=1, help="answers per problem and method")
    ap.add_argument("--n", type=int, default=4, help="particles of the SMC methods and N of best-of-N")
    ap.add_argument("--methods", default="unconstrained,masking,smc,smc_names,bestofn")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--depth", type=int, default=6, help="indentation levels of the grammar")
    ap.add_argument("--eager", action="store_true", help="precompile every mask entry (minutes) instead of lazily")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-budget", action="store_true", help="grammar + names SMC without the budget twist and last-token mask"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--show", action="store_true", help="print each method's first answer per problem")
    ap.add_argument("--out", default=None, help="directory for answers.json (every answer and its outcome)")
    args = ap.parse_args(argv)
    if not 1 <= args.problems <= len(PROBLEMS):
        ap.error(f"--problems must be in [1, {len(PROBLEMS)}]")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return run(args)


if __name__ == "__main__":
    main()
