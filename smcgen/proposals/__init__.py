"""Proposals: how particles are extended."""

from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal
from smcgen.proposals.masked import MaskedLMProposal

__all__ = ["LMProposal", "MaskedLMProposal", "Proposal"]
