"""Grouped-query attention of new queries over keys whose positions are known.

* ``plain``: XLA einsums with masks from positions; every backend.
* ``flash``: cuDNN's fused flash attention on NVIDIA GPUs.
* ``kvjax.kernels.decode_attention``: a decode step's cache write and attention in one
  Pallas kernel on NVIDIA GPUs.
* ``choice``: ``choose`` picks among them once per program (an ``AttentionPlan``, a
  static argument of ``kvjax.model.forward``); ``attend_layer`` runs a layer's choice.

``attend_block`` (causal attention within one block: a prefill into an empty cache,
the recompute baseline) and ``attend_cache`` (a block over a cache that holds it: a
decode step, a chat turn, a piece of a long prompt) run one path by name, or the one
``choose`` would pick.
"""

from __future__ import annotations

import jax

from kvjax.attention import flash, plain
from kvjax.attention.choice import (AttentionPlan, LayerAttention, attend_layer,
                                    attend_pool_blocks, block_implementation, choose)
from kvjax.attention.plain import attend, attention_mask, default_scale, soft_cap

flash_supported = flash.supported  # the name before kvjax.attention became a package


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
      implementation: ``"cudnn"``, ``"xla"`` or None (what ``choose`` would pick).
      Others as in ``attend``.

    Returns:
      ``[batch, seq, heads, head_dim]``; rows of padding hold zeros (cuDNN) or a finite
      average (XLA), never NaN.
    """
    if implementation is None:
        implementation = block_implementation(queries.shape[-1], queries.dtype, logit_softcap,
                                              sliding_window, over_cache=False)
    if implementation == "xla":
        return plain.attend_block(queries, keys, values, positions, sliding_window, scale,
                                  logit_softcap)
    if logit_softcap is not None:
        raise ValueError("cuDNN flash attention does not apply a logit soft-cap; use 'xla'")
    return flash.attend_block(queries, keys, values, positions, sliding_window, scale)


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
      implementation: ``"cudnn"``, ``"xla"`` or None (what ``choose`` would pick: cuDNN
        where it runs and there is no sliding window).
      Others as in ``attend``.

    Returns:
      ``[batch, seq, heads, head_dim]`` in the dtype of ``queries``.
    """
    if implementation is None:
        implementation = block_implementation(queries.shape[-1], queries.dtype, logit_softcap,
                                              sliding_window, over_cache=True)
    if implementation == "xla":
        return plain.attend_cache(queries, cache_keys, cache_values, positions, sliding_window,
                                  scale, logit_softcap, key_limit)
    if logit_softcap is not None or sliding_window is not None:
        raise ValueError("cuDNN flash attention over a cache takes no logit soft-cap and no "
                         "sliding window; use 'xla'")
    return flash.attend_cache(queries, block_keys, block_values, cache_keys, cache_values,
                              positions, scale)


__all__ = ["AttentionPlan", "LayerAttention", "attend", "attend_block", "attend_cache",
           "attend_layer", "attend_pool_blocks", "attention_mask", "block_implementation", "choose",
           "default_scale", "flash_supported", "soft_cap"]
