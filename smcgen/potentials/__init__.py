"""Potentials: the factors a target is made of."""

from smcgen.potentials.base import Potential, PotentialError, Product, SequenceBatch
from smcgen.potentials.errors import GrammarError
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.json_schema import SchemaWarning
from smcgen.potentials.lm import LMPotential
from smcgen.potentials.output import as_grammar
from smcgen.potentials.python_budget import PythonBudgetTwist
from smcgen.potentials.python_grammar import PythonGrammarPotential
from smcgen.potentials.python_names import PythonNamesPotential
from smcgen.potentials.reward import RewardPotential
from smcgen.potentials.token import LearnedReward, TokenPotential

__all__ = [
    "GrammarError",
    "GrammarPotential",
    "LMPotential",
    "LearnedReward",
    "Potential",
    "PotentialError",
    "Product",
    "PythonBudgetTwist",
    "PythonGrammarPotential",
    "PythonNamesPotential",
    "RewardPotential",
    "SchemaWarning",
    "SequenceBatch",
    "TokenPotential",
    "as_grammar",
]
