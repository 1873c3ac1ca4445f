"""A transformers KV cache for particle rows: buffers that grow in place and reorder by changed rows.

transformers' ``DynamicCache`` appends each forward's keys and values with ``torch.cat``, which
copies every layer's whole cache at every forward, and it follows resampling ancestors with an
``index_select`` that copies every row even when most rows keep their own history. On a CPU these
copies cost as much as a sizable part of the forward itself (the cache of 8 particles x 150
positions of SmolLM2 is ~55 MB). :class:`RowCache` keeps each layer's keys and values in a buffer with
spare positions (doubling when full), writes new positions in place and hands attention a view of
the filled part; :meth:`RowCache.reorder_cache` copies only the rows whose ancestor is another row.
The values attention sees are the same numbers in the same order, so logits do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: positions allocated at least, so short runs do not regrow their buffers at every step
MIN_CAPACITY = 64


class GrowingLayer(DynamicLayer):
    """One layer's keys and values ``[rows, heads, capacity, head_dim]``, filled up to ``length``.

    ``keys`` / ``values`` are views of the filled part (what ``DynamicLayer`` users read).
    """

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.key_buffer: Tensor | None = None
        self.value_buffer: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _views(self) -> None:
        assert self.key_buffer is not None and self.value_buffer is not None
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def _allocate(self, like_k: Tensor, like_v: Tensor, rows: int, capacity: int) -> None:
        """New buffers of ``capacity`` positions holding the filled part of the old ones (if any)."""
        k_shape = (rows, like_k.shape[1], capacity, like_k.shape[3])
        v_shape = (rows, like_v.shape[1], capacity, like_v.shape[3])
        new_k = like_k.new_empty(k_shape)
        new_v = like_v.new_empty(v_shape)
        if self.length:
            assert self.key_buffer is not None and self.value_buffer is not None
            new_k[:, :, : self.length] = self.key_buffer[:, :, : self.length]
            new_v[:, :, : self.length] = self.value_buffer[:, :, : self.length]
        self.key_buffer, self.value_buffer = new_k, new_v

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write the new positions after the filled part; return views of everything filled."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        kb = self.key_buffer
        if kb is None or kb.shape[2] < end or kb.shape[0] != key_states.shape[0] or kb.dtype != key_states.dtype:
            if kb is not None and self.length and kb.shape[0] != key_states.shape[0]:
                raise ValueError(f"cache holds {kb.shape[0]} rows, the forward feeds {key_states.shape[0]}")
            capacity = max(MIN_CAPACITY, end, 2 * (kb.shape[2] if kb is not None else 0))
            self._allocate(key_states, value_states, key_states.shape[0], capacity)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.key_buffer = self.value_buffer = None
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' negative-count convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.length:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (the prompt's cache over the particles)."""
        if not self.length:
            return
        assert self.key_buffer is not None and self.value_buffer is not None
        k = self.key_buffer[:, :, : self.length]
        v = self.value_buffer[:, :, : self.length]
        rows = k.shape[0] * repeats
        capacity = max(MIN_CAPACITY, 2 * self.length)
        self.key_buffer = k.new_empty((rows, k.shape[1], capacity, k.shape[3]))
        self.value_buffer = v.new_empty((rows, v.shape[1], capacity, v.shape[3]))
        self.key_buffer[:, :, : self.length] = k.repeat_interleave(repeats, dim=0)
        self.value_buffer[:, :, : self.length] = v.repeat_interleave(repeats, dim=0)
        self._views()

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the rows ``indices`` (a new, smaller buffer)."""
        if not self.length:
            return
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer = self.key_buffer[indices].contiguous()
        self.value_buffer = self.value_buffer[indices].contiguous()
        self._views()

    def copy_rows(self, dst: Tensor, src: Tensor) -> None:
        """Row ``dst[i]`` becomes a copy of row ``src[i]`` (all sources are read before any write)."""
        if not self.length or not dst.numel():
            return
        assert self.key_buffer is not None and self.value_buffer is not None
        n = self.length
        self.key_buffer[dst, :, :n] = self.key_buffer[src, :, :n]
        self.value_buffer[dst, :, :n] = self.value_buffer[src, :, :n]

    def reorder_cache(self, beam_idx: Tensor) -> None:
        rows = beam_idx.to(self.device)
        changed = changed_rows(rows)
        self.copy_rows(changed, rows[changed])


def changed_rows(rows: Tensor) -> Tensor:
    """The indices i with ``rows[i] != i``: the rows a reorder to ``rows`` must overwrite."""
    return (rows != torch.arange(rows.shape[0], device=rows.device)).nonzero().squeeze(-1)


class RowCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers are :class:`GrowingLayer` s.

    Build it with :func:`row_cache`, which falls back to a plain ``DynamicCache`` for models with
    other layer kinds (sliding windows, linear attention).
    """

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Row i becomes a copy of row ``beam_idx[i]``: only the rows that change are copied."""
        if not self.layers:
            return
        rows = beam_idx.to(self.layers[0].device if self.layers[0].is_initialized else beam_idx.device)
        changed = changed_rows(rows)
        if not changed.numel():
            return
        src = rows[changed]
        for layer in self.layers:
            layer.copy_rows(changed, src)


def row_cache(config) -> DynamicCache:
    """A :class:`RowCache` for ``config`` when every layer is a plain full-attention layer, else the
    ``DynamicCache`` transformers would build."""
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        grown = RowCache(config=config)
        grown.layers = [GrowingLayer() for _ in cache.layers]
        return grown
    return cache


__all__ = ["GrowingLayer", "RowCache", "changed_rows", "row_cache"]
