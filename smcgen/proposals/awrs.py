"""Adaptive weighted rejection sampling (AWRS): token draws inside a hard constraint with no mask.

A boolean constraint over text (a :class:`Potential` whose score is ``-inf`` on forbidden
prefixes, such as "no letter e") has no cheap next-token mask: checking every token of the
vocabulary would mean one potential call per token. AWRS (after Lipkin et al. 2025) checks only
the tokens it draws. Per row it visits candidates in the order of a draw without replacement from
softmax(scores) (Gumbel top-k), asks the constraint about each (batched over rows, a few
candidates per row per call), stops at the first accepted token ``c`` and checks one more:

- ``c`` is an exact draw from the scores restricted to the allowed tokens;
- ``Z_hat = M`` if the next candidate is allowed (or there is none), else ``Z_hat = exp(score_c)``,
  where ``M`` is the mass of the tokens not rejected, is an unbiased estimate of the allowed mass
  ``Z = sum_{v allowed} exp(score_v)``, and jointly with ``c`` properly weighted:
  ``E[Z_hat f(c)] = sum_{v allowed} exp(score_v) f(v)`` for every f (docs/constraints.md).

So an SMC step that draws ``c`` this way and multiplies the particle's weight by ``Z_hat`` (times
the usual ``p / q`` ratio) keeps the target ``p(x) 1[constraint]`` exact. A row whose every token
is rejected gets ``Z_hat = 0``: its particle dies alone, without NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from smcgen.core.sampling import gumbel_noise
from smcgen.potentials.base import Decoder, Potential, SequenceBatch, checked_scores
from smcgen.proposals.lm import LMProposal
from smcgen.runners.transformers import LanguageModel


class AWRS:
    """Draws one token per row from softmax(scores) restricted to the tokens ``constraint`` allows.

    ``constraint`` is checked on prefix + candidate: ``log_prefix`` for ordinary tokens,
    ``log_complete`` for an EOS token or when the candidate is a row's last token; a score of
    ``-inf`` rejects and any finite score accepts (the constraint's finite values, if any, are the
    engine's to weight as a factor of the target). As for any prefix potential, a prefix scored
    ``-inf`` is taken to have no allowed continuation. Candidates are checked with ``rows=None``, so a
    stateful potential must recompute from the token ids. ``decoder`` turns ids into the texts the
    constraint reads. ``checks_per_round`` candidates per row go into the first potential call;
    rows still without an answer check twice as many in each later call, so even a row that must
    exhaust the vocabulary takes O(log V) calls.
    """

    def __init__(
        self,
        constraint: Potential,
        decoder: Decoder | None,
        eos_token_ids: Sequence[int] = (),
        checks_per_round: int = 2,
    ):
        if not isinstance(constraint, Potential):
            raise TypeError(f"constraint must be a Potential, got {type(constraint).__name__}")
        if checks_per_round < 1:
            raise ValueError(f"checks_per_round must be >= 1, got {checks_per_round}")
        self.constraint = constraint
        self.decoder = decoder
        self.eos = {int(e) for e in eos_token_ids}
        self.checks_per_round = int(checks_per_round)
        self.checks = 0  # candidates checked so far (for profiling)
        self.calls = 0  # potential calls so far

    def draw(
        self,
        scores: Tensor,
        sequences: Tensor,
        n_prompt: int,
        generator: torch.Generator | None,
        active: Tensor | None = None,
        last: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One AWRS draw per row of ``scores [R, V]`` (unnormalized log-weights, ``-inf`` = never).

        ``sequences [R, T]`` hold each row's tokens so far (the first ``n_prompt`` are the prompt);
        ``active [R]`` (default all) selects the rows to draw for (the others get an unconstrained
        draw and the unconstrained log-mass, for the caller to ignore); ``last [R]`` marks rows whose
        next token is their last (checked with ``log_complete``). Returns ``(tokens [R],
        log_z_hat [R])`` with ``log_z_hat`` the log of the properly weighted estimate of
        ``sum_{v allowed} exp(scores[v])`` (float64, ``-inf`` where nothing is allowed).
        """
        R, V = scores.shape
        device = scores.device
        scores = scores.float()
        keys = scores + gumbel_noise(scores.shape, generator, device)
        active_l = [True] * R if active is None else active.tolist()
        last_l = [False] * R if last is None else last.tolist()
        rows = [r for r in range(R) if active_l[r]]
        # candidate order per row: the keys' top-k (a draw without replacement), widened on demand
        width = min(V, max(16, 4 * self.checks_per_round))
        top_keys, order = keys.topk(width, dim=-1)
        top_keys, order = top_keys.tolist(), order.tolist()

        prompt = sequences[0, :n_prompt].tolist() if R else []
        generated = sequences[:, n_prompt:].tolist()
        verdicts: dict[int, list[bool]] = {r: [] for r in rows}  # check results along each row's order
        pending = list(rows)
        chunk = {r: self.checks_per_round for r in rows}
        prefix_checked: set[int] = set()
        while pending:
            need = max(len(verdicts[r]) + chunk[r] for r in pending)
            if need > width and width < V:
                width = min(V, max(need, 4 * width))
                top_keys, order = keys.topk(width, dim=-1)
                top_keys, order = top_keys.tolist(), order.tolist()
            asks: list[tuple[int, int]] = []  # (row, candidate token)
            for r in pending:
                start = len(verdicts[r])
                for j in range(start, min(start + chunk[r], width)):
                    if top_keys[r][j] == -math.inf:
                        break
                    asks.append((r, order[r][j]))
            for (r, _), ok in zip(asks, self._check(asks, generated, prompt, last_l)):
                verdicts[r].append(ok)
            still = []
            for r in pending:
                v = verdicts[r]
                # past the fetched candidates there may be more (the list widens next round)
                n_more = len(v) < V and (len(v) >= width or top_keys[r][len(v)] > -math.inf)
                if not n_more:
                    continue  # this row's candidates are exhausted
                first = v.index(True) if True in v else -1
                if first < 0 or first + 1 >= len(v):
                    chunk[r] = 1 if first >= 0 else 2 * chunk[r]
                    still.append(r)
            # a row with no allowed candidate yet may sit on a prefix the constraint already
            # rejects (e.g. drafted by an unconstrained proposal): no continuation is allowed
            # there, so end it now rather than scan the whole vocabulary
            unsure = [r for r in still if True not in verdicts[r] and r not in prefix_checked]
            if unsure:
                prefix_checked.update(unsure)
                batch = SequenceBatch([generated[r] for r in unsure], prompt, self.decoder)
                alive = checked_scores(self.constraint, self.constraint.log_prefix(batch), len(unsure)).tolist()
                self.calls += 1
                dead = {r for r, a in zip(unsure, alive) if a == -math.inf}
                still = [r for r in still if r not in dead]
            pending = still

        # assemble: token and log Z_hat per row (inactive rows: the unconstrained top candidate)
        tokens = torch.tensor([o[0] for o in order], dtype=torch.long, device=device)
        log_z = torch.logsumexp(scores.double(), dim=-1)
        removed = torch.zeros(R, V, dtype=torch.bool, device=device)
        full_mass: list[int] = []
        for r in rows:
            v = verdicts[r]
            if True not in v:
                log_z[r] = -math.inf  # every token with mass was rejected
                continue
            first = v.index(True)
            tokens[r] = order[r][first]
            if first + 1 < len(v) and not v[first + 1]:
                log_z[r] = scores[r, order[r][first]].double()
            else:
                full_mass.append(r)
                if first:
                    removed[r, order[r][:first]] = True
        if full_mass:
            # the mass not rejected, summed directly (1 - rejected mass would cancel badly)
            idx = torch.tensor(full_mass, device=device)
            left = scores[idx].double().masked_fill(removed[idx], -math.inf)
            log_z[idx] = torch.logsumexp(left, dim=-1)
        return tokens, log_z

    def _check(
        self, asks: list[tuple[int, int]], generated: list[list[int]], prompt: list[int], last: list[bool]
    ) -> list[bool]:
        """Whether the constraint allows each (row, candidate): one potential call per kind of score."""
        ok = [False] * len(asks)
        self.checks += len(asks)
        for complete in (False, True):
            pick = [i for i, (r, t) in enumerate(asks) if (t in self.eos or last[r]) == complete]
            if not pick:
                continue
            batch = SequenceBatch([generated[asks[i][0]] + [asks[i][1]] for i in pick], prompt, self.decoder)
            fn = self.constraint.log_complete if complete else self.constraint.log_prefix
            scores = checked_scores(self.constraint, fn(batch), len(pick))
            self.calls += 1
            for i, s in zip(pick, scores.tolist()):
                ok[i] = s > -math.inf
        return ok


class AWRSProposal(LMProposal):
    """A model's tokens drawn at ``temperature`` inside a hard ``constraint``, by :class:`AWRS`.

    Each drafted token reports ``log q = score(token) - log Z_hat`` (``score`` the tempered
    log-softmax), so the engine's weight ``alpha log p - log q`` carries the AWRS estimate of the
    allowed mass: the target ``p(x) * constraint(x)`` stays exact. The constraint is a factor of
    the target (:meth:`required_potentials`) and also steers the target's own draws (the bonus
    token, :meth:`target_constraint`). For plain SMC (the target proposing its own tokens) prefer
    ``smcgen.generate(..., constraint=...)``: the same draws without a second model forward.
    """

    def __init__(self, lm: LanguageModel, constraint: Potential, temperature: float = 1.0, checks_per_round: int = 2):
        super().__init__(lm, temperature)
        self.constraint = constraint
        self.awrs = AWRS(constraint, lm.tokenizer, lm.eos_token_ids, checks_per_round)

    def required_potentials(self) -> tuple[Potential, ...]:
        """The constraint: the target must include it for the weights to be right."""
        return (self.constraint,)

    def target_constraint(self) -> Potential:
        return self.constraint

    def _request(self, sequences: Tensor) -> Tensor:
        return sequences  # AWRS checks candidates against the tokens so far

    def _draw(self, logits: Tensor, pending: Any, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        scores = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        # rows that already ended on EOS are padding for the engine: no checks for them
        eos = torch.tensor(sorted(self.awrs.eos), dtype=torch.long, device=pending.device)
        ended = torch.isin(pending[:, self.n_prompt :], eos).any(dim=1) if len(eos) else None
        active = None if ended is None else ~ended
        tokens, log_z = self.awrs.draw(scores, pending, self.n_prompt, generator, active=active)
        log_q = scores.gather(-1, tokens[:, None]).squeeze(-1).double() - log_z
        return tokens, log_q
