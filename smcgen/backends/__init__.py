"""Model runners. ``transformers_lm`` runs any Hugging Face causal LM (the exact reference)."""

from smcgen.backends.transformers_lm import CausalLMRunner, LanguageModel

__all__ = ["CausalLMRunner", "LanguageModel"]
