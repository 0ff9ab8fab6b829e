"""KV caches: immutable pytrees of fixed-capacity buffers, one module per kind.

* ``base``: the ``Cache`` interface every kind implements, and shared writes.
* ``contiguous``: ``KVCache``, per-layer ``[batch, kv_heads, capacity, head_dim]`` K/V
  buffers in a float dtype (the default).
* ``quantized``: ``QuantizedKVCache``, int8 or fp8 codes with a float32 scale per token
  and KV head.
* ``paged``: ``PagedKVCache``, a pool of fixed-size blocks per layer and a block table
  per row (``kvjax.paged`` hands the blocks out and shares cached prefixes).
* ``history``: ``TokenHistory``, the token ids of the recompute baseline.
* ``layout``: which slots hold which positions: ring buffers of sliding-window layers,
  streaming with attention sinks (``CacheLayout``, ``LayerSlots``).

``create`` makes the kind a ``kv_dtype`` names; ``planning`` (``estimate_bytes``,
``max_batch``, ``max_capacity``) says how many bytes it will hold, without creating it.
"""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.cache.base import (Cache, LogicalAxes, advanced_lengths, is_axes, replace_at,
                              tree_nbytes, write_rows)
from kvjax.cache.contiguous import BUFFER_AXES, CACHE_DTYPES, KVCache, write_block
from kvjax.cache.history import TokenHistory
from kvjax.cache.paged import PagedKVCache, PagedSlots
from kvjax.cache.layout import CacheLayout, LayerSlots, cache_layout, held_positions
from kvjax.cache.planning import estimate_bytes, max_batch, max_capacity
from kvjax.cache.quantized import QUANTIZED, QuantizedKVCache, dequantize, quantize

# What ``kv_dtype`` may be (None: the model's dtype).
KV_DTYPES = ("bfloat16", "float16", "float32", *QUANTIZED)


def check_kv_dtype(kv_dtype: str | None) -> None:
    """Raises ``ValueError`` naming the choices unless ``kv_dtype`` is one of
    ``KV_DTYPES`` or None."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; supported: {', '.join(KV_DTYPES)} "
                         "(or None: the model's dtype)")


def create(config, batch: int, capacity: int, kv_dtype: str | None, dtype,
           window: int | None = None, sink_tokens: int | None = None) -> Cache:
    """An empty cache of the kind ``kv_dtype`` names: a ``QuantizedKVCache`` for int8 and
    fp8, else a ``KVCache`` in that float dtype (None: ``dtype``, the model's).
    ``window``, ``sink_tokens``: streaming (``KVCache.create``)."""
    check_kv_dtype(kv_dtype)
    if kv_dtype in QUANTIZED:
        return QuantizedKVCache.create(config, batch, capacity, kv_dtype, window=window,
                                       sink_tokens=sink_tokens)
    return KVCache.create(config, batch, capacity, jnp.dtype(kv_dtype or dtype), window=window,
                          sink_tokens=sink_tokens)


__all__ = ["BUFFER_AXES", "CACHE_DTYPES", "Cache", "CacheLayout", "KVCache", "KV_DTYPES",
           "LayerSlots", "LogicalAxes", "PagedKVCache", "PagedSlots", "QUANTIZED", "QuantizedKVCache", "TokenHistory",
           "advanced_lengths", "cache_layout", "check_kv_dtype", "create", "dequantize",
           "estimate_bytes", "held_positions", "is_axes", "max_batch", "max_capacity", "quantize",
           "replace_at", "tree_nbytes", "write_block", "write_rows"]
