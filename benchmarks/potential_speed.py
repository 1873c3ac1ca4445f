"""What potentials cost on the native engine, measured through ``smcgen.generate`` (GPU host).

One run, same models and prompt, SMC-SD N=8 K=8 (random-weight Llama-3.1-8B target, Llama-3.2-1B
draft, built from their configs) with:

- nothing (the unconstrained baseline);
- a token-level device potential (``TokenPotential``: counts even token ids, torch ops, inside
  the captured cycle);
- a cheap host text potential (``RewardPotential`` over the decoded text, scored one cycle late);
- a learned reward (~100M-parameter torch scorer over all particles' tokens) every cycle, and
  the same scorer only at the end (``every_step=False``): the cost of scoring and the break-even;
- plain SMC (no draft) with the device potential on the native engine against the generic one.

Random weights: what matters is the cost, which does not depend on the weights. Text needs a
tokenizer: the embedded SmolLM2's (``--tokenizer-dir`` or the smcgen cache; the models are then
built with its vocabulary, 49152 tokens) or, when none is available offline, a stand-in decoder
that maps each id to one printable character (vocabulary 128256).

    python benchmarks/potential_speed.py                 # H100: the table above
    python benchmarks/potential_speed.py --tiny          # CPU smoke test (tiny configs, CPU twins)

Writes JSON rows to ``--out`` (default ``$OUT``, else ``benchmarks/results``) and prints a table last.
"""

# ruff: noqa: C408  (model configs read best as keyword dicts)
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from architectures import LLAMA_3_1_8B, LLAMA_3_2_1B, TINY_LLAMA, build_llama, without_vocab

import smcgen
from smcgen.potentials.reward import RewardPotential
from smcgen.potentials.token import LearnedReward, TokenPotential
from smcgen.runners.transformers import LanguageModel

# the script's vocabulary replaces the architecture's own (see main)
TARGET = without_vocab(LLAMA_3_1_8B)
DRAFT = without_vocab(LLAMA_3_2_1B)
TINY = TINY_LLAMA


class EvenTokens(TokenPotential):
    """Device potential: 0.01 per even token id so far (a trivial token-level twist)."""

    def log_potential(self, tokens, lengths, finished):
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return 0.01 * ((tokens % 2 == 0) & (pos < lengths[:, None])).sum(dim=1).float()


class CharDecoder:
    """Stand-in tokenizer: each id decodes to one printable ASCII character (cheap, any vocabulary)."""

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(32 + t % 95) for t in s) for s in sequences]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.batch_decode([ids])[0]


