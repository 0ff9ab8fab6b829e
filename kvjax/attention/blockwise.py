"""Attention over a cache read a block of slots at a time, on any backend.

A ``fori_loop`` reads one block of keys and values per iteration (``read``) and keeps
an online softmax (flash attention's running maximum, sum and weighted values), so only
one block is ever converted or gathered, never the whole cache. Quantized caches
(``kvjax.attention.quantized``) and paged ones (``kvjax.attention.paged``) differ only
in how a block is read. Codes enter the products as stored: a token's scale factors out
of its dot products (``q . (codes * s) = (q . codes) * s``; a value weighted by ``p``
contributes ``(p * s) . codes``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kvjax.attention.plain import MASKED, Partials, attention_mask, default_scale, soft_cap

# read(i) -> (keys, values, key_scales, value_scales, key_positions) of block i:
# keys, values [batch, kv_heads, block, head_dim] (float or codes); scales
# float32[batch, kv_heads, block] or None (a float cache); the position each slot holds
# int32[batch, block] (-1: none, or a slot another block already read).
BlockReader = Callable[[jax.Array], tuple]


def partials(queries: jax.Array, read: BlockReader, blocks: jax.Array | int,
             query_positions: jax.Array, sliding_window: int | None = None,
             scale: float | None = None, logit_softcap: float | None = None) -> Partials:
    """``kvjax.attention.plain.Partials`` of ``queries`` (``[batch, seq, heads,
    head_dim]``) over ``blocks`` blocks that ``read`` gives (a count, static or traced).
    Masks by positions as ``kvjax.attention.plain.attend`` does."""
    batch, seq, heads, head_dim = queries.shape
    scale = default_scale(head_dim) if scale is None else scale

    def step(i, carry):
        top, total, out = carry  # [batch, kv_heads, group, seq](, head_dim)
        keys, values, key_scales, value_scales, held = read(i)
        kv_heads = keys.shape[1]
        grouped = queries.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
        scores = jnp.einsum("bqkgd,bksd->bkgqs", grouped.astype(jnp.float32),
                            keys.astype(jnp.float32))  # [batch, kv_heads, group, seq, block]
        if key_scales is not None:
            scores = scores * key_scales[:, :, None, None, :]
        scores = scores * scale
        if logit_softcap is not None:
            scores = soft_cap(scores, logit_softcap)
        seen = attention_mask(query_positions, held, sliding_window)
        scores = jnp.where(seen[:, None, None], scores, MASKED)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(scores - new_top[..., None])
        weighted = weights if value_scales is None else weights * value_scales[:, :, None, None, :]
        out = out * rescale[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", weighted,
                                                    values.astype(jnp.float32))
        return new_top, total * rescale + weights.sum(axis=-1), out

    kv_heads = jax.eval_shape(read, jnp.int32(0))[0].shape[1]
    shape = (batch, kv_heads, heads // kv_heads, seq)
    init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    return jax.lax.fori_loop(0, blocks, step, init)
