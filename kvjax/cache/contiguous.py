"""The contiguous KV cache: an immutable pytree of fixed-capacity key/value buffers.

Slot ``j`` of a row holds the key/value of the token at position ``j`` of that row, so
attention masks follow from positions alone. Buffers are per layer (a tuple), which
measured faster than one stacked ``[layers, ...]`` array, and heads-major
(``[batch, kv_heads, capacity, head_dim]``), so that attention contracts over them
without first transposing the whole buffer (docs/architecture.md). Writes use
``jax.lax.dynamic_update_slice``; when the cache is donated to a jitted function XLA
performs them in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.base import PerLayerBuffers, check_cache_sizes, replace_at, write_rows
from kvjax.cache.layout import CacheLayout, cache_layout, write_slots
from kvjax.config import ModelConfig

# What the K/V buffers may hold (KVCache.create).
CACHE_DTYPES = ("float32", "bfloat16", "float16", "float64")
# The logical axes of a K/V buffer [batch, kv_heads, capacity, head_dim] (kvjax.sharding).
BUFFER_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


@struct.dataclass
class KVCache(PerLayerBuffers):
    """Keys and values of every layer for a batch of sequences.

    Attributes:
      keys: one buffer per layer, each ``[batch, kv_heads, slots, head_dim]``: ``capacity``
        slots (slot = position), or a ring of a sliding window (``layout``).
      values: same shapes as ``keys``.
      lengths: ``int32[batch]``, how many positions of each row were written.
      layout: static; each layer's slots (``kvjax.cache.layout``); None: every layer
        has ``capacity`` slots, slot = position.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    lengths: jax.Array
    layout: CacheLayout | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int,
               dtype: jnp.dtype = jnp.bfloat16, *, window: int | None = None,
               sink_tokens: int | None = None) -> "KVCache":
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens each.

        Sliding-window layers narrower than ``capacity`` keep a ring of their window
        only. ``window`` / ``sink_tokens``: streaming (``kvjax.cache.layout``): every
        layer keeps ``sink_tokens`` sinks and a ring of ``window`` positions, and rows
        never fill."""
        check_cache_sizes(batch, capacity)
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = repr(dtype)  # not a dtype at all
        if name not in CACHE_DTYPES:
            raise ValueError("the cache dtype must be a floating type "
                             f"({', '.join(CACHE_DTYPES)}), got {name}")
        layout = cache_layout(config, capacity, window=window, sink_tokens=sink_tokens)
        zeros = lambda: tuple(
            jnp.zeros((batch, config.num_kv_heads, layer.slots, config.head_dim), dtype)
            for layer in layout.layers)
        return cls(keys=zeros(), values=zeros(), lengths=jnp.zeros((batch,), jnp.int32),
                   layout=layout)

    def logical_axes(self) -> "KVCache":
        """Every K/V buffer ``(batch, kv_heads, cache_seq, head_dim)``, lengths ``(batch,)``."""
        layers = (BUFFER_AXES,) * len(self.keys)
        return KVCache(keys=layers, values=layers, lengths=("batch",), layout=self.layout)

    def layer(self, index: int) -> tuple[jax.Array, jax.Array]:
        """One layer's ``(keys, values)`` buffers."""
        return self.keys[index], self.values[index]

    @property
    def slot_positions(self) -> jax.Array:
        """``int32[batch, capacity]``: the position held by each slot of a cache whose
        layers keep slot = position (no ring)."""
        return jnp.broadcast_to(jnp.arange(self.capacity, dtype=jnp.int32),
                                (self.batch, self.capacity))

    def update(self, layer: int, keys: jax.Array, values: jax.Array,
               positions: jax.Array) -> "KVCache":
        """Writes a block of new keys/values of one layer at each row's positions.

        Args:
          layer: layer index (a Python int).
          keys, values: ``[batch, kv_heads, new, head_dim]``.
          positions: ``int32[batch, new]``; row ``b`` is written at slots
            ``positions[b, 0] ... positions[b, 0] + new - 1``. Padding tokens carry
            position ``-1``; they must come after the row's real tokens.

        The caller guarantees ``positions[b, 0] + new <= capacity`` (``kvjax.generate``
        checks it before compiling); ``dynamic_update_slice`` would otherwise clamp the
        start and overwrite earlier slots. A ring layer (``layer_slots``) keeps the
        block's last positions of its window instead.
        """
        slots = self.layer_slots(layer)
        if slots is None:
            return self.with_layer(layer, write_block(*self.layer(layer), keys, values, positions))
        return self.with_layer(layer, tuple(write_slots(buffer, block, positions, slots)
                                            for buffer, block in zip(self.layer(layer), (keys, values))))

    def with_layer(self, index: int, layer: tuple[jax.Array, jax.Array]) -> "KVCache":
        """The cache with one layer's whole ``(keys, values)`` buffers replaced
        (``[batch, kv_heads, capacity, head_dim]``, e.g. as the decode kernel wrote them)."""
        keys, values = layer
        return self.replace(keys=replace_at(self.keys, index, keys),
                            values=replace_at(self.values, index, values))


def write_block(keys: jax.Array, values: jax.Array, new_keys: jax.Array,
                new_values: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's buffers (``[batch, kv_heads, capacity, head_dim]``) with a block
    (``[batch, kv_heads, new, head_dim]``) written at each row's positions
    (``KVCache.update``, which says what the caller guarantees)."""
    return (write_rows(keys, new_keys, positions, seq_axis=2),
            write_rows(values, new_values, positions, seq_axis=2))

