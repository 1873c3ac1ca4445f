"""What ``smcgen distill`` learns from: prompt sets, samples of the target (a KV-cached Hugging Face
loop), the divergences it minimises and the held-out evaluation of a draft (both KL directions, the
Renyi-2 divergence, top-1 agreement, sum_v min(p, q)), all at one temperature."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

# Varied instructions (writing, explaining, coding, math, lists, dialogue, rewriting) so the
# target's samples cover the registers a chat draft will meet.
INSTRUCTIONS: tuple[str, ...] = (
    "Write a short poem about the sea.",
    "Explain how photosynthesis works in simple terms.",
    "Give me three tips for staying focused while studying.",
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "What are the benefits of regular exercise?",
    "Tell me a short story about a robot who learns to paint.",
    "How do I make a cup of green tea?",
    "List five fruits that are high in vitamin C.",
    "What is 17 times 23? Show your work.",
    "Write a polite email declining a meeting invitation.",
    "Explain the difference between weather and climate.",
    "Describe a sunset over the mountains.",
    "What causes the seasons on Earth?",
    "Give me a recipe for a simple pancake breakfast.",
    "Write a haiku about autumn leaves.",
    "How does a computer store information?",
    "What should I pack for a weekend camping trip?",
    "Explain what a neural network is to a ten-year-old.",
    "Write a JavaScript function that checks whether a number is prime.",
    "What are some good habits for better sleep?",
    "Compare cats and dogs as pets.",
    "Why is the sky blue?",
    "Write a limerick about a cat who loves cheese.",
    "Explain the water cycle step by step.",
    "Suggest a name for a coffee shop and explain why.",
    "What is the Pythagorean theorem? Give an example.",
    "Write a short dialogue between a teacher and a student about homework.",
    "How can I reduce plastic waste at home?",
    "Describe the main features of the Roman Empire.",
    "What is the difference between a virus and a bacterium?",
    "Write a motivational message for someone starting a new job.",
    "Explain how to solve the equation 2x + 5 = 13.",
    "What are the planets of the solar system, in order?",
    "Rewrite this sentence to sound more formal: 'We gotta finish this soon.'",
    "Give me a list of ideas for a birthday party.",
    "How do vaccines help the immune system?",
    "Write a SQL query that selects all users older than 30.",
    "What is the meaning of the word 'ephemeral'? Use it in a sentence.",
    "Describe your ideal weekend.",
    "Explain why saving money is important.",
    "What happens when you boil water at high altitude?",
    "Write a short product description for a reusable water bottle.",
    "Give three arguments for and against homework in school.",
    "How do bees make honey?",
    "Write a thank-you note to a friend who helped you move.",
    "What is machine learning?",
    "Tell me a fun fact about octopuses.",
    "Explain what inflation is and how it affects people.",
    "Write a short speech for a school graduation.",
    "How do I change a flat tire?",
    "What are prime numbers? List the first ten.",
    "Describe the taste of a lemon to someone who has never had one.",
    "Write a bash command that counts the lines in a file.",
    "What is the role of the heart in the human body?",
    "Give me advice for a job interview.",
    "Write a story that begins with 'It was a dark and stormy night.'",
    "Explain recursion with an example.",
    "Hi! How are you today?",
    "What is the tallest mountain in the world?",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "Write a tweet announcing a new bakery opening.",
)


def chat_prompts(tokenizer: Any, instructions: Sequence[str] = INSTRUCTIONS) -> list[list[int]]:
    """Token ids of each instruction wrapped in the tokenizer's chat template (generation prompt added)."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for text in instructions
    ]


