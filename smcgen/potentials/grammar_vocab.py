"""Compiling a grammar needs xgrammar's view of the vocabulary: a TokenizerInfo and a GrammarCompiler.

``tokenizer_info`` builds both for a LanguageModel, a Hugging Face tokenizer or a list of token
strings, with special tokens other than EOS blanked so no grammar ever allows them. They are
cached (the last 8 vocabularies): building them reads the whole vocabulary, and a target and a
draft that share a tokenizer then share one compiler and its compiled grammars.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from smcgen.potentials.errors import GrammarError
from smcgen.runners.transformers import LanguageModel

# the grammar modules import xgr from here, so a missing xgrammar always gets this hint
try:
    import xgrammar as xgr
except ImportError as _err:  # pragma: no cover - xgrammar is a dependency
    raise ImportError("grammar potentials need xgrammar: pip install 'xgrammar>=0.2.8,<0.3'") from _err

__all__ = ["tokenizer_info", "xgr"]

# (id(tokenizer), vocab size, eos ids) -> (tokenizer kept alive, TokenizerInfo, GrammarCompiler)
_COMPILERS: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Any, Any]] = {}
_COMPILERS_LOCK = threading.Lock()


def tokenizer_info(vocab: Any, vocab_size: int | None, eos_token_ids: Sequence[int] | None) -> tuple[Any, Any, int]:
    """(TokenizerInfo, GrammarCompiler, vocab size) for a LanguageModel, HF tokenizer or token list."""
    tokenizer = vocab
    if isinstance(vocab, LanguageModel):
        tokenizer = vocab.tokenizer
        vocab_size = vocab_size if vocab_size is not None else vocab.vocab_size
        eos_token_ids = eos_token_ids if eos_token_ids is not None else vocab.eos_token_ids
        if tokenizer is None:
            raise GrammarError("the model has no tokenizer; pass its token strings as a list (vocab=[...])")
    if isinstance(tokenizer, (list, tuple)):
        strings = ["" if t is None else t for t in tokenizer]
        size = vocab_size if vocab_size is not None else len(strings)
        if not eos_token_ids:
            raise GrammarError("a token list needs eos_token_ids (the grammar ends a sequence with EOS)")
        key_obj: Any = tuple(strings)
        key = (hash(key_obj), size, tuple(int(e) for e in eos_token_ids))
    else:
        if not hasattr(tokenizer, "get_vocab"):
            raise GrammarError(
                f"expected a smcgen.LanguageModel, a Hugging Face tokenizer or a list of token strings, got "
                f"{type(tokenizer).__name__}"
            )
        size = vocab_size if vocab_size is not None else max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        if not eos_token_ids:
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise GrammarError("the tokenizer has no EOS token; pass eos_token_ids")
            eos_token_ids = [eos]
        key_obj = tokenizer
        key = (id(tokenizer), size, tuple(int(e) for e in eos_token_ids))
    with _COMPILERS_LOCK:
        hit = _COMPILERS.get(key)
        if hit is not None and (hit[0] is key_obj or hit[0] == key_obj):
            return hit[1], hit[2], size
    stop = [int(e) for e in eos_token_ids]
    if isinstance(tokenizer, (list, tuple)):
        info = xgr.TokenizerInfo(list(key_obj), xgr.VocabType.RAW, vocab_size=size, stop_token_ids=stop)
    else:
        base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size, stop_token_ids=stop)
        # special tokens (chat markers, <|endoftext|>, ...) decode to nothing but xgrammar would read
        # their literal spelling as text: blank them so the grammar never allows them (EOS is a stop token)
        special = set(getattr(tokenizer, "all_special_ids", []))
        for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                special.add(int(idx))
        encoded = [""] * size
        for token, idx in tokenizer.get_vocab().items():
            if idx < size and idx not in special:
                encoded[idx] = token
        info = xgr.TokenizerInfo(
            encoded, base.vocab_type, vocab_size=size, stop_token_ids=stop, add_prefix_space=base.add_prefix_space
        )
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    with _COMPILERS_LOCK:
        if len(_COMPILERS) >= 8:
            _COMPILERS.pop(next(iter(_COMPILERS)))
        _COMPILERS[key] = (key_obj, info, compiler)
    return info, compiler, size
