"""Native decoder for the Llama, Qwen2 and Qwen3 families over the paged KV cache.

The forward pass is four linear layers per layer (fused QKV, output, fused gate/up, down) around
``paged_attention``, the QKV projection with RoPE and the cache write in its epilogue or beside it
(``kernels.qkv_rope.qkv_rope_write_kv``); the RMSNorms, SiLU
gating and residual adds run inside or beside the linear layers (``kernels.linear.fused_linear``),
and the input RMSNorm's weight lives in the QKV weights with its 1/RMS scale applied by RoPE
(``fold_input_norms``; not for a QKV bias).
Everything has static shapes and reads positions from a device tensor, so a whole decode or verify
step can be captured in a CUDA graph: no host syncs, no Python branches on tensor values.

Numerics follow transformers so logits match for the same weights: RMSNorm in fp32 and cast back
before the weight multiply (except the folded input norm: W * g rounded once, the 1/RMS scale
applied after the projection; ``fold_input_norms``), RoPE cos/sin computed in fp32 and cast to the
activations' dtype, attention scale ``head_dim ** -0.5``, SiLU-gated MLP.

Beside this module: ``config`` (the architecture numbers), ``weights`` (the fused layer layout,
random init, the copy from transformers), ``weight_quantization`` (fp8 / int8 storage); their
public names stay importable from here.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smcgen.core.device_memory import release_held
from smcgen.kernels._triton import pdl_scope, use_triton
from smcgen.kernels.attention import TRITON_HEAD_DIMS, cascade_attention, paged_attention
from smcgen.kernels.decode_layer import MAX_ROWS as FUSED_LAYER_MAX_ROWS
from smcgen.kernels.decode_layer import DecodeLayerWeights, decode_layer_triton
from smcgen.kernels.linear import fused_linear
from smcgen.kernels.qkv_rope import qkv_rope_write_kv
from smcgen.kernels.sampling import fused_sample, token_logprobs
from smcgen.runners.native.config import SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, NativeConfig, rope_inv_freq  # noqa: F401
from smcgen.runners.native.kv_cache import PagedKVCache, SharedPrefix
from smcgen.runners.native.weight_quantization import WeightQuantization
from smcgen.runners.native.weights import NativeLayer, copy_hf_weights, empty_param, init_random

#: the process-wide default of ``NativeCausalLM.fused_layers`` (SMCGEN_FUSED_LAYERS=1 turns it on):
#: off until the one-launch layer (kernels.decode_layer) has been timed on a GPU
FUSED_LAYERS = os.environ.get("SMCGEN_FUSED_LAYERS", "0") == "1"


class NativeCausalLM(WeightQuantization, nn.Module):
    """Llama / Qwen2 / Qwen3 causal LM running on a ``PagedKVCache``.

    Build it with ``from_hf`` (copy a transformers model's weights) or ``from_config`` (random
    weights, for benchmarks). ``forward`` writes the new tokens' K/V into the cache and returns
    logits; the caller reserves pages first (``cache.reserve(n_tokens)``), so that page
    bookkeeping stays one explicit, separately capturable step.
    """

    #: activation dtypes the one-launch layer runs in (tensor-core dots; tests add fp32)
    FUSED_LAYER_DTYPES = (torch.bfloat16, torch.float16)

    def __init__(
        self,
        cfg: NativeConfig,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        max_positions: int | None = None,
    ):
        super().__init__()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.cfg = cfg
        self.max_positions = int(max_positions or cfg.max_positions)
        self.embed = empty_param((cfg.vocab_size, cfg.hidden_size), dtype, device)
        self.layers = nn.ModuleList(NativeLayer(cfg, dtype, device) for _ in range(cfg.n_layers))
        self.norm = empty_param((cfg.hidden_size,), dtype, device)
        # Tied: one Parameter under both names (parameters() lists it once).
        self.lm_head = (
            self.embed if cfg.tie_word_embeddings else empty_param((cfg.vocab_size, cfg.hidden_size), dtype, device)
        )
        # The whole cos/sin table once, so a step only gathers rows by position (graph-safe);
        # fp32 math, then the activations' dtype, exactly like transformers' rotary embedding.
        # Positions must stay below max_positions (the table's length; pass a smaller one to save memory).
        inv_freq = rope_inv_freq(cfg).to(device)
        freqs = torch.arange(self.max_positions, device=device, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(dtype), persistent=False)
        self.q_size = cfg.n_heads * cfg.head_dim
        self.kv_size = cfg.n_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        #: batches of at most this many token rows run the fused skinny GEMM kernel on CUDA
        #: (kernels.linear); 0 sends every batch through cuBLAS (benchmarks compare the two). fp32
        #: models start at 0: the kernel's fp32 dots are IEEE FMA loops, and an fp32 SmolLM2-135M
        #: decoded 131 tok/s with them against 617 on cuBLAS (H100, BENCHMARKS.md). Quantized layers
        #: stream in the skinny kernel whatever this says.
        self.skinny_max_rows = 0 if dtype == torch.float32 else 16
        #: whether decode-sized batches also run the QKV projection / the LM head in the skinny
        #: kernel (o, gate_up and down always do). With the swapped operand order (SWAP_AB) the
        #: head streamed 5-9% faster there than on cuBLAS and QKV as fast, and with both there a
        #: decode step is a chain of Triton kernels that PDL can overlap (H100, BENCHMARKS.md)
        self.skinny_qkv = True
        self.skinny_head = True
        #: decode-sized batches of a model with 64-wide heads project, rotate and cache q/k/v in
        #: one kernel (kernels.qkv_rope) instead of the skinny QKV kernel plus the RoPE kernel
        self.fused_qkv_rope = True
        #: launch this model's Triton kernels with programmatic dependent launch (sm_90+): True,
        #: False, or None to follow the process-wide setting (SMCGEN_PDL). Read when a forward
        #: runs, so a CUDA graph keeps the mode it was captured with.
        self.pdl: bool | None = None
        #: whether each layer's ``qkv`` holds W * input_norm (see ``fold_input_norms``): the forward
        #: then projects the raw residual stream and RoPE applies the norm's 1/RMS scale
        self.input_norm_folded = False
        #: the o and down projections add into the residual stream in place, so cuBLAS's addmm
        #: needs no copy of its C operand (one device memcpy per layer and projection otherwise, on
        #: batches wider than skinny_max_rows): +1.9% at N=8 K=8 and +2.1% on 8 x 8 (H100, BENCHMARKS.md)
        self.residual_in_place = True
        #: cascade attention (kernels.attention.cascade_attention) for caches whose row groups share
        #: a prompt prefix (PagedKVCache.share_prefix, set by the engine after its prefill): each
        #: prefix K/V tile is read once for all the group's queries instead of once per row. True /
        #: False: always / never; None: on CUDA where ``cascade_pays`` says the shape was measured to
        #: win on an H100 (BENCHMARKS.md, "prefix tiles and a per-call choice"): one-query (draft) steps from
        #: ``cascade_decode_prefix`` tokens (1 x 8 at 4,096: 1.04x, at 256: 0.97x) or for
        #: ``cascade_min_groups`` requests from ``cascade_min_prefix`` tokens; many-query (verify)
        #: forwards from ``cascade_long_prefix`` tokens only (8 x 8 at 4,096: 1.16x with the draft's
        #: steps alone in cascade, 1.11x with the verify's too; 1 x 8 at 16,384: 1.19x, with the
        #: earlier 128-row prefix tiles). The draft's two-token first step of a cycle counts as many-query.
        self.cascade: bool | None = None
        #: run each layer of a decode-sized forward (at most ``FUSED_LAYER_MAX_ROWS`` token rows,
        #: bf16 / fp16, no cascade) as one launch of ``kernels.decode_layer`` instead of five: True,
        #: False, or None to follow ``FUSED_LAYERS``. The five kernels' math and tile plans; it
        #: runs every projection in the skinny kernel and QKV with RoPE whatever ``skinny_max_rows``,
        #: ``skinny_qkv`` and ``fused_qkv_rope`` say.
        self.fused_layers: bool | None = None
        self.cascade_min_prefix = 1024
        self.cascade_min_groups = 8
        #: (a 4,096-token prompt declares prefixes of 4,095 and 4,094 tokens, a 16,384-token one 16,383)
        self.cascade_decode_prefix = 4_000
        self.cascade_long_prefix = 16_000
        # split-K programs of the skinny kernel elect their reducer on these; the kernel re-zeroes
        # them. One forward at a time per model: two streams running this model at once would share them.
        self.register_buffer("linear_counters", torch.zeros(4096, dtype=torch.int32, device=device), persistent=False)
        # the same for split-KV attention's merging program (one slot per row x kv head x query
        # block; the kernel splits only grids far smaller than this)
        self.register_buffer("attn_counters", torch.zeros(16384, dtype=torch.int32, device=device), persistent=False)
        # the one-launch layer's barrier and merge counters (kernels.decode_layer), left zeroed too
        self.register_buffer("layer_counters", torch.zeros(4096, dtype=torch.int32, device=device), persistent=False)

    # --------------------------------------------------------------------------- builders

    @classmethod
    @torch.no_grad()
    def from_hf(
        cls,
        model: nn.Module,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        max_positions: int | None = None,
    ) -> NativeCausalLM:
        """Copy the weights of a transformers LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM.

        ``dtype`` and ``device`` default to the model's own. Raises ValueError naming the model
        type when the architecture is not supported.
        """
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "model") or not hasattr(model, "lm_head"):
            raise ValueError(
                f"NativeCausalLM.from_hf needs a transformers *ForCausalLM model, got {type(model).__name__} "
                f"(model type '{getattr(config, 'model_type', None)}')"
            )
        cfg = NativeConfig.from_hf(config)
        first = next(model.parameters())
        native = cls(cfg, dtype or first.dtype, device if device is not None else first.device, max_positions)
        copy_hf_weights(native, model)
        native.fold_input_norms()
        return native

    @classmethod
    @torch.no_grad()
    def from_pretrained(
        cls,
        path: str,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        *,
        max_positions: int | None = None,
    ) -> NativeCausalLM:
        """Load a checkpoint directory (``config.json`` + safetensors, as ``save_pretrained`` writes).

        The weights go through transformers once (on the CPU, in ``dtype``) and are copied into the
        fused layout on ``device`` (default: CUDA when present); the transformers copy is dropped.
        """
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        target = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        native = cls.from_hf(hf, dtype=dtype, device=target, max_positions=max_positions)
        del hf
        return native.eval()

    @classmethod
    @torch.no_grad()
    def from_config(
        cls,
        config: Any,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        seed: int = 0,
        *,
        max_positions: int | None = None,
    ) -> NativeCausalLM:
        """Random weights drawn directly on ``device`` (no CPU init: seconds for 8B on a GPU).

        Matrices ~ N(0, initializer_range), norms 1, biases 0, like transformers' initializer.
        ``config`` is a transformers config or a ``NativeConfig``.
        """
        cfg = config if isinstance(config, NativeConfig) else NativeConfig.from_hf(config)
        native = cls(cfg, dtype, device, max_positions)
        init_random(native, cfg, torch.Generator(device=native.embed.device).manual_seed(seed))
        native.fold_input_norms()
        return native

    @torch.no_grad()
    def fold_input_norms(self) -> None:
        """Fold each layer's input RMSNorm weight into its QKV weight columns, once (``input_norm_folded``).

        ``rms_norm(h) @ W.T`` = ``rsqrt(mean(h^2) + eps) * (h @ (W * g).T)``: with the weight g in
        W, the 1/RMS scale is a per-token scalar that the RoPE + KV-write kernel applies to q, k and v
        (it reads h), so a layer needs no separate norm kernel: one launch fewer per layer and
        step. Numerics: W * g is rounded once to the weight dtype, and the scale comes after the
        matmul instead of before it (differences at the dtype's rounding level). Not done with
        a QKV bias (Qwen2), which must be added after the scale. The builders call it.
        """
        if self.input_norm_folded or self.cfg.qkv_bias:
            return
        for layer in self.layers:
            layer.qkv.mul_(layer.input_norm)
        self.input_norm_folded = True

    def get_extra_state(self) -> dict[str, Any]:
        """Saved with ``state_dict``: whether its ``qkv`` weights hold the folded input norms, and
        which weights are quantized in which format."""
        return {"input_norm_folded": self.input_norm_folded, "quantized": self.quantized_weights}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """``load_state_dict`` takes the weights' layout along with them (folded or not)."""
        self.input_norm_folded = bool(state["input_norm_folded"])

    # ------------------------------------------------------------------------- properties

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return self.cfg.n_layers

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (the KV cache's head count)."""
        return self.cfg.n_kv_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.cfg.head_dim

    @property
    def vocab_size(self) -> int:
        """Width of the logits."""
        return self.cfg.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (and of the caches ``make_cache`` builds)."""
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        """Device holding the weights."""
        return self.embed.device

    def weight_bytes(self) -> int:
        """Bytes of weights one forward reads: every layer, the final norm and the LM head.

        The embedding table is not counted (a step gathers only a few rows of it) unless it is
        tied to the LM head, where it is read whole once as the head.
        """
        total = sum(p.numel() * p.element_size() for p in self.layers.parameters())
        total += sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name.endswith("_scale"))
        total += self.norm.numel() * self.norm.element_size()
        return total + self.lm_head.numel() * self.lm_head.element_size()

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes in the cache (all layers), in the model's dtype."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.embed.element_size()

    def make_cache(self, n_pages: int, n_rows: int, max_pages: int, page_size: int = 16) -> PagedKVCache:
        """An empty ``PagedKVCache`` shaped for this model, in its dtype and on its device.

        Every paged pool is made here, so this is where an engine's kept run (held for the next run
        of its shape) gives its memory back first: a new pool must not sit beside an idle one."""
        release_held()
        return PagedKVCache(
            self.n_layers,
            self.n_kv_heads,
            self.head_dim,
            page_size,
            n_pages,
            n_rows,
            max_pages,
            self.dtype,
            self.device,
        )

    def cascade_pays(self, n_groups: int, min_prefix: int, n_queries: int = 1) -> bool:
        """The automatic choice (``cascade`` None) on CUDA: ``n_groups`` requests share prefixes of
        at least ``min_prefix`` tokens, each row brings ``n_queries`` queries, and that shape was
        measured to run faster with cascade."""
        if n_queries > 1:  # a verify: its plain kernel already reads each key for 9 queries at once
            return min_prefix >= self.cascade_long_prefix
        wide = n_groups >= self.cascade_min_groups and min_prefix >= self.cascade_min_prefix
        return wide or min_prefix >= self.cascade_decode_prefix

    def cascade_prefix(self, cache: PagedKVCache, n_queries: int = 1) -> SharedPrefix | None:
        """The shared prefix a forward of ``n_queries`` tokens per row over ``cache`` attends to with
        cascade attention, or None for plain paged attention (see ``cascade``; a group of one row has
        nothing to share)."""
        prefix = cache.shared_prefix
        if prefix is None or prefix.group < 2 or self.cascade is False:
            return None
        if self.cascade is None and (
            self.device.type != "cuda"
            or not self.cascade_pays(cache.n_rows // prefix.group, prefix.min_length, n_queries)
        ):
            return None
        return prefix

    def fused_layers_on(self) -> bool:
        """Whether decode-sized forwards may run one launch per layer (``fused_layers``, else ``FUSED_LAYERS``)."""
        return FUSED_LAYERS if self.fused_layers is None else bool(self.fused_layers)

    def _fuses_layers(self, h: Tensor, prefix: SharedPrefix | None) -> bool:
        """Whether this forward runs its layers through ``kernels.decode_layer``: asked for, on CUDA,
        at most ``FUSED_LAYER_MAX_ROWS`` token rows, tensor-core dtypes (fp32 dots would be IEEE FMA
        loops), no cascade prefix, and not a tensor-parallel shard (it sums its ranks' projections)."""
        rows = h.shape[0] * h.shape[1]
        return (
            self.fused_layers_on()
            and use_triton(h)
            and 0 < rows <= FUSED_LAYER_MAX_ROWS
            and h.dtype in self.FUSED_LAYER_DTYPES
            and prefix is None
            and self.cfg.head_dim in TRITON_HEAD_DIMS
            and type(self)._add_projection is NativeCausalLM._add_projection
        )

    def layer_weights(self, i: int) -> DecodeLayerWeights:
        """Layer ``i``'s weights as ``kernels.decode_layer`` takes them (quantized ones with their scales)."""
        layer = self.layers[i]
        return DecodeLayerWeights(
            qkv=layer.qkv,
            o=layer.o,
            gate_up=layer.gate_up,
            down=layer.down,
            post_norm=layer.post_norm,
            input_norm=None if self.input_norm_folded else layer.input_norm,
            qkv_bias=layer.qkv_bias,
            o_bias=layer.o_bias,
            gate_up_bias=layer.gate_up_bias,
            down_bias=layer.down_bias,
            q_norm=layer.q_norm,
            k_norm=layer.k_norm,
            qkv_scale=getattr(layer, "qkv_scale", None),
            o_scale=getattr(layer, "o_scale", None),
            gate_up_scale=getattr(layer, "gate_up_scale", None),
            down_scale=getattr(layer, "down_scale", None),
        )

    # ------------------------------------------------------- hooks of the tensor-parallel model

    def _add_projection(
        self,
        linear: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        residual: Tensor,
        accumulate: bool,
        weight_scale: Tensor | None,
    ) -> Tensor:
        """``residual + x @ weight.T + bias`` (the o and down projections); the tensor-parallel
        model (``runners.native.parallel``) sums its ranks' partial products here."""
        return linear(x, weight, bias, residual=residual, accumulate=accumulate, weight_scale=weight_scale)

    def sample(
        self, logits: Tensor, scale: float, alpha: float, seed: Tensor, offset: Tensor, allowed: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``kernels.sampling.fused_sample`` over this model's logits (a tensor-parallel model's
        logits are its vocabulary shard: it reduces the statistics across ranks)."""
        return fused_sample(logits, scale, alpha, seed, offset, allowed)

    def token_logprobs(self, logits: Tensor, tokens: Tensor, scale: float, alpha: float) -> Tensor:
        """``kernels.sampling.token_logprobs`` over this model's logits (see :meth:`sample`)."""
        return token_logprobs(logits, tokens, scale, alpha)

    # ---------------------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(
        self,
        tokens: Tensor,
        start_pos: Tensor,
        cache: PagedKVCache,
        last_only: bool = False,
        max_keys: int | None = None,
    ) -> Tensor:
        """Logits [R, T, V] (or [R, V] with ``last_only``) for ``tokens`` [R, T] at ``start_pos`` [R] + t.

        Writes the tokens' K/V into ``cache`` (pages for positions < start_pos + T must be
        reserved) and attends causally to everything the rows hold up to each query's position.
        ``max_keys``: a bound on start_pos + T that the caller knows without a sync (a prefill from
        position 0 passes T); it sizes the attention's KV splits.
        """
        with pdl_scope(self.pdl):
            return self._forward(tokens, start_pos, cache, last_only, max_keys)

    def _forward(
        self, tokens: Tensor, start_pos: Tensor, cache: PagedKVCache, last_only: bool, max_keys: int | None = None
    ) -> Tensor:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        n_rows, n_new = tokens.shape
        # the kernels index start_pos per row: a stride-0 (expanded) view would be read out of bounds
        start_pos = start_pos.to(torch.int32).contiguous()
        # kernels.linear.fused_linear folds the norms, SiLU gating and residual adds into the linear
        # layers. Decode-sized batches (rows <= skinny_max_rows) run o, gate_up and down in the
        # skinny Triton kernel, the LM head and QKV there too when skinny_head / skinny_qkv say so;
        # otherwise cuBLAS with the fused elementwise kernels (QKV as a bare GEMM when the input
        # norm is folded into its weights). Layers stored in fp8 / int8 (quantize_weights) always
        # stream in the skinny kernel.
        linear = functools.partial(fused_linear, max_rows=self.skinny_max_rows, counters=self.linear_counters)
        h = F.embedding(tokens, self.embed)
        prefix = self.cascade_prefix(cache, n_new)
        fused = self._fuses_layers(h, prefix)
        for i, layer in enumerate(self.layers):
            if fused:  # the layer's five decode kernels as one launch (kernels.decode_layer)
                h = decode_layer_triton(
                    h, self.layer_weights(i), self.rope_cos, self.rope_sin, start_pos, cache.k_pool[i],
                    cache.v_pool[i], cache.block_table, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                    scale=self.scale, eps=eps, counters=self.layer_counters, max_keys=max_keys,
                )  # fmt: skip
                continue
            # a quantized projection's row scales (quantize_weights), None for one in the model's dtype
            qkv_scale, o_scale = getattr(layer, "qkv_scale", None), getattr(layer, "o_scale", None)
            gate_up_scale, down_scale = getattr(layer, "gate_up_scale", None), getattr(layer, "down_scale", None)
            k_pool, v_pool = cache.k_pool[i], cache.v_pool[i]
            # decode batches of 64-wide heads project, rotate and cache q/k/v in one kernel
            # (fused_qkv_rope); the rest project through fused_linear (skinny or cuBLAS by the
            # rows; max_rows 0 when skinny_qkv is off, quantized weights stream in the skinny
            # kernel regardless) and then run the RoPE kernel
            folded = self.input_norm_folded
            q = qkv_rope_write_kv(
                h, layer.qkv, self.rope_cos, self.rope_sin, start_pos, k_pool, v_pool, cache.block_table,
                n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, bias=layer.qkv_bias,
                norm_weight=None if folded else layer.input_norm, row_norm=folded, q_norm=layer.q_norm,
                k_norm=layer.k_norm, eps=eps, weight_scale=qkv_scale,
                max_rows=self.skinny_max_rows if self.skinny_qkv else 0, counters=self.linear_counters,
                fused=self.fused_qkv_rope,
            )  # fmt: skip
            if prefix is not None:
                att = cascade_attention(
                    q, k_pool, v_pool, cache.block_table, start_pos, self.scale,
                    prefix.lengths, prefix.group, prefix.min_length, self.attn_counters,
                )  # fmt: skip
            else:
                att = paged_attention(
                    q, k_pool, v_pool, cache.block_table, start_pos, self.scale, self.attn_counters, max_keys
                )
            inplace = self.residual_in_place  # h is this forward's own buffer (the embedding's output)
            h = self._add_projection(
                linear, att.reshape(n_rows, n_new, self.q_size), layer.o, layer.o_bias, h, inplace, o_scale
            )
            mlp = linear(
                h,
                layer.gate_up,
                layer.gate_up_bias,
                norm_weight=layer.post_norm,
                eps=eps,
                gated=True,
                weight_scale=gate_up_scale,
            )
            h = self._add_projection(linear, mlp, layer.down, layer.down_bias, h, inplace, down_scale)
        if last_only:
            h = h[:, -1]
        return fused_linear(
            h,
            self.lm_head,
            norm_weight=self.norm,
            eps=eps,
            weight_scale=getattr(self, "lm_head_scale", None),
            max_rows=self.skinny_max_rows if self.skinny_head else 0,
            counters=self.linear_counters,
        )
