"""Reward steering with a prefix twist: a sentence that uses every word of a given set.

Reward R(x) = the fraction of the keywords that the text uses (whole words, any case, a plural
"s" allowed); success = all of them. SMC targets p_tau(x) exp(beta R(x)) with the fraction used
*so far* as the twist (``RewardPotential(..., prefix=True)``): particles that already placed a
keyword are resampled ahead of those that have not, while the final weights still target the
tilted distribution. Compared with best-of-N (N samples, the one with the highest reward) at the
same number of generated tokens, and with plain sampling.

It also writes the trace of one SMC run (N=8, first prompt): ``keywords_trace.html`` (particles as
rows, weights as shading, resampling lineage) and ``keywords_trace.png`` (ESS and log Z_hat per step).

    python recipes/keywords.py [--groups 4] [--cases 4] [--beta 8] [--model smollm2-135m] [--plot keywords.png]
"""

from __future__ import annotations

import re

from _harness import Case, RewardTask, load_for_recipe, prompt_ids, report, reward_args, run_reward_task

import smcgen
from smcgen import RewardPotential

KEYWORDS = [
    ("river", "clock", "purple"),
    ("bread", "mountain", "quiet"),
    ("window", "tiger", "green"),
    ("ocean", "pencil", "happy"),
    ("garden", "rocket", "cold"),
    ("music", "stone", "yellow"),
    ("forest", "phone", "slow"),
    ("cloud", "kitchen", "brave"),
]


def fraction_used(text: str, words: tuple[str, ...]) -> float:
    low = text.lower()
    return sum(bool(re.search(rf"\b{w}s?\b", low)) for w in words) / len(words)


def reward(case: Case, texts: list[str]) -> list[float]:
    return [fraction_used(t, case.data) for t in texts]


def success(case: Case, text: str) -> bool:
    return fraction_used(text, case.data) == 1.0


def potential(case: Case, lm, args) -> RewardPotential:
    words = case.data
    # prefix=True: the fraction used so far is the twist; the finished text gets the same function
    return RewardPotential(lambda text: fraction_used(text, words), beta=args.beta, prefix=True)


TASK = RewardTask(
    title="Recipe: keywords (reward steering with a prefix twist)",
    cases=[Case(f"Write one short sentence that uses all of these words: {', '.join(w)}.", data=w) for w in KEYWORDS],
    reward=reward,
    success=success,
    potential=potential,
    max_new_tokens=24,
    temperature=1.0,
    metric_note="reward = fraction of the 3 keywords used; success = all 3; SMC target p(x) exp(beta R(x)), "
    "twist = fraction used so far",
)


def main() -> None:
    ap = reward_args(__doc__, groups=4, cases=4)
    ap.add_argument("--beta", type=float, default=8.0, help="inverse temperature of the reward: exp(beta R)")
    ap.add_argument("--trace", default="keywords_trace", help="path stem of the run trace (.html, .png); '' for none")
    args = ap.parse_args()
    lm = load_for_recipe(args)
    results = run_reward_task(TASK, args, lm)
    report(TASK, results, args, args.plot or "keywords.png")
    if args.trace:
        case = TASK.cases[0]
        res = smcgen.generate(
            lm,
            prompt_ids(lm, case),
            potentials=potential(case, lm, args),
            n_particles=8,
            max_new_tokens=args.max_new_tokens or TASK.max_new_tokens,
            seed=args.seed,
            trace=True,
        )
        res.trace.prompt = case.prompt
        html = res.trace.save_html(args.trace + ".html", title=f"SMC N=8 on: {case.prompt}")
        png = res.trace.plot(args.trace + ".png", title="keywords, SMC N=8: ESS and log Z_hat")
        print(f"trace: {html}, {png} ({res.n_steps} steps, {res.n_resamples} resamplings); answer: {res.text!r}")


if __name__ == "__main__":
    main()
