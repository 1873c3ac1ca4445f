"""The shared cycle over a runner written from plain tensors: any runner with propose / score /
reorder plugs in, and the cycle's estimate of Z stays unbiased (E[Z_hat] = Z, checked by enumeration)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_exactness import count_b
from tiny_models import LetterDecoder

from smcgen.core.resampling import get_resampler
from smcgen.core.sampling import log_probs, sample_powered
from smcgen.potentials.reward import RewardPotential
from smcgen.samplers.cycle import Cycle, CycleSettings, HostPotentials, Particles, Scored

V, MAX_NEW, ALPHA, BETA = 3, 4, 0.5, 0.8
PROMPT = [0]


class BigramRunner:
    """A target that is a table of next-token logits given the last token; a uniform proposal.
    No cache, so reordering has nothing to follow (the particles' tokens move with the cycle)."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.reordered = 0

    def propose(self, particles, n_tokens, generator):
        tokens = torch.randint(V, (particles.seq.shape[0], n_tokens), generator=generator)
        return tokens, torch.full(tokens.shape, -math.log(V), dtype=torch.float64)

    def score(self, particles, drafted, log_q, with_bonus, generator):
        ext = torch.cat([particles.seq, drafted], dim=1)
        log_p = ALPHA * log_probs(self.table[ext[:, -drafted.shape[1] - 1 : -1]], 1.0)
        log_p = log_p.gather(-1, drafted[..., None]).squeeze(-1).double()
        if not with_bonus:
            return Scored(drafted, log_p, None)
        bonus, _, log_norm = sample_powered(self.table[ext[:, -1]], 1.0, ALPHA, generator)
        return Scored(torch.cat([drafted, bonus[:, None]], dim=1), log_p, log_norm)

    def reorder(self, rows):
        self.reordered += 1


def exact_z(table: torch.Tensor) -> float:
    """sum over every continuation x of prod_t p(x_t | x_{t-1})^alpha * exp(beta * count_b(x))."""
    lp = log_probs(table, 1.0).double()
    total = 0.0
    for x in itertools.product(range(V), repeat=MAX_NEW):
        prev, log_w = PROMPT[-1], 0.0
        for t in x:
            log_w += ALPHA * float(lp[prev, t])
            prev = t
        total += math.exp(log_w + BETA * count_b(LetterDecoder().decode(list(x))))
    return total


@pytest.mark.parametrize(("block_size", "resampler"), [(0, "stratified"), (2, "multinomial")])
def test_a_tensor_runner_in_the_cycle_estimates_z_without_bias(block_size, resampler):
    torch.manual_seed(0)
    table = torch.randn(V, V) * 1.5
    groups, n = 3000, 4
    generator = torch.Generator().manual_seed(1)
    particles = Particles.start(PROMPT, groups, n, torch.device("cpu"))
    potentials = HostPotentials(RewardPotential(count_b, beta=BETA, prefix=True), PROMPT, LetterDecoder(), groups * n)
    particles.log_w += potentials.initial
    settings = CycleSettings(n, MAX_NEW, block_size, False, 0.7, torch.zeros(0, dtype=torch.long), 0)
    runner = BigramRunner(table)
    run = Cycle(runner, settings, get_resampler(resampler), generator, potentials).run(particles)
    assert run.tokens.shape == (groups, n, MAX_NEW) and bool((run.lengths == MAX_NEW).all())
    assert runner.reordered > 0 and bool(run.resampled.any())
    z_hat = run.log_z.exp()
    z, mean, se = exact_z(table), float(z_hat.mean()), float(z_hat.std() / math.sqrt(groups))
    assert abs(mean - z) < 4 * se, f"E[Z_hat] = {mean:.4f} +- {se:.4f}, exact Z = {z:.4f}"
    # and the check is sharp enough to see a bias of a few percent
    assert se < 0.05 * z
