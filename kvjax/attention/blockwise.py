"""Attention over a cache read a block of slots at a time, on any backend.

A ``fori_loop`` reads one block of keys and values per iteration (``read``) and keeps
an online softmax (flash attention's running maximum, sum and weighted values), so only
one block is ever converted or gathered, never the whole cache. Quantized caches
(``kvjax.attention.quantized``) and paged ones (``kvjax.attention.paged``) differ only
in how a block is read. Codes enter the products as stored: a token's scale factors out
of its dot products (``q . (codes * s) = (q . codes) * s``; a value weighted by ``p``
contributes ``(p * s) . codes``). Codes enter the products converted to the queries'
dtype (exact), so on GPUs they run on the tensor cores; int8 keys are not converted:
each query row is quantized as the cache quantizes a key (``kvjax.cache.quantize``: int8
codes and a float32 scale) and the scores are int8 products summed exactly in int32,
times both scales (``int8_scores``), as the decode kernel computes them (quality and
speed: docs/memory.md).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kvjax.attention.plain import MASKED, Partials, attention_mask, default_scale, soft_cap
from kvjax.cache.quantized import quantize

# read(i) -> (keys, values, key_scales, value_scales, key_positions) of block i:
# keys, values [batch, kv_heads, block, head_dim] (float or codes); scales
# float32[batch, kv_heads, block] or None (a float cache); the position each slot holds
# int32[batch, block] (-1: none, or a slot another block already read).
BlockReader = Callable[[jax.Array], tuple]

# Slots read per iteration: as many as keep a block's converted keys and its float32
# scores within BLOCK_BYTES, between MIN_BLOCK_SLOTS and MAX_BLOCK_SLOTS (an iteration is
# a few kernels: on GPUs few large blocks beat many small ones), and at most a quarter
# of the cache (a converted block is never a copy of the whole cache).
MIN_BLOCK_SLOTS, MAX_BLOCK_SLOTS, BLOCK_BYTES = 256, 4096, 64 << 20


def block_slots(queries: jax.Array, kv_heads: int, capacity: int) -> int:
    """Cache slots to read per iteration for ``queries`` (``[batch, seq, heads,
    head_dim]``) over ``capacity`` slots: a power of two within ``MIN_BLOCK_SLOTS ...
    MAX_BLOCK_SLOTS`` whose scores (float32) and converted keys fit ``BLOCK_BYTES``, and
    at most ``capacity // 4`` unless that is below ``MIN_BLOCK_SLOTS``."""
    batch, seq, heads, head_dim = queries.shape
    per_slot = batch * max(heads * seq * 4, kv_heads * head_dim * queries.dtype.itemsize)
    fitting = 1 << (max(BLOCK_BYTES // per_slot, 1).bit_length() - 1)
    return max(min(fitting, MAX_BLOCK_SLOTS, capacity // 4), MIN_BLOCK_SLOTS)


def partials(queries: jax.Array, read: BlockReader, blocks: jax.Array | int,
             query_positions: jax.Array, sliding_window: int | None = None,
             scale: float | None = None, logit_softcap: float | None = None) -> Partials:
    """``kvjax.attention.plain.Partials`` of ``queries`` (``[batch, seq, heads,
    head_dim]``) over ``blocks`` blocks that ``read`` gives (a count, static or traced).
    Masks by positions as ``kvjax.attention.plain.attend`` does."""
    batch, seq, heads, head_dim = queries.shape
    scale = default_scale(head_dim) if scale is None else scale
    first = jax.eval_shape(read, jnp.int32(0))[0]  # a block's keys
    kv_heads = first.shape[1]
    grouped = queries.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    int8_keys = first.dtype == jnp.int8
    if int8_keys:  # (codes, scales), once, outside the loop
        query_int8 = quantize(grouped, "int8")

    def step(i, carry):
        top, total, out = carry  # [batch, kv_heads, group, seq](, head_dim)
        keys, values, key_scales, value_scales, held = read(i)
        operands = _operand_dtype(queries.dtype, keys.dtype, key_scales is not None)
        if int8_keys:
            scores = int8_scores(*query_int8, keys)
        else:
            scores = jnp.einsum("bqkgd,bksd->bkgqs", grouped.astype(operands),
                                keys.astype(operands), preferred_element_type=jnp.float32)
        # [batch, kv_heads, group, seq, block]
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
        out = out * rescale[..., None] + jnp.einsum(
            "bkgqs,bksd->bkgqd", weighted.astype(operands), values.astype(operands),
            preferred_element_type=jnp.float32)
        return new_top, total * rescale + weights.sum(axis=-1), out

    shape = (batch, kv_heads, heads // kv_heads, seq)
    init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    return jax.lax.fori_loop(0, blocks, step, init)


def int8_scores(query_codes: jax.Array, query_scales: jax.Array,
                key_codes: jax.Array) -> jax.Array:
    """float32 ``[batch, kv_heads, group, seq, block]`` products of int8 query codes
    ``[batch, seq, kv_heads, group, head_dim]`` (with their float32 scales ``[batch, seq,
    kv_heads, group]``, ``kvjax.cache.quantize``'s) and int8 key codes ``[batch, kv_heads,
    block, head_dim]``: summed in int32 (exact), times the queries' scales (the keys'
    are the caller's)."""
    scores = jnp.einsum("bqkgd,bksd->bkgqs", query_codes, key_codes,
                        preferred_element_type=jnp.int32)
    return scores.astype(jnp.float32) * jnp.moveaxis(query_scales, 1, -1)[..., None]


def _operand_dtype(query_dtype, key_dtype, codes: bool):
    """The dtype the dot products over converted codes take: the queries' for codes
    (int8 and e4m3 values are exact in every float dtype), else the wider of the
    queries' and the cache's; products accumulate in float32 (flash attention's
    choice: the probabilities enter the second product in it too)."""
    return jnp.dtype(query_dtype) if codes else jnp.promote_types(query_dtype, key_dtype)
