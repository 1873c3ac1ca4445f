"""Regex-guided SMC-SD on the native engine: the device automaton against the host masks (GPU host).

One run, through ``smcgen.generate``: random-weight Llama-3.1-8B target and Llama-3.2-1B draft
(built from their configs), SMC-SD N=8 K=8, 512 new tokens, with

- no guide (the baseline);
- a one-line regex guide on the device path (the guide's token automaton, inside the captured
  cycle: ``result.engine_reason`` is None);
- the same regex on the host path (xgrammar masks computed on the CPU at every drafted token,
  eager cycles; forced here by hiding the automaton).

Grammars need a real tokenizer: ``--tokenizer-dir`` (any Hugging Face tokenizer directory), else a
synthetic word-level tokenizer of 128256 tokens (printable characters and random multi-character
pieces, so masks cost what a real vocabulary's do) is built in memory. The regex is a sentence
(``[A-Z][a-z ,]*`` by default: no full stop, so particles use the whole budget as unguided ones do).

    python benchmarks/guide_speed.py --out $OUT            # H100: the table
    python benchmarks/guide_speed.py --tiny                # CPU smoke test (tiny configs, no speed claim)

Writes ``guide_speed.json`` to ``--out`` (default ``$OUT``, else ``benchmarks/results``) and prints a
table last.
"""

# ruff: noqa: C408  (model configs read best as keyword dicts)
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
from architectures import LLAMA_3_1_8B, LLAMA_3_2_1B, build_llama

import smcgen
from smcgen.potentials.grammar import GrammarPotential
from smcgen.runners.transformers import LanguageModel

# the script's vocabulary replaces the architecture's own (see main)
TARGET = {k: v for k, v in LLAMA_3_1_8B.items() if k not in ("vocab_size", "max_position_embeddings")}
DRAFT = {k: v for k, v in LLAMA_3_2_1B.items() if k not in ("vocab_size", "max_position_embeddings")}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
EOS = 1


def synthetic_tokenizer(size: int):
    """A word-level fast tokenizer of ``size`` tokens: ``<s>``, ``</s>`` (EOS, id 1), the printable ASCII
    characters, then distinct random pieces of 2-8 characters (letters, spaces, digits, punctuation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": EOS}
    for c in range(32, 127):
        vocab.setdefault(chr(c), len(vocab))
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz     ,.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    while len(vocab) < size:
        vocab.setdefault("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))), len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="</s>")


def timed(label: str, repeats: int, **kw) -> dict:
    """Median tokens/s (the answer's tokens over wall time) of ``repeats`` calls after one warm-up."""
    smcgen.generate(**kw)
    speeds, out = [], None
    for i in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = smcgen.generate(**{**kw, "seed": i + 1})
        speeds.append(len(out.token_ids) / (time.perf_counter() - t0))
    assert out is not None
    row = {
        "variant": label,
        "engine": out.engine,
        "engine_reason": out.engine_reason,
        "tok_s": statistics.median(speeds),
        "tokens": len(out.token_ids),
        "resamples": out.n_resamples,
        "answer_head": out.text[:60],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test, no speed claim)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request (512; --tiny: 16)")
    ap.add_argument("--regex", default=r"[A-Z][a-z ,]*")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new_tokens = args.new_tokens or (16 if args.tiny else 512)
    prompt_len = 8 if args.tiny else 64

    if args.tokenizer_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
        eos = tok.eos_token_id
    else:
        tok = synthetic_tokenizer(2048 if args.tiny else 128256)
        eos = EOS
    vocab = len(tok)
    max_pos = prompt_len + new_tokens + 64
    target = build_llama(
        TINY if args.tiny else TARGET,
        dtype,
        device,
        0,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        bos_token_id=0,
        eos_token_id=EOS,
    )
    draft = build_llama(
        TINY if args.tiny else DRAFT,
        dtype,
        device,
        1,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        bos_token_id=0,
        eos_token_id=EOS,
    )
    target_lm = LanguageModel(target, tok, (eos,), max_pos)
    draft_lm = LanguageModel(draft, tok, (eos,), max_pos)
    prompt = torch.randint(2, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    device_guide = GrammarPotential.regex(args.regex).bind(target_lm)
    t0 = time.perf_counter()
    automaton = device_guide.token_automaton()
    build_s = time.perf_counter() - t0
    host_guide = GrammarPotential.regex(args.regex).bind(target_lm)
    if host_guide is device_guide:
        raise RuntimeError("the host row needs its own bound grammar")
    # the host row: the same grammar with its automaton hidden, so the engine computes masks on the CPU
    host_guide.token_automaton = lambda *a, **k: "hidden by the benchmark (host path)"
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "vocab": vocab,
        "tokenizer": args.tokenizer_dir or "synthetic word-level",
        "regex": args.regex,
        "new_tokens": new_tokens,
        "automaton": automaton
        if isinstance(automaton, str)
        else {"states": automaton.n_states, "MiB": automaton.nbytes / 2**20, "build_s": build_s},
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    print(json.dumps(info), flush=True)

    sd = dict(
        target=target_lm,
        draft=draft_lm,
        prompt=prompt,
        n_particles=8,
        block_size=8,
        max_new_tokens=new_tokens,
        engine="native",
    )
    R = args.repeats
    rows = [
        timed("SMC-SD N=8 K=8, no guide", R, **sd),
        timed("+ regex guide, device automaton", R, **sd, guide=device_guide),
        timed("+ regex guide, host masks", R, **sd, guide=host_guide),
    ]
    base = rows[0]["tok_s"]
    for r in rows:
        r["vs_unguided"] = r["tok_s"] / base
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "guide_speed.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(
        f"\n{info['device']}, vocab {vocab}, regex {args.regex!r}, {new_tokens} new tokens, median of {R}; "
        f"automaton: {info['automaton']}"
    )
    print("| request | engine | guide on | tok/s | answer tokens | vs unguided |\n|---|---|---|---:|---:|---:|")
    for r, where in zip(rows, ("-", "device", "host")):
        print(
            f"| {r['variant']} | {r['engine']} | {where} | {r['tok_s']:.1f} | {r['tokens']} | {r['vs_unguided']:.0%} |"
        )


if __name__ == "__main__":
    main()
