"""Tiny random-weight causal LMs whose targets can be enumerated exactly."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smcgen.runners.transformers import LanguageModel

VOCAB = 4
EOS = 3
PROMPT = [0, 1]


class LetterDecoder:
    """Decodes token ids to letters ('a', 'b', ...), skipping EOS: enough for text rewards."""

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(ord("a") + t) for t in s if not (skip_special_tokens and t == EOS)) for s in sequences]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.batch_decode([ids], skip_special_tokens)[0]


def tiny_lm(
    seed: int, vocab: int = VOCAB, eos: int = EOS, logit_scale: float = 3.0, layers: int = 2, hidden: int = 16
) -> LanguageModel:
    """A 2-layer Llama with ``vocab`` tokens; ``logit_scale`` sharpens its next-token distributions.

    ``hidden`` is split over 2 heads (the Triton attention kernel needs head_dim >= 16: hidden 32)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=eos,
        bos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        w = model.lm_head.weight
        w.copy_(torch.randn_like(w) * logit_scale / w.shape[1] ** 0.5 * 4)
    lm = LanguageModel.wrap(model, LetterDecoder())
    return LanguageModel(lm.model, lm.tokenizer, (eos,), lm.context_length)


def tiny_tokenizer(letters: str = "abc"):
    """A word-level fast tokenizer over single letters plus ``</s>`` (id len(letters)) as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(letters)}
    vocab["</s>"] = len(letters)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="</s>")
