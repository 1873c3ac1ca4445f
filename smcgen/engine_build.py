"""What an :class:`~smcgen.engine.Engine` builds per setting: the generic engine over its models, and
the native engines it keeps (one per distinct setting, least recently used dropped first)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from smcgen.core.config import SMCConfig
from smcgen.potentials.base import Potential
from smcgen.potentials.lm import LMPotential
from smcgen.proposals.awrs import AWRSProposal
from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal
from smcgen.proposals.masked import MaskedLMProposal
from smcgen.runners.transformers import LanguageModel
from smcgen.samplers.generic import SMC


def generic_engine(
    target: LanguageModel,
    draft: LanguageModel | None,
    proposal: Proposal | None,
    constraint: Potential | None,
    potentials: Any,
    cfg: SMCConfig,
    guide: Potential | None,
) -> SMC:
    """The generic engine for one setting (cheap to build: it holds no per-run state). A draft
    proposes through AWRS under a constraint, through the guide's mask under a guide."""
    if draft is not None:
        if constraint is not None:
            proposal = AWRSProposal(draft, constraint, temperature=cfg.draft_temperature)
        elif guide is not None:
            proposal = MaskedLMProposal(draft, guide, temperature=cfg.draft_temperature)
        else:
            proposal = LMProposal(draft, temperature=cfg.draft_temperature)
    return SMC(
        LMPotential(target, temperature=cfg.target_temperature, alpha=cfg.alpha),
        cfg,
        proposal=proposal,
        potentials=potentials,
        guide=guide,
        constraint=constraint,
    )


class NativeEngines:
    """The :class:`~smcgen.samplers.native.NativeSMC` engines of one Engine, at most ``kept`` of them.

    Keyed by the config without its seed (the seed is read at run time, so one engine serves every
    seed), the guide object and the converted draft, so every request with the same settings reuses
    one engine and whatever it keeps per shape (captured graphs, the KV pool)."""

    def __init__(self, kept: int):
        self.kept = kept
        self._engines: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._engines)

    def most_recent(self) -> Any:
        """The engine used last (benchmarks read its ``last_timing``), or None."""
        return next(reversed(self._engines.values()))[0] if self._engines else None

    def get(
        self,
        cfg: SMCConfig,
        guide: Potential | None,
        target: Any,
        draft: Any,
        lm: LanguageModel,
        potentials: Any,
    ) -> tuple[Any, bool]:
        """(the engine for this setting, whether it was built now). ``target``/``draft``: the native
        models; ``lm``: the target's :class:`LanguageModel` (its EOS ids and tokenizer)."""
        from smcgen.samplers.native import NativeSMC

        key = (cfg.model_copy(update={"seed": None}), id(guide), id(draft))
        hit = self._engines.get(key)
        built = False
        if hit is not None and hit[1] is guide:
            self._engines.move_to_end(key)
            engine = hit[0]
        else:
            with torch.no_grad():
                engine = NativeSMC(
                    target,
                    cfg,
                    draft=draft,
                    eos_token_ids=lm.eos_token_ids,
                    guide=guide,
                    potentials=potentials,
                    tokenizer=lm.tokenizer,
                )
            built = True
            # the guide is held with its engine so its id cannot be reused by another object
            self._engines[key] = (engine, guide)
            while len(self._engines) > self.kept:
                self._engines.popitem(last=False)
        engine.config = cfg
        return engine, built


__all__ = ["NativeEngines", "generic_engine"]
