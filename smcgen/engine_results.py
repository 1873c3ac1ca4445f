"""Building an :class:`SMCResult` from one group of a finished run, and the warnings a result can raise
(a weak draft, a fallback to the generic engine), each logged once per process."""

from __future__ import annotations

import logging
from typing import Any

import torch

from smcgen.core.config import SMCConfig
from smcgen.core.resampling import normalized_log_weights
from smcgen.core.result import SMCResult
from smcgen.potentials.base import Potential
from smcgen.potentials.grammar import GrammarPotential
from smcgen.samplers.outcome import choose_answer
from smcgen.samplers.run import BatchRun

logger = logging.getLogger("smcgen")
_WARNED: set[str] = set()


# mean ESS/N below this means the draft's blocks are mostly corrected by a few particles: at this N the
# weighted particles then carry visibly more of the draft's text than the target's
WEAK_DRAFT_ESS = 0.5


def _warn_weak_draft(result: SMCResult) -> None:
    """Warn (once per process) when the draft is far from the target at this N (mean ESS/N low)."""
    frac = result.mean_ess_fraction
    if result.n_particles > 1 and frac is not None and frac < WEAK_DRAFT_ESS and "weak-draft" not in _WARNED:
        _WARNED.add("weak-draft")
        logger.warning(
            "smcgen: the draft limits fidelity at N=%d: mean ESS/N %.2f (< %.2f), weight variance %.2f; "
            "samples may look like the draft's text. Raise n_particles, lower block_size (or "
            "block_size_policy='adaptive'), use method='sd' (exact, slower) or a better draft (smcgen distill)",
            result.n_particles,
            frac,
            WEAK_DRAFT_ESS,
            result.weight_variance,
        )


def _warn_fallback(reason: str, device: torch.device | str) -> None:
    """Log (once per distinct reason) that engine='auto' fell back to the generic engine: a warning
    on a GPU, where the native engine is the fast path, and at info level on a CPU, where the generic
    engine is the usual one (``result.engine_reason`` says why either way)."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        level = logging.WARNING if torch.device(device).type == "cuda" else logging.INFO
        logger.log(level, "smcgen: running on the generic engine, not the native one: %s", reason)


def posterior_of(sequences: list[list[int]], log_weights: list[float], decoder: Any) -> list[tuple[str, float]]:
    """Distinct decoded texts of the live particles with their merged normalized weights, largest first
    (particles that decode to the same text pool their weight, as genlm-control's decoded posterior)."""
    if decoder is None or not log_weights:
        return []
    # normalize in log space first: exponentiating raw log-weights underflows to an empty posterior
    # once every particle sits below about -745 (or overflows above 709)
    weights = normalized_log_weights(torch.tensor(log_weights, dtype=torch.float64)).exp().tolist()
    mass: dict[tuple[int, ...], float] = {}
    for seq, w in zip(sequences, weights):
        if w > 0.0:
            key = tuple(seq)
            mass[key] = mass.get(key, 0.0) + w
    by_text: dict[str, float] = {}
    for seq, w in mass.items():
        t = decoder.decode(list(seq), skip_special_tokens=True)
        by_text[t] = by_text.get(t, 0.0) + w
    total = sum(by_text.values())
    if total <= 0:
        return []
    return sorted(((t, w / total) for t, w in by_text.items()), key=lambda tw: -tw[1])


def group_result(
    run: BatchRun,
    b: int,
    cfg: SMCConfig,
    guide: Potential | None,
    decoder: Any,
    engine: str,
    engine_reason: str | None = None,
    with_draft: bool = False,
) -> SMCResult:
    """The :class:`SMCResult` of group ``b`` of a run: the answer is one particle drawn by final
    weight (for a dead group, the longest partial output). ``engine_reason``: why the generic engine
    ran, or why a native run's guide ran on the host (None when the native engine ran it all on the
    device). ``with_draft``: warn (once) when the draft limits fidelity at this N."""
    lengths = run.lengths[b].tolist()
    sequences = [row[:n] for row, n in zip(run.tokens[b].tolist(), lengths)]
    log_w = run.log_weights[b]
    alive = [bool(w > float("-inf")) for w in log_w.tolist()]
    dead = (bool(run.dead[b]) if run.dead is not None else False) or not any(alive)
    chosen = choose_answer(log_w, lengths, cfg.seed, dead)
    ess = run.ess_history[:, b]
    ess = ess[~torch.isnan(ess)]  # NaN pads the steps after a shorter batch of a merged run stopped
    text = decoder.decode(sequences[chosen], skip_special_tokens=True) if decoder is not None else ""
    texts = (
        list(decoder.batch_decode(sequences, skip_special_tokens=True)) if decoder and cfg.return_all_particles else []
    )
    structured = isinstance(guide, GrammarPotential)
    res = SMCResult(
        text=text,
        token_ids=sequences[chosen],
        sequences=sequences,
        log_weights=[float(x) for x in log_w],
        log_z=float(run.log_z[b]),
        ess_history=[float(x) for x in ess],
        n_resamples=int(run.resampled[:, b].sum()),
        n_steps=len(ess),
        elapsed_s=run.elapsed_s,
        n_particles=cfg.n_particles,
        texts=texts,
        engine=engine,
        engine_reason=engine_reason,
        dead=dead,
        parsed=guide.parse(text) if structured and not dead else None,
        alive=alive,
        posterior=posterior_of(sequences, log_w.tolist(), decoder),
        output_format="json" if structured and guide.kind == "json_schema" else None,
    )
    if with_draft:
        _warn_weak_draft(res)  # every caller (generate, Engine, the server) hears of a weak draft
    return res


__all__ = ["WEAK_DRAFT_ESS", "group_result", "posterior_of"]
