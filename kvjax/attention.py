"""Grouped-query attention of new queries over keys whose positions are known.

Masks follow from positions alone: a query at position ``p`` sees a key at position
``k`` when ``0 <= k <= p`` (and ``k > p - window`` with a sliding window). Padding
carries position ``-1`` and is never seen.

``attend`` is the plain path (XLA einsums, any backend). ``attend_block`` is causal
attention within one block of tokens (a prefill into an empty cache, the recompute
baseline): on NVIDIA GPUs it runs cuDNN's fused flash attention, which never writes
the score matrix to memory and skips the masked half, and elsewhere it falls back to
``attend`` (``flash_supported`` says which).
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


def flash_supported(head_dim: int, dtype, logit_softcap: float | None = None) -> bool:
    """Whether ``attend_block`` runs cuDNN flash attention here: a CUDA backend, a 16-bit
    float dtype, a head dimension that is a multiple of 8 and at most 128 (256 from
    Hopper on), and no logit soft-capping (which the fused kernel does not apply)."""
    if logit_softcap is not None or np.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    if jax.default_backend() != "gpu" or head_dim % 8:
        return False
    device = jax.devices()[0]
    if "cuda" not in device.client.platform_version:
        return False
    hopper = tuple(int(x) for x in device.compute_capability.split(".")) >= (9, 0)
    return head_dim <= (256 if hopper else 128)


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
    lengths = jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)  # [batch]
    out = jax.nn.dot_product_attention(
        queries, keys, values, scale=head_dim ** -0.5 if scale is None else scale,
        is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
        implementation="cudnn")
    return jnp.where((positions >= 0)[:, :, None, None], out, 0).astype(queries.dtype)
