"""Measure how many target layers the embedded early-exit draft should keep.

For each candidate ``n`` this builds ``derive_draft(target, n)`` and compares its
next-token distribution with the full SmolLM2-135M-Instruct on real text:

* ``KL``     mean KL(p_target || p_draft) per token, in nats;
* ``accept`` mean sum_v min(p_target(v), p_draft(v)): the probability that a
  token drawn from the draft would survive a speculative-decoding style
  acceptance test, i.e. how much of the draft's mass lands where the target's is;
* ``top1``   how often both argmaxes agree;
* ``ESS``    per-token effective-sample-size fraction of importance sampling
  from the draft with target weights, 1 / sum_v pT^2/pD (geometric mean);
* ``best tau`` the same draft with its logits divided by a temperature tau,
  at the tau (from a small grid) that minimises the KL: early exits are
  over-confident, and a proposal can be tempered for free;
* cost: the FLOP ratio draft/target per token, and two measured time ratios
  (median over alternating runs): ``prefill`` for one forward over the longest
  scored sequence, ``decode`` for one cached single-token step of a batch of 8
  (the shape of an SMC step).  The tied 576x49152 LM head costs as much as
  ~8 decoder layers, so the cost is not n/30; on CPU, per-layer Python
  overhead makes decode steps cheaper still than the FLOPs suggest.

The text is a paragraph written for this script plus the target's own greedy
answers to a few chat prompts (only the answer positions are scored there,
since that is where a proposal is actually used).

Run: ``python benchmarks/draft_layers.py`` (converts the model on first use;
about a minute on a 2-core CPU afterwards).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as a plain script, Python puts benchmarks/ (not the repo root) on the
# path; make an uninstalled checkout importable too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smcgen.models.smollm2 import derive_draft, load_smollm2  # noqa: E402

PARAGRAPH = (
    "The old lighthouse at the end of the harbour had not been lit for twenty years, "
    "but the fishermen still steered by it. In the morning its white tower caught the "
    "sun before anything else in town, and in the evening it was the last thing to "
    "fade. When the council proposed to tear it down and build apartments, the whole "
    "village turned up at the meeting. Nobody made a speech; they simply sat there, "
    "row after row, until the councillors understood. The next spring a group of "
    "volunteers repainted the walls, replaced the broken windows and fixed the spiral "
    "staircase. A retired engineer rewired the lamp with modern LEDs, and on the first "
    "night it shone again, children counted the seconds between the flashes and "
    "argued about whether it was four or five."
)

TEMPS = (1.0, 1.5, 2.0, 3.0, 4.0)

CHAT_PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "Write a short story about a robot who learns to paint.",
    "What are the main differences between Python lists and tuples?",
]


def _sequences(model, tokenizer, answer_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """Return (input_ids [1, T], first scored position) pairs."""
    seqs = [(tokenizer(PARAGRAPH, return_tensors="pt").input_ids, 0)]
    for prompt in CHAT_PROMPTS:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=answer_tokens, do_sample=False)
        prompt_len = enc["input_ids"].shape[1]
        # Position t's logits predict token t+1, so the first answer token is
        # predicted from position prompt_len - 1.
        seqs.append((out, prompt_len - 1))
    return seqs


def _hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Residual stream entering each layer (entry n feeds layer n), plus the target's logits."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states, out.logits


def _exit_log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Return the n-layer draft's log-probs, given the residual stream after layer n.

    Exactly what ``derive_draft(model, n)`` computes (``main`` checks this
    once), but without re-running the first n layers for every n.
    """
    with torch.no_grad():
        return torch.log_softmax(model.lm_head(model.model.norm(hidden)).double(), dim=-1)