def corpus_prompts(
    tokenizer: Any, path: str | Path, max_prompts: int = 2000, prefix_tokens: int = 48
) -> list[list[int]]:
    """Prompts cut from a text file: each non-empty paragraph's first ``prefix_tokens`` tokens."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()] or [text]
    out = []
    for para in paragraphs[:max_prompts]:
        ids = tokenizer(para, add_special_tokens=False)["input_ids"][:prefix_tokens]
        if len(ids) >= 2:
            out.append(list(ids))
    if not out:
        raise ValueError(f"corpus {path} has no paragraph of at least 2 tokens")
    return out


@dataclass
class SampleBatch:
    """Left-padded target samples: ``ids`` [B, T]; ``real`` marks non-pad tokens (prompt and sample up to EOS);
    ``scored`` marks the positions whose next-token distributions enter the loss (last prompt token onward)."""

    ids: Tensor
    real: Tensor
    scored: Tensor

    def slice(self, rows: slice) -> SampleBatch:
        return SampleBatch(self.ids[rows], self.real[rows], self.scored[rows])


def _positions(real: Tensor) -> Tensor:
    return (real.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_from_target(
    target: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    generator: torch.Generator,
    autocast: bool = False,
    temperature: float = 1.0,
) -> SampleBatch:
    """``n`` samples of the target at ``temperature``, each continuing a prompt drawn (with ``generator``) from
    ``prompts``."""
    device = target.get_input_embeddings().weight.device
    chosen = _pick_prompts(prompts, n, generator)
    pad = int(eos_ids[0]) if eos_ids else 0
    ids, real = _left_padded(chosen, pad, device)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    cache = DynamicCache()
    new_ids, new_real = [], []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    attn = real.long()
    pos = _positions(real)
    step_in, step_pos = ids, pos
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(max_new_tokens):
            logits = (
                target(
                    input_ids=step_in, attention_mask=attn, position_ids=step_pos, past_key_values=cache, use_cache=True
                )
                .logits[:, -1]
                .float()
            )
            probs = torch.softmax(logits / temperature, -1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            new_ids.append(tok)
            new_real.append(~done)
            done = done | torch.isin(tok, eos)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            step_pos = step_pos[:, -1:] + 1
            step_in = tok[:, None]
    return _sample_batch(ids, real, torch.stack(new_ids, 1), torch.stack(new_real, 1))


def _sample_batch(ids: Tensor, real: Tensor, gen_ids: Tensor, gen_real: Tensor) -> SampleBatch:
    """Left-padded prompts ``ids`` / ``real`` [B, W] followed by the sampled tokens ``gen_ids`` / ``gen_real``
    [B, T] (an EOS is real, what follows it padding), with the positions the loss scores."""
    width = ids.shape[1]
    all_ids, all_real = torch.cat([ids, gen_ids], 1), torch.cat([real, gen_real], 1)
    scored = torch.zeros_like(all_real)
    scored[:, width - 1] = True  # the last prompt position predicts the first sampled token
    # A sampled token's position predicts the next one; the row's final token (EOS or cut) predicts nothing used.
    scored[:, width:-1] = gen_real[:, :-1] & gen_real[:, 1:]
    return SampleBatch(all_ids, all_real, scored)


def _pick_prompts(prompts: Sequence[Sequence[int]], n: int, generator: torch.Generator) -> list[list[int]]:
    """``n`` prompts drawn with replacement by ``generator``."""
    pick = torch.randint(len(prompts), (n,), generator=generator, device=generator.device).tolist()
    return [list(prompts[i]) for i in pick]


def _left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``rows`` as ids [B, longest] padded with ``pad`` on the left, and the mask of their real tokens."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    real = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width)
        if r:
            ids[i, cols] = torch.tensor(r, device=device)
            real[i, cols] = True
    return ids, real


def _logits(model: PreTrainedModel, batch: SampleBatch) -> Tensor:
    return model(input_ids=batch.ids, attention_mask=batch.real.long(), position_ids=_positions(batch.real)).logits


def _log_probs(target_logits: Tensor, draft_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p, log q): both models' full-vocabulary log-probabilities at ``temperature`` (float32 math)."""
    return (
        torch.log_softmax(target_logits.float() / temperature, -1),
        torch.log_softmax(draft_logits.float() / temperature, -1),
    )


def kl_terms(target_logits: Tensor, draft_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-position KL(target || draft) in nats over the full vocabulary, both at ``temperature`` (float32 math)."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


#: what ``smcgen distill`` can minimise at each position (see :func:`divergence_terms`)
DIVERGENCES = ("forward", "reverse", "symmetric")


def divergence_terms(
    target_logits: Tensor, draft_logits: Tensor, temperature: float = 1.0, kind: str = "forward"
) -> Tensor:
    """Per-position divergence between the tempered target p and draft q, over the full vocabulary.

    ``forward``: KL(p || q), which punishes the draft for missing mass the target has (unbounded
    importance weights). ``reverse``: KL(q || p), which punishes the draft for putting mass where the
    target has little: the proposals SMC-SD's few particles cannot resample away. ``symmetric``:
    their mean, which asks for both."""
    if kind == "forward":
        return kl_terms(target_logits, draft_logits, temperature)
    if kind == "reverse":
        return kl_terms(draft_logits, target_logits, temperature)
    if kind == "symmetric":  # both directions from one pair of log-softmaxes (full-vocabulary rows)
        log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
        return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {kind!r}")


@torch.no_grad()
def evaluate_draft(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    batch: SampleBatch,
    micro_batch: int = 8,
    autocast: bool = False,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Mean over scored positions of KL(target || draft), KL(draft || target) (``reverse_kl``), top-1
    agreement, sum_v min(p, q) (the expected acceptance of one drafted token) and the Renyi divergence
    of order 2, log sum_v p^2 / q (``renyi2``), all at ``temperature``.

    ``renyi2`` is the log of the importance weight's second moment E_q[(p/q)^2] for one drafted token,
    so exp(-renyi2) is that token's ESS fraction: the figure importance sampling's variance depends on,
    where the KL is only a lower bound of it."""
    device = batch.ids.device
    # per-figure sums stay on the device: one host sync for the whole evaluation
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for start in range(0, batch.ids.shape[0], micro_batch):
        part = batch.slice(slice(start, start + micro_batch))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            t, d = _logits(target, part), _logits(draft, part)
        m = part.scored
        log_p, log_q = _log_probs(t[m], d[m], temperature)
        p, q = log_p.exp(), log_q.exp()
        sums += torch.stack(
            [
                (p * (log_p - log_q)).sum(),
                (q * (log_q - log_p)).sum(),
                (log_p.argmax(-1) == log_q.argmax(-1)).sum(),
                torch.minimum(p, q).sum(),
                torch.logsumexp(2 * log_p - log_q, -1).sum(),
                m.sum(),
            ]
        ).double()
    kl, reverse, agree, overlap, renyi2, count = sums.tolist()
    count = max(count, 1.0)
    return {
        "kl": kl / count,
        "reverse_kl": reverse / count,
        "top1_agreement": agree / count,
        "overlap": overlap / count,
        "renyi2": renyi2 / count,
        "positions": count,
    }
