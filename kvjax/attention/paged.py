"""Attention over a paged cache (``kvjax.cache.PagedKVCache``).

A block of tokens is written first (each token scattered to its block and slot through
its row's table), then the queries attend over the row's blocks, read a few at a time
through the table (``kvjax.attention.blockwise``, whose ``block_slots`` says how many):
only those blocks are ever gathered, never the row's whole history at once. Float and
int8/fp8 pools alike, on any backend. The loop runs as many iterations as the longest
row needs.

On NVIDIA GPUs a prompt chunk over a float pool (several tokens a row) takes cuDNN
flash attention instead (``attend_cache_cudnn``, where ``kvjax.attention.choose`` picks
cuDNN): the rows' blocks are gathered into a contiguous copy, then attended as a
contiguous cache is, with no loop whose trip count the GPU runtime must read back.

On TPUs a decode step over a float pool runs JAX's Pallas TPU paged attention instead,
where its constraints are met (``tpu_kernel_fits``): it reads the pool in the layout
kvjax keeps it in. The tests run it in Pallas's TPU interpret mode on CPU
(``LayerAttention.kernel == "interpret"``, i.e. ``decode_kernel=True``). It works in
bfloat16 internally.

On NVIDIA GPUs a decode step runs kvjax's own decode kernel
(``kvjax.kernels.decode_attention.attend_and_write_paged``), which writes the new token
into its block and reads the row's blocks through its table as it walks them, float
and int8/fp8 pools alike (``gpu_kernel_takes``). JAX's GPU paged attention took 1.6 to
1.8 times the time of contiguous attention on an H200, and gathering the blocks into a
contiguous copy first 3 times. A short block over int8/fp8 pools (a chat turn after a
cached prefix) runs the same kernel's loop there once written
(``kvjax.kernels.decode_attention.attend_cached_block_paged``, where
``kvjax.attention.choice.block_kernel_takes``). Interpreted (``decode_kernel=True`` on a
CPU, for a step the TPU kernel does not take) the tests check it against the portable
path.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

from kvjax.attention import blockwise, flash
from kvjax.attention.plain import finish
from kvjax.cache.paged import slot_addresses, write_pool
from kvjax.cache.quantized import layer_kv_dtype, quantize_block

try:  # JAX's TPU kernels; kvjax imports and runs without them
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged
except ImportError:
    pltpu = tpu_paged = None


TPU_CHUNK_SLOTS = 256  # slots the TPU kernel reads per step of its loop (whole blocks)


def write(layer_cache: tuple, k: jax.Array, v: jax.Array, positions: jax.Array,
          is_quantized: bool) -> tuple:
    """A paged layer's ``(pools..., block_tables)`` (``PagedKVCache.layer``) with the
    block's keys and values (``[batch, seq, kv_heads, head_dim]``, quantized first for
    a code pool) written at each row's positions."""
    *pools, tables = layer_cache
    block = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # [batch, kv_heads, seq, head_dim]
    if is_quantized:
        block = quantize_block(*block, layer_kv_dtype(pools))
    blocks, slots = slot_addresses(tables, positions, pools[0].shape[2], pools[0].shape[1])
    return (*(write_pool(pool, new, blocks, slots) for pool, new in zip(pools, block)), tables)


def tpu_kernel_fits(queries: jax.Array, pools: list, sliding_window: int | None) -> bool:
    """Whether JAX's Pallas TPU paged attention takes this decode step: one query a row,
    a float pool in the queries' dtype, a head_dim that fills TPU lanes (a multiple of
    128), blocks of whole sublane tiles (a multiple of 16 slots) and no sliding window."""
    return (tpu_paged is not None and queries.shape[1] == 1 and len(pools) == 2
            and pools[0].dtype == queries.dtype and queries.shape[-1] % 128 == 0
            and pools[0].shape[2] % 16 == 0 and sliding_window is None)


def gpu_kernel_takes(queries: jax.Array, layer_cache: tuple, kernel: str | None,
                     split) -> bool:
    """Whether a decode step runs kvjax's decode kernel over the pool
    (``kvjax.kernels.decode_attention.attend_and_write_paged``): the layer's
    ``LayerAttention.kernel`` is set (``choose`` sets it where the kernel runs, and for
    no sliding window), one query a row, not a step that JAX's TPU kernel takes
    (``tpu_kernel_mode``), and rows whole on each device (every device holds every row's
    blocks)."""
    if not kernel or queries.shape[1] != 1 or (split is not None and split.splits_rows()):
        return False
    return not (tpu_kernel_mode(kernel) and tpu_kernel_fits(queries, list(layer_cache[:-1]), None))


def tpu_kernel_mode(kernel: str | None) -> str | None:
    """``"compiled"`` on TPUs, ``"interpret"`` when asked (``LayerAttention.kernel``),
    else None (on GPUs ``"compiled"`` means kvjax's own decode kernel:
    ``gpu_kernel_takes``)."""
    if kernel == "interpret":
        return "interpret"
    return "compiled" if jax.default_backend() == "tpu" else None


