"""Standard speculative decoding on the native runner: all rows in one batch over paged KV caches.

The same algorithm as :mod:`smcgen.samplers.speculative` (draft K tokens from q, verify them plus
one bonus position in one target forward, keep token i with probability min(1, p/q), draw the
step's last token from the residual or from p), with the same acceptance math
(:func:`~smcgen.samplers.speculative.verify_blocks`), but every row of the batch runs together on
``NativeCausalLM`` with one ``PagedKVCache`` per model, one row per independent sample.

Rows accept different numbers of tokens, so each row keeps its own length ``L`` (committed
tokens, prompt included). The target's cache holds the K/V of a row's first ``L - 1`` tokens and
the draft's of at least its first ``L - 2``: each step the draft is fed the row's last two tokens
(at ``L - 2``) and the target its last token plus the K drafts (at ``L - 1``). Rolling back a
rejected suffix is only lowering ``L``: attention reads a row's cache up to each query's position,
so the K/V left past it are never read and the next step overwrites them. Rows that stop leave the
batch (their block-table rows are dropped from the step's view), so a finished row costs nothing.

Eager (no CUDA graph); one host read per step decides which rows go on.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.runners.native.kv_cache import PagedKVCache
from smcgen.runners.native.model import NativeCausalLM
from smcgen.samplers.run import length_problem
from smcgen.samplers.speculative import (
    SpeculativeRun,
    check_speculative_sizes,
    emitted_tokens,
    tempered_probabilities,
    verify_blocks,
)

#: the draft is fed a row's last two tokens each step, so the prompt needs two
MIN_PROMPT = 2


def native_sd_unsupported(
    target: NativeCausalLM, draft: NativeCausalLM, prompt_len: int, max_new_tokens: int
) -> str | None:
    """Why native SD cannot run a prompt of ``prompt_len`` tokens on these models (None when it can)."""
    if draft.vocab_size != target.vocab_size:
        return f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})"
    if prompt_len < MIN_PROMPT:
        return f"native speculative decoding needs a prompt of at least {MIN_PROMPT} tokens, got {prompt_len}"
    # the step's block never reaches past the shortest row budget, so no row writes past
    # prompt_len + max_new_tokens - 1
    return length_problem(prompt_len, max_new_tokens, min(target.max_positions, draft.max_positions))


def _view(cache: PagedKVCache, rows: Tensor | None) -> PagedKVCache:
    """The cache restricted to ``rows`` (None: all): same pools, a gathered copy of the block table.

    Pages are reserved on the whole cache before a step, so the view's forward only writes into
    pages the rows already own; the copy is never changed, so nothing needs writing back."""
    if rows is None:
        return cache
    view = copy.copy(cache)
    view.block_table = cache.block_table.index_select(0, rows)
    view.n_rows = int(rows.shape[0])
    return view


def _prefill(model: NativeCausalLM, cache: PagedKVCache, prompt: Tensor, n_fed: int, n_rows: int) -> None:
    """Write the prompt's first ``n_fed`` tokens once (row 0) and share their pages with every row."""
    if n_fed == 0:
        return
    head = cache.rows(0, 1)
    head.reserve(n_fed)
    zero = torch.zeros(1, dtype=torch.int32, device=cache.device)
    model(prompt[None, :n_fed], zero, head, last_only=True, max_keys=n_fed)
    cache.resample(torch.zeros(n_rows, dtype=torch.long, device=cache.device), n_fed)


