"""Weight-only fp8 / int8 storage for the native model's linear layers (an SMC-SD draft's).

``WeightQuantization`` is a mixin of ``model.NativeCausalLM``: it converts named layers in place,
reports which are stored in which format, and refuses a ``state_dict`` quantized differently
(fp8 and int8 weights share names and shapes, so a plain copy would silently cast one into the
other).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from smcgen.kernels.linear import quantize_fp8, quantize_int8


class WeightQuantization:
    """The quantization methods of ``NativeCausalLM`` (a mixin placed before ``nn.Module``).

    Expects ``self.layers`` (decoder layers with ``qkv``, ``o``, ``gate_up`` and ``down``) and
    ``self.lm_head``; the row scales are registered as ``<name>_scale`` buffers.
    """

    layers: nn.ModuleList
    lm_head: nn.Parameter
    register_buffer: Any

    #: what ``quantize_weights`` (fp8 or int8) converts by default: the layers where one-byte
    #: weights streamed faster in the skinny kernel on an H100 at 8 rows (Llama-3.2-1B). QKV and O,
    #: 6-13 MB a layer, are latency-bound there: in fp8 they ran slower than their bf16 GEMMs, and
    #: with int8 QKV and O the engine's N=8 K=8 lost 2.5% (BENCHMARKS.md)
    FP8_DEFAULT = ("gate_up", "down", "lm_head")
    FP8_NAMES = ("qkv", "o", "gate_up", "down", "lm_head")

    @torch.no_grad()
    def quantize_weights(self, fmt: str, names: tuple[str, ...] = FP8_DEFAULT) -> None:
        """Store the named linear layers (of every decoder layer) and/or the LM head as weight-only
        ``fmt`` ('fp8': e4m3, or 'int8'), one fp32 scale per weight row.

        Halves the bytes a decode step streams through those layers. Meant for an SMC-SD *draft*:
        SMC reweights its proposals by their own probabilities, so the target distribution stays
        exact whatever the draft's precision, while a quantized target would change the
        distribution sampled. int8 keeps 7 bits of each row's range, e4m3 3 mantissa bits: on
        SmolLM2 the int8 copy's next-token distributions moved ~7x less (KL) from the model's own
        (BENCHMARKS.md). The skinny kernel reads the one-byte tiles and converts them before the
        dot (batches over its row limit, a prefill, run it on row blocks). The embedding keeps the
        model's dtype (a tied LM head gets its own quantized copy). The scales are buffers
        (``<name>_scale``) saved by ``state_dict``; a model that was not quantized the same way
        refuses such a state (ValueError, before anything is copied). ``names``: from ``FP8_NAMES``; a layer already in
        ``fmt`` is left as it is, one in the other format is refused.
        """
        quantizers = {"fp8": quantize_fp8, "int8": quantize_int8}
        if fmt not in quantizers:
            raise ValueError(f"fmt must be 'fp8' or 'int8', got {fmt!r}")
        unknown = set(names) - set(self.FP8_NAMES)
        if unknown:
            raise ValueError(f"names: unknown {sorted(unknown)}; choose from {self.FP8_NAMES}")
        held = self.quantized_weights
        clash = sorted(n for n in names if held.get(n, fmt) != fmt)
        if clash:
            raise ValueError(f"{clash} are already stored in {held[clash[0]]}; cannot also quantize them to {fmt}")
        quantize = quantizers[fmt]
        for name in names:
            if name == "lm_head":
                if "lm_head" not in held:
                    q, scale = quantize(self.lm_head)
                    self.lm_head = nn.Parameter(q, requires_grad=False)  # unties a tied head
                    self.register_buffer("lm_head_scale", scale)
                continue
            # layer by layer: a model built one quantized layer at a time (runners.native.build)
            # quantizes only the layer it just appended
            for layer in self.layers:
                if getattr(layer, f"{name}_scale", None) is not None:
                    continue
                q, scale = quantize(getattr(layer, name))
                setattr(layer, name, nn.Parameter(q, requires_grad=False))
                layer.register_buffer(f"{name}_scale", scale)

    def quantize_fp8(self, names: tuple[str, ...] = FP8_DEFAULT) -> None:
        """``quantize_weights('fp8', names)``."""
        self.quantize_weights("fp8", names)

    def quantize_int8(self, names: tuple[str, ...] = FP8_DEFAULT) -> None:
        """``quantize_weights('int8', names)``."""
        self.quantize_weights("int8", names)

    @property
    def quantized_weights(self) -> dict[str, str]:
        """The weights stored quantized (see ``quantize_weights``) and their format ('fp8' / 'int8')."""
        layer = self.layers[0] if len(self.layers) else None
        found = {
            n: getattr(layer, n)
            for n in self.FP8_NAMES[:-1]
            if layer is not None and getattr(layer, f"{n}_scale", None) is not None
        }
        if getattr(self, "lm_head_scale", None) is not None:
            found["lm_head"] = self.lm_head
        return {n: ("int8" if w.dtype == torch.int8 else "fp8") for n, w in found.items()}

    @property
    def fp8_weights(self) -> tuple[str, ...]:
        """The weights stored in fp8 (see ``quantize_fp8``); empty for a model in its own dtype."""
        return tuple(n for n, fmt in self.quantized_weights.items() if fmt == "fp8")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # fp8 and int8 weights share names, shapes and scale buffers: copy_ would cast one format's
        # values into the other's without a complaint (int8 wraps fp8 values over 127), so the
        # formats are compared before anything is copied (states saved before the record: unchecked)
        saved = state_dict.get(prefix + "_extra_state", {}).get("quantized")
        if saved is not None and saved != self.quantized_weights:
            raise ValueError(
                f"the state holds weights quantized as {saved or 'none'}, this model {self.quantized_weights or 'none'}: "
                "quantize it the same way (quantize_weights) before loading"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
