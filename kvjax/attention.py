"""Grouped-query attention of new queries over keys whose positions are known.

Masks follow from positions alone: a query at position ``p`` sees a key at position
``k`` when ``0 <= k <= p`` (and ``k > p - window`` with a sliding window). Padding
carries position ``-1`` and is never seen.

``attend`` is the plain path (XLA einsums, any backend). ``attend_block`` is causal
attention within one block of tokens (a prefill into an empty cache, the recompute
baseline); ``attend_cache`` attends a block (a decode step, a chat turn, a piece of a
long prompt) over a cache that holds it. On NVIDIA GPUs both run cuDNN's fused flash
attention, which never writes a score matrix to memory and skips masked and unfilled
keys; elsewhere they fall back to ``attend`` (``flash_supported`` says which).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


def _cudnn_module():
    """JAX's cuDNN fused-attention module, or None where this JAX has none. Its
    ``dot_product_attention`` takes the heads-major (``BNTH``) layout of kvjax's cache and
    returns the float32 log-sum-exp that merging two attentions needs, which
    ``jax.nn.dot_product_attention`` does not."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo
    except ImportError:
        return None
    return fused_attention_stablehlo


def flash_supported(head_dim: int, dtype, logit_softcap: float | None = None) -> bool:
    """Whether cuDNN flash attention runs here: a CUDA backend with JAX's cuDNN attention,
    a 16-bit float dtype, a head dimension that is a multiple of 8 and at most 128 (256
    from Hopper on), and no logit soft-capping (which the fused kernel does not apply)."""
    if logit_softcap is not None or np.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    if jax.default_backend() != "gpu" or head_dim % 8 or _cudnn_module() is None:
        return False
    device = jax.devices()[0]
    if "cuda" not in device.client.platform_version:
        return False
    hopper = tuple(int(x) for x in device.compute_capability.split(".")) >= (9, 0)
    return head_dim <= (256 if hopper else 128)


