"""Generic backend: any Hugging Face causal LM, particles batched as rows, KV cache per row.

Every particle of a run has the same length (finished particles keep being fed padding that
their frozen weights ignore), so rows need no attention mask and the cache needs no ragged
bookkeeping: a resampling step copies, in every layer, the rows whose ancestor is another row.
This path is the exact reference the fast GPU engine is tested against; it favors clarity, but
keeps the cache copies off the hot path (:mod:`smcgen.runners.row_cache`: buffers written in
place, reorders that copy only the rows that change; :mod:`smcgen.runners.gqa_attention`: no
copied key/value heads on a CPU), which leaves the logits unchanged.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from smcgen.runners.gqa_attention import gqa_attention
from smcgen.runners.row_cache import row_cache

# transformers 5.x announces a rename of `past_key_values` to `cache`, but in 5.17 a cache
# passed as `cache=` is silently not filled; keep the working name and hide the notice.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


@dataclass
class LanguageModel:
    """A causal LM with what the engine needs beside its weights.

    ``tokenizer`` may be None for models used on token ids only (tests, custom vocabularies);
    ``eos_token_ids`` end a particle; ``context_length`` bounds prompt plus new tokens.
    """

    model: PreTrainedModel
    tokenizer: Any | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    context_length: int | None = None
    #: the weight format ('int8' / 'fp8') the native engine gives this model when it drafts and the
    #: config leaves the choice to it (``draft_quantization='auto'``); None: the config's own rule
    native_format: str | None = None

    def __post_init__(self) -> None:
        if self.native_format not in (None, "int8", "fp8"):
            raise ValueError(f"native_format must be None, 'int8' or 'fp8', got {self.native_format!r}")

    @classmethod
    def wrap(cls, model: PreTrainedModel, tokenizer: Any | None = None) -> LanguageModel:
        """Wrap a model, reading EOS ids and context length from its configs and tokenizer."""
        eos: list[int] = []
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if int(v) not in eos:
                    eos.append(int(v))
        context = getattr(model.config, "max_position_embeddings", None)
        return cls(model=model, tokenizer=tokenizer, eos_token_ids=tuple(eos), context_length=context)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to_dtype(self, dtype: torch.dtype | str) -> LanguageModel:
        """A copy of this model with its weights in ``dtype`` (e.g. ``"bfloat16"``); this one is untouched.

        Meant for drafts: a trained draft shares the target's embedding and head, which a copy leaves
        alone. In bf16 a draft streams half the bytes per step (on a CPU with AVX512-BF16 its
        49,152-token head ran ~3x faster than in fp32); SMC stays exact, since the weights use the
        draft's own bf16 probabilities, and only the proposal (hence ESS) can change.
        """
        import copy

        target_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(target_dtype, torch.dtype) or not target_dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype such as 'bfloat16', got {dtype!r}")
        model = copy.deepcopy(self.model).to(target_dtype)
        return dataclasses.replace(self, model=model)  # the tokenizer, EOS ids and native format kept

    @property
    def vocab_size(self) -> int:
        """Width of the logits (may exceed the tokenizer's size when the embedding is padded)."""
        return int(self.model.get_output_embeddings().weight.shape[0])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX, via oneDNN)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_draft_dtype(draft: LanguageModel) -> str | None:
    """The dtype ``draft`` runs in when none is asked for: bfloat16 for a float32 draft on a CPU with
    native bf16 (on the 2-core CI machine the shipped draft's steps took about half the time, and SMC
    stays exact: the weights use the copy's own probabilities), else as loaded (None; a draft already
    narrower, such as self-int8, stays as it is)."""
    first = next(draft.model.parameters())
    as_loaded = first.device.type != "cpu" or first.dtype != torch.float32
    return None if as_loaded or not cpu_has_native_bf16() else "bfloat16"


