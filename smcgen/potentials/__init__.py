"""Potentials: the factors a target is made of."""

from smcgen.potentials.base import Potential, Product, SequenceBatch
from smcgen.potentials.errors import GrammarError
from smcgen.potentials.grammar import GrammarPotential
from smcgen.potentials.lm import LMPotential
from smcgen.potentials.python_names import PythonNamesPotential
from smcgen.potentials.reward import RewardPotential

__all__ = ["GrammarError", "GrammarPotential", "LMPotential", "Potential", "Product", "PythonNamesPotential", "RewardPotential", "SequenceBatch"]
