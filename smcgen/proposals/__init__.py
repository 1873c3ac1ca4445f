"""Proposals: how particles are extended."""

from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal

__all__ = ["LMProposal", "Proposal"]
