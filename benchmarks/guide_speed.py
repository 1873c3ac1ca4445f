"""Grammar-guided SMC-SD on the native engine: which path each guide takes and what it costs (GPU host).

One run, through ``smcgen.generate``: random-weight Llama-3.1-8B target and Llama-3.2-1B draft
(built from their configs), SMC-SD N=8 K=8, 512 new tokens, with

- no guide (the baseline);
- a one-line regex on the device path (its token automaton inside the captured cycle);
- the same regex forced onto the host (automaton hidden): masks from xgrammar on the CPU between
  the cycle's captured pieces (samplers/native_host_guide.py), and once more with the old eager
  cycle (``NativeSMC.host_guide_pieces = False``);
- a JSON schema from a pydantic model (str with max_length, int, enum, list of str with
  max_length), one without strings (enums, int, bool) and a context-free grammar (the SQL
  recipe's EBNF, recipes/_grammars.py), each on whatever path the engine picks for it.

Each row says which path ran (device automaton / host pieces / host eager, from
``result.engine_reason``), tokens/s of the answer and of all particles, and the ratio to the
unguided baseline; and the steady milliseconds per cycle (decode time after the first cycle, which
a host guide runs eagerly while its pieces are recorded) with its ratio to unguided, the speed a
long answer sees whatever length this one had. Grammars need a real tokenizer: ``--tokenizer-dir`` (any Hugging Face tokenizer
directory), else a synthetic word-level tokenizer of 128256 tokens (printable characters and
random multi-character pieces, so masks cost what a real vocabulary's do) is built in memory. The
regex is a sentence (``[A-Z][a-z ,]*`` by default: no full stop, so particles use the whole budget
as unguided ones do). Needs only torch, transformers, xgrammar and pydantic.

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
from typing import Literal

import torch
from architectures import LLAMA_3_1_8B, LLAMA_3_2_1B, TINY_LLAMA, build_llama, without_vocab
from pydantic import BaseModel, Field

import smcgen
from smcgen.potentials.grammar import GrammarPotential
from smcgen.runners.transformers import LanguageModel
from smcgen.samplers.native import NativeSMC

# the script's vocabulary replaces the architecture's own (see main)
TARGET = without_vocab(LLAMA_3_1_8B)
DRAFT = without_vocab(LLAMA_3_2_1B)
TINY = TINY_LLAMA
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


class Person(BaseModel):
    """The JSON row's schema: a few bounded fields of the common kinds."""

    name: str = Field(max_length=20)
    age: int
    role: Literal["admin", "user", "guest"]
    tags: list[str] = Field(max_length=3)


class Order(BaseModel):
    """A JSON schema without strings or counted lists (enums, int, bool): its grammar tabulates."""

    item: Literal["apple", "pear", "fig"]
    quantity: int
    gift: bool


def sql_grammar_text() -> str:
    """The SQL recipe's grammar for its schema (recipes/sql_query.py): a recursive CFG."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))
    from _grammars import sql_grammar
    from sql_query import JOINS, TABLES

    return sql_grammar(TABLES, JOINS)


def path_of(out, guided: bool, forced_eager: bool) -> str:
    """Which path ran the guide, from the result (``engine_reason`` is the native engine's guide_reason)."""
    if out.engine != "native":
        return f"generic engine: {out.engine_reason}"
    if not guided:
        return "-"
    if out.engine_reason is None:
        return "device automaton"
    if forced_eager:
        return "host eager"
    if "capturing the cycle's pieces failed" in out.engine_reason:
        return "host pieces, eager (capture failed: see engine_reason)"
    return "host pieces" if "pieces" in out.engine_reason else f"host ({out.engine_reason})"


def timed(label: str, repeats: int, forced_eager: bool = False, **kw) -> dict:
    """Median tokens/s (the answer's and all particles', over wall time) of ``repeats`` calls after
    one warm-up. ``forced_eager``: run host guides with the eager cycle instead of the pieces."""
    NativeSMC.host_guide_pieces = not forced_eager
    try:
        smcgen.generate(**kw)
        speeds, particle_speeds, cycle_ms, out = [], [], [], None
        for i in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = smcgen.generate(**{**kw, "seed": i + 1})
            wall = time.perf_counter() - t0
            speeds.append(len(out.token_ids) / wall)
            particle_speeds.append(out.particle_tokens / wall)
            timing = smcgen.api.cached_engine(kw["target"], draft=kw["draft"], engine=kw["engine"])._native
            timing = timing.most_recent().last_timing
            cycle_ms.append(steady_cycle_ms(timing))
    finally:
        NativeSMC.host_guide_pieces = True
    assert out is not None
    row = {
        "variant": label,
        "engine": out.engine,
        "path": path_of(out, kw.get("guide") is not None, forced_eager),
        "engine_reason": out.engine_reason,
        "tok_s": statistics.median(speeds),
        "particle_tok_s": statistics.median(particle_speeds),
        "cycle_ms": statistics.median(cycle_ms),
        "tokens": len(out.token_ids),
        "resamples": out.n_resamples,
        "dead": bool(out.dead),
        "answer_head": out.text[:60],
        # the last repeat's answer and weight estimate: the same seed and masks draw the same tokens
        # on every path (the regex rows check the captured pieces against the eager cycle)
        "answer_ids": out.token_ids,
        "log_z": out.log_z,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "answer_ids"}), flush=True)
    return row


