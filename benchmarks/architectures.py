"""The real architectures the GPU benchmarks build with random weights (speed does not depend on the
weights): their transformers config fields, in one place. Vocabulary size and context length are
included; scripts that pair the models with another tokenizer override ``vocab_size``."""

LLAMA_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA_COMMON = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)

LLAMA_3_1_8B = dict(
    _LLAMA_COMMON,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_scaling={**LLAMA_ROPE, "factor": 8.0},
    tie_word_embeddings=False,
)
LLAMA_3_2_1B = dict(
    _LLAMA_COMMON,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rope_scaling={**LLAMA_ROPE, "factor": 32.0},
    tie_word_embeddings=True,
)
LLAMA_3_1_70B = dict(
    _LLAMA_COMMON,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    rope_scaling={**LLAMA_ROPE, "factor": 8.0},
    tie_word_embeddings=False,
)

# a two-layer toy of the same family, for the scripts' --tiny runs on the CPU
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def without_vocab(fields: dict) -> dict:
    """``fields`` less the vocabulary size and context length, for scripts that pair the model with
    a tokenizer of their own."""
    return {k: v for k, v in fields.items() if k not in ("vocab_size", "max_position_embeddings")}


def build_llama(fields: dict, dtype, device, seed: int, **overrides):
    """A random-weight ``LlamaForCausalLM`` of ``fields`` (plus ``overrides``), built directly on
    ``device`` in ``dtype``: an 8B model never exists in float32 on the host."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**fields, **overrides})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


#: the embedded model's architecture (HuggingFaceTB/SmolLM2-135M-Instruct's config), for timings of
#: its kernels without loading its weights
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