@torch.inference_mode()
def native_speculative_decode(
    target: NativeCausalLM,
    draft: NativeCausalLM,
    prompt_ids: Sequence[int],
    *,
    n_rows: int = 1,
    block_size: int = 4,
    max_new_tokens: int = 64,
    target_temperature: float = 1.0,
    draft_temperature: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    seed: int | None = None,
    page_size: int = 16,
    progress: bool = False,
) -> SpeculativeRun:
    """Draw ``n_rows`` independent exact samples of the tempered target by speculative decoding.

    The native counterpart of :func:`~smcgen.samplers.speculative.speculative_decode` (same
    arguments, plus the models' ``eos_token_ids`` and the caches' ``page_size``); its random
    streams differ, so seeded runs reproduce within one engine, not across the two."""
    check_speculative_sizes(n_rows, block_size, max_new_tokens, target_temperature, draft_temperature)
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    prompt = [int(t) for t in prompt_ids]
    problem = native_sd_unsupported(target, draft, len(prompt), max_new_tokens)
    if problem is not None:
        raise ValueError(problem)
    device = target.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    eos = {int(t) for t in eos_token_ids}
    t_start = time.perf_counter()

    P, R = len(prompt), n_rows
    max_len = P + max_new_tokens  # no position written reaches it (native_sd_unsupported)
    max_pages = -(-max_len // page_size)
    caches = []
    for model, n_fed in ((target, P - 1), (draft, P - 2)):
        n_pages = PagedKVCache.pages_needed(R, 1, n_fed, max_len, page_size)
        caches.append(model.make_cache(n_pages, R, max_pages, page_size))
    tcache, dcache = caches
    prompt_t = torch.tensor(prompt, dtype=torch.long, device=device)
    _prefill(target, tcache, prompt_t, P - 1, R)
    _prefill(draft, dcache, prompt_t, P - 2, R)

    # every row's committed tokens (prompt + output) on the device, and their count
    seqs = torch.zeros(R, max_len, dtype=torch.long, device=device)
    seqs[:, :P] = prompt_t
    lengths = [P] * R
    outputs: list[list[int]] = [[] for _ in range(R)]
    steps = [0] * R
    active = list(range(R))
    drafted_total = accepted_total = 0
    bar = tqdm(total=R * max_new_tokens, disable=not progress, desc="sd (native)", unit="tok", leave=False)
    while active:
        rows = None if len(active) == R else torch.tensor(active, dtype=torch.long, device=device)
        A = len(active)
        # one block size for the batch: no row drafts past its own budget, so none writes past max_len
        k = min(block_size, min(max_new_tokens - len(outputs[r]) for r in active))
        length = torch.tensor([lengths[r] for r in active], dtype=torch.long, device=device)
        own = seqs if rows is None else seqs.index_select(0, rows)
        top = max(lengths[r] for r in active)

        # draft: the row's last two tokens at L - 2 (the second may be missing from the cache when
        # the last step kept every draft), then one drafted token a forward
        dcache.reserve(top + k - 1)
        dview = _view(dcache, rows)
        feed = own.gather(1, (length - 2)[:, None] + torch.arange(2, device=device))
        start = length - 2
        drafted, q_rows = [], []
        for _j in range(k):
            logits = draft(feed, start.to(torch.int32), dview, last_only=True)
            q = tempered_probabilities(logits, draft_temperature)
            tok = torch.multinomial(q, 1, generator=generator)
            drafted.append(tok)
            q_rows.append(q)
            start = start + feed.shape[1]
            feed = tok
        x = torch.cat(drafted, dim=1)  # [A, k]

        # target: the last committed token and the k drafts at L - 1, in one forward
        tcache.reserve(top + k)
        last_tok = own.gather(1, (length - 1)[:, None])
        logits = target(torch.cat([last_tok, x], dim=1), (length - 1).to(torch.int32), _view(tcache, rows))
        p = tempered_probabilities(logits, target_temperature)
        n_kept, last = verify_blocks(p, torch.stack(q_rows, dim=1), x, generator)

        # host: append each row's tokens; rows stopped by EOS or the budget leave the batch
        x_host, kept_host, last_host = x.tolist(), n_kept.tolist(), last.tolist()
        drafted_total += k * A
        accepted_total += sum(kept_host)
        still = []
        for i, r in enumerate(active):
            new, stopped = emitted_tokens(x_host[i], kept_host[i], last_host[i], max_new_tokens - len(outputs[r]), eos)
            steps[r] += 1
            outputs[r].extend(new)
            seqs[r, lengths[r] : lengths[r] + len(new)] = torch.tensor(new, dtype=torch.long, device=device)
            lengths[r] += len(new)
            bar.update(len(new))
            if not stopped and len(outputs[r]) < max_new_tokens:
                still.append(r)
        active = still
    bar.close()
    for cache in caches:
        cache.check_status()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return SpeculativeRun(outputs, steps, drafted_total, accepted_total, time.perf_counter() - t_start)


__all__ = ["MIN_PROMPT", "native_sd_unsupported", "native_speculative_decode"]
