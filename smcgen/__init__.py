"""smcgen: sequential Monte Carlo decoding of language models with pluggable potentials."""

from smcgen.api import generate, load_model
from smcgen.backends.transformers_lm import LanguageModel
from smcgen.config import SMCConfig
from smcgen.distill import DistillConfig, distill
from smcgen.engine import Engine
from smcgen.potentials import (
    GrammarError,
    GrammarPotential,
    LearnedReward,
    LMPotential,
    Potential,
    PotentialError,
    Product,
    PythonNamesPotential,
    RewardPotential,
    SequenceBatch,
    TokenPotential,
)
from smcgen.proposals import AWRS, AWRSProposal, LMProposal, MaskedLMProposal, Proposal
from smcgen.resampling import (
    MultinomialResampler,
    Resampler,
    ResidualResampler,
    StratifiedResampler,
    SystematicResampler,
    effective_sample_size,
    get_resampler,
)
from smcgen.result import SMCResult
from smcgen.smc import SMC, AllParticlesDeadError, BatchRun
from smcgen.step import NonFiniteError

__version__ = "0.1.0"

__all__ = [
    "AWRS",
    "SMC",
    "AWRSProposal",
    "AllParticlesDeadError",
    "BatchRun",
    "DistillConfig",
    "Engine",
    "GrammarError",
    "GrammarPotential",
    "LMPotential",
    "LMProposal",
    "LanguageModel",
    "LearnedReward",
    "MaskedLMProposal",
    "MultinomialResampler",
    "NonFiniteError",
    "Potential",
    "PotentialError",
    "Product",
    "Proposal",
    "PythonNamesPotential",
    "Resampler",
    "ResidualResampler",
    "RewardPotential",
    "SMCConfig",
    "SMCResult",
    "SequenceBatch",
    "StratifiedResampler",
    "SystematicResampler",
    "TokenPotential",
    "distill",
    "effective_sample_size",
    "generate",
    "get_resampler",
    "load_model",
]