def _flash(queries: jax.Array, keys: jax.Array, values: jax.Array, query_lengths: jax.Array,
           key_lengths: jax.Array, *, causal: bool, layout: str, scale: float,
           sliding_window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cuDNN flash attention of the first ``query_lengths[b]`` queries of each row over its
    first ``key_lengths[b]`` keys (``causal``: query ``i`` sees keys ``<= i``); work past
    a row's lengths is skipped. ``layout`` ``"BTNH"`` or ``"BNTH"`` (queries, keys and
    values alike). Returns the output in ``layout`` and the log-sum-exp of each query's
    scores, ``float32[batch, heads, queries]``."""
    fa = _cudnn_module()
    mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    out, lse = fa.dot_product_attention(
        queries, keys, values, q_seqlen=query_lengths, kv_seqlen=key_lengths, scale=scale,
        mask_type=mask, qkv_layout=layout, sliding_window_length=sliding_window,
        return_residual=True)
    return out, lse.astype(jnp.float32)


def attend_block(queries: jax.Array, keys: jax.Array, values: jax.Array,
                 positions: jax.Array, sliding_window: int | None = None,
                 scale: float | None = None, logit_softcap: float | None = None,
                 implementation: str | None = None) -> jax.Array:
    """Causal attention of a block of tokens over itself.

    Args:
      queries: ``[batch, seq, heads, head_dim]``.
      keys, values: ``[batch, seq, kv_heads, head_dim]`` (sequence-major, as projected).
      positions: ``int32[batch, seq]``: ``0, 1, ..., length - 1`` then ``-1`` padding in
        each row (the block starts the sequence).
      implementation: ``"cudnn"``, ``"xla"`` (``attend``) or None: cuDNN where
        ``flash_supported``, else XLA.
      Others as in ``attend``.

    Returns:
      ``[batch, seq, heads, head_dim]``; rows of padding hold zeros (cuDNN) or a finite
      average (XLA), never NaN.
    """
    head_dim = queries.shape[-1]
    if implementation is None:
        implementation = "cudnn" if flash_supported(head_dim, queries.dtype, logit_softcap) else "xla"
    if implementation == "xla":
        heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
        return attend(queries, heads_major(keys), heads_major(values), positions, positions,
                      sliding_window, scale, logit_softcap)
    if logit_softcap is not None:
        raise ValueError("cuDNN flash attention does not apply a logit soft-cap; use 'xla'")
    real = positions >= 0  # [batch, seq]
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)  # [batch]
    out, _ = _flash(queries, keys, values, lengths, lengths, causal=True, layout="BTNH",
                    scale=head_dim ** -0.5 if scale is None else scale,
                    sliding_window=sliding_window)
    return jnp.where(real[:, :, None, None], out, 0).astype(queries.dtype)


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


def attend_cache(queries: jax.Array, block_keys: jax.Array, block_values: jax.Array,
                 cache_keys: jax.Array, cache_values: jax.Array, positions: jax.Array,
                 sliding_window: int | None = None, scale: float | None = None,
                 logit_softcap: float | None = None, key_limit: int | None = None,
                 implementation: str | None = None) -> jax.Array:
    """Attention of a block of new tokens over a cache that already holds them.

    Args:
      queries: ``[batch, seq, heads, head_dim]``.
      block_keys, block_values: the block's own ``[batch, seq, kv_heads, head_dim]``.
      cache_keys, cache_values: ``[batch, kv_heads, capacity, head_dim]``, slot ``j``
        holding position ``j``, the block written at its positions.
      positions: ``int32[batch, seq]``, consecutive in each row from where the row's
        cache ended, then ``-1`` padding.
      key_limit: static; no query sees a slot at or past it (the XLA path reads only the
        slots before it; with a sliding window, only the window's slots).
      implementation: ``"cudnn"``, ``"xla"`` or None: cuDNN where ``flash_supported``
        and there is no sliding window, else XLA.
      Others as in ``attend``.

    On cuDNN the work follows each row's filled length, not the capacity. One token per
    row (a decode step) is one fused attention over the row's first ``position + 1``
    slots. A longer block is two: its queries over the slots before the block (no mask)
    and over the block itself (causal), merged by their log-sum-exps, so no score matrix
    over the capacity is ever formed. The XLA path masks by positions over the first
    ``key_limit`` slots, or, with a sliding window, over the ``window + seq - 1`` slots
    the window can reach (``window_slices``): a windowed layer's work follows its window.

    Returns:
      ``[batch, seq, heads, head_dim]`` in the dtype of ``queries``.
    """
    batch, seq, heads, head_dim = queries.shape
    if implementation is None:
        flash = sliding_window is None and flash_supported(head_dim, queries.dtype, logit_softcap)
        implementation = "cudnn" if flash else "xla"
    if implementation == "xla":
        capacity = cache_keys.shape[2]
        limit = capacity if key_limit is None else min(key_limit, capacity)
        if sliding_window is not None and sliding_window + seq - 1 < limit:
            keys, values, slots = window_slices(cache_keys, cache_values, positions,
                                                sliding_window + seq - 1)
        else:
            keys, values = cache_keys[:, :, :limit], cache_values[:, :, :limit]
            slots = jnp.broadcast_to(jnp.arange(limit, dtype=jnp.int32), (batch, limit))
        return attend(queries, keys, values, positions, slots, sliding_window, scale,
                      logit_softcap)
    if logit_softcap is not None or sliding_window is not None:
        raise ValueError("cuDNN flash attention over a cache takes no logit soft-cap and no "
                         "sliding window; use 'xla'")
    scale = head_dim ** -0.5 if scale is None else scale
    heads_major = queries.transpose(0, 2, 1, 3)  # [batch, heads, seq, head_dim]
    real = positions >= 0  # [batch, seq]
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)  # [batch]
    if seq == 1:  # a decode step: the row's slots up to and including its new token
        out, _ = _flash(heads_major, cache_keys, cache_values, lengths, positions[:, 0] + 1,
                        causal=False, layout="BNTH", scale=scale)
        return jnp.where(real[:, :, None, None], out.transpose(0, 2, 1, 3), 0).astype(queries.dtype)
    start = jnp.maximum(positions[:, 0], 0)  # [batch], slots before the block
    before, before_lse = _flash(heads_major, cache_keys, cache_values, lengths, start,
                                causal=False, layout="BNTH", scale=scale)
    within, within_lse = _flash(queries, block_keys, block_values, lengths, lengths,
                                causal=True, layout="BTNH", scale=scale)
    has_before = (start > 0)[:, None, None]  # a row that starts its sequence has no slots before
    before_lse = jnp.where(has_before, before_lse, -jnp.inf).transpose(0, 2, 1)  # [batch, seq, heads]
    within_lse = within_lse.transpose(0, 2, 1)
    top = jnp.maximum(before_lse, within_lse)
    w_before = jnp.exp(before_lse - top)[..., None]  # [batch, seq, heads, 1]
    w_within = jnp.exp(within_lse - top)[..., None]
    before = jnp.where(has_before[..., None], before.transpose(0, 2, 1, 3), 0)
    out = (before.astype(jnp.float32) * w_before + within.astype(jnp.float32) * w_within
           ) / (w_before + w_within)
    return jnp.where(real[:, :, None, None], out, 0).astype(queries.dtype)
