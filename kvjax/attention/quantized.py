"""Attention over a quantized cache (``kvjax.cache.QuantizedKVCache``), on any backend.

The cache is read block by block (``BLOCK_SLOTS`` slots at a time, a ``fori_loop`` with
an online softmax, as flash attention does): only one block's codes are ever converted
to float, never the whole cache. A token's scale factors out of its dot products:
``q . (codes * s) = (q . codes) * s`` for a key, and a value weighted by ``p``
contributes ``(p * s) . codes``, so the codes enter the products as they are stored.
Masks follow positions as in ``kvjax.attention.plain`` (slot = position, or the
positions a ring buffer's slots hold).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention.plain import (MASKED, Partials, attention_mask, default_scale, finish,
                                   soft_cap)

BLOCK_SLOTS = 256  # cache slots read per iteration


def attend_cache(queries: jax.Array, keys: jax.Array, values: jax.Array,
                 key_scales: jax.Array, value_scales: jax.Array, positions: jax.Array,
                 sliding_window: int | None = None, scale: float | None = None,
                 logit_softcap: float | None = None, key_limit: int | None = None,
                 block_slots: int = BLOCK_SLOTS) -> jax.Array:
    """A block's attention over a quantized cache that holds it (slot = position).

    Args:
      queries: ``[batch, seq, heads, head_dim]``.
      keys, values: codes ``[batch, kv_heads, capacity, head_dim]`` (int8 or fp8).
      key_scales, value_scales: ``float32[batch, kv_heads, capacity]``.
      positions: ``int32[batch, seq]``, the block's positions (``-1``: padding).
      key_limit: static; no query sees a slot at or past it: only the blocks before it
        are read.
      block_slots: static; cache slots read per iteration.
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
             key_limit: int | None = None, block_slots: int = BLOCK_SLOTS) -> Partials:
    """``kvjax.attention.plain.Partials`` of queries over quantized keys and values, read
    block by block. ``key_positions``: ``int32[batch, slots]``, the position each slot
    holds (a ring buffer's, ``-1``: empty); None: slot = position. Other arguments as in
    ``attend_cache``."""
    batch, seq, heads, head_dim = queries.shape
    _, kv_heads, capacity, _ = keys.shape
    group = heads // kv_heads
    limit = capacity if key_limit is None else min(key_limit, capacity)
    block = min(block_slots, limit)
    blocks = -(-limit // block)
    scale = default_scale(head_dim) if scale is None else scale
    grouped = queries.reshape(batch, seq, kv_heads, group, head_dim).astype(jnp.float32)

    def step(i, carry):
        top, total, out = carry  # [batch, kv_heads, group, seq](, head_dim)
        # the last block moves back inside the buffer; slots an earlier block read are
        # masked out below, so none counts twice
        start = jnp.minimum(i * block, limit - block)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block, axis=2)
        slots = start + jnp.arange(block, dtype=jnp.int32)  # [block]
        held = (jnp.broadcast_to(slots, (batch, block)) if key_positions is None
                else jax.lax.dynamic_slice_in_dim(key_positions, start, block, axis=1))
        key_codes = take(keys).astype(jnp.float32)  # [batch, kv_heads, block, head_dim]
        scores = jnp.einsum("bqkgd,bksd->bkgqs", grouped, key_codes)
        scores = scores * (take(key_scales)[:, :, None, None, :] * scale)
        if logit_softcap is not None:
            scores = soft_cap(scores, logit_softcap)
        seen = attention_mask(query_positions, held, sliding_window) & (slots >= i * block)[None, None, :]
        scores = jnp.where(seen[:, None, None], scores, MASKED)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(scores - new_top[..., None])  # [batch, kv_heads, group, seq, block]
        value_codes = take(values).astype(jnp.float32)
        weighted = weights * take(value_scales)[:, :, None, None, :]
        out = out * rescale[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", weighted, value_codes)
        return new_top, total * rescale + weights.sum(axis=-1), out

    shape = (batch, kv_heads, group, seq)
    init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    return jax.lax.fori_loop(0, blocks, step, init)
