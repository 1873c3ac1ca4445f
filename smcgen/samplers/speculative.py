"""Standard speculative decoding: draft K tokens, verify them in one target forward, keep an exact sample.

Each step the draft samples K tokens from q; the target scores all of them (plus one more
position) in one forward. Drafted token i is kept with probability min(1, p(x_i) / q(x_i)); at the
first rejection the step ends with a token drawn from the residual normalize(max(0, p - q)), and
when every drafted token is kept the step ends with a bonus token drawn from p. Every emitted token
is then distributed exactly as the target's next-token distribution p given the tokens before it
(Leviathan et al. 2023, Chen et al. 2023), so the output is an exact sample of the target: no
weights, no resampling. The caches of both models roll back to the kept prefix after each step.

Rows are independent samples of one prompt; each row runs on its own caches (rows accept different
numbers of tokens, and the generic runner keeps equal-length rows), so N rows cost N times one.
Only the per-token tempered target p_tau is supported: the sequence-level power p^alpha (alpha != 1)
and potentials are not next-token distributions a rejection test can verify; use SMC for those.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.core.sampling import log_probs
from smcgen.runners.transformers import CausalLMRunner, LanguageModel
from smcgen.samplers.run import length_problem


@dataclass(frozen=True)
class SpeculativeRun:
    """Output of :func:`speculative_decode`: ``tokens[i]`` is row i's continuation (EOS included when
    it stopped on one); ``drafted``/``accepted`` count draft tokens proposed and kept over all rows;
    ``steps[i]`` is the number of target forwards row i took."""

    tokens: list[list[int]]
    steps: list[int]
    drafted: int
    accepted: int
    elapsed_s: float

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the target kept (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


def verify_blocks(p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The rejection test of one block for each of R rows: tokens kept per row, and each row's last token.

    ``p`` ``[R, k + 1, V]`` holds the target's next-token probabilities at each drafted position and
    one after; ``q`` ``[R, k, V]`` the draft's probabilities the tokens ``drafted`` ``[R, k]`` were
    drawn from. Token i is kept with probability min(1, p_i(x_i) / q_i(x_i)); the first rejected
    position gets a draw from normalize(max(0, p_i - q_i)); when all are kept the extra token is
    drawn from p_k. Returns ``(n_kept [R], last [R])`` (int64, on ``p``'s device). Both SD loops
    (this module's and ``native_sd``'s) verify through this one function.
    """
    n_rows, k = int(drafted.shape[0]), int(drafted.shape[1])
    vocab = p.shape[-1]
    n_kept = torch.full((n_rows,), k, dtype=torch.long, device=p.device)
    if k:
        idx = drafted[..., None].to(p.device)
        ratio = p[:, :k].gather(2, idx).squeeze(2) / q.gather(2, idx).squeeze(2)
        u = torch.rand(n_rows, k, generator=generator, device=p.device, dtype=p.dtype)
        rejected = u >= ratio
        # the first rejected position (argmax of a bool row finds the first True), k when none
        n_kept = torch.where(rejected.any(dim=1), rejected.long().argmax(dim=1), n_kept)
    at = n_kept[:, None, None].expand(n_rows, 1, vocab)
    dist = p.gather(1, at).squeeze(1)
    if k:
        q_at = q.gather(1, at.clamp_max(k - 1)).squeeze(1)
        residual = (dist - q_at).clamp_min(0)
        total = residual.sum(dim=-1, keepdim=True)
        # a rejection needs p(x) < q(x) somewhere, so the residual has mass; rounding aside
        use_residual = (n_kept < k)[:, None] & (total > 0)
        dist = torch.where(use_residual, residual / total.clamp_min(torch.finfo(total.dtype).tiny), dist)
    return n_kept, torch.multinomial(dist, 1, generator=generator).squeeze(1)


def verify_block(p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator | None) -> tuple[int, int]:
    """:func:`verify_blocks` for one row: ``p`` ``[k + 1, V]``, ``q`` ``[k, V]``, ``drafted`` ``[k]``
    -> (tokens kept, the token that ends the step)."""
    n_kept, last = verify_blocks(p[None], q[None], drafted[None], generator)
    return int(n_kept[0]), int(last[0])