def _metrics(lt: torch.Tensor, ld: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-position KL(T||D), sum_v min(pT, pD), argmax agreement, and -log ESS/N.

    The last is log E_D[(pT/pD)^2] = log sum_v pT^2/pD: for importance sampling
    one token from the draft and weighting by the target, ESS/N = 1/that.
    Averaging its log gives the geometric mean, i.e. the per-token factor by
    which a block of tokens shrinks the ESS.
    """
    pt = lt.exp()
    return (
        (pt * (lt - ld)).sum(-1),
        torch.minimum(pt, ld.exp()).sum(-1),
        (lt.argmax(-1) == ld.argmax(-1)).double(),
        torch.logsumexp(2 * lt - ld, dim=-1),
    )


def _time_prefill(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(ids, use_cache=False)
        return time.perf_counter() - start


def _time_decode(model, ids: torch.Tensor, batch: int, steps: int) -> float:
    """Median seconds per cached single-token step for a batch of identical rows."""
    prefix = ids[:, :64].expand(batch, -1)
    with torch.no_grad():
        out = model(prefix, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def _time_ratios(model, draft, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(prefill, decode) time of draft / target, alternating the two to share any CPU drift."""
    _time_prefill(model, ids), _time_prefill(draft, ids)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        prefill.append(_time_prefill(draft, ids) / _time_prefill(model, ids))
        decode.append(_time_decode(draft, ids, 8, 8) / _time_decode(model, ids, 8, 8))
    return statistics.median(prefill), statistics.median(decode)


def main() -> None:
    """Print the draft-layer table (markdown) for the embedded SmolLM2 model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12, 15, 20, 25, 27, 28, 29])
    parser.add_argument("--answer-tokens", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    total = model.config.num_hidden_layers
    seqs = _sequences(model, tokenizer, args.answer_tokens)
    runs = []  # (hidden states, target log-probs) per sequence, scored positions only
    for ids, start in seqs:
        hidden, logits = _hidden_states(model, ids)
        scored = slice(start, ids.shape[1] - 1)
        runs.append(([h[0, scored] for h in hidden], torch.log_softmax(logits[0, scored].double(), dim=-1)))
    n_scored = sum(lt.shape[0] for _, lt in runs)

    # Guard the shortcut: a real derive_draft must give the same distribution.
    check_n = args.layers[len(args.layers) // 2]
    ids, start = seqs[0]
    with torch.no_grad():
        real = torch.log_softmax(derive_draft(model, check_n)(ids).logits[0, start:-1].double(), dim=-1)
    assert torch.allclose(real, _exit_log_probs(model, runs[0][0][check_n]), atol=1e-4), "shortcut != derive_draft"

    timing_ids = max((ids for ids, _ in seqs), key=lambda t: t.shape[1])
    # Multiply-adds per token, ignoring attention scores (short contexts here).
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 2)
    head = model.lm_head.weight.numel()

    print(f"scored tokens: {n_scored}  (paragraph + greedy answers to {len(CHAT_PROMPTS)} chat prompts)")
    print(f"prefill timing on {timing_ids.shape[1]} tokens; decode timing: batch 8, 64-token cache")
    print("best τ: the draft's logits divided by τ in {" + ", ".join(f"{t:g}" for t in TEMPS) + "}, minimising KL\n")
    print(
        "| n layers | KL(T‖D) nats/tok | accept Σmin(pT,pD) | top-1 agree | IS ESS/N per token "
        "| best τ: KL / accept / ESS | FLOP ratio | time ratio prefill | time ratio decode |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.layers:
        per_temp = {}
        for tau in TEMPS:
            parts = [
                _metrics(lt, torch.log_softmax(_exit_log_probs(model, hidden[n]) / tau, -1)) for hidden, lt in runs
            ]
            per_temp[tau] = tuple(torch.cat(column).mean().item() for column in zip(*parts, strict=True))
        kl, acc, top1, log_chi = per_temp[1.0]
        best_tau = min(TEMPS, key=lambda t: per_temp[t][0])
        b_kl, b_acc, _, b_log_chi = per_temp[best_tau]
        flop_ratio = (n * per_layer + head) / (total * per_layer + head)
        prefill, decode = _time_ratios(model, derive_draft(model, n), timing_ids, args.repeats)
        print(
            f"| {n} | {kl:.2f} | {acc:.3f} | {top1:.3f} | {math.exp(-log_chi):.1e} | τ={best_tau:g}: {b_kl:.2f} / "
            f"{b_acc:.3f} / {math.exp(-b_log_chi):.1e} | {flop_ratio:.2f} | {prefill:.2f} | {decode:.2f} |"
        )


if __name__ == "__main__":
    main()
