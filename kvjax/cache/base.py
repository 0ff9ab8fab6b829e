"""What a decode step needs from a cache, and the pieces every cache kind shares.

A cache is an immutable pytree (a ``flax.struct.dataclass``) carried through the
compiled loop with static shapes. ``Cache`` is the interface the model, the sharding
and the generation code use; ``KVCache`` (contiguous buffers) implements it, and a
quantized cache (K/V + scales) or a paged pool (blocks + tables) is a new class beside
it: it declares its leaves' logical axes itself (``logical_axes``), so placing it on a
mesh needs no edit of ``kvjax.sharding``, and ``kvjax.attention.choose`` gains the
value that attends over it.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import is_count

# A leaf of ``logical_axes()``: one logical axis name per dimension of the array
# (``kvjax.sharding.ShardingRules`` maps them to mesh axes).
LogicalAxes = tuple[str, ...]


def is_axes(x: Any) -> bool:
    """Whether ``x`` is a ``LogicalAxes`` leaf (a tuple of names), not a tuple of leaves."""
    return isinstance(x, tuple) and all(isinstance(name, str) for name in x)


class Cache(Protocol):
    """The interface of a cache kind (``KVCache``, ``TokenHistory``)."""

    lengths: jax.Array  # int32[batch]: filled slots per row

    @property
    def batch(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    def layer_slots(self, index: int) -> Any:
        """Layer ``index``'s ring buffer (``kvjax.cache.layout.LayerSlots``), or None
        where slot = position."""

    @property
    def nbytes(self) -> int: ...

    def layer(self, index: int) -> Any:
        """What one layer's attention reads and writes (``KVCache``: ``(keys, values)``)."""

    def with_layer(self, index: int, layer: Any) -> "Cache":
        """The cache with one layer's part replaced."""

    def advance(self, positions: jax.Array) -> "Cache":
        """Each row's length set past the largest position just written."""

    def logical_axes(self) -> Any:
        """A pytree of this cache's structure with a ``LogicalAxes`` per array leaf."""


class PerLayerBuffers:
    """What caches with per-layer ``keys`` buffers ``[batch, kv_heads, slots, ...]``,
    ``lengths`` and a static ``layout`` (``kvjax.cache.layout.CacheLayout``, or None:
    every layer slot = position) share (``KVCache``, ``QuantizedKVCache``): a mixin of
    their ``flax.struct`` dataclasses, holding no fields of its own."""

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        """Positions a row holds before it is full (with streaming: the slots it keeps)."""
        return self.keys[0].shape[2] if self.layout is None else self.layout.capacity

    @property
    def streaming(self) -> bool:
        """Rows never fill: past the sinks, the oldest positions are dropped."""
        return self.layout is not None and self.layout.streaming

    def layer_slots(self, index: int):
        """Layer ``index``'s ``LayerSlots`` where it keeps a ring buffer (a sliding
        window, streaming), else None (slot = position)."""
        if self.layout is None or not self.layout.layers[index].ring:
            return None
        return self.layout.layers[index]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's arrays (buffers, scales, lengths)."""
        return tree_nbytes(self)

    @property
    def is_full(self) -> jax.Array:
        """``bool[batch]``: rows with no free slot left (never, with streaming)."""
        return (self.lengths >= self.capacity) & (not self.streaming)

    def advance(self, positions: jax.Array):
        """Sets each row's length past the largest position just written (``-1`` = padding)."""
        return self.replace(lengths=advanced_lengths(self.lengths, positions))


def check_cache_sizes(batch, capacity) -> None:
    """Raises ``ValueError`` unless a cache's ``batch`` and ``capacity`` are integers >= 1."""
    if not (is_count(batch) and is_count(capacity)):
        raise ValueError(f"batch and capacity must be >= 1, got batch={batch}, capacity={capacity}")


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (works on abstract arrays too)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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


def replace_at(items: tuple, index: int, value) -> tuple:
    """``items`` with the entry at ``index`` replaced by ``value`` (per-layer buffers)."""
    return items[:index] + (value,) + items[index + 1:]
