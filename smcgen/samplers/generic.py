"""The generic engine: the shared SMC cycle over a transformers model (or any logits runner).

:class:`SMC` takes every target the library can express (see docs/math.md): a proposal drafts K
tokens per step (none when there is no proposal), the target scores them in one forward and adds
a bonus token drawn from its own next-token distribution p_tau^alpha (through a guide's mask or
AWRS when given), the potentials weight the extension, and groups whose ESS fell below the
threshold are resampled. It has no loop of its own: :meth:`SMC.run` sets a run up and hands it to
:class:`~smcgen.samplers.cycle.Cycle` over a :class:`TargetRunner`, which is where the model runs.
B independent groups (requests, or repeated runs of one prompt) of N particles advance together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from smcgen.core.config import SMCConfig
from smcgen.core.resampling import Resampler, get_resampler
from smcgen.core.sampling import log_probs, sample_powered
from smcgen.potentials.base import Potential, Product, as_guide
from smcgen.potentials.lm import LMPotential
from smcgen.proposals.awrs import AWRS
from smcgen.proposals.base import Proposal
from smcgen.runners.transformers import CausalLMRunner
from smcgen.samplers.cycle import Cycle, CycleSettings, HostPotentials, Particles, Scored
from smcgen.samplers.run import AllParticlesDeadError, BatchRun, length_problem


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
    ``resampler`` (a :class:`Resampler`) overrides ``config.resampler``. ``target_runner`` (called
    once per run) makes the target's logits runner: default the transformers
    :class:`~smcgen.runners.transformers.CausalLMRunner` over ``target.lm``; the native paged model's
    :class:`~smcgen.runners.native.paged_runner.PagedLMRunner` runs the same cycle over paged KV.
    Build once, call :meth:`run` per prompt.
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
        target_runner: Callable[[], Any] | None = None,
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
        self.target_runner = target_runner

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
        lm = self.target.lm
        problem = length_problem(len(prompt), cfg.max_new_tokens, lm.context_length)
        if problem is not None:
            raise ValueError(problem)
        device = lm.device
        generator = torch.Generator(device=device)
        # a fresh seed from the OS, leaving torch's global generator (the user's) untouched
        generator.manual_seed(cfg.seed if cfg.seed is not None else random.SystemRandom().getrandbits(63))
        t_start = time.perf_counter()

        particles = Particles.start(prompt, n_groups, cfg.n_particles, device)
        R = particles.seq.shape[0]
        runner = TargetRunner(self, self.target_runner() if self.target_runner is not None else CausalLMRunner(lm))
        runner.start(torch.tensor(prompt, device=device)[None], R)
        potentials = None
        if self.potential is not None:
            potentials = HostPotentials(self.potential, prompt, lm.tokenizer, R)
            particles.log_w += potentials.initial
        K = cfg.block_size if self.proposal is not None else 0
        settings = CycleSettings(
            n_particles=cfg.n_particles,
            max_new_tokens=cfg.max_new_tokens,
            block_size=K,
            adaptive=cfg.block_size_policy == "adaptive" and K > 1,
            ess_threshold=cfg.ess_threshold,
            eos=runner.eos,
            pad_id=self.pad_id,
        )
        cycle = Cycle(runner, settings, self.resampler, generator, potentials, on_dead, recorder)
        return cycle.run(particles, progress, t_start)


class TargetRunner:
    """The generic engine's :class:`~smcgen.samplers.cycle.CycleRunner`: a proposal drafts, the
    target's logits runner scores the draft and draws the bonus token (through the guide's mask or
    AWRS when the run has one).

    ``logits`` is any runner with ``start(prompt_ids [1, P], n_rows)``, ``forward_new(sequences)``
    (logits of the positions it has not seen) and ``reorder(rows)``: the transformers
    :class:`~smcgen.runners.transformers.CausalLMRunner` by default, or the native paged model's
    :class:`~smcgen.runners.native.paged_runner.PagedLMRunner`.
    """

    def __init__(self, smc: SMC, logits: Any):
        self.logits = logits
        self.proposal, self.mask, self.awrs = smc.proposal, smc.mask, smc.awrs
        self.tau, self.alpha = smc.target.temperature, smc.target.alpha
        self.max_new_tokens = smc.config.max_new_tokens
        self.eos = torch.tensor(smc.eos_ids, device=smc.target.lm.device, dtype=torch.long).reshape(-1)

    def start(self, prompt_ids: Tensor, n_rows: int) -> None:
        """Prefill the target (and the proposal) with the prompt, repeated over ``n_rows`` rows."""
        self.logits.start(prompt_ids, n_rows)
        if self.proposal is not None:
            self.proposal.start(prompt_ids, n_rows)

    def propose(self, particles: Particles, n_tokens: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The proposal's draft of ``n_tokens`` per row and its log q."""
        assert self.proposal is not None
        return self.proposal.propose(particles.seq, n_tokens, generator)

    def score(
        self, particles: Particles, drafted: Tensor, log_q: Tensor, with_bonus: bool, generator: torch.Generator
    ) -> Scored:
        """One target forward over the draft: its alpha * log p, and a bonus token from p_tau^alpha."""
        k = drafted.shape[1]
        n_prompt = len(particles.prompt)
        extended = torch.cat([particles.seq, drafted], dim=1)
        # the bonus token's mask is requested before the forward and collected after it, so a
        # GPU forward overlaps the CPU's mask computation (on the CPU nothing overlaps)
        pending = self.mask.request_bitmask(extended, n_prompt) if self.mask is not None and with_bonus else None
        logits = self.logits.forward_new(extended)[:, -(k + 1) :]
        log_p = self.alpha * log_probs(logits[:, :k], self.tau).gather(-1, drafted[:, :, None]).squeeze(-1).double()
        if not with_bonus:
            return Scored(drafted, log_p, None)
        if self.awrs is not None:
            # inside the constraint: AWRS over p_tau^alpha, weighted by its allowed-mass estimate;
            # rows already out (done, weight zero, drafted EOS) are not checked
            live = ~particles.done & torch.isfinite(particles.log_w.view(-1)) & torch.isfinite(log_p - log_q).all(dim=1)
            if k:
                live &= ~torch.isin(drafted, self.eos).any(dim=1)
            last = particles.lengths + k + 1 >= self.max_new_tokens
            scores = self.alpha * log_probs(logits[:, k], self.tau)
            bonus, log_norm = self.awrs.draw(scores, extended, n_prompt, generator, live, last)
        else:
            allowed = pending.result() if pending is not None else None
            bonus, _, log_norm = sample_powered(logits[:, k], self.tau, self.alpha, generator, allowed=allowed)
        return Scored(torch.cat([drafted, bonus[:, None]], dim=1), log_p, log_norm)

    def reorder(self, rows: Tensor) -> None:
        """Both models' caches follow the resampling ancestors."""
        self.logits.reorder(rows)
        if self.proposal is not None:
            self.proposal.reorder(rows)


__all__ = ["SMC", "AllParticlesDeadError", "BatchRun", "TargetRunner"]
