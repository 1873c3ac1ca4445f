"""The SMC step loop: propose a block, weight it, resample when the ESS drops.

One loop serves every target (see DESIGN.md section 1): a step drafts K tokens from the
proposal (none when there is no proposal), the target scores them in one forward and adds a
bonus token drawn from its own next-token distribution p_tau^alpha, the potentials weight the
extension, and groups whose ESS fell below the threshold are resampled. B independent groups
(requests, or repeated runs of one prompt) of N particles advance together.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.backends.transformers_lm import CausalLMRunner
from smcgen.config import SMCConfig
from smcgen.potentials.base import Potential, Product, SequenceBatch, checked_scores
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.lm import LMPotential
from smcgen.proposals.base import Proposal
from smcgen.resampling import (
    effective_sample_size,
    get_resampler,
    normalized_log_weights,
)
from smcgen.sampling import log_probs, sample_powered


class AllParticlesDeadError(RuntimeError):
    """Every particle of a group has weight zero: the target gives the explored prefixes no mass.

    ``step`` and ``groups`` say where; ``sequences`` holds the token ids every particle of the
    first such group had reached (the partial outputs), when the engine provides them.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        groups: Sequence[int] = (),
        sequences: Sequence[Sequence[int]] = (),
    ):
        super().__init__(message)
        self.step = step
        self.groups = list(groups)
        self.sequences = [list(s) for s in sequences]


@dataclass(frozen=True)
class BatchRun:
    """Raw output of :meth:`SMC.run` for B groups of N particles (tensors on the CPU).

    ``tokens[b, n, :lengths[b, n]]`` is a particle's continuation (EOS included when it
    stopped on one); ``log_weights`` are normalized per group; ``log_z[b]`` is the log of the
    unbiased estimate of the group's normalizing constant; ``ess_history[s, b]`` is the ESS
    after step s (before any resampling) and ``resampled[s, b]`` whether that step resampled.
    ``dead[b]`` (runs with ``on_dead="flag"``) marks groups whose particles all reached weight
    zero: their tokens are the partial outputs at that step, their log-weights ``-inf`` and
    ``log_z`` is ``-inf`` (Z_hat = 0).
    """

    tokens: Tensor
    lengths: Tensor
    log_weights: Tensor
    log_z: Tensor
    ess_history: Tensor
    resampled: Tensor
    elapsed_s: float
    dead: Tensor | None = None

    @classmethod
    def from_log_weights(
        cls,
        tokens: Tensor,
        lengths: Tensor,
        log_w: Tensor,
        ess_history: Tensor,
        resampled: Tensor,
        elapsed_s: float,
        dead: Tensor,
    ) -> BatchRun:
        """Assemble a run from unnormalized ``log_w [B, N]``: normalized weights, log Z_hat, all on the CPU."""
        n = log_w.shape[1]
        return cls(
            tokens=tokens.cpu(),
            lengths=lengths.cpu(),
            log_weights=normalized_log_weights(log_w).cpu(),
            log_z=(torch.logsumexp(log_w, dim=1) - math.log(n)).cpu(),
            ess_history=ess_history.cpu(),
            resampled=resampled.cpu(),
            elapsed_s=elapsed_s,
            dead=dead.cpu(),
        )


def length_problem(prompt_len: int, max_new_tokens: int, context: int | None) -> str | None:
    """Why a prompt and a token budget do not fit a model context (None when they do or it is unknown)."""
    if context is None:
        return None
    if prompt_len > context:
        return f"prompt has {prompt_len} tokens but the model context is {context} tokens"
    if prompt_len + max_new_tokens > context:
        return (
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model context ({context} tokens); shorten the prompt or lower max_new_tokens"
        )
    return None


