"""A paged KV cache: one pool of fixed-size blocks per layer, and a block table per row.

A contiguous cache reserves ``capacity`` slots for every row; a paged cache holds
``num_blocks`` blocks of ``block_size`` slots per layer, shared by all rows, and maps
each row's positions to blocks through its table: position ``p`` of row ``b`` is slot
``p % block_size`` of block ``block_tables[b, p // block_size]``. Memory then follows the
tokens rows actually hold, and rows whose prompts share a prefix can share its blocks
(``kvjax.paged``, which hands blocks out and decides which cached prefixes to keep).

The pool is heads-major (``[kv_heads, num_blocks, block_size, head_dim]``): one head's
slots of a block are contiguous, as a contiguous cache's row is, and the layout is the
one JAX's Pallas TPU paged attention reads (``kvjax.attention.paged``). Writes scatter each new token to its block and slot; attention reads a row's blocks
through its table, a few at a time (``kvjax.attention.paged``), never the whole pool.
int8/fp8 pools hold codes and a float32 scale per token and KV head, as
``QuantizedKVCache`` does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvjax.cache.base import advanced_lengths, check_cache_sizes, replace_at, tree_nbytes
from kvjax.cache.quantized import QUANTIZED
from kvjax.config import ModelConfig, is_count
from kvjax.paged.blocks import check_block_size

# The logical axes of a pool buffer [kv_heads, num_blocks, block_size, head_dim]
# (kvjax.sharding): blocks belong to any row, so they are never split over ``batch``.
POOL_AXES = ("kv_heads", "cache_blocks", "cache_seq", "head_dim")
SCALE_POOL_AXES = POOL_AXES[:3]


@dataclasses.dataclass(frozen=True)
class PagedSlots:
    """A layer of a paged cache (static): position ``p`` of a row is slot ``p %
    block_size`` of its table's block ``p // block_size``."""

    block_size: int


@struct.dataclass
class PagedKVCache:
    """Keys and values of every layer in a pool of blocks, and each row's block table.

    Attributes:
      keys, values: one pool per layer, each ``[kv_heads, num_blocks, block_size,
        head_dim]`` (float, or int8/fp8 codes).
      key_scales, value_scales: for codes, one per layer ``float32[kv_heads, num_blocks,
        block_size]``; empty tuples for a float pool.
      block_tables: ``int32[batch, blocks_per_row]``: row ``b``'s ``i``-th block holds its
        positions ``i * block_size ...``. Entries past what a row holds are never read.
      lengths: ``int32[batch]``, how many positions of each row were written.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_scales: tuple[jax.Array, ...]
    value_scales: tuple[jax.Array, ...]
    block_tables: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int, kv_dtype: str,
               *, block_size: int = 16, num_blocks: int | None = None) -> "PagedKVCache":
        """An empty pool of ``num_blocks`` blocks (default: ``batch`` rows of ``capacity``
        slots' worth) holding ``kv_dtype`` (a float dtype name, ``"int8"`` or ``"fp8"``),
        and tables giving row ``b`` the blocks ``b * blocks_per_row ...`` (a block manager
        replaces them: ``with_tables``)."""
        check_cache_sizes(batch, capacity)
        check_block_size(block_size, capacity)
        per_row = -(-capacity // block_size)
        num_blocks = batch * per_row if num_blocks is None else num_blocks
        if not is_count(num_blocks):
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        heads = (config.num_kv_heads, num_blocks, block_size)
        storage = QUANTIZED[kv_dtype][0] if kv_dtype in QUANTIZED else jnp.dtype(kv_dtype)
        pools = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        scales = (lambda: pools(heads, jnp.float32)) if kv_dtype in QUANTIZED else tuple
        tables = jnp.arange(batch * per_row, dtype=jnp.int32).reshape(batch, per_row) % num_blocks
        return cls(keys=pools((*heads, config.head_dim), storage),
                   values=pools((*heads, config.head_dim), storage),
                   key_scales=scales(), value_scales=scales(), block_tables=tables,
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.block_tables.shape[0]

    @property
    def block_size(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[1]

    @property
    def capacity(self) -> int:
        """Positions a row's table can hold."""
        return self.block_tables.shape[1] * self.block_size

    @property
    def quantized(self) -> bool:
        return bool(self.key_scales)

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)

    @property
    def is_full(self) -> jax.Array:
        return self.lengths >= self.capacity

    def layer_slots(self, index: int) -> PagedSlots:
        return PagedSlots(self.block_size)

    def layer(self, index: int) -> tuple:
        """One layer's pools ``(keys, values)`` (with ``(key_scales, value_scales)`` for
        codes), then the block tables."""
        scales = (self.key_scales[index], self.value_scales[index]) if self.quantized else ()
        return self.keys[index], self.values[index], *scales, self.block_tables

    def with_layer(self, index: int, layer: tuple) -> "PagedKVCache":
        """The cache with one layer's pools replaced (``layer`` as ``layer`` gives it)."""
        pools = layer[:-1]
        cache = self.replace(keys=replace_at(self.keys, index, pools[0]),
                             values=replace_at(self.values, index, pools[1]))
        if self.quantized:
            cache = cache.replace(key_scales=replace_at(self.key_scales, index, pools[2]),
                                  value_scales=replace_at(self.value_scales, index, pools[3]))
        return cache

    def with_tables(self, block_tables, lengths) -> "PagedKVCache":
        """The same pool with other rows: ``block_tables`` ``int32[rows, blocks_per_row]``
        and their ``lengths`` ``int32[rows]`` (host code; for a pool on a mesh they are
        placed whole on every device, as its rows are: ``check_mesh_rows``)."""
        tables, lengths = jnp.asarray(block_tables, jnp.int32), jnp.asarray(lengths, jnp.int32)
        # A traced pool (jax.eval_shape, jit) has no placement to follow.
        placed = getattr(self.block_tables, "sharding", None)
        if isinstance(placed, NamedSharding):
            tables, lengths = jax.device_put((tables, lengths),
                                             NamedSharding(placed.mesh, PartitionSpec()))
        return self.replace(block_tables=tables, lengths=lengths)

    def advance(self, positions: jax.Array) -> "PagedKVCache":
        return self.replace(lengths=advanced_lengths(self.lengths, positions))

    def logical_axes(self) -> "PagedKVCache":
        """Pools ``(kv_heads, cache_blocks, cache_seq, head_dim)`` (scales without
        ``head_dim``), tables ``(batch, cache_blocks)``, lengths ``(batch,)``."""
        count = len(self.keys)
        scales = (SCALE_POOL_AXES,) * count if self.quantized else ()
        return PagedKVCache(keys=(POOL_AXES,) * count, values=(POOL_AXES,) * count,
                            key_scales=scales, value_scales=scales,
                            block_tables=("batch", "cache_blocks"), lengths=("batch",))


