"""An LLM judge as the reward: the same model asked "is this review negative?", batched over particles.

Reward R(x) = P("yes") / (P("yes") + P("no")) for the judge's first answer token, the judge being
the target model itself prompted with the particle's text (any model name works for both).
``JudgePotential`` scores all particles of a batch in one forward pass (right-padded, each row read
at its own last position) and caches scores by text. It is an expensive potential, so the prefix
twist is the judge's score of the text truncated to a multiple of ``--every`` tokens: it changes
only every few steps (between those, the weight increment is 0 and the judge is not run again), and
a finished particle gets the judge's score of its whole text. SMC targets p(x) exp(beta R(x)); the
default prompt asks the writer for a neutral review, so the judge steers against the model's habit.

    python recipes/llm_judge.py [--groups 3] [--cases 3] [--every 8] [--beta 8] [--plot llm_judge.png]
"""

from __future__ import annotations

import torch
from _harness import Case, RewardTask, load_for_recipe, report, reward_args, run_reward_task

from smcgen import LanguageModel, Potential, SequenceBatch

QUESTION = "Here is a review:\n\n{text}\n\nIs this review negative? Answer yes or no."


class Judge:
    """log P(yes) - log(P(yes) + P(no)) of the judge's first reply token, batched, cached by text."""

    def __init__(self, lm: LanguageModel, batch: int = 32):
        self.lm, self.batch = lm, batch
        tok = lm.tokenizer
        self.yes = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "Yes", " yes", " Yes")]
        self.no = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("no", "No", " no", " No")]
        self.cache: dict[str, float] = {}
        self.calls = 0

    def _ids(self, text: str) -> list[int]:
        tok = self.lm.tokenizer
        msg = [{"role": "user", "content": QUESTION.format(text=text.strip() or "(empty)")}]
        if getattr(tok, "chat_template", None):
            return list(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False))
        return list(tok(msg[0]["content"] + "\nAnswer:", add_special_tokens=True)["input_ids"])

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[float]:
        todo = sorted({t for t in texts if t not in self.cache})
        for k in range(0, len(todo), self.batch):
            part = todo[k : k + self.batch]
            rows = [self._ids(t) for t in part]
            width = max(len(r) for r in rows)
            pad = self.lm.eos_token_ids[0] if self.lm.eos_token_ids else 0
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.lm.device)
            logits = self.lm.model(input_ids=ids).logits  # right padding never changes earlier positions
            last = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].float()
            lp = torch.log_softmax(last, dim=-1)
            yes, no = torch.logsumexp(lp[:, self.yes], -1), torch.logsumexp(lp[:, self.no], -1)
            for t, y, n in zip(part, yes.tolist(), no.tolist()):
                self.cache[t] = float(torch.sigmoid(torch.tensor(y - n)))  # P(yes) / (P(yes) + P(no))
            self.calls += len(part)
        return [self.cache[t] for t in texts]


class JudgePotential(Potential):
    """exp(beta * judge(text)): on prefixes truncated to a multiple of ``every`` tokens, on the whole text at the end."""

    def __init__(self, judge: Judge, beta: float, every: int):
        self.judge, self.beta, self.every = judge, beta, every

    def log_prefix(self, batch: SequenceBatch) -> torch.Tensor:
        cut = [t[: len(t) // self.every * self.every] for t in batch.token_ids]
        texts = self.judge.lm.tokenizer.batch_decode(cut, skip_special_tokens=True)
        return self.beta * torch.tensor(self.judge(texts), dtype=torch.float64)

    def log_complete(self, batch: SequenceBatch) -> torch.Tensor:
        return self.beta * torch.tensor(self.judge(batch.texts), dtype=torch.float64)


PLACES = [
    "the restaurant Blue Fork",
    "the Hotel Marina",
    "the movie Night Train",
    "the Lakeside Park",
    "the phone Zeta 5",
    "the cafe Little Bean",
    "the book The Long Road",
    "the museum of clocks",
]


def build_task(lm) -> RewardTask:
    judge = Judge(lm)
    return RewardTask(
        title="Recipe: LLM judge as the reward (is the review negative?)",
        cases=[Case(f"Write a one-sentence review of {p}.", data=p) for p in PLACES],
        reward=lambda case, texts: judge(texts),
        potential=lambda case, lm_, args: JudgePotential(judge, args.beta, args.every),
        max_new_tokens=20,
        temperature=1.0,
        metric_note="reward = the judge's P(yes) / (P(yes) + P(no)) for 'Is this review negative?', the judge being "
        "the target model; SMC target p(x) exp(beta R(x)), twist = the judge on the text cut to a multiple of "
        "--every tokens",
    )


def main() -> None:
    ap = reward_args(__doc__, groups=3, cases=3)
    ap.add_argument("--beta", type=float, default=8.0, help="inverse temperature of the reward: exp(beta R)")
    ap.add_argument("--every", type=int, default=8, help="the twist re-runs the judge every this many tokens")
    args = ap.parse_args()
    lm = load_for_recipe(args)
    task = build_task(lm)
    results = run_reward_task(task, args, lm)
    report(task, results, args, args.plot or "llm_judge.png")


if __name__ == "__main__":
    main()
