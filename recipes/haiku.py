"""A syllable-counted haiku (5-7-5) as a custom ``Potential`` of a few lines.

The potential is a hard constraint: a prefix scores 0 while its finished lines have 5, 7 and 5
syllables and the line being written has not gone over (only whole words are counted, so a word
cut by the tokenizer never counts early), ``-inf`` otherwise; a finished text scores 0 when it is
exactly three lines of 5, 7 and 5 syllables. Syllables are counted by a vowel-group heuristic
(``syllables``), which is the definition of success here, not a dictionary's count. SMC drops
particles the moment they break the meter; best-of-N can only check finished samples. No token
mask exists for this constraint, so there is no "plain masking" baseline.

    python recipes/haiku.py [--groups 4] [--cases 3] [--model smollm2-135m] [--plot haiku.png]
"""

from __future__ import annotations

import math
import re

import torch
from _harness import Case, RewardTask, load_for_recipe, report, reward_args, run_reward_task

from smcgen import Potential, SequenceBatch

METER = (5, 7, 5)


def syllables(word: str) -> int:
    """Vowel groups, minus a silent final 'e' (not after 'l', as in 'table'); at least 1 per word."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 0
    n = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and n > 1:
        n -= 1
    return max(n, 1)


def line_counts(text: str, finished: bool) -> list[int]:
    """Syllables per line; unless ``finished``, the last (unfinished) word is left out."""
    lines = re.split(r"\n+", text.strip("\n"))  # blank lines between the three do not count
    if not finished:
        lines[-1] = lines[-1].rsplit(" ", 1)[0] if " " in lines[-1] else ""
    return [sum(syllables(w) for w in line.split()) for line in lines]


def meter_ok(text: str, finished: bool) -> bool:
    counts = line_counts(text, finished)
    if finished:
        return tuple(counts) == METER
    return len(counts) <= 3 and all(c == m for c, m in zip(counts[:-1], METER)) and counts[-1] <= METER[len(counts) - 1]


class Haiku(Potential):
    """Psi(x) = 1 while the text can still be a 5-7-5 haiku (prefix) / is one (complete), else 0."""

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([0.0 if meter_ok(t, False) else -math.inf for t in batch.texts])

    def log_complete(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.tensor([0.0 if meter_ok(t, True) else -math.inf for t in batch.texts])


TOPICS = ["the sea", "autumn leaves", "a mountain", "the moon", "rain", "a cat", "winter", "a river"]

TASK = RewardTask(
    title="Recipe: 5-7-5 haiku (hard constraint as a custom Potential)",
    cases=[Case(f"Write a haiku about {t}. Three short lines, no title.", data=t) for t in TOPICS],
    reward=lambda case, texts: [float(meter_ok(t, True)) for t in texts],
    success=lambda case, text: meter_ok(text, True),
    potential=lambda case, lm, args: Haiku(),
    max_new_tokens=28,
    temperature=1.0,
    metric_note="success = exactly three lines of 5, 7, 5 syllables (vowel-group count); best-of-N keeps a sample "
    "that meets it when one of its N does",
)


def main() -> None:
    args = reward_args(__doc__, groups=4, cases=3).parse_args()
    lm = load_for_recipe(args)
    results = run_reward_task(TASK, args, lm)
    report(TASK, results, args, args.plot or "haiku.png")


if __name__ == "__main__":
    main()