def check_mesh_rows(mesh: Mesh | None, rules) -> None:
    """Raises ``ValueError`` unless ``mesh`` keeps a pool's rows whole on every device:
    a pool holds every row's blocks, so splitting rows over devices would give each
    device a diverging copy. Heads may split (``rules.kv_heads``); the batch's axes
    (``rules.batch``) must have size 1."""
    if mesh is None:
        return
    axes = rules.batch if isinstance(rules.batch, tuple) else (rules.batch,)
    size = 1
    for axis in axes:
        size *= mesh.shape.get(axis, 1) if axis is not None else 1
    if size > 1:
        raise ValueError(f"a paged pool holds every row's blocks, so its rows cannot split over "
                         f"devices, but this mesh splits the batch {size} ways "
                         f"({dict(mesh.shape)}); use a mesh whose batch axes have size 1 "
                         f"(e.g. data=1,model={mesh.devices.size}): the heads split instead")


def slot_addresses(block_tables: jax.Array, positions: jax.Array, block_size: int,
                   num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """``(blocks, slots)``, each ``int32[batch, new]``: where each position of a block of
    tokens (``int32[batch, new]``, ``-1`` = padding) is written; padding gets block
    ``num_blocks`` (out of range: not written)."""
    real = positions >= 0
    index = jnp.where(real, positions, 0) // block_size  # [batch, new]
    blocks = jnp.take_along_axis(block_tables, index, axis=1)
    return jnp.where(real, blocks, num_blocks), jnp.where(real, positions % block_size, 0)


def write_pool(pool: jax.Array, block: jax.Array, blocks: jax.Array,
               slots: jax.Array) -> jax.Array:
    """``pool`` (``[kv_heads, num_blocks, block_size, ...]``) with a block of tokens
    (``[batch, kv_heads, new, ...]``) written at ``(blocks, slots)`` (``slot_addresses``);
    scattered, in place when the cache is donated."""
    moved = jnp.moveaxis(block, 1, 0)  # [kv_heads, batch, new, ...]
    return pool.at[:, blocks, slots].set(moved.astype(pool.dtype), mode="drop")