def dead_group_error(
    groups: list[int],
    partial: list[list[int]],
    finished: list[bool],
    potential: Potential | None,
    step: int | None = None,
    cause: str | None = None,
) -> AllParticlesDeadError:
    """The error for groups whose particles all have weight zero: the first group's partial outputs
    and, where the potential can tell, why they are ruled out."""
    reasons: list[str] = []
    if potential is not None:
        for toks, fin in zip(partial, finished):
            why = potential.explain_zero(toks, fin)
            if why and why not in reasons:
                reasons.append(why)
    detail = f" ({potential.name}: {'; '.join(reasons[:3])})" if reasons and potential is not None else ""
    which = str(groups[:8])[:-1] + (f", ... ({len(groups)} groups)]" if len(groups) > 8 else "]")
    where = f"step {step}: " if step is not None else ""
    cause = cause or "the potentials rule out every continuation the proposal reached"
    return AllParticlesDeadError(
        f"{where}every particle of group(s) {which} has weight zero; {cause}{detail}",
        step=step,
        groups=groups,
        sequences=partial,
    )


class SMC:
    """Sequential Monte Carlo over a language-model target with optional proposal and potentials.

    ``target`` is the LM factor p_tau^alpha; ``proposal`` drafts ``config.block_size`` tokens per
    step (None: the target proposes one token per step by itself); ``potentials`` multiply the
    target. ``mask`` (a :class:`~smcgen.potentials.grammar.GrammarPotential`) restricts the
    target's own draws (the bonus token; every token in plain SMC) to the tokens it allows, each
    weighted by the masked log-normalizer log sum_{v allowed} p(v)^alpha: the locally constrained
    proposal of DESIGN.md. A mask, and the mask of a masked proposal, are factors of the target
    (added to ``potentials`` when missing). Build once, call :meth:`run` per prompt.
    """

    def __init__(
        self,
        target: LMPotential,
        config: SMCConfig,
        proposal: Proposal | None = None,
        potentials: Potential | Sequence[Potential] = (),
        mask: GrammarPotential | None = None,
    ):
        self.target = target
        self.config = config
        self.proposal = proposal
        if isinstance(potentials, Potential):
            potentials = [potentials]
        factors = list(Product(list(potentials)).factors)
        if mask is not None:
            if not isinstance(mask, GrammarPotential):
                raise TypeError(f"mask must be a GrammarPotential, got {type(mask).__name__}")
            mask = mask.for_logits(target.lm.vocab_size, target.lm)
        self.mask = mask
        required = proposal.required_potentials() if proposal is not None else ()
        for m in (mask, *required):
            if m is not None and not any(f is m for f in factors):
                factors.append(m)
        self.potential: Potential | None = Product(factors) if factors else None
        self.resampler = get_resampler(config.resampler)
        lm = target.lm
        self.eos_ids = list(lm.eos_token_ids)
        self.pad_id = self.eos_ids[0] if self.eos_ids else 0

    def _check_lengths(self, prompt_len: int) -> None:
        problem = length_problem(prompt_len, self.config.max_new_tokens, self.target.lm.context_length)
        if problem is not None:
            raise ValueError(problem)

    def _score_potential(
        self, seq: Tensor, rows: Tensor, rows_dev: Tensor, lengths: Tensor, finished: Tensor, prompt: list[int]
    ) -> Tensor:
        """Potential log-scores for ``rows`` (on the CPU; ``rows_dev`` the same on the device):
        complete for finished rows, prefix for the others."""
        assert self.potential is not None
        start = len(prompt)
        ids = seq[rows_dev, start:].tolist()
        lens = lengths[rows_dev].tolist()
        token_ids = [r[:n] for r, n in zip(ids, lens)]
        out = torch.empty(len(token_ids), dtype=torch.float64)
        fin = finished.tolist()
        row_ids = rows.tolist()
        decoder = self.target.lm.tokenizer
        for want_complete in (False, True):
            pick = [i for i, f in enumerate(fin) if f == want_complete]
            if not pick:
                continue
            batch = SequenceBatch([token_ids[i] for i in pick], prompt, decoder, rows=[row_ids[i] for i in pick])
            fn = self.potential.log_complete if want_complete else self.potential.log_prefix
            out[pick] = checked_scores(self.potential, fn(batch), len(pick))
        return out

    def _raise_dead(
        self, step: int, groups: list[int], seq: Tensor, lengths: Tensor, done: Tensor, prompt: list[int]
    ) -> None:
        """Raise AllParticlesDeadError with the first dead group's partial outputs and the potentials' reasons."""
        N = self.config.n_particles
        rows = slice(groups[0] * N, (groups[0] + 1) * N)
        ids, lens, fin = seq[rows, len(prompt) :].tolist(), lengths[rows].tolist(), done[rows].tolist()
        partial = [r[:n] for r, n in zip(ids, lens)]
        raise dead_group_error(groups, partial, fin, self.potential, step)

    @torch.inference_mode()
    def run(
        self,
        prompt_ids: Sequence[int],
        n_groups: int = 1,
        progress: bool = False,
        on_dead: str = "raise",
        recorder: Any | None = None,
    ) -> BatchRun:
        """Run SMC for ``n_groups`` independent groups of N particles on one prompt.

        A group whose particles all reach weight zero raises :class:`AllParticlesDeadError`
        (``on_dead="raise"``), or (``on_dead="flag"``) stops where it is, flagged in
        ``BatchRun.dead``, while the other groups go on. ``recorder`` (e.g. a
        :class:`smcgen.trace.TraceRecorder`) gets ``record(block, valid, log_weights, ess, ancestors)``
        once per step, the weights before resampling and ancestors None when no group resampled.
        """
        cfg = self.config
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if on_dead not in ("raise", "flag"):
            raise ValueError(f"on_dead must be 'raise' or 'flag', got {on_dead!r}")
        prompt = [int(t) for t in prompt_ids]
        self._check_lengths(len(prompt))
        B, N = n_groups, cfg.n_particles
        R = B * N
        lm = self.target.lm
        device = lm.device
        tau, alpha = self.target.temperature, self.target.alpha
        K = cfg.block_size if self.proposal is not None else 0

        generator = torch.Generator(device=device)
        # a fresh seed from the OS, leaving torch's global generator (the user's) untouched
        generator.manual_seed(cfg.seed if cfg.seed is not None else random.SystemRandom().getrandbits(63))
        t_start = time.perf_counter()

        prompt_t = torch.tensor(prompt, device=device)
        seq = prompt_t.expand(R, -1).clone()
        runner = CausalLMRunner(lm)
        runner.start(prompt_t[None], R)
        if self.proposal is not None:
            self.proposal.start(prompt_t[None], R)
        if self.potential is not None:
            self.potential.start(prompt, R)
        eos = torch.tensor(self.eos_ids, device=device, dtype=torch.long)

        done = torch.zeros(R, dtype=torch.bool, device=device)
        dead_groups = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.zeros(R, dtype=torch.long, device=device)
        lw = torch.zeros(B, N, dtype=torch.float64, device=device)
        pot_prev = torch.zeros(R, dtype=torch.float64)
        if self.potential is not None:
            empty = SequenceBatch([[]], prompt, lm.tokenizer)
            s0 = float(checked_scores(self.potential, self.potential.log_prefix(empty), 1)[0])
            if s0 == -math.inf:
                raise AllParticlesDeadError("the potentials give the empty continuation weight zero")
            pot_prev.fill_(s0)
            lw += s0

        ess_history: list[Tensor] = []
        resampled_history: list[Tensor] = []
        bar = tqdm(total=cfg.max_new_tokens, disable=not progress, desc="smc", unit="tok", leave=False)
        step = 0
        while not bool(done.all()):
            step += 1
            generated = seq.shape[1] - len(prompt)
            remaining = cfg.max_new_tokens - generated
            k = min(K, remaining)
            with_bonus = remaining > k

            if k > 0:
                assert self.proposal is not None
                drafted, log_q = self.proposal.propose(seq, k, generator)
                drafted, log_q = drafted.to(device), log_q.to(device)
            else:
                drafted = seq.new_empty(R, 0)
                log_q = torch.zeros(R, 0, dtype=torch.float64, device=device)
            extended = torch.cat([seq, drafted], dim=1)
            # the bonus token's mask is requested before the forward and collected after it, so a
            # GPU forward overlaps the CPU's mask computation (on the CPU nothing overlaps)
            pending = self.mask.request_bitmask(extended, len(prompt)) if self.mask is not None and with_bonus else None
            logits = runner.forward_new(extended)[:, -(k + 1) :]
            log_p = alpha * log_probs(logits[:, :k], tau).gather(-1, drafted[:, :, None]).squeeze(-1).double()
            token_w = log_p - log_q
            block = drafted
            if with_bonus:
                allowed = pending.result() if pending is not None else None
                bonus, _, log_norm = sample_powered(logits[:, k], tau, alpha, generator, allowed=allowed)
                block = torch.cat([block, bonus[:, None]], dim=1)
                token_w = torch.cat([token_w, log_norm[:, None]], dim=1)

            # a position counts while its particle is alive and no EOS came earlier in the block
            is_eos = torch.isin(block, eos) if len(self.eos_ids) else torch.zeros_like(block, dtype=torch.bool)
            eos_before = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
            valid = (~done)[:, None] & ~eos_before
            inc = torch.where(valid, token_w, torch.zeros_like(token_w)).sum(dim=1)
            block = torch.where(valid, block, torch.full_like(block, self.pad_id))
            lengths += valid.sum(dim=1)
            new_done = done | (is_eos & valid).any(dim=1) | (lengths >= cfg.max_new_tokens)
            seq = torch.cat([seq, block], dim=1)

            if self.potential is not None:
                rows_dev = (~done).nonzero().squeeze(-1)
                rows = rows_dev.cpu()
                if rows.numel():
                    new = self._score_potential(seq, rows, rows_dev, lengths, new_done[rows_dev].cpu(), prompt)
                    prev = pot_prev[rows]
                    delta = torch.where(torch.isneginf(prev), torch.full_like(new, -math.inf), new - prev)
                    pot_prev[rows] = new
                    inc[rows_dev] += delta.to(device)
            done = new_done
            lw += inc.view(B, N)

            dead = torch.isneginf(lw).all(dim=1) & ~dead_groups
            if bool(dead.any()):
                if on_dead == "raise":
                    self._raise_dead(step, dead.nonzero().squeeze(-1).tolist(), seq, lengths, done, prompt)
                dead_groups |= dead
                done |= dead_groups.repeat_interleave(N)  # frozen where they died
            ess = effective_sample_size(lw)  # 0 for dead groups
            ess_history.append(ess.cpu())
            want = (ess < cfg.ess_threshold * N) | torch.full_like(ess, cfg.ess_threshold >= 1.0, dtype=torch.bool)
            want &= ~dead_groups
            if bool(done.all()):
                # resampling after the last step only adds noise to the final weights
                want = torch.zeros_like(want)
            resampled_history.append(want.cpu())
            ancestors, lw_seen = None, (lw.clone() if recorder is not None else None)
            if bool(want.any()):
                groups = want.nonzero().squeeze(-1)
                ancestors = torch.arange(N, device=device).expand(B, N).clone()
                ancestors[groups] = self.resampler.ancestors(lw[groups], generator).to(device)
                rows_all = (ancestors + torch.arange(B, device=device)[:, None] * N).reshape(-1)
                rows_cpu = rows_all.cpu()
                seq, done, lengths = seq[rows_all], done[rows_all], lengths[rows_all]
                pot_prev = pot_prev[rows_cpu]
                runner.reorder(rows_all)
                if self.proposal is not None:
                    self.proposal.reorder(rows_all)
                if self.potential is not None:
                    self.potential.reorder(rows_cpu)
                mean = torch.logsumexp(lw[groups], dim=1, keepdim=True) - math.log(N)
                lw[groups] = mean.expand(-1, N)
            if recorder is not None:
                recorder.record(block, valid, lw_seen, ess, ancestors)
            bar.update(min(block.shape[1], cfg.max_new_tokens - bar.n))
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_start

        width = seq.shape[1] - len(prompt)
        return BatchRun.from_log_weights(
            seq[:, len(prompt) :].reshape(B, N, width),
            lengths.view(B, N),
            lw,
            torch.stack(ess_history) if ess_history else torch.zeros(0, B),
            torch.stack(resampled_history) if resampled_history else torch.zeros(0, B, dtype=torch.bool),
            elapsed,
            dead_groups,
        )
