"""The peer baseline every speed benchmark reports beside smcgen: Hugging Face ``generate``."""

from __future__ import annotations

import statistics
import time

import torch


def hf_generate_speed(
    hf_model, ids: torch.Tensor, new_tokens: int, temperature: float = 0.7, repeats: int = 1
) -> float:
    """Tokens/s of ``hf_model.generate`` sampling ``new_tokens`` after ``ids`` [1, P] (at
    ``temperature``, no top-k / top-p, the token count forced), after an 8-token warm-up; the median
    of ``repeats`` seeded calls."""
    kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "pad_token_id": 0}
    hf_model.generate(ids, min_new_tokens=8, max_new_tokens=8, **kw)
    speeds = []
    for r in range(repeats):
        torch.manual_seed(r)
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf_model.generate(ids, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **kw)
        if ids.is_cuda:
            torch.cuda.synchronize()
        speeds.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    return statistics.median(speeds)