def steady_cycle_ms(timing: dict) -> float:
    """Milliseconds per decode cycle, less a host guide's warm-up: what a long answer pays per
    cycle. Pieces recorded in this call run their first cycle eagerly and record their graphs inside
    the decode time, which a short answer (a finished SQL query) would otherwise spread over few
    cycles; that cycle is left out. Pieces kept from a call of the same shape have no warm-up, and
    every cycle counts; the whole-cycle graph is captured before decoding."""
    warm = timing.get("pieces_warm_up_s", 0.0)
    cycles = timing["cycles"] - (1 if warm else 0)
    return 1e3 * (timing["decode_s"] - warm) / max(cycles, 1)


def automaton_info(guide: GrammarPotential) -> dict:
    """The guide's token automaton: states, MiB and build time, or why it has none (and how long that took)."""
    t0 = time.perf_counter()
    a = guide.token_automaton()
    s = time.perf_counter() - t0
    if isinstance(a, str):
        return {"automaton": None, "why_not": a, "tried_s": round(s, 2)}
    return {"automaton": {"states": a.n_states, "MiB": round(a.nbytes / 2**20, 1), "build_s": round(s, 2)}}


def host_mask_ms(guide: GrammarPotential, rows: int = 8, steps: int = 64) -> dict:
    """What one host step costs the CPU: milliseconds to compute the next-token masks of ``rows``
    particles from their tokens (as the engine asks for them), over ``steps`` steps of random
    allowed tokens (seeded); median and 90th percentile."""
    import numpy as np

    rng = np.random.default_rng(0)
    guide.start([], rows)
    history = torch.zeros(rows, 0, dtype=torch.long)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        mask = guide.request_bitmask(history, 0).result()
        times.append(1e3 * (time.perf_counter() - t0))
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : guide.vocab_size]
        nxt = []
        for r in range(rows):
            ok = np.flatnonzero(bits[r])
            ok = ok[~np.isin(ok, guide.eos_token_ids)] if len(ok) > 1 else ok
            nxt.append(int(rng.choice(ok)))
        history = torch.cat([history, torch.tensor(nxt)[:, None]], dim=1)
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(float(np.percentile(times, 90)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test, no speed claim)")
    ap.add_argument(
        "--new-tokens", type=int, default=None, help="tokens per request (512; --tiny: 63, room for the JSON schema)"
    )
    ap.add_argument("--regex", default=r"[A-Z][a-z ,]*")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new_tokens = args.new_tokens or (63 if args.tiny else 512)
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
    models = []
    for config, seed in ((TINY if args.tiny else TARGET, 0), (TINY if args.tiny else DRAFT, 1)):
        model = build_llama(
            config,
            dtype,
            device,
            seed,
            vocab_size=vocab,
            max_position_embeddings=max_pos,
            bos_token_id=0,
            eos_token_id=EOS,
        )
        models.append(LanguageModel(model, tok, (eos,), max_pos))
    target_lm, draft_lm = models
    prompt = torch.randint(2, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    guides = {
        "regex": GrammarPotential.regex(args.regex).bind(target_lm),
        "json": GrammarPotential.json_schema(Person).bind(target_lm),
        "json_no_strings": GrammarPotential.json_schema(Order).bind(target_lm),
        "cfg": GrammarPotential.ebnf(sql_grammar_text()).bind(target_lm),
    }
    host_regex = GrammarPotential.regex(args.regex).bind(target_lm)
    if host_regex is guides["regex"]:
        raise RuntimeError("the host row needs its own bound grammar")
    # the host rows: the same regex with its automaton hidden, so the engine computes masks on the CPU
    host_regex.token_automaton = lambda *a, **k: "hidden by the benchmark (host path)"
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "vocab": vocab,
        "tokenizer": args.tokenizer_dir or "synthetic word-level",
        "regex": args.regex,
        "json_schema": Person.model_json_schema(),
        "json_schema_no_strings": Order.model_json_schema(),
        "cfg": "recipes/_grammars.py sql_grammar (recipes/sql_query.py schema)",
        "new_tokens": new_tokens,
        "automata": {name: automaton_info(g) for name, g in guides.items()},
        # the CPU side of a host-guided step, N=8 rows (what the pieces must hide under a draft forward)
        "host_mask_ms_8_rows": {name: host_mask_ms(g) for name, g in guides.items()},
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
        # a random model may leave a JSON document or a query unfinished at the budget: the speed
        # still counts (the row says so); flag it instead of raising
        on_dead="flag",
    )
    R = args.repeats
    rows = [
        timed("SMC-SD N=8 K=8, no guide", R, **sd),
        timed("+ regex (its automaton)", R, **sd, guide=guides["regex"]),
        timed("+ regex on the host (automaton hidden)", R, **sd, guide=host_regex),
        timed("+ regex on the host, eager cycle", R, forced_eager=True, **sd, guide=host_regex),
        timed("+ JSON schema (pydantic Person)", R, **sd, guide=guides["json"]),
        timed("+ JSON schema without strings (pydantic Order)", R, **sd, guide=guides["json_no_strings"]),
        timed("+ CFG (SQL recipe grammar)", R, **sd, guide=guides["cfg"]),
    ]
    regex_rows = rows[1:4]
    info["regex_paths_agree"] = all(r["answer_ids"] == regex_rows[0]["answer_ids"] for r in regex_rows)
    base = rows[0]["tok_s"]
    base_p = rows[0]["particle_tok_s"]
    for r in rows:
        r["vs_unguided"] = r["tok_s"] / base
        r["particle_vs_unguided"] = r["particle_tok_s"] / base_p
        # every cycle adds K+1 tokens to each live particle: the cycle time ratio is the steady speed ratio
        r["cycle_vs_unguided"] = rows[0]["cycle_ms"] / r["cycle_ms"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "guide_speed.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(
        "regex rows (device automaton, host pieces, host eager) drew the same answer for the same seed: "
        f"{info['regex_paths_agree']}; log Z: {[r['log_z'] for r in regex_rows]}"
    )
    print(f"\n{info['device']}, vocab {vocab}, {new_tokens} new tokens, median of {R}; automata:")
    for name, a in info["automata"].items():
        print(f"  {name}: {a}; host masks of 8 rows: {info['host_mask_ms_8_rows'][name]}")
    print(
        "| request | path | tok/s (answer) | answer tokens | vs unguided | particle tok/s | vs unguided "
        "| ms per cycle (after the first) | vs unguided | dead |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for r in rows:
        print(
            f"| {r['variant']} | {r['path']} | {r['tok_s']:.1f} | {r['tokens']} | {r['vs_unguided']:.0%} "
            f"| {r['particle_tok_s']:.1f} | {r['particle_vs_unguided']:.0%} | {r['cycle_ms']:.2f} "
            f"| {r['cycle_vs_unguided']:.0%} | {'yes' if r['dead'] else ''} |"
        )


if __name__ == "__main__":
    main()
