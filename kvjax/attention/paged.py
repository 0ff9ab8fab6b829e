"""Attention over a paged cache (``kvjax.cache.PagedKVCache``), on any backend.

A block of tokens is written first (each token scattered to its block and slot through
its row's table), then the queries attend over the row's blocks, read a few at a time
through the table (``CHUNK_SLOTS`` slots an iteration, ``kvjax.attention.blockwise``):
only those blocks are ever gathered, never the row's whole history at once. Float and
int8/fp8 pools alike. The loop runs as many iterations as the longest row needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import blockwise
from kvjax.attention.plain import finish
from kvjax.cache.paged import slot_addresses, write_pool
from kvjax.cache.quantized import layer_kv_dtype, quantize_block

CHUNK_SLOTS = 256  # slots gathered per iteration (whole blocks)


def write(layer_cache: tuple, k: jax.Array, v: jax.Array, positions: jax.Array,
          is_quantized: bool) -> tuple:
    """A paged layer's ``(pools..., block_tables)`` (``PagedKVCache.layer``) with the
    block's keys and values (``[batch, seq, kv_heads, head_dim]``, quantized first for
    a code pool) written at each row's positions."""
    *pools, tables = layer_cache
    block = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # [batch, kv_heads, seq, head_dim]
    if is_quantized:
        block = quantize_block(*block, layer_kv_dtype(pools))
    blocks, slots = slot_addresses(tables, positions, pools[0].shape[2], pools[0].shape[0])
    return (*(write_pool(pool, new, blocks, slots) for pool, new in zip(pools, block)), tables)


def attend_cache(queries: jax.Array, layer_cache: tuple, positions: jax.Array,
                 sliding_window: int | None = None, scale: float | None = None,
                 logit_softcap: float | None = None, key_limit: int | None = None
                 ) -> jax.Array:
    """A block's attention (``queries`` ``[batch, seq, heads, head_dim]`` at
    ``positions``) over a paged layer that holds it (``write`` first); masks by
    positions as ``kvjax.attention.plain.attend``. ``key_limit``: static; no query
    sees a position at or past it."""
    *pools, tables = layer_cache
    block_size = pools[0].shape[2]
    width = tables.shape[1]  # table entries a row has
    if key_limit is not None:
        width = min(width, -(-key_limit // block_size))
    per_chunk = min(max(CHUNK_SLOTS // block_size, 1), width)  # table entries an iteration
    batch = tables.shape[0]
    slots = jnp.arange(per_chunk * block_size, dtype=jnp.int32)  # [chunk]

    def read(i):
        # the last chunk moves back inside the table; entries an earlier chunk read are
        # masked out, so none counts twice
        start = jnp.minimum(i * per_chunk, width - per_chunk)
        ids = jax.lax.dynamic_slice_in_dim(tables, start, per_chunk, axis=1)  # [batch, n]

        def gather(pool):  # [batch, kv_heads, n * block_size(, head_dim)]
            taken = jnp.moveaxis(pool[ids], 2, 1)  # [batch, kv_heads, n, block_size, ...]
            return taken.reshape(batch, taken.shape[1], -1, *taken.shape[4:])

        held = start * block_size + slots
        held = jnp.broadcast_to(jnp.where(held >= i * per_chunk * block_size, held, -1),
                                (batch, slots.shape[0]))
        keys, values, *scales = map(gather, pools)
        return keys, values, *(scales or (None, None)), held

    needed = jnp.max(positions) + 1  # positions the longest row has after this block
    chunks = jnp.clip(-(-needed // (per_chunk * block_size)), 0, -(-width // per_chunk))
    parts = blockwise.partials(queries, read, chunks, positions, sliding_window, scale,
                               logit_softcap)
    return finish(parts, queries.dtype)
