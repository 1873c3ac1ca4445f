"""smcgen: sequential Monte Carlo decoding of language models with pluggable potentials."""

from smcgen.api import generate, load_model
from smcgen.backends.transformers_lm import LanguageModel
from smcgen.config import SMCConfig
from smcgen.engine import Engine
from smcgen.potentials import (
    GrammarError,
    GrammarPotential,
    LMPotential,
    Potential,
    Product,
    RewardPotential,
    SequenceBatch,
)
from smcgen.proposals import LMProposal, MaskedLMProposal, Proposal
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

__version__ = "0.1.0"

__all__ = [
    "SMC",
    "AllParticlesDeadError",
    "BatchRun",
    "Engine",
    "GrammarError",
    "GrammarPotential",
    "LMPotential",
    "LMProposal",
    "LanguageModel",
    "MaskedLMProposal",
    "MultinomialResampler",
    "Potential",
    "Product",
    "Proposal",
    "Resampler",
    "ResidualResampler",
    "RewardPotential",
    "SMCConfig",
    "SMCResult",
    "SequenceBatch",
    "StratifiedResampler",
    "SystematicResampler",
    "effective_sample_size",
    "generate",
    "get_resampler",
    "load_model",
]
