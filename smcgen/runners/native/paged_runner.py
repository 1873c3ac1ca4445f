"""The native paged model behind the transformers runner's interface: one forward at a time.

:class:`PagedLMRunner` gives a :class:`~smcgen.runners.native.model.NativeCausalLM` the three
methods the generic engine's cycle asks of a target (``start``, ``forward_new``, ``reorder``), with
its K/V in a :class:`~smcgen.runners.native.kv_cache.PagedKVCache`: the prompt prefilled once and
shared by every row, resampling a copy of block-table rows. It runs eagerly, one call per step, so
the shared cycle of :mod:`smcgen.samplers.cycle` runs unchanged over the native model (what the
native engine captures as a CUDA graph, this runs step by step, with any potential, proposal or
resampler); the tests use it to check that both runners give one cycle the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import NativeCausalLM


class PagedLMRunner:
    """Incremental scorer of equal-length rows over a native model's paged KV cache.

    ``max_new_tokens`` bounds the tokens a row gains after the prompt (the cache is sized for it
    when :meth:`start` sees the prompt); ``page_size`` is the cache's page length.
    """

    def __init__(self, model: NativeCausalLM, max_new_tokens: int, page_size: int = 16):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.model, self.max_new_tokens, self.page_size = model, max_new_tokens, page_size
        self.cache: PagedKVCache | None = None
        self.fed = 0

    @torch.inference_mode()
    def start(self, prompt_ids: Tensor, n_rows: int) -> None:
        """Prefill all but the last prompt token in one row, then share its pages with ``n_rows`` rows."""
        prompt = prompt_ids.reshape(1, -1).to(self.model.device)
        n_fed = prompt.shape[1] - 1
        max_len = prompt.shape[1] + self.max_new_tokens
        if max_len > self.model.max_positions:
            raise ValueError(
                f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds the "
                f"native model's {self.model.max_positions} positions"
            )
        pages = PagedKVCache.pages_needed(n_rows, 1, max(n_fed, 1), max_len, self.page_size)
        self.cache = self.model.make_cache(pages, n_rows, -(-max_len // self.page_size), self.page_size)
        self.fed = 0
        if n_fed > 0:
            first = self.cache.rows(0, 1)
            first.reserve(n_fed)
            zero = torch.zeros(1, dtype=torch.int32, device=prompt.device)
            self.model(prompt[:, :n_fed], zero, first, last_only=True, max_keys=n_fed)
            self.cache.resample(torch.zeros(n_rows, dtype=torch.long, device=prompt.device), n_fed)
            self.fed = n_fed

    @torch.inference_mode()
    def forward_new(self, sequences: Tensor) -> Tensor:
        """Feed ``sequences[:, fed:]``; return logits ``[R, T - fed, V]``, row j predicting token fed+j+1
        (on ``sequences``' device, as the cycle's other tensors)."""
        assert self.cache is not None, "call start() first"
        new = sequences[:, self.fed :].to(self.model.device)
        if new.shape[1] == 0:
            raise RuntimeError("forward_new called with no unseen tokens")
        self.cache.reserve(sequences.shape[1])
        start = torch.full((new.shape[0],), self.fed, dtype=torch.int32, device=new.device)
        logits = self.model(new, start, self.cache)
        self.cache.check_status()
        self.fed = sequences.shape[1]
        return logits.to(sequences.device)

    def reorder(self, rows: Tensor) -> None:
        """Make row i a copy of row ``rows[i]`` (resampling): block tables copied, the partial page too."""
        if self.cache is not None and self.fed > 0:
            self.cache.resample(rows, self.fed)


__all__ = ["PagedLMRunner"]
