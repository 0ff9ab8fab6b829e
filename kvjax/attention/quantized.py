"""Attention over a quantized cache (``kvjax.cache.QuantizedKVCache``), on any backend.

The cache is read block by block (``kvjax.attention.blockwise``): only one block's codes are ever converted, never the whole cache, and
the scales are folded into the scores and weights. Masks follow positions as in
``kvjax.attention.plain`` (slot = position, or the positions a ring buffer's slots
hold). Where slot = position, only the blocks up to the block's last position are read:
the work follows the fill, not the capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import blockwise
from kvjax.attention.plain import Partials, finish

def attend_cache(queries: jax.Array, keys: jax.Array, values: jax.Array,
                 key_scales: jax.Array, value_scales: jax.Array, positions: jax.Array,
                 sliding_window: int | None = None, scale: float | None = None,
                 logit_softcap: float | None = None, key_limit: int | None = None,
                 block_slots: int | None = None) -> jax.Array:
    """A block's attention over a quantized cache that holds it (slot = position).

    Args:
      queries: ``[batch, seq, heads, head_dim]``.
      keys, values: codes ``[batch, kv_heads, capacity, head_dim]`` (int8 or fp8).
      key_scales, value_scales: ``float32[batch, kv_heads, capacity]``.
      positions: ``int32[batch, seq]``, the block's positions (``-1``: padding).
      key_limit: static; no query sees a slot at or past it: only the blocks before it
        are read.
      block_slots: static; cache slots read per iteration (None: ``kvjax.attention.blockwise.block_slots``).
      Others as in ``kvjax.attention.plain.attend``.

    Returns:
      ``[batch, seq, heads, head_dim]`` in the dtype of ``queries``.
    """
    parts = partials(queries, keys, values, key_scales, value_scales, positions, None,
                     sliding_window, scale, logit_softcap, key_limit, block_slots)
    return finish(parts, queries.dtype)


def partials(queries: jax.Array, keys: jax.Array, values: jax.Array, key_scales: jax.Array,
             value_scales: jax.Array, query_positions: jax.Array,
             key_positions: jax.Array | None = None, sliding_window: int | None = None,
             scale: float | None = None, logit_softcap: float | None = None,
             key_limit: int | None = None, block_slots: int | None = None) -> Partials:
    """``kvjax.attention.plain.Partials`` of queries over quantized keys and values, read
    block by block (``kvjax.attention.blockwise``). ``key_positions``:
    ``int32[batch, slots]``, the position each slot holds (a ring buffer's, ``-1``:
    empty); None: slot = position. Other arguments as in ``attend_cache``."""
    batch, kv_heads, capacity = keys.shape[:3]
    limit = capacity if key_limit is None else min(key_limit, capacity)
    block = min(block_slots or blockwise.block_slots(queries, kv_heads, limit), limit)

    def read(i):
        # the last block moves back inside the buffer; slots an earlier block read are
        # masked out, so none counts twice
        start = jnp.minimum(i * block, limit - block)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block, axis=2)
        slots = start + jnp.arange(block, dtype=jnp.int32)  # [block]
        held = (jnp.broadcast_to(slots, (batch, block)) if key_positions is None
                else jax.lax.dynamic_slice_in_dim(key_positions, start, block, axis=1))
        held = jnp.where(slots >= i * block, held, -1)
        return take(keys), take(values), take(key_scales), take(value_scales), held

    blocks = -(-limit // block)
    if key_positions is None:  # slot = position: no query sees past the last one
        blocks = jnp.clip(-(-(jnp.max(query_positions) + 1) // block), 0, blocks)
    return blockwise.partials(queries, read, blocks, query_positions, sliding_window, scale,
                              logit_softcap)
