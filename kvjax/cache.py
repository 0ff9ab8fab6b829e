"""The KV cache: an immutable pytree of fixed-capacity key/value buffers.

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
import numpy as np
from flax import struct

from kvjax.config import ModelConfig, is_count

# What the K/V buffers may hold (KVCache.create).
CACHE_DTYPES = ("float32", "bfloat16", "float16", "float64")


@struct.dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences.

    Attributes:
      keys: one buffer per layer, each ``[batch, kv_heads, capacity, head_dim]``.
      values: same shapes as ``keys``.
      lengths: ``int32[batch]``, how many leading slots of each row hold real tokens.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    lengths: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int,
               dtype: jnp.dtype = jnp.bfloat16) -> "KVCache":
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens each."""
        if not (is_count(batch) and is_count(capacity)):
            raise ValueError(f"batch and capacity must be >= 1, got batch={batch}, capacity={capacity}")
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = repr(dtype)  # not a dtype at all
        if name not in CACHE_DTYPES:
            raise ValueError("the cache dtype must be a floating type "
                             f"({', '.join(CACHE_DTYPES)}), got {name}")
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(keys=zeros(), values=zeros(), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache buffers (keys, values and lengths)."""
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self))

    @property
    def slot_positions(self) -> jax.Array:
        """``int32[batch, capacity]``: the position held by each slot (slot = position)."""
        return jnp.broadcast_to(jnp.arange(self.capacity, dtype=jnp.int32),
                                (self.batch, self.capacity))

    @property
    def is_full(self) -> jax.Array:
        """``bool[batch]``: rows with no free slot left."""
        return self.lengths >= self.capacity

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
        start and overwrite earlier slots.
        """
        return self.with_layer(layer, *write_block(self.keys[layer], self.values[layer], keys,
                                                   values, positions))

    def with_layer(self, layer: int, keys: jax.Array, values: jax.Array) -> "KVCache":
        """The cache with one layer's whole buffers replaced (``[batch, kv_heads,
        capacity, head_dim]``, e.g. as ``kvjax.decode_kernel`` wrote them)."""
        return self.replace(keys=_replace_at(self.keys, layer, keys),
                            values=_replace_at(self.values, layer, values))

    def advance(self, positions: jax.Array) -> "KVCache":
        """Sets each row's length past the largest position just written (``-1`` = padding)."""
        return self.replace(lengths=advanced_lengths(self.lengths, positions))


@struct.dataclass
class TokenHistory:
    """The "cache" of the recompute baseline (``use_cache=False``): token ids only.

    Attributes:
      tokens: ``int32[batch, capacity]``, slot ``j`` holds the token at position ``j``.
      lengths: ``int32[batch]``, filled slots per row.
    """

    tokens: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, batch: int, capacity: int) -> "TokenHistory":
        return cls(tokens=jnp.zeros((batch, capacity), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def update(self, tokens: jax.Array, positions: jax.Array) -> "TokenHistory":
        """Writes ``int32[batch, new]`` tokens at their positions (as ``KVCache.update``)."""
        return self.replace(tokens=write_rows(self.tokens, tokens, positions, seq_axis=1),
                            lengths=advanced_lengths(self.lengths, positions))


def write_block(keys: jax.Array, values: jax.Array, new_keys: jax.Array,
                new_values: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's buffers (``[batch, kv_heads, capacity, head_dim]``) with a block
    (``[batch, kv_heads, new, head_dim]``) written at each row's positions
    (``KVCache.update``, which says what the caller guarantees)."""
    return (write_rows(keys, new_keys, positions, seq_axis=2),
            write_rows(values, new_values, positions, seq_axis=2))


def write_rows(buffer: jax.Array, block: jax.Array, positions: jax.Array,
               seq_axis: int) -> jax.Array:
    """Writes ``block[b]`` into ``buffer[b]`` from slot ``positions[b, 0]`` on, per row.

    ``buffer`` and ``block`` have the batch first and agree on every axis but
    ``seq_axis`` (capacity slots in ``buffer``, new tokens in ``block``);
    ``positions``: ``int32[batch, new]``. Entries at position ``-1`` (padding) leave
    their slot as it was, so a row with no real token in the block (a chunk of a long
    prompt past that row's end) writes nothing.
    """
    start = jnp.maximum(positions[:, 0], 0)  # [batch]
    real = positions >= 0  # [batch, new]

    def write_row(buf, new, s, keep_new):
        index = tuple(s if axis == seq_axis - 1 else 0 for axis in range(buf.ndim))
        old = jax.lax.dynamic_slice(buf, index, new.shape)
        mask_shape = [1] * new.ndim
        mask_shape[seq_axis - 1] = new.shape[seq_axis - 1]
        new = jnp.where(keep_new.reshape(mask_shape), new, old)
        return jax.lax.dynamic_update_slice(buf, new, index)

    return jax.vmap(write_row)(buffer, block.astype(buffer.dtype), start, real)


def advanced_lengths(lengths: jax.Array, positions: jax.Array) -> jax.Array:
    """Row lengths after writing ``positions`` (``int32[batch, new]``, ``-1`` = padding)."""
    return jnp.maximum(lengths, positions.max(axis=1) + 1)


def _replace_at(items: tuple, index: int, value) -> tuple:
    return items[:index] + (value,) + items[index + 1:]
