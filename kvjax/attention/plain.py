"""Grouped-query attention in plain XLA (einsums): runs on every backend.

Masks follow from positions alone: a query at position ``p`` sees a key at position
``k`` when ``0 <= k <= p`` (and ``k > p - window`` with a sliding window). Padding
carries position ``-1`` and is never seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a query that sees nothing (padding) gives a uniform row, not NaN.
MASKED = -1e30


def default_scale(head_dim: int) -> float:
    """The usual score scale ``head_dim ** -0.5`` (configs may set another:
    ``ModelConfig.query_scale``)."""
    return head_dim ** -0.5


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


def masked_scores(queries: jax.Array, keys: jax.Array, query_positions: jax.Array,
                  key_positions: jax.Array, sliding_window: int | None = None,
                  scale: float | None = None, logit_softcap: float | None = None) -> jax.Array:
    """``float32[batch, kv_heads, group, queries, keys]``: scaled (soft-capped) scores of
    grouped queries against keys, ``MASKED`` where a query may not see a key (arguments
    as in ``attend``)."""
    batch, num_queries, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.reshape(batch, num_queries, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bksd->bkgqs", grouped, keys,
                        preferred_element_type=jnp.float32)  # [batch, kv_heads, group, queries, keys]
    scores = scores * (default_scale(head_dim) if scale is None else scale)
    if logit_softcap is not None:
        scores = soft_cap(scores, logit_softcap)
    mask = attention_mask(query_positions, key_positions, sliding_window)[:, None, None]
    return jnp.where(mask, scores, MASKED)


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
      scale: multiplies the scores (default ``default_scale(head_dim)``).
      logit_softcap: ``soft_cap`` the scaled scores at this value (before masking).

    Returns:
      ``[batch, queries, heads, head_dim]`` in the dtype of ``queries``.
    """
    batch, num_queries, heads, head_dim = queries.shape
    scores = masked_scores(queries, keys, query_positions, key_positions, sliding_window,
                           scale, logit_softcap)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    # In the values' dtype, as HF transformers does (GPUs accumulate in float32 anyway);
    # XLA:CPU has no bf16 x bf16 -> f32 kernel for this batched contraction.
    out = jnp.einsum("bkgqs,bksd->bqkgd", probs, values)  # [batch, queries, kv_heads, group, head_dim]
    return out.reshape(batch, num_queries, heads, head_dim).astype(queries.dtype)


# Flash-attention partials of queries over one part of their keys: the scores' maximum
# ``float32[batch, kv_heads, group, queries]``, the sum of ``exp(score - maximum)`` (same
# shape) and the values weighted by it ``float32[batch, kv_heads, group, queries,
# head_dim]``. Parts over disjoint keys ``merge`` into the attention over all of them.
Partials = tuple[jax.Array, jax.Array, jax.Array]


def partials(queries: jax.Array, keys: jax.Array, values: jax.Array,
             query_positions: jax.Array, key_positions: jax.Array,
             sliding_window: int | None = None, scale: float | None = None,
             logit_softcap: float | None = None) -> Partials:
    """``Partials`` of ``queries`` over ``keys`` (arguments as in ``attend``)."""
    scores = masked_scores(queries, keys, query_positions, key_positions, sliding_window,
                           scale, logit_softcap)
    top = scores.max(axis=-1)
    weights = jnp.exp(scores - top[..., None])
    out = jnp.einsum("bkgqs,bksd->bkgqd", weights.astype(values.dtype), values)
    return top, weights.sum(axis=-1), out.astype(jnp.float32)


def merge(parts: list[Partials]) -> Partials:
    """The ``Partials`` over the keys of all ``parts`` (each rescaled to the largest
    maximum; a part whose keys a query cannot see contributes nothing)."""
    top = parts[0][0]
    for part in parts[1:]:
        top = jnp.maximum(top, part[0])
    rescale = [jnp.exp(part[0] - top) for part in parts]
    total = sum(r * part[1] for r, part in zip(rescale, parts))
    out = sum(r[..., None] * part[2] for r, part in zip(rescale, parts))
    return top, total, out


def finish(parts: Partials, dtype) -> jax.Array:
    """Normalised attention ``[batch, queries, heads, head_dim]`` in ``dtype`` from
    ``Partials`` (a query that sees nothing, padding, gets a finite average)."""
    _, total, out = parts
    batch, kv_heads, group, num_queries, head_dim = out.shape
    out = out / total[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, num_queries, kv_heads * group,
                                                  head_dim).astype(dtype)


def attend_block(queries: jax.Array, keys: jax.Array, values: jax.Array,
                 positions: jax.Array, sliding_window: int | None = None,
                 scale: float | None = None, logit_softcap: float | None = None) -> jax.Array:
    """Causal attention of a block over itself (``kvjax.attention.attend_block``'s XLA
    path); ``keys``/``values`` sequence-major ``[batch, seq, kv_heads, head_dim]``."""
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
    return attend(queries, heads_major(keys), heads_major(values), positions, positions,
                  sliding_window, scale, logit_softcap)


def window_slices(cache_keys: jax.Array, cache_values: jax.Array, positions: jax.Array,
                  span: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``span`` slots of each row that a sliding window over a block can see.

    A block at positions ``p ... p + seq - 1`` with a window ``w`` sees slots
    ``p - w + 1 ... p + seq - 1``: ``span = w + seq - 1`` slots, taken per row with
    ``dynamic_slice`` (moved inside the buffer where they would cross its start or end,
    which only adds slots the masks exclude). Returns keys and values ``[batch, kv_heads,
    span, head_dim]`` and the slots' positions ``int32[batch, span]``.
    """
    capacity = cache_keys.shape[2]
    seq = positions.shape[1]
    first = jnp.clip(positions[:, 0] - (span - seq), 0, capacity - span)  # [batch]
    take = jax.vmap(lambda buffer, start: jax.lax.dynamic_slice_in_dim(buffer, start, span, axis=1))
    slots = first[:, None] + jnp.arange(span, dtype=jnp.int32)[None, :]
    return take(cache_keys, first), take(cache_values, first), slots


def attend_cache(queries: jax.Array, cache_keys: jax.Array, cache_values: jax.Array,
                 positions: jax.Array, sliding_window: int | None = None,
                 scale: float | None = None, logit_softcap: float | None = None,
                 key_limit: int | None = None) -> jax.Array:
    """A block's attention over a cache that holds it (``kvjax.attention.attend_cache``'s
    XLA path): masks by positions over the first ``key_limit`` slots, or, with a sliding
    window, over the ``window + seq - 1`` slots the window can reach (``window_slices``),
    so a windowed layer's work follows its window."""
    batch, seq = positions.shape
    capacity = cache_keys.shape[2]
    limit = capacity if key_limit is None else min(key_limit, capacity)
    if sliding_window is not None and sliding_window + seq - 1 < limit:
        keys, values, slots = window_slices(cache_keys, cache_values, positions,
                                            sliding_window + seq - 1)
    else:
        keys, values = cache_keys[:, :, :limit], cache_values[:, :, :limit]
        slots = jnp.broadcast_to(jnp.arange(limit, dtype=jnp.int32), (batch, limit))
    return attend(queries, keys, values, positions, slots, sliding_window, scale, logit_softcap)
