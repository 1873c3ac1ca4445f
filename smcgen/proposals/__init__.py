"""Proposals: how particles are extended."""

from smcgen.proposals.awrs import AWRS, AWRSProposal
from smcgen.proposals.base import Proposal
from smcgen.proposals.lm import LMProposal
from smcgen.proposals.masked import MaskedLMProposal

__all__ = ["AWRS", "AWRSProposal", "LMProposal", "MaskedLMProposal", "Proposal"]
