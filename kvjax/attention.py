"""Grouped-query attention of new queries over keys whose positions are known.

Masks follow from positions alone: a query at position ``p`` sees a key at position
``k`` when ``0 <= k <= p`` (and ``k > p - window`` with a sliding window). Padding
carries position ``-1`` and is never seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a query that sees nothing (padding) gives a uniform row, not NaN.
_MASKED = -1e30


def attention_mask(query_positions: jax.Array, key_positions: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
    """``bool[batch, queries, keys]``: which keys each query may attend to."""
    q = query_positions[:, :, None]  # [batch, queries, 1]
    k = key_positions[:, None, :]  # [batch, 1, keys]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= k > q - sliding_window
    return mask


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(x / cap)``: squashes ``x`` smoothly into ``(-cap, cap)`` (Gemma 2)."""
    return cap * jnp.tanh(x / cap)


def attend(queries: jax.Array, keys: jax.Array, values: jax.Array,
           query_positions: jax.Array, key_positions: jax.Array,
           sliding_window: int | None = None, scale: float | None = None,
           logit_softcap: float | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    Args:
      queries: ``[batch, queries, heads, head_dim]``.
      keys, values: ``[batch, kv_heads, keys, head_dim]`` (heads-major, the cache's
        layout); ``heads`` is a multiple of ``kv_heads`` (MHA, GQA and MQA alike).
      query_positions: ``int32[batch, queries]``.
      key_positions: ``int32[batch, keys]``.
      sliding_window: attend only to the last ``sliding_window`` positions.
      scale: multiplies the scores (default ``head_dim ** -0.5``).
      logit_softcap: ``soft_cap`` the scaled scores at this value (before masking).

    Returns:
      ``[batch, queries, heads, head_dim]`` in the dtype of ``queries``.
    """
    batch, num_queries, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.reshape(batch, num_queries, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bksd->bkgqs", grouped, keys,
                        preferred_element_type=jnp.float32)  # [batch, kv_heads, group, queries, keys]
    scores = scores * (head_dim ** -0.5 if scale is None else scale)
    if logit_softcap is not None:
        scores = soft_cap(scores, logit_softcap)
    mask = attention_mask(query_positions, key_positions, sliding_window)[:, None, None]
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    # In the values' dtype, as HF transformers does (GPUs accumulate in float32 anyway);
    # XLA:CPU has no bf16 x bf16 -> f32 kernel for this batched contraction.
    out = jnp.einsum("bkgqs,bksd->bqkgd", probs, values)  # [batch, queries, kv_heads, group, head_dim]
    return out.reshape(batch, num_queries, heads, head_dim).astype(queries.dtype)
