"""Which slots of a layer's buffer hold which positions: ring buffers for sliding
windows, attention sinks for streaming.

A layer that attends to every position keeps one slot per position (slot = position,
``capacity`` slots). A layer that attends only to the last ``window`` positions (Mistral
with ``sliding_window``, the local layers of Gemma 2 and 3) needs only ``window`` slots:
position ``p`` goes to slot ``p % window``, overwriting the position ``window`` before
it, which no later query can see. Its memory is O(window), not O(capacity).

Streaming (StreamingLLM, Xiao et al. 2023, "Efficient Streaming Language Models with
Attention Sinks") applies the same ring to every layer and keeps the first
``sink_tokens`` positions as well: ``sink_tokens + window`` slots, positions ``0 ..
sink_tokens - 1`` in the first slots for good, every later position in a ring of
``window`` slots after them. Generation then goes on past the cache's slots with bounded
memory. Each query attends to the sinks and to its last ``window`` positions.

Nothing here is stored per slot: which position a slot holds follows from the row's
length (``held_positions``), because rows are written in position order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache.base import write_rows
from kvjax.config import ModelConfig, is_count


@dataclasses.dataclass(frozen=True)
class LayerSlots:
    """How one layer's buffer maps positions to its slots (static).

    Attributes:
      slots: the buffer's slots.
      window: None: slot = position. Else the layer keeps the last ``window`` positions
        in a ring (and attends to no older one but the sinks).
      sinks: positions ``0 .. sinks - 1`` kept in slots ``0 .. sinks - 1`` for good
        (streaming's attention sinks); the ring is the ``window`` slots after them.
    """

    slots: int
    window: int | None = None
    sinks: int = 0

    @property
    def ring(self) -> bool:
        return self.window is not None


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The slots of every layer of a cache (static: part of the cache's pytree structure).

    Attributes:
      capacity: positions a row holds before it is full; with streaming, the global
        layers' slots (``sink_tokens + window``), which a row may run past.
      layers: a ``LayerSlots`` per layer.
      streaming: rows never fill: the oldest positions past the sinks are dropped.
    """

    capacity: int
    layers: tuple[LayerSlots, ...]
    streaming: bool = False

    @property
    def sink_tokens(self) -> int:
        return max(layer.sinks for layer in self.layers)


def cache_layout(config: ModelConfig, capacity: int, *, window: int | None = None,
                 sink_tokens: int | None = None) -> CacheLayout:
    """The slots of each layer of a cache of ``capacity`` positions a row.

    Without ``window`` and ``sink_tokens``: a layer with a sliding window narrower than
    the capacity keeps a ring of its window; every other layer ``capacity`` slots.

    With either (streaming): ``sink_tokens`` (default 0) sinks and a ring of ``window``
    (default ``capacity - sink_tokens``) slots a layer; a sliding-window layer narrower
    than that keeps just its own window. ``sink_tokens + window`` must not exceed
    ``capacity``; the cache then holds ``sink_tokens + window`` slots a row.

    Raises:
      ValueError: sizes that are not integers of the right range, with what fits.
    """
    if not is_count(capacity):
        raise ValueError(f"capacity must be an integer >= 1 (cache slots per row), got {capacity!r}")
    if window is None and sink_tokens is None:
        layers = []
        for i in range(config.num_layers):
            own = config.layer_window(i)
            layers.append(LayerSlots(own, window=own) if own is not None and own < capacity
                          else LayerSlots(capacity))
        return CacheLayout(capacity, tuple(layers))
    sinks = 0 if sink_tokens is None else sink_tokens
    if not is_count(sinks, 0):
        raise ValueError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
    if sinks >= capacity:
        raise ValueError(f"sink_tokens ({sinks}) must be smaller than the capacity ({capacity}): "
                         "the window after the sinks needs at least one slot; pass a capacity "
                         f">= {sinks + 1} or fewer sink tokens")
    if window is None:
        window = capacity - sinks
    if not is_count(window):
        raise ValueError(f"window must be an integer >= 1 (positions each query sees after the "
                         f"sinks), got {window!r}")
    if sinks + window > capacity:
        raise ValueError(f"sink_tokens ({sinks}) + window ({window}) = {sinks + window} is larger "
                         f"than the capacity ({capacity}); pass capacity >= {sinks + window} or "
                         f"window <= {capacity - sinks}")
    if config.position_embedding != "rope":
        raise ValueError(f"streaming (window, sink_tokens) needs rotary position embeddings; "
                         f"{config.model_type} learns one embedding per position, up to "
                         f"{config.max_position_embeddings}: generate without window and "
                         "sink_tokens")
    layers = []
    for i in range(config.num_layers):
        own = config.layer_window(i)
        layers.append(LayerSlots(own, window=own) if own is not None and own <= window
                      else LayerSlots(sinks + window, window=window, sinks=sinks))
    return CacheLayout(sinks + window, tuple(layers), streaming=True)


def held_positions(lengths: jax.Array, slots: LayerSlots) -> jax.Array:
    """``int32[batch, slots]``: the position each slot of a ring layer holds once a
    row's first ``lengths`` positions (``int32[batch]``) were written (a sink slot its
    own position, a ring slot the latest position that maps to it); ``-1`` for a slot
    not yet written."""
    slot = jnp.arange(slots.slots, dtype=jnp.int32)[None, :]  # [1, slots]
    filled = lengths[:, None]  # [batch, 1]
    sinks, window = slots.sinks, slots.window
    offset = slot - sinks  # place in the ring (negative: a sink slot)
    newest = filled - 1 - sinks  # the newest ring position's offset from the sinks
    in_ring = sinks + offset + window * jnp.floor_divide(newest - offset, window)
    position = jnp.where(offset < 0, slot, in_ring)
    return jnp.where(position < filled, jnp.where(offset > newest, -1, position), -1)


def slot_indices(positions: jax.Array, slots: LayerSlots) -> jax.Array:
    """``int32[batch, new]``: the slot of a ring layer each position of a block
    (``int32[batch, new]``, ``-1`` = padding) is written to; ``slots.slots`` (out of
    range: not written) for padding and for positions that a later position of the same
    block overwrites."""
    sinks, window = slots.sinks, slots.window
    newest = positions.max(axis=1, keepdims=True)  # [batch, 1]
    slot = jnp.where(positions < sinks, positions, sinks + (positions - sinks) % window)
    kept = (positions >= 0) & ((positions < sinks) | (positions > newest - window))
    return jnp.where(kept, slot, slots.slots)


def write_slots(buffer: jax.Array, block: jax.Array, positions: jax.Array,
                slots: LayerSlots) -> jax.Array:
    """A ring layer's ``buffer`` (``[batch, kv_heads, slots, ...]``) with a block
    (``[batch, kv_heads, new, ...]``) written to the slots its positions map to
    (``slot_indices``).

    A single token a row (a decode step) is one ``dynamic_update_slice`` a row, done in
    place when the cache is donated; a block scatters its kept tokens.
    """
    index = slot_indices(positions, slots)  # [batch, new]
    if positions.shape[1] == 1:
        return write_rows(buffer, block, jnp.where(index < slots.slots, index, -1), seq_axis=2)
    put = lambda buf, new, at: buf.at[:, at].set(new.astype(buf.dtype), mode="drop")
    return jax.vmap(put)(buffer, block, index)