class CausalLMRunner:
    """Incremental scorer of a growing batch of equal-length sequences.

    ``start`` prefills the shared prompt once and repeats its cache over the rows;
    ``forward_new`` feeds whatever part of the sequences the cache has not seen and returns the
    logits predicting each following token; ``reorder`` follows resampling ancestors.
    """

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self.cache: DynamicCache | None = None
        self.fed = 0

    @torch.inference_mode()
    def start(self, prompt_ids: Tensor, n_rows: int) -> None:
        """Prefill all but the last prompt token (shared by every row), then repeat to ``n_rows``."""
        model = self.lm.model
        self.cache = row_cache(model.config)
        self.fed = 0
        if prompt_ids.shape[-1] > 1:
            head = prompt_ids[..., :-1].reshape(1, -1).to(self.lm.device)
            with gqa_attention(model):
                model(input_ids=head, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.fed = head.shape[1]
            self.cache.batch_repeat_interleave(n_rows)

    @torch.inference_mode()
    def forward_new(self, sequences: Tensor) -> Tensor:
        """Feed ``sequences[:, fed:]``; return logits ``[R, T - fed, V]``, row j predicting token fed+j+1."""
        assert self.cache is not None, "call start() first"
        new = sequences[:, self.fed :]
        if new.shape[1] == 0:
            raise RuntimeError("forward_new called with no unseen tokens")
        with gqa_attention(self.lm.model):
            out = self.lm.model(input_ids=new, past_key_values=self.cache, use_cache=True)
        self.fed = sequences.shape[1]
        return out.logits

    def truncate(self, length: int) -> None:
        """Roll the cache back to its first ``length`` positions (speculative decoding's rejected
        tokens); the next :meth:`forward_new` feeds the sequences from there."""
        assert self.cache is not None, "call start() first"
        if length < self.fed:
            self.cache.crop(length - self.fed)  # transformers 5: a negative count removes that many positions
            self.fed = length

    def reorder(self, rows: Tensor) -> None:
        """Make row i a copy of row ``rows[i]`` (resampling; rows that keep their own history are not copied)."""
        if self.cache is not None and self.cache.get_seq_length() > 0:
            self.cache.reorder_cache(rows.to(self.lm.device))


def check_compatible(target: LanguageModel, draft: LanguageModel) -> None:
    """Raise ``ValueError`` unless draft and target share one vocabulary."""
    if target.vocab_size != draft.vocab_size:
        raise ValueError(
            f"draft and target vocabularies differ: draft logits have {draft.vocab_size} entries, "
            f"target logits {target.vocab_size}; SMC-SD needs a draft with the target's tokenizer"
        )
    # the same tokenizer object, or decoders without a vocabulary (plain id -> text maps): nothing to compare
    comparable = all(hasattr(t, "get_vocab") for t in (target.tokenizer, draft.tokenizer))
    if comparable and target.tokenizer is not draft.tokenizer:
        tv, dv = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
        if tv != dv:
            differing = sorted(set(tv.items()) ^ set(dv.items()))[:3]
            raise ValueError(
                "draft and target tokenizers differ (SMC-SD needs the same tokenizer); "
                f"{len(set(tv.items()) ^ set(dv.items()))} token/id pairs differ, e.g. {differing}"
            )


def encode_prompt(prompt: Any, lm: LanguageModel) -> list[int]:
    """Turn text, a list of ids, a tokenizer tensor (``[T]`` or ``[1, T]``) or a tokenizer's output
    (``BatchEncoding``, ``apply_chat_template(..., return_dict=True)``) into a list of ids."""
    from smcgen.prompts import prompt_ids_from

    parsed = prompt_ids_from(prompt)
    if isinstance(parsed, str):
        if lm.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or a model with a tokenizer")
        ids = [int(t) for t in lm.tokenizer(parsed, add_special_tokens=True)["input_ids"]]
    else:
        ids = parsed
    if not ids:
        raise ValueError("prompt is empty: give at least one token (a text prompt may need a BOS token)")
    bad = [t for t in ids if not 0 <= t < lm.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {lm.vocab_size})")
    return ids
