"""genlm-control's AWRS on the embedded SmolLM2-135M weights: the peer side of awrs_vs_genlm.py.

Runs in a separate virtual environment that has genlm-control (0.4.x) installed; reads a JSON
request on stdin (model directory, prompt ids, seeds, N, max_tokens, threads) and prints one JSON
line per seed: wall seconds, whether every particle died, and the text of each particle.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np
import torch
from genlm.backend.llm import AsyncTransformer
from genlm.control import AWRS, Potential, PromptedLLM


class NoLetterE(Potential):
    """Boolean: 0 while the bytes hold no 'e'/'E', -inf after."""

    async def prefix(self, context):
        text = b"".join(context)
        return -np.inf if (b"e" in text or b"E" in text) else 0.0

    async def complete(self, context):
        return await self.prefix(context)


async def one_run(sampler, n, max_tokens):
    return await sampler.smc(n_particles=n, ess_threshold=0.5, max_tokens=max_tokens)


def main() -> None:
    req = json.loads(sys.stdin.read())
    torch.set_num_threads(req["threads"])
    backend = AsyncTransformer.from_name(req["model_dir"], hf_opts={"device_map": "cpu", "torch_dtype": torch.float32})
    llm = PromptedLLM(backend, temperature=req["temperature"])
    llm.prompt_ids = req["prompt_ids"]
    condition = NoLetterE(llm.vocab)
    if req.get("warmup_tokens"):
        llm.model.cache_kv(req["prompt_ids"])
        asyncio.run(one_run(AWRS(llm, condition, seed=12345), req["n_particles"], req["warmup_tokens"]))
    for seed in req["seeds"]:
        backend.clear_cache()
        llm.model.cache_kv(req["prompt_ids"])  # the prompt prefilled once, as smcgen does
        np.random.seed(seed)
        torch.manual_seed(seed)
        sampler = AWRS(llm, condition, seed=seed)
        t0 = time.perf_counter()
        seqs = asyncio.run(one_run(sampler, req["n_particles"], req["max_tokens"]))
        wall = time.perf_counter() - t0
        texts, weights = [], []
        for ctx, w in zip(seqs.contexts, seqs.log_weights):
            texts.append(b"".join(t for t in ctx if isinstance(t, bytes)).decode("utf-8", errors="replace"))
            weights.append(float(w))
        print(
            json.dumps(
                {
                    "seed": seed,
                    "wall_s": wall,
                    "texts": texts,
                    "log_weights": weights,
                    "n_tokens": [len(c) for c in seqs.contexts],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
