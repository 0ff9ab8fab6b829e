"""Attention of a layer that keeps a ring buffer (``kvjax.cache.layout``): a sliding
window, or streaming with attention sinks. Any backend; float or quantized caches.

A ring of ``window`` slots holds a row's last ``window`` positions. A decode step
writes its token first, and then the ring holds exactly what the step's query sees. A
block of several tokens would overwrite positions its own first queries still see, so it
reads the ring as it was and the block itself as two parts, and is written after: the
parts' flash partials (``kvjax.attention.plain.merge``) give the attention over both.

Streaming adds the sinks (StreamingLLM): each query also sees positions ``0 .. sinks -
1``, as if they sat just before its window. Keys keep the rotation of their own
position, so a query and a key of its window are as far apart as in the text; the sinks
are scored with the query rotated to position ``min(position, sinks + window - 1)``
(``sink_queries``), which puts each sink as far from every query as it would be in a
cache of ``sinks + window`` positions numbered from 0, the paper's choice ("positions
within the cache"). While a row holds no more than ``sinks + window`` positions, this
is plain causal attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import plain, quantized
from kvjax.cache.layout import LayerSlots, held_positions, write_slots
from kvjax.cache.quantized import layer_kv_dtype, quantize_block


def write(layer_cache: tuple, block: tuple, positions: jax.Array, slots: LayerSlots) -> tuple:
    """A ring layer's buffers with a block (as stored: ``(keys, values)``, with scales for
    a quantized cache; ``[batch, kv_heads, seq, ...]``) written to its slots."""
    return tuple(write_slots(buffer, new, positions, slots)
                 for buffer, new in zip(layer_cache, block))


def attend(scale: float, softcap: float | None, slots: LayerSlots, fresh: bool,
           is_quantized: bool, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: tuple,
           positions: jax.Array, sink_queries: jax.Array | None
           ) -> tuple[jax.Array, tuple]:
    """A ring layer's attention and write.

    Args:
      scale, softcap: the model's score scale and soft-cap.
      slots: the layer's ring (``kvjax.cache.layout.LayerSlots``).
      fresh: the cache starts empty: the block attends within itself.
      is_quantized: ``layer_cache`` holds codes and scales.
      q: ``[batch, seq, heads, head_dim]``; k, v: ``[batch, seq, kv_heads, head_dim]``.
      layer_cache: the layer's ``(keys, values)`` ``[batch, kv_heads, slots,
        head_dim]`` (with ``(key_scales, value_scales)`` when quantized).
      positions: ``int32[batch, seq]``, each row's block starting at its length.
      sink_queries: ``q`` rotated to ``min(position, sinks + window - 1)`` (streaming
        with sinks), else None.

    Returns:
      ``(out [batch, seq, heads, head_dim], layer_cache)``.
    """
    block = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # [batch, kv_heads, seq, head_dim]
    stored = quantize_block(*block, layer_kv_dtype(layer_cache)) if is_quantized else block
    read = lambda kv, key_positions: _read(scale, softcap, slots, q, sink_queries, kv,
                                           positions, key_positions)
    start = positions[:, 0]  # each row's length before the block (-1: a row of padding)
    if q.shape[1] == 1 and not fresh:  # written first: the ring then holds what it sees
        layer_cache = write(layer_cache, stored, positions, slots)
        parts = read(layer_cache, held_positions(jnp.maximum(start + 1, 0), slots))
    else:  # the ring as it was, and the block (full precision when it starts the cache)
        parts = [] if fresh else read(layer_cache, held_positions(jnp.maximum(start, 0), slots))
        parts += read(block if fresh else stored, positions)
        layer_cache = write(layer_cache, stored, positions, slots)
    return plain.finish(plain.merge(parts), q.dtype), layer_cache


def _read(scale, softcap, slots: LayerSlots, q, sink_queries, kv: tuple, query_positions,
          key_positions) -> list[plain.Partials]:
    """Partials of the queries over ``kv`` (``(keys, values)`` or codes and scales, whose
    slots hold ``key_positions``): its sinks (scored with ``sink_queries``) and the
    window of each query over the rest."""
    sinks = slots.sinks
    in_window = jnp.where(key_positions >= sinks, key_positions, -1)
    partials = quantized.partials if len(kv) == 4 else plain.partials
    parts = [partials(q, *kv, query_positions, in_window, slots.window, scale, softcap)]
    if sinks:  # sinks sit in the first slots of a ring, or of a block that starts the row
        count = min(sinks, kv[0].shape[2])
        held = key_positions[:, :count]
        parts.append(partials(sink_queries, *(x[:, :, :count] for x in kv), query_positions,
                              jnp.where(held < sinks, held, -1), None, scale, softcap))
    return parts
