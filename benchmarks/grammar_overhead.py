"""What the grammar costs: SMC-SD and plain SMC with and without a JSON-schema grammar (CPU).

Runs, interleaved per seed, on the embedded SmolLM2-135M-Instruct with the JSON recipe's prompt
and schema (recipes/json_record.py): SMC-SD N=8, K=4 (early-exit draft) unconstrained vs with the
grammar (masked draft + masked bonus token), and plain SMC N=8 unconstrained vs masked target.
Reports wall time per generated token position (the run's width: every row advances in lock
step, so this normalizes for different output lengths), the slowdown of the constrained run, and
the grammar's own CPU time (mask, advance, fork) per particle-step and as a share of the wall time.
Prints a Markdown table for BENCHMARKS.md.

    python benchmarks/grammar_overhead.py [--repeats 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from _harness import chat_prompt
from json_record import TASK

from smcgen import SMC, LMPotential, LMProposal, MaskedLMProposal, SMCConfig
from smcgen.api import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target_lm = load_model("smollm2-135m", "cpu")
    draft_lm = load_model("smollm2-135m-draft", "cpu")
    grammar = TASK.grammar.bind(target_lm)
    ids = chat_prompt(target_lm, TASK)
    tau = args.temperature
    target = LMPotential(target_lm, temperature=tau)

    def config(seed: int) -> SMCConfig:
        return SMCConfig(
            n_particles=8,
            block_size=4,
            max_new_tokens=args.max_new_tokens,
            target_temperature=tau,
            draft_temperature=tau,
            seed=seed,
        )

    cases = {
        "SMC-SD N=8, K=4": (True, False),
        "SMC-SD N=8, K=4 + grammar (masked draft and bonus)": (True, True),
        "plain SMC N=8": (False, False),
        "plain SMC N=8 + grammar (masked target)": (False, True),
    }
    results: dict[str, list[tuple[float, int, float, int, float]]] = {k: [] for k in cases}
    for seed in range(args.repeats):
        for name, (use_draft, constrained) in cases.items():
            cfg = config(seed)
            if use_draft:
                proposal = (
                    MaskedLMProposal(draft_lm, grammar, temperature=tau) if constrained else LMProposal(draft_lm, tau)
                )
            else:
                proposal = None
            grammar.stats.reset()
            smc = SMC(target, cfg, proposal=proposal, mask=grammar if constrained else None)
            t0 = time.perf_counter()
            out = smc.run(ids, on_dead="flag")
            wall = time.perf_counter() - t0
            st = grammar.stats
            g_time = st.mask_seconds + st.advance_seconds + st.fork_seconds if constrained else 0.0
            results[name].append((wall, out.tokens.shape[-1], g_time, st.mask_rows, st.mask_seconds))

    print(
        f"device: CPU ({platform.machine()}), {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"JSON recipe prompt and schema, max_new_tokens {args.max_new_tokens}, tau {tau}, "
        f"{args.repeats} seeds (medians)"
    )
    print(
        "| configuration | token positions | wall s | ms / token position | slowdown vs unconstrained | "
        "mask µs / particle-step | grammar CPU share of wall |"
    )
    print("|---|---|---|---|---|---|---|")
    base = {}
    for name, (use_draft, constrained) in cases.items():
        rs = results[name]
        per_tok = statistics.median(w / n for w, n, *_ in rs)
        wall = statistics.median(w for w, *_ in rs)
        width = statistics.median(n for _, n, *_ in rs)
        if not constrained:
            base[use_draft] = per_tok
            slow, mask, share = "1.00", "-", "-"
        else:
            slow = f"{per_tok / base[use_draft]:.2f}"
            mask = f"{1e6 * sum(r[4] for r in rs) / max(1, sum(r[3] for r in rs)):.0f}"
            share = f"{100 * statistics.median(g / w for w, _, g, *_ in rs):.1f}%"
        print(f"| {name} | {width:.0f} | {wall:.2f} | {1000 * per_tok:.0f} | {slow} | {mask} | {share} |")


if __name__ == "__main__":
    main()
