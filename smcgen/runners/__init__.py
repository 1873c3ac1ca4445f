"""Model runners. ``transformers_lm`` runs any Hugging Face causal LM (the exact reference)."""

from smcgen.runners.transformers import CausalLMRunner, LanguageModel

__all__ = ["CausalLMRunner", "LanguageModel"]