def check_speculative_sizes(
    n_rows: int, block_size: int, max_new_tokens: int, target_temperature: float, draft_temperature: float
) -> None:
    """Raise ``ValueError`` naming the parameter for a size or temperature out of range (both SD loops)."""
    for name, value, low in (
        ("n_rows", n_rows, 1),
        ("block_size", block_size, 1),
        ("max_new_tokens", max_new_tokens, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("target_temperature", target_temperature), ("draft_temperature", draft_temperature)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_speculative_request(alpha: float, has_potentials: bool, has_guide: bool, has_draft: bool) -> None:
    """Raise ``ValueError`` naming the parameter when speculative decoding cannot sample the request exactly."""
    if not has_draft:
        raise ValueError("method='sd' (speculative decoding) needs a draft model: pass draft=")
    if alpha != 1.0:
        raise ValueError(
            f"method='sd' samples the target p_tau only: alpha must be 1.0, got {alpha} "
            "(p^alpha is a sequence-level target; use method='smc')"
        )
    if has_potentials or has_guide:
        raise ValueError(
            "method='sd' cannot apply potentials, a guide or a grammar (no rejection test verifies them); "
            "use method='smc'"
        )


def tempered_probabilities(logits: Tensor, temperature: float) -> Tensor:
    """Tempered next-token probabilities (float64): what SD's draft samples from and what the
    rejection test compares, for the draft and the target alike (both SD loops)."""
    return log_probs(logits, temperature).double().exp()


def emitted_tokens(drafted: list[int], n_kept: int, last: int, remaining: int, eos: set[int]) -> tuple[list[int], bool]:
    """The tokens one SD step appends to a row, and whether the row stopped on EOS.

    The kept drafts, then the step's own token (residual draw or bonus), cut to the ``remaining``
    budget and just after the first EOS. Shared by both SD loops."""
    new = (drafted[:n_kept] + [last])[:remaining]
    stop = next((i for i, t in enumerate(new) if t in eos), None)
    return (new, False) if stop is None else (new[: stop + 1], True)


@torch.inference_mode()
def speculative_decode(
    target: LanguageModel,
    draft: LanguageModel,
    prompt_ids: Sequence[int],
    *,
    n_rows: int = 1,
    block_size: int = 4,
    max_new_tokens: int = 64,
    target_temperature: float = 1.0,
    draft_temperature: float = 1.0,
    seed: int | None = None,
    progress: bool = False,
) -> SpeculativeRun:
    """Draw ``n_rows`` independent exact samples of the tempered target by speculative decoding."""
    check_speculative_sizes(n_rows, block_size, max_new_tokens, target_temperature, draft_temperature)
    prompt = [int(t) for t in prompt_ids]
    problem = length_problem(len(prompt), max_new_tokens, target.context_length)
    if problem is not None:
        raise ValueError(problem)
    device = target.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    eos = set(target.eos_token_ids)
    t_start = time.perf_counter()
    prompt_t = torch.tensor(prompt, device=device)
    outputs: list[list[int]] = []
    steps: list[int] = []
    drafted_total = accepted_total = 0
    bar = tqdm(total=n_rows * max_new_tokens, disable=not progress, desc="sd", unit="tok", leave=False)
    for _ in range(n_rows):
        t_runner, d_runner = CausalLMRunner(target), CausalLMRunner(draft)
        t_runner.start(prompt_t[None], 1)
        d_runner.start(prompt_t[None], 1)
        seq = prompt_t[None].clone()
        out: list[int] = []
        n_steps = 0
        while True:
            remaining = max_new_tokens - len(out)
            k = min(block_size, remaining)
            drafted, q_rows = [], []
            ext = seq
            for _j in range(k):
                q = tempered_probabilities(d_runner.forward_new(ext)[0, -1], draft_temperature)
                tok = torch.multinomial(q, 1, generator=generator)
                drafted.append(tok)
                q_rows.append(q)
                ext = torch.cat([ext, tok[None].to(device)], dim=1)
            logits = t_runner.forward_new(ext)[0, -(k + 1) :]
            p = tempered_probabilities(logits, target_temperature)
            d = torch.cat(drafted).to(device) if k else seq.new_empty(0)
            q_all = torch.stack(q_rows) if k else p.new_empty(0, p.shape[-1])
            n_ok, last = verify_block(p, q_all, d, generator)
            n_steps += 1
            drafted_total += k
            accepted_total += n_ok
            new, stopped = emitted_tokens(d.tolist(), n_ok, last, remaining, eos)
            out.extend(new)
            bar.update(len(new))
            if stopped or len(out) >= max_new_tokens:
                break
            seq = torch.cat([seq, torch.tensor(new, device=device)[None]], dim=1)
            # both caches keep only the kept prefix; the last token is fed at the next step
            kept = seq.shape[1] - 1
            t_runner.truncate(kept)
            d_runner.truncate(kept)
        outputs.append(out)
        steps.append(n_steps)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return SpeculativeRun(outputs, steps, drafted_total, accepted_total, time.perf_counter() - t_start)


__all__ = [
    "SpeculativeRun",
    "check_speculative_request",
    "check_speculative_sizes",
    "emitted_tokens",
    "speculative_decode",
    "tempered_probabilities",
    "verify_block",
    "verify_blocks",
]
