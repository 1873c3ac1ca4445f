"""smcgen: sequential Monte Carlo decoding of language models with pluggable potentials."""

from smcgen.api import generate, load_model
from smcgen.core.config import EngineSettings, SamplingParams, SMCConfig
from smcgen.core.resampling import (
    MultinomialResampler,
    Resampler,
    ResidualResampler,
    StratifiedResampler,
    SystematicResampler,
    effective_sample_size,
    get_resampler,
)
from smcgen.core.result import SMCResult
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
from smcgen.runners.transformers import LanguageModel
from smcgen.samplers.generic import SMC, AllParticlesDeadError, BatchRun
from smcgen.samplers.step import NonFiniteError

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
    "SamplingParams",
    "EngineSettings",
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
