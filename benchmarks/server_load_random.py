"""Load test of the HTTP server on the GPU host: many ``openai`` clients against a Llama-3.1-8B /
Llama-3.2-1B pair with random weights (speed only: the text is noise).

The models are built from their configs (as in ``benchmarks/engine_speed.py``) with a byte-level
tokenizer made in-process (256 byte tokens and an end token; the random model's other ids decode to
nothing), wrapped in one :class:`smcgen.Engine`, and served by ``smcgen.server.create_app`` under
uvicorn on 127.0.0.1 in this process. The client side (``--clients`` concurrent ``openai`` async
clients, ``--requests`` each, retries off) is ``benchmarks/server_load.py``'s, and so is the table.

    python benchmarks/server_load_random.py --out $OUT                    # H100: 64 clients x 2
    python benchmarks/server_load_random.py --tiny --clients 4 --requests 1  # the script, on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time

import httpx
import torch
from engine_speed import PAIR, TINY, build
from server_load import free_port, load, outcome, print_table

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def byte_tokenizer():
    """A PreTrainedTokenizerFast over the 256 bytes (byte-level BPE without merges) plus ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (checks the script)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-particles", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import uvicorn

    import smcgen
    from smcgen.runners.transformers import LanguageModel
    from smcgen.server.app import create_app

    if args.tiny:
        device, dtype, pair, engine_name = torch.device("cpu"), torch.float32, TINY, "native"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --tiny)")
        device, dtype, pair, engine_name = torch.device("cuda"), torch.bfloat16, PAIR, "auto"
    tok = byte_tokenizer()
    t0 = time.perf_counter()
    models = {}
    for role, seed in (("target", 0), ("draft", 1)):
        name, fields = pair[role]
        raw = build(fields, dtype, device, seed).model
        models[role] = LanguageModel.wrap(raw, tok)
    engine = smcgen.Engine(
        models["target"],
        draft=models["draft"],
        n_particles=args.n_particles,
        block_size=args.block_size,
        max_new_tokens=args.max_tokens,
        engine=engine_name,
        target_temperature=0.7,
        draft_temperature=0.7,
    )
    warm = engine([{"role": "user", "content": "warm up"}], seed=0)  # conversion and graph capture before the clock
    built_s = time.perf_counter() - t0

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, "random-pair", max_queue=args.clients * 2, max_batch=args.max_batch),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.1)
    args.model = "random-pair"
    try:
        records, wall = asyncio.run(load(base, args))
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    summary = outcome(records, wall, args)
    summary.update(
        pair=[pair["target"][0], pair["draft"][0]],
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        engine=warm.engine,
        engine_stats=dict(engine.stats),
        block_size=args.block_size,
        max_batch=args.max_batch,
        build_s=built_s,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "server_load_random.json"), "w") as f:
        json.dump({"summary": summary, "records": records, "metrics": metrics}, f, indent=1)
    print(
        f"# server load, {summary['pair'][0]} / {summary['pair'][1]} random weights, {summary['device']}, "
        f"{warm.engine} engine, N={args.n_particles} K={args.block_size}, {args.max_tokens} tokens per answer, "
        f"max batch {args.max_batch}"
    )
    print_table(records, summary)


if __name__ == "__main__":
    main()
