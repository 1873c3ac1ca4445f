"""Potentials: the factors a target is made of."""

from smcgen.potentials.base import Potential, Product, SequenceBatch
from smcgen.potentials.errors import GrammarError
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.json_schema import SchemaWarning
from smcgen.potentials.lm import LMPotential
from smcgen.potentials.output import as_grammar
from smcgen.potentials.reward import RewardPotential

__all__ = [
    "GrammarError",
    "GrammarPotential",
    "LMPotential",
    "Potential",
    "Product",
    "RewardPotential",
    "SchemaWarning",
    "SequenceBatch",
    "as_grammar",
]
