"""The SMC step loop: propose a block, weight it, resample when the ESS drops.

One loop serves every target (see docs/math.md): a step drafts K tokens from the
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
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smcgen.core.config import SMCConfig
from smcgen.core.resampling import Resampler, effective_sample_size, get_resampler
from smcgen.core.sampling import log_probs, sample_powered
from smcgen.potentials.base import (
    Potential,
    Product,
    SequenceBatch,
    as_guide,
    checked_scores,
    score_particles,
    scoring_error,
)
from smcgen.potentials.lm import LMPotential
from smcgen.proposals.awrs import AWRS
from smcgen.proposals.base import Proposal
from smcgen.runners.transformers import CausalLMRunner
from smcgen.samplers.run import AllParticlesDeadError, BatchRun, dead_group_error, length_problem
from smcgen.samplers.step import (
    NonFiniteError,
    advance,
    bad_values,
    global_rows,
    next_block_size,
    potential_increment,
    resample_gate,
    reset_weights,
    token_weights,
)


class SMC:
    """Sequential Monte Carlo over a language-model target with optional proposal and potentials.

    ``target`` is the LM factor p_tau^alpha; ``proposal`` drafts ``config.block_size`` tokens per
    step (None: the target proposes one token per step by itself); ``potentials`` multiply the
    target. ``guide`` (a potential with a next-token mask: a
    :class:`~smcgen.potentials.grammar.GrammarPotential`, or any :class:`Potential` implementing
    ``next_token_mask``; ``mask=`` is its older name) restricts the target's own draws (the bonus
    token; every token in plain SMC) to the tokens it allows, each weighted by the masked
    log-normalizer log sum_{v allowed} p(v)^alpha: the locally constrained proposal of docs/math.md.
    A guide, and the mask of a masked proposal, are factors of the target (added to
    ``potentials`` when missing). ``constraint`` (any :class:`Potential`, typically a boolean one
    with no cheap mask; default: the proposal's ``target_constraint()``) does the same without a
    mask: the target's own draws go through adaptive weighted rejection sampling
    (:class:`~smcgen.proposals.awrs.AWRS`), weighted by its estimate of the allowed mass.
    ``resampler`` (a :class:`Resampler`) overrides ``config.resampler``. Build once, call
    :meth:`run` per prompt.
    """

    def __init__(
        self,
        target: LMPotential,
        config: SMCConfig,
        proposal: Proposal | None = None,
        potentials: Potential | Sequence[Potential] = (),
        guide: Potential | None = None,
        *,
        mask: Potential | None = None,
        resampler: Resampler | None = None,
        constraint: Potential | None = None,
    ):
        self.target = target
        self.config = config
        self.proposal = proposal
        if isinstance(potentials, Potential):
            potentials = [potentials]
        factors = list(Product(list(potentials)).factors)
        mask = as_guide(guide, mask)
        if mask is not None:
            mask = mask.for_logits(target.lm.vocab_size, target.lm)
        self.mask = mask
        if constraint is None and proposal is not None:
            constraint = proposal.target_constraint()
        if constraint is not None and mask is not None:
            raise ValueError("give either mask or constraint, not both")
        lm = target.lm
        self.awrs = AWRS(constraint, lm.tokenizer, lm.eos_token_ids) if constraint is not None else None
        required = proposal.required_potentials() if proposal is not None else ()
        for m in (mask, constraint, *required):
            if m is not None and not any(f is m for f in factors):
                factors.append(m)
        self.potential: Potential | None = Product(factors) if factors else None
        self.resampler = resampler if resampler is not None else get_resampler(config.resampler)
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
        return score_particles(
            self.potential, token_ids, finished.tolist(), prompt, self.target.lm.tokenizer, rows.tolist()
        )

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
        adaptive = cfg.block_size_policy == "adaptive" and K > 1

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
        eos = torch.tensor(self.eos_ids, device=device, dtype=torch.long).reshape(-1)

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
            block, log_norm = drafted, None
            if with_bonus:
                if self.awrs is not None:
                    # inside the constraint: AWRS over p_tau^alpha, weighted by its allowed-mass
                    # estimate; rows already out (done, weight zero, drafted EOS) are not checked
                    live = ~done & torch.isfinite(lw.view(-1)) & torch.isfinite(log_p - log_q).all(dim=1)
                    if k:
                        live &= ~torch.isin(drafted, eos).any(dim=1)
                    last = lengths + k + 1 >= cfg.max_new_tokens
                    scores = alpha * log_probs(logits[:, k], tau)
                    bonus, log_norm = self.awrs.draw(scores, extended, len(prompt), generator, live, last)
                else:
                    allowed = pending.result() if pending is not None else None
                    bonus, _, log_norm = sample_powered(logits[:, k], tau, alpha, generator, allowed=allowed)
                block = torch.cat([block, bonus[:, None]], dim=1)
            token_w = token_weights(log_p, log_q, log_norm)

            done_before = done
            adv = advance(block, token_w, done, lengths, eos, cfg.max_new_tokens, self.pad_id)
            block, inc, lengths, new_done = adv.block, adv.inc, adv.lengths, adv.done
            # the model's numbers are checked where they enter the weights (NaN logits name the model)
            if bool(bad_values(inc)):
                bad_q = bool(bad_values(-log_q)) if k > 0 else False
                raise NonFiniteError("the proposal" if bad_q else "the target model's logits", step)
            seq = torch.cat([seq, block], dim=1)

            if self.potential is not None:
                rows_dev = (~done).nonzero().squeeze(-1)
                rows = rows_dev.cpu()
                if rows.numel():
                    try:
                        new = self._score_potential(seq, rows, rows_dev, lengths, new_done[rows_dev].cpu(), prompt)
                    except Exception as err:
                        raise scoring_error(self.potential, err, step) from err
                    active = torch.ones_like(new, dtype=torch.bool)  # only active rows were scored
                    delta, pot_prev[rows] = potential_increment(new, pot_prev[rows], active)
                    inc[rows_dev] += delta.to(device)
            done = new_done
            lw += inc.view(B, N)
            if adaptive:  # decided from this step's weights, before the next block is drafted
                K = next_block_size(K, cfg.block_size, inc.view(B, N), ~done_before.view(B, N))

            dead = torch.isneginf(lw).all(dim=1) & ~dead_groups
            if bool(dead.any()):
                if on_dead == "raise":
                    self._raise_dead(step, dead.nonzero().squeeze(-1).tolist(), seq, lengths, done, prompt)
                dead_groups |= dead
                done |= dead_groups.repeat_interleave(N)  # frozen where they died
            ess = effective_sample_size(lw)  # 0 for dead groups
            ess_history.append(ess.cpu())
            want = resample_gate(ess, cfg.ess_threshold, N, done.all(), dead_groups)
            resampled_history.append(want.cpu())
            ancestors, lw_seen = None, (lw.clone() if recorder is not None else None)
            if bool(want.any()):
                groups = want.nonzero().squeeze(-1)
                ancestors = torch.arange(N, device=device).expand(B, N).clone()
                ancestors[groups] = self.resampler.ancestors(lw[groups], generator).to(device)
                rows_all = global_rows(ancestors)
                rows_cpu = rows_all.cpu()
                seq, done, lengths = seq[rows_all], done[rows_all], lengths[rows_all]
                pot_prev = pot_prev[rows_cpu]
                runner.reorder(rows_all)
                if self.proposal is not None:
                    self.proposal.reorder(rows_all)
                if self.potential is not None:
                    self.potential.reorder(rows_cpu)
                lw = reset_weights(lw, want)
            if recorder is not None:
                recorder.record(block, adv.valid, lw_seen, ess, ancestors)
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
