"""Which attention a program runs, chosen once per program.

``choose`` looks at the backend, the dtype, each layer's window, the soft-cap, the mesh
and the caller's wishes, and returns an ``AttentionPlan``: one static value that
``kvjax.model.forward`` takes and hands each layer its ``LayerAttention``. Nothing else
in kvjax decides between the plain path, cuDNN flash attention and the Pallas decode
kernel; a new path (quantized or paged caches) is a new value here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from kvjax.attention import flash, paged, plain, quantized, ring
from kvjax.cache import QUANTIZED, check_kv_dtype
from kvjax.cache.contiguous import write_block
from kvjax.cache.layout import LayerSlots
from kvjax.cache.paged import PagedSlots
from kvjax.cache.quantized import layer_kv_dtype, quantize_block, write_quantized_block
from kvjax.config import ModelConfig
from kvjax.kernels import decode_attention as kernel

IMPLEMENTATIONS = ("xla", "cudnn")  # for blocks, and decode steps off the kernel
KERNEL_MODES = ("compiled", "interpret")


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """How one layer attends (hashable: a static argument of the layer's program).

    Attributes:
      implementation: ``"cudnn"`` or ``"xla"``: a block of several tokens (a prefill, a
        chat turn, a piece of a long prompt), and decode steps when ``kernel`` is None.
      kernel: a decode step (one token a row) over the cache runs
        ``kvjax.kernels.decode_attention``: ``"compiled"``, ``"interpret"`` (any
        backend, slow; tests) or None; so does a block over int8/fp8 codes that
        ``block_takes`` (``attend_cached_block``).
      window: the layer's sliding window (None: every position).
      split: the kernel's split over a mesh (``kvjax.sharding.kernel_split``), or None.
      fresh: the cache starts empty and the block starts every row at position 0, so
        attention stays within the block and never reads the cache's empty slots.
      key_limit: no query attends to a slot at or past it (a generation that can fill
        only its first ``key_limit`` slots): the work follows what can be filled.
      quantized: the cache holds int8/fp8 codes and scales (``QuantizedKVCache``): a
        block is quantized when written, and attention over the cache reads the codes
        block by block (``kvjax.attention.quantized``).
    """

    implementation: str = "xla"
    kernel: str | None = None
    window: int | None = None
    split: kernel.MeshSplit | None = None
    fresh: bool = False
    key_limit: int | None = None
    quantized: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """A ``LayerAttention`` per layer: how a program's layers attend (``choose``)."""

    layers: tuple[LayerAttention, ...]

    def describe(self) -> str:
        """One line a person reads, e.g. ``"blocks: cudnn, steps: kernel (compiled)"``."""
        def kinds(values):
            return "/".join(sorted({str(v) for v in values}))
        steps = [f"kernel ({a.kernel})" if a.kernel else a.implementation for a in self.layers]
        return f"blocks: {kinds(a.implementation for a in self.layers)}, steps: {kinds(steps)}"


def block_implementation(head_dim: int, dtype, logit_softcap: float | None,
                         window: int | None, over_cache: bool) -> str:
    """``"cudnn"`` where cuDNN flash attention runs these shapes (within a block with any
    window; over a cache without one), else ``"xla"``."""
    if not flash.supported(head_dim, dtype, logit_softcap):
        return "xla"
    return "xla" if over_cache and window is not None else "cudnn"


def choose(config: ModelConfig, dtype, *, use_cache: bool = True, fresh: bool = False,
           key_limit: int | None = None, mesh=None, rules=None,
           decode_kernel: bool | None = None,
           kernel_split: kernel.MeshSplit | None = None,
           kv_dtype: str | None = None) -> AttentionPlan:
    """How a program's layers attend.

    Args:
      config: the model.
      dtype: the params' (and queries') dtype.
      use_cache: False for the recompute baseline (attention within the block only).
      fresh, key_limit: as in ``LayerAttention``.
      mesh, rules: where params and cache live (``kvjax.sharding``). On a mesh of
        several devices the decode kernel runs on each device's shard
        (``kvjax.sharding.kernel_split``), and not at all where the mesh cannot split
        it (a custom call that XLA cannot split would gather the whole cache).
      decode_kernel: None: the Pallas decode kernel where it runs compiled (CUDA GPUs of
        compute capability >= 8.0, 8.9 over fp8 codes, with Pallas Triton); True: also
        elsewhere, interpreted (slow; tests); False: never.
      kernel_split: the kernel's split when the caller made it without a mesh
        (``kvjax.sharding.kernel_options``, kept for older code); ignored with ``mesh``.
      kv_dtype: what the cache stores (``kvjax.cache.KV_DTYPES``; None: ``dtype``). A
        cache in another float dtype than the queries attends on the XLA path; int8 and
        fp8 caches on the quantized path, and in decode steps through the decode kernel
        where it runs (it reads the codes).

    Raises:
      RuntimeError: ``decode_kernel=True`` where this JAX has no Pallas Triton.
    """
    split = kernel_split
    if mesh is not None and mesh.devices.size > 1:
        from kvjax import sharding  # sharding imports the cache, which imports nothing here

        split = sharding.kernel_split(config, mesh, rules or sharding.DEFAULT_RULES)
        if split is None:
            decode_kernel = False
    check_kv_dtype(kv_dtype)
    is_quantized = kv_dtype in QUANTIZED
    same_dtype = kv_dtype is None or (not is_quantized and np.dtype(kv_dtype) == np.dtype(dtype))
    if decode_kernel and not kernel.available():
        raise RuntimeError("decode_kernel=True asks for kvjax's Pallas Triton decode kernel, "
                           "but this JAX has no Pallas Triton; pass decode_kernel=None or False")
    within_block = fresh or not use_cache
    softcap = config.attn_logit_softcap

    def layer(window: int | None) -> LayerAttention:
        mode = None
        if use_cache and not fresh and decode_kernel is not False and window is None \
                and softcap is None and (same_dtype or is_quantized):
            # over int8/fp8 codes too: on an H200 (batch 8, 16k filled) a decode step
            # through it took 7.5 ms, through the portable path 30.3 (docs/memory.md)
            if kernel.supported(config.head_dim, dtype, kv_dtype=kv_dtype):
                mode = "compiled"
            elif decode_kernel:  # any dtype and head_dim: the tests' float32 models too
                mode = "interpret"
        implementation = block_implementation(config.head_dim, dtype, softcap, window,
                                              over_cache=not within_block)
        if not (within_block or same_dtype):  # cuDNN takes one dtype for q, k and v
            implementation = "xla"
        return LayerAttention(implementation=implementation, kernel=mode, window=window,
                              split=split if mode else None, fresh=fresh,
                              key_limit=key_limit, quantized=use_cache and is_quantized)

    return AttentionPlan(tuple(layer(config.layer_window(i)) for i in range(config.num_layers)))


def attend_layer(config: ModelConfig, attention: LayerAttention, q: jax.Array, k: jax.Array,
                 v: jax.Array, layer_cache: tuple | None, positions: jax.Array,
                 slots: LayerSlots | PagedSlots | None = None, sink_queries: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple | None]:
    """A layer's attention as its ``LayerAttention`` says: the block's ``k``, ``v``
    (``[batch, seq, kv_heads, head_dim]``) written to the layer's part of the cache
    (``Cache.layer``: ``(keys, values)`` buffers ``[batch, kv_heads, capacity,
    head_dim]``, with scales for a quantized cache; None without a cache), then ``q``
    (``[batch, seq, heads, head_dim]``) attending. Returns ``(attn, layer_cache)``.

    ``slots``: how the layer's slots hold positions (``Cache.layer_slots``): a ring
    buffer (a sliding window or streaming, ``kvjax.attention.ring``) or a block pool
    (``PagedSlots``, ``kvjax.attention.paged``); None: slot = position.
    ``sink_queries``: ``q`` rotated for the sinks of streaming (``kvjax.attention.ring``)."""
    scale, softcap, window = config.query_scale, config.attn_logit_softcap, attention.window
    if layer_cache is not None and isinstance(slots, PagedSlots):
        (out,), layer_cache = attend_pool_blocks(config, attention, [(q, k, v, positions)],
                                                 layer_cache)
        return out, layer_cache
    if layer_cache is not None and slots is not None:
        window = slots.window  # streaming may narrow a layer's window
        if not attention.fresh or slots.sinks:
            return ring.attend(scale, softcap, slots, attention.fresh, attention.quantized, q, k,
                               v, layer_cache, positions, sink_queries)
        # a prompt starting the cache attends within itself (below), then keeps its window
        stored = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        if attention.quantized:
            stored = quantize_block(*stored, layer_kv_dtype(layer_cache))
        layer_cache = ring.write(layer_cache, stored, positions, slots)
    elif layer_cache is not None and attention.kernel and q.shape[1] == 1:
        step = kernel.attend_and_write_quantized if attention.quantized else kernel.attend_and_write
        out, *layer_cache = step(q, k, v, *layer_cache, positions, scale,
                                 interpret=attention.kernel == "interpret", split=attention.split)
        return out, tuple(layer_cache)
    elif layer_cache is not None:  # written [batch, kv_heads, seq, head_dim]
        block_keys, block_values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if attention.quantized:
            layer_cache = write_quantized_block(layer_cache, block_keys, block_values, positions)
        else:
            layer_cache = write_block(*layer_cache, block_keys, block_values, positions)
    if layer_cache is None or attention.fresh:  # attend within the given tokens
        return _attend_within(config, attention, q, k, v, positions, window), layer_cache
    if attention.quantized:
        if block_kernel_takes(config, attention, q, paged=False):
            out = kernel.attend_cached_block(q, layer_cache, positions, scale,
                                             interpret=attention.kernel == "interpret",
                                             split=attention.split)
            return out, layer_cache
        return quantized.attend_cache(q, *layer_cache, positions, window, scale, softcap,
                                      attention.key_limit), layer_cache
    keys, values = layer_cache
    if attention.implementation == "cudnn":
        return flash.attend_cache(q, k, v, keys, values, positions, scale), layer_cache
    return plain.attend_cache(q, keys, values, positions, window, scale, softcap,
                              attention.key_limit), layer_cache


def attend_pool_blocks(config: ModelConfig, attention: LayerAttention,
                       blocks: Sequence[tuple[jax.Array, ...]], layer_cache: tuple
                       ) -> tuple[list[jax.Array], tuple]:
    """``attend_layer`` over a paged layer (``PagedKVCache.layer``) for blocks of
    different rows: ``(q, k, v, positions)`` each (``[rows_i, seq_i, ...]``), their rows'
    tables in ``layer_cache``'s, in order. Returns each block's attention and the layer.

    Blocks the decode kernel takes write and attend in one kernel call; then the other
    blocks are all written, and only then attend. No attention reads a version of the
    pool that a later write replaces (in the order write, read, write, read, a CPU
    forward over a decode step and a chunk took 6x as long: XLA seems to copy the pool to
    write it after a read). Blocks of different rows never read each other's slots (a row
    writes only its own blocks), so the order does not change what any block sees.
    """
    scale, softcap, window = config.query_scale, config.attn_logit_softcap, attention.window
    *pools, tables = layer_cache
    starts = np.cumsum([0] + [q.shape[0] for q, *_ in blocks])
    table = lambda i: tables[starts[i]:starts[i + 1]]
    outs: list = [None] * len(blocks)
    for i, (q, k, v, positions) in enumerate(blocks):
        if paged.gpu_kernel_takes(q, (*pools, table(i)), attention.kernel, attention.split):
            outs[i], *pools = kernel.attend_and_write_paged(
                q, k, v, pools, table(i), positions, scale,
                interpret=attention.kernel == "interpret", split=attention.split)
    rest = [i for i, out in enumerate(outs) if out is None]
    for i in rest:
        _, k, v, positions = blocks[i]
        *pools, _ = paged.write((*pools, table(i)), k, v, positions, attention.quantized)
    for i in rest:
        q, k, v, positions = blocks[i]
        if attention.fresh:
            outs[i] = _attend_within(config, attention, q, k, v, positions, window)
        elif attention.implementation == "cudnn" and q.shape[1] > 1:  # a float pool, no window
            outs[i] = paged.attend_cache_cudnn(q, k, v, (*pools, table(i)), positions, scale,
                                               attention.key_limit)
        elif block_kernel_takes(config, attention, q, paged=True):
            outs[i] = kernel.attend_cached_block_paged(
                q, tuple(pools), table(i), positions, scale,
                interpret=attention.kernel == "interpret", split=attention.split)
        else:
            outs[i] = paged.attend_cache(q, (*pools, table(i)), positions, window, scale,
                                         softcap, attention.key_limit, attention.kernel)
    return outs, (*pools, tables)


def block_kernel_takes(config: ModelConfig, attention: LayerAttention, q: jax.Array,
                       paged: bool) -> bool:
    """Whether a block over int8/fp8 codes, written first, attends by the decode
    kernel's loop (``attend_cached_block``; the codes read in registers, not converted
    block by block in memory): where the layer's decode steps take the kernel, while
    its query rows fit the kernel's tiles (``block_takes``); over a pool only with rows
    whole on each device (a pool holds every row's blocks)."""
    rows_split = paged and attention.split is not None and attention.split.splits_rows()
    return (attention.quantized and attention.kernel is not None and not rows_split
            and kernel.block_takes(q.shape[1], config.queries_per_kv))


def _attend_within(config: ModelConfig, attention: LayerAttention, q: jax.Array, k: jax.Array,
                   v: jax.Array, positions: jax.Array, window: int | None) -> jax.Array:
    """A block attending within itself (an empty cache, or none), cuDNN's or XLA's."""
    if attention.implementation == "cudnn":
        return flash.attend_block(q, k, v, positions, window, config.query_scale)
    return plain.attend_block(q, k, v, positions, window, config.query_scale,
                              config.attn_logit_softcap)