class Scorer(torch.nn.Module):
    """A learned reward of about ``dim``-wide blocks: embedding, encoder blocks, mean pool, linear head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.heads = heads
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "qkv": torch.nn.Linear(dim, 3 * dim),
                    "out": torch.nn.Linear(dim, dim),
                    "up": torch.nn.Linear(dim, 4 * dim),
                    "down": torch.nn.Linear(4 * dim, dim),
                    "n1": torch.nn.LayerNorm(dim),
                    "n2": torch.nn.LayerNorm(dim),
                }
            )
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(dim, 1)

    def forward(self, tokens, lengths):
        r, L = tokens.shape
        valid = torch.arange(L, device=tokens.device)[None] < lengths[:, None]  # [R, L]
        x = self.emb(tokens)
        # keys: the particle's own tokens, and always position 0, so no row is fully masked (NaN) when
        # a particle has no token yet (padding is left out of the pooling below)
        mask = (valid | (torch.arange(L, device=tokens.device) == 0)[None])[:, None, None, :]
        for b in self.blocks:
            q, k, v = b["qkv"](b["n1"](x)).view(r, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + b["out"](a.transpose(1, 2).reshape(r, L, -1))
            x = x + b["down"](F.gelu(b["up"](b["n2"](x))))
        pooled = (x * valid[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
        return torch.tanh(self.head(pooled).squeeze(-1).float())


def text_reward(text: str) -> float:
    """A cheap host text reward: the share of vowels in the text."""
    return sum(ch in "aeiou" for ch in text) / max(len(text), 1)


def load_tokenizer(path: str | None):
    """The SmolLM2 tokenizer from ``path`` or the smcgen cache; None when neither is available offline."""
    from transformers import AutoTokenizer

    candidates = [path] if path else []
    cache = os.path.expanduser("~/.cache/smcgen")
    if os.path.isdir(cache):
        for root, _, files in os.walk(cache):
            if "tokenizer.json" in files:
                candidates.append(root)
    for c in candidates:
        try:
            return AutoTokenizer.from_pretrained(c)
        except (OSError, ValueError):
            continue
    return None


def timed(label: str, repeats: int, **kw) -> dict:
    """Median tokens/s over ``repeats`` calls (after one warm-up) of smcgen.generate(**kw)."""
    smcgen.generate(**kw)
    speeds, out = [], None
    for i in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = smcgen.generate(**{**kw, "seed": i + 1})
        dt = time.perf_counter() - t0
        speeds.append(len(out.token_ids) / dt)
    assert out is not None
    row = {
        "variant": label,
        "engine": out.engine,
        "engine_reason": out.engine_reason,
        "tok_s": statistics.median(speeds),
        "tokens": len(out.token_ids),
        "n_particles": out.n_particles,
        "resamples": out.n_resamples,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test, no speed claim)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request (512; --tiny: 16)")
    ap.add_argument("--generic-tokens", type=int, default=None, help="tokens for the generic engine row (64)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    tiny = args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new_tokens = args.new_tokens or (16 if tiny else 512)
    generic_tokens = args.generic_tokens or (8 if tiny else 64)
    prompt_len = 8 if tiny else args.prompt_len

    tok = load_tokenizer(args.tokenizer_dir)
    decoder = tok if tok is not None else CharDecoder()
    vocab = len(tok) if tok is not None else (512 if tiny else 128256)
    max_pos = prompt_len + max(new_tokens, generic_tokens) + 64
    target = build_llama(
        TINY if tiny else TARGET,
        dtype,
        device,
        0,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        bos_token_id=0,
        eos_token_id=1,
    )
    draft = build_llama(
        TINY if tiny else DRAFT,
        dtype,
        device,
        1,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        bos_token_id=0,
        eos_token_id=1,
    )
    target_lm = LanguageModel(target, decoder, (), max_pos)  # no EOS: every request runs to the budget
    draft_lm = LanguageModel(draft, decoder, (), max_pos)
    scorer = Scorer(vocab, 64 if tiny else 640, 1 if tiny else 4).to(device=device, dtype=dtype).eval()
    n_scorer = sum(p.numel() for p in scorer.parameters())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, vocab, (prompt_len,), generator=gen).tolist()
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "vocab": vocab,
        "tokenizer": type(decoder).__name__,
        "scorer_params": n_scorer,
        "new_tokens": new_tokens,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    print(json.dumps(info), flush=True)

    common = dict(target=target_lm, prompt=prompt, n_particles=8, max_new_tokens=new_tokens, engine="native")
    sd = dict(common, draft=draft_lm, block_size=8)
    R = args.repeats
    rows = [
        timed("SMC-SD N=8 K=8", R, **sd),
        timed("+ device token potential", R, **sd, potentials=[EvenTokens()]),
        timed(
            "+ host text potential (RewardPotential, lag 1)",
            R,
            **sd,
            potentials=[RewardPotential(text_reward, beta=2.0, prefix=True)],
        ),
        timed(
            f"+ learned reward every cycle ({n_scorer / 1e6:.0f}M)",
            R,
            **sd,
            potentials=[LearnedReward(scorer, beta=1.0, every_step=True)],
        ),
        timed(
            "+ learned reward at the end only", R, **sd, potentials=[LearnedReward(scorer, beta=1.0, every_step=False)]
        ),
        timed("plain SMC N=8 + device potential, native", R, **common, potentials=[EvenTokens()]),
        timed(
            "plain SMC N=8 + device potential, generic",
            1,
            **{**common, "engine": "generic", "max_new_tokens": generic_tokens},
            potentials=[EvenTokens()],
        ),
    ]
    base = rows[0]["tok_s"]
    for r in rows:
        r["vs_unconstrained"] = r["tok_s"] / base
    every, end = rows[3], rows[4]
    cycles = math.ceil(new_tokens / 9)
    # seconds the scorer adds per cycle; scoring every cycle costs this much more than scoring once
    per_cycle_s = (new_tokens / every["tok_s"] - new_tokens / end["tok_s"]) / cycles
    summary = {
        "scorer_ms_per_cycle": per_cycle_s * 1e3,
        "every_cycle_over_end_time": end["tok_s"] / every["tok_s"],
        "native_over_generic_plain": rows[5]["tok_s"] / rows[6]["tok_s"],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "potential_speed.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "summary": summary}, f, indent=1)
    print(f"\n{info['device']}, vocab {vocab} ({info['tokenizer']}), {new_tokens} new tokens, median of {R}")
    print("| request | engine | tok/s | vs unconstrained |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['engine']} | {r['tok_s']:.1f} | {r['vs_unconstrained']:.0%} |")
    print(
        f"learned reward: {summary['scorer_ms_per_cycle']:.2f} ms per cycle; every cycle takes "
        f"{summary['every_cycle_over_end_time']:.2f}x the time of scoring at the end only (break-even: the "
        f"twist must save that factor in particles or reruns); native / generic (plain SMC + potential): "
        f"{summary['native_over_generic_plain']:.1f}x"
    )


if __name__ == "__main__":
    main()
