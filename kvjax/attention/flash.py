"""cuDNN's fused flash attention on NVIDIA GPUs: never writes a score matrix to memory
and skips masked and unfilled keys. ``supported`` says where it runs; elsewhere
``kvjax.attention.choose`` picks the plain path (``kvjax.attention.plain``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention.plain import default_scale
from kvjax import platform


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


def supported(head_dim: int, dtype, logit_softcap: float | None = None) -> bool:
    """Whether cuDNN flash attention runs here: a CUDA GPU of compute capability 8.0 or
    newer with JAX's cuDNN attention, a 16-bit float dtype, a head dimension that is a
    multiple of 8 and at most 128 (256 from Hopper on), and no logit soft-capping (which
    the fused kernel does not apply)."""
    if logit_softcap is not None or np.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    if head_dim % 8 or not platform.is_cuda_gpu((8, 0)) or _cudnn_module() is None:
        return False
    return head_dim <= (256 if platform.is_cuda_gpu((9, 0)) else 128)


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
                 scale: float | None = None) -> jax.Array:
    """Causal attention of a block over itself (``kvjax.attention.attend_block``'s cuDNN
    path); rows of padding hold zeros."""
    real = positions >= 0  # [batch, seq]
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)  # [batch]
    scale = default_scale(queries.shape[-1]) if scale is None else scale
    out, _ = _flash(queries, keys, values, lengths, lengths, causal=True, layout="BTNH",
                    scale=scale, sliding_window=sliding_window)
    return jnp.where(real[:, :, None, None], out, 0).astype(queries.dtype)


def attend_cache(queries: jax.Array, block_keys: jax.Array, block_values: jax.Array,
                 cache_keys: jax.Array, cache_values: jax.Array, positions: jax.Array,
                 scale: float | None = None) -> jax.Array:
    """A block's attention over a cache that holds it (``kvjax.attention.attend_cache``'s
    cuDNN path), its work following each row's filled length, not the capacity.

    One token per row (a decode step) is one fused attention over the row's first
    ``position + 1`` slots. A longer block is two: its queries over the slots before the
    block (no mask) and over the block itself (causal), merged by their log-sum-exps, so
    no score matrix over the capacity is ever formed.
    """
    batch, seq, heads, head_dim = queries.shape
    scale = default_scale(head_dim) if scale is None else scale
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
