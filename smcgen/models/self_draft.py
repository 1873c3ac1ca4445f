"""A draft made from the target itself: its linear layers stored in int8.

On a CPU a small target's decode step is mostly per-layer overhead, so a draft with a few layers is
cheap but, trained in minutes, far from the target (the shipped 2-layer draft: mean ESS/N about
0.3 at K=4, text pulled toward the draft's). The target's own weights in int8 (one scale per output
row, bf16 activations, ``aten._weight_int8pack_mm``) give a draft that costs well under half of the
fp32 target per step and stays close to it (int8 rowwise weights with fp32 activations changed
SmolLM2-135M's next-token distribution by about 0.008 nats per token at temperature 0.7:
``benchmarks/target_quantization.py``). SMC stays exact whatever the draft: the weights use this
draft's own probabilities.

``draft="self-int8"`` (``generate``, ``Engine``, the CLI's ``--draft``) builds it from the target.
On a GPU it is the target's own model marked for the native engine's int8 format (weight-only
int8 gate/up, down and LM head, the native drafts' default set); the generic engine drafts with the
target's weights as loaded there.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref

import torch
from torch import Tensor, nn

from smcgen.kernels.linear import quantize_int8
from smcgen.runners.transformers import LanguageModel

#: the draft name that asks for :func:`int8_self_draft` of the target
SELF_INT8_DRAFT = "self-int8"

_built: weakref.WeakKeyDictionary[nn.Module, LanguageModel] = weakref.WeakKeyDictionary()
_marked: weakref.WeakKeyDictionary[nn.Module, weakref.ref[LanguageModel]] = weakref.WeakKeyDictionary()


class Int8RowwiseLinear(nn.Module):
    """``nn.Linear`` with int8 weights and one bf16 scale per output row (CPU, bf16 activations).

    ``weight`` is the int8 matrix (its shape is what vocabulary checks read); the output is bf16.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_int8(linear.weight.detach())  # the native engine's int8 format
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def int8_self_draft(target: LanguageModel) -> LanguageModel:
    """A copy of ``target`` with every linear layer (the LM head too) in int8 and the rest in bf16.

    On a CPU: ``Int8RowwiseLinear`` layers, built once per target model and reused while the target
    lives. Elsewhere: the target's own model, marked ``native_format='int8'`` so the native engine
    drafts with its int8 copy (``NativeCausalLM.quantize_weights``), converted once like any draft;
    the same marked object is returned while it is still held.
    """
    if target.device.type != "cpu":
        # the same marked object while anything (an engine cache keyed by the draft) still holds it; a
        # weak reference, because the draft holds the target's model, the key, strongly
        ref = _marked.get(target.model)
        draft = ref() if ref is not None else None
        if draft is None:
            draft = dataclasses.replace(target, native_format="int8")
            _marked[target.model] = weakref.ref(draft)
        return draft
    hit = _built.get(target.model)
    if hit is not None:
        return hit
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise RuntimeError(f"draft={SELF_INT8_DRAFT!r} needs torch's _weight_int8pack_mm (torch >= 2.3)")
    model = copy.deepcopy(target.model).eval()
    # the head is replaced by its own int8 copy; a tied embedding stays (in bf16) for the input side
    model.config.tie_word_embeddings = False
    # quantized from the target's own weights (before the cast), then the rest goes to bf16
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8RowwiseLinear(child))
    model.to(torch.bfloat16).requires_grad_(False)
    draft = LanguageModel(model, target.tokenizer, target.eos_token_ids, target.context_length)
    _built[target.model] = draft
    return draft


__all__ = ["SELF_INT8_DRAFT", "Int8RowwiseLinear", "int8_self_draft"]