def tpu_attend(queries: jax.Array, pools: list, tables: jax.Array, positions: jax.Array,
               scale: float, logit_softcap: float | None, mode: str) -> jax.Array:
    """A decode step through JAX's Pallas TPU paged attention (``tpu_kernel_fits``):
    ``[batch, 1, heads, head_dim]``. The kernel does not scale the scores: the queries
    come scaled. A row at position ``-1`` reads its first slot (finite, discarded)."""
    block_size, width = pools[0].shape[2], tables.shape[1]
    lengths = jnp.maximum(positions[:, 0] + 1, 1).astype(jnp.int32)
    interpret = pltpu.force_tpu_interpret_mode() if mode == "interpret" else contextlib.nullcontext()
    with interpret:
        out = tpu_paged((queries[:, 0] * scale).astype(queries.dtype), *pools, lengths,
                        tables, attn_logits_soft_cap=logit_softcap,
                        pages_per_compute_block=math.gcd(width, max(TPU_CHUNK_SLOTS // block_size, 1)))
    return out[:, None]


def readable_entries(tables: jax.Array, block_size: int, key_limit: int | None) -> int:
    """Table entries a row's attention reads: all of them, or those before ``key_limit``
    (static: no query sees a position at or past it)."""
    width = tables.shape[1]
    return width if key_limit is None else min(width, -(-key_limit // block_size))


def gather_blocks(pool: jax.Array, ids: jax.Array) -> jax.Array:
    """The blocks ``ids`` (``int32[rows, n]``) of ``pool`` (``[kv_heads, num_blocks,
    block_size(, head_dim)]``), each row's in a row of its own: ``[rows, kv_heads,
    n * block_size(, head_dim)]``."""
    taken = jnp.moveaxis(pool[:, ids], 0, 1)  # [rows, kv_heads, n, block_size(, head_dim)]
    return taken.reshape(*taken.shape[:2], -1, *taken.shape[4:])


def attend_cache_cudnn(queries: jax.Array, keys: jax.Array, values: jax.Array,
                       layer_cache: tuple, positions: jax.Array, scale: float | None,
                       key_limit: int | None) -> jax.Array:
    """A block of several tokens a row (a prompt chunk; ``queries`` ``[rows, seq, heads,
    head_dim]``, its own ``keys`` and ``values`` ``[rows, seq, kv_heads, head_dim]``)
    over a float pool that holds it (``write`` first), through cuDNN flash attention
    (``kvjax.attention.flash.attend_cache``): the rows' blocks, up to ``key_limit``,
    gathered into a contiguous copy first.

    The portable path's loop runs as many iterations as the longest row needs, a count
    XLA's GPU runtime reads back to the host before each iteration: on an H100 (8B
    shape) a mixed serving call with 4 chunks of 64 tokens over 1088-token prefixes took
    27 ms against 11.5 ms with no prefix, most of it waiting. A prompt chunk's queries
    make the copy cheap beside the attention (a decode step, whose attention only reads
    the cache, keeps the decode kernel: there a copy would triple the time)."""
    *pools, tables = layer_cache
    ids = tables[:, :readable_entries(tables, pools[0].shape[2], key_limit)]  # [rows, width]
    cache_keys, cache_values = (gather_blocks(pool, ids) for pool in pools)
    return flash.attend_cache(queries, keys, values, cache_keys, cache_values, positions, scale)


def attend_cache(queries: jax.Array, layer_cache: tuple, positions: jax.Array,
                 sliding_window: int | None = None, scale: float | None = None,
                 logit_softcap: float | None = None, key_limit: int | None = None,
                 kernel: str | None = None) -> jax.Array:
    """A block's attention (``queries`` ``[batch, seq, heads, head_dim]`` at
    ``positions``) over a paged layer that holds it (``write`` first); masks by
    positions as ``kvjax.attention.plain.attend``. ``key_limit``: static; no query
    sees a position at or past it. ``kernel``: the layer's ``LayerAttention.kernel``
    (``tpu_kernel_mode``)."""
    *pools, tables = layer_cache
    mode = tpu_kernel_mode(kernel)
    if mode and tpu_kernel_fits(queries, pools, sliding_window):
        head_dim = queries.shape[-1]
        return tpu_attend(queries, pools, tables, positions,
                          head_dim ** -0.5 if scale is None else scale, logit_softcap, mode)
    block_size = pools[0].shape[2]
    width = readable_entries(tables, block_size, key_limit)
    chunk_slots = blockwise.block_slots(queries, pools[0].shape[0], width * block_size)
    per_chunk = min(max(chunk_slots // block_size, 1), width)  # table entries an iteration
    batch = tables.shape[0]
    slots = jnp.arange(per_chunk * block_size, dtype=jnp.int32)  # [chunk]

    def read(i):
        # the last chunk moves back inside the table; entries an earlier chunk read are
        # masked out, so none counts twice
        start = jnp.minimum(i * per_chunk, width - per_chunk)
        ids = jax.lax.dynamic_slice_in_dim(tables, start, per_chunk, axis=1)  # [batch, n]
        held = start * block_size + slots
        held = jnp.broadcast_to(jnp.where(held >= i * per_chunk * block_size, held, -1),
                                (batch, slots.shape[0]))
        keys, values, *scales = (gather_blocks(pool, ids) for pool in pools)
        return keys, values, *(scales or (None, None)), held

    needed = jnp.max(positions) + 1  # positions the longest row has after this block
    chunks = jnp.clip(-(-needed // (per_chunk * block_size)), 0, -(-width // per_chunk))
    parts = blockwise.partials(queries, read, chunks, positions, sliding_window, scale,
                               logit_softcap)
    return finish(parts, queries.dtype)
