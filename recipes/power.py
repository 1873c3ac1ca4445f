"""Power sampling p(x)^alpha (alpha = 2, 4) against temperature 1/alpha and plain sampling.

Task: short factual questions (capitals, small sums) answered in a word or two, where the model's
likelihood tracks correctness: the recipe shows it first, from the plain samples, as the AUC of a
sample's log p(x) for telling correct from wrong answers and the accuracy of the likelier half
against the other half. Power sampling targets p(x)^alpha over whole answers; per-token temperature
1/alpha samples prod_t p(x_t | x_<t)^alpha / Z_t instead, which is not the same distribution (it
ignores how likely the continuation of each token is). SMC runs the power target with the model
proposing each token from its tempered next-token distribution, weighted by log sum_v p(v)^alpha
(docs/math.md); the answer is one particle drawn by weight. Best-of-N keeps the likeliest of N plain
samples (the selection a user without a checker has). Success = the expected word in the answer.

    python recipes/power.py [--groups 3] [--cases 8] [--plot power.png]
"""

from __future__ import annotations

import math

from _harness import Case, RewardTask, Sample, _score, load_for_recipe, report, reward_args, run_reward_task

QUESTIONS = [  # easy and harder ones interleaved, so the first few (--cases) are a mix
    ("What is the capital of Australia?", "canberra"),
    ("What is the capital of France?", "paris"),
    ("What is the capital of Canada?", "ottawa"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Turkey?", "ankara"),
    ("How many legs does a spider have?", "eight|8"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("What is 2 + 3?", "five|5"),
    ("What is the capital of Italy?", "rome"),
    ("What is the opposite of hot?", "cold"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Russia?", "moscow"),
    ("What is the capital of England?", "london"),
    ("What color is the sky on a clear day?", "blue"),
]


def correct(case: Case, text: str) -> bool:
    low = text.lower()
    return any(a in low for a in case.data.split("|"))


def select_by_likelihood(case, answers, lm, ids, tau):
    """Best-of-N's score: the sample's total log p_tau (its per-token value is kept for the table)."""
    samples = [Sample(a.text, a.tokens, True, False, math.nan) for a in answers]
    _score(lm, ids, [s for s in samples if s.tokens], tau)
    for a, s in zip(answers, samples):
        a.loglik_per_token = s.loglik_per_token
    return [s.loglik_per_token * len(s.tokens) if s.tokens else -math.inf for s in samples]


TASK = RewardTask(
    title="Recipe: power sampling p^alpha on short factual answers",
    cases=[Case(q + " Answer with one word.", data=a) for q, a in QUESTIONS],
    reward=lambda case, texts: [float(correct(case, t)) for t in texts],
    success=correct,
    potential=lambda case, lm, args: (),
    max_new_tokens=12,
    temperature=1.0,
    metric_note="success = the expected word in the answer; best-of-N keeps the likeliest of N plain samples; "
    "reward = success here (no reward is used by SMC)",
)


def likelihood_tracks_correctness(results) -> str:
    """AUC of log p(x) for correct vs wrong plain samples, and accuracy of the likelier vs less likely half."""
    plain = next(r for r in results if r.name == "plain sampling")
    pts = [(a.loglik_per_token * len(a.tokens), a.success) for a in plain.answers if a.tokens]
    pos = [s for s, ok in pts if ok]
    neg = [s for s, ok in pts if not ok]
    if not pos or not neg:
        return "likelihood vs correctness: every plain sample is correct or every one wrong; no AUC"
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    pts.sort()
    half = len(pts) // 2
    low, high = pts[:half], pts[half:]
    return (
        f"likelihood tracks correctness (plain samples, n={len(pts)}): AUC of log p(x) for correct vs wrong = "
        f"{auc:.2f}; accuracy of the likelier half {sum(o for _, o in high) / len(high):.0%} vs the less likely "
        f"half {sum(o for _, o in low) / max(len(low), 1):.0%}"
    )


def main() -> None:
    ap = reward_args(__doc__, groups=3, cases=8)
    ap.add_argument("--alphas", default="2,4")
    args = ap.parse_args()
    lm = load_for_recipe(args)
    ns = [int(x) for x in args.particles.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    variants = [(f"temperature 1/{a:g}", 1, {"potential": False, "target_temperature": 1 / a}) for a in alphas]
    variants += [(f"SMC p^{a:g} N={n}", n, {"potential": False, "alpha": a}) for a in alphas for n in ns]
    results = run_reward_task(TASK, args, lm, smc_variants=variants, select=select_by_likelihood)
    for r in results:  # the temperature rows are plain sampling at another temperature, not SMC
        if r.name.startswith("temperature"):
            r.kind = "plain"
    report(TASK, results, args, args.plot or "power.png")
    print(likelihood_tracks_correctness(results))


if __name__ == "__main__":
    main()
