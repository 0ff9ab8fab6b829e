"""``PrefixCache``: a paged KV pool shared by requests, keeping the prefixes they computed.

A ``PrefixCache`` owns the device pool (``kvjax.cache.PagedKVCache``'s buffers, one pool
per layer), an optional host tier of blocks, and a ``BlockManager``
(``kvjax.paged.blocks``) that decides which blocks each row reads and writes. A request
given one (``kvjax.generate(..., prefix_cache=pc)``, ``generate_stream``,
``ChatSession``) gets, per row, a block table whose first blocks hold the longest cached
prefix of its prompt; the row prefills only the rest, from there on, and when it ends its
full blocks are kept for later requests until the budget needs them back.

The pool lives between requests in this object: each run takes it (donated), writes its
rows' blocks and hands it back. The host tier holds blocks evicted from the device, in
pinned host memory where the backend offers it (``jax.sharding`` memory kinds), and a
later hit copies them back instead of recomputing them.

For a model on a mesh the pool is created sharded as the model's rules place a cache
(KV heads over the model axis), and the rows stay whole on every device
(``kvjax.cache.paged.check_mesh_rows``): tensor parallelism within a pool.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from kvjax import sharding
from kvjax.cache.base import tree_nbytes
from kvjax.cache.paged import PagedKVCache, check_mesh_rows
from kvjax.cache.quantized import check_storable
from kvjax.cache import check_kv_dtype
from kvjax.config import is_count
from kvjax.paged.blocks import Allocation, BlockManager, chain_keys, check_block_size


class PrefixCache:
    """A pool of KV blocks for one model, and the cached prefixes it keeps.

    Args:
      model: the ``kvjax.Model`` it serves (requests of another model are refused).
      block_size: slots per block, a power of two; prefixes are shared in whole blocks.
      budget_blocks: device blocks in the pool; or ``budget_bytes`` (one of the two):
        the pool's bytes, rounded down to whole blocks.
      policy: which unreferenced cached block gives way first on the device: ``"lru"``,
        ``"lfu"`` or ``"lru-k"`` (``lru_k`` accesses; ``kvjax.paged.blocks``).
      host_budget_blocks: blocks of the host tier (0: evicted blocks are dropped); or
        ``host_budget_bytes``, rounded down to whole blocks. ``host_policy`` orders its
        evictions.
      kv_dtype: what the pool stores (as in ``kvjax.generate``; None: the model's dtype).

    Raises:
      ValueError: bad sizes (each message names the fix), a mesh that splits rows.
    """

    def __init__(self, model, *, block_size: int = 16, budget_blocks: int | None = None,
                 budget_bytes: int | None = None, policy: str = "lru", lru_k: int = 2,
                 host_budget_blocks: int = 0, host_budget_bytes: int | None = None,
                 host_policy: str = "lru", kv_dtype: str | None = None):
        check_mesh_rows(model.mesh, model.rules)
        check_block_size(block_size)
        check_kv_dtype(kv_dtype)
        check_storable(kv_dtype)
        self.kv_dtype = kv_dtype or jnp.dtype(model.dtype).name
        self.block_bytes = block_bytes(model.config, block_size, self.kv_dtype)
        if (budget_blocks is None) == (budget_bytes is None):
            raise ValueError("give the pool's size as budget_blocks or budget_bytes (one of "
                             "the two)")
        if budget_bytes is not None:
            if not is_count(budget_bytes, 0):
                raise ValueError(f"budget_bytes must be an integer >= 0, got {budget_bytes!r}")
            budget_blocks = budget_bytes // self.block_bytes
            if budget_blocks < 1:
                raise ValueError(f"budget_bytes ({budget_bytes:,}) holds no block of "
                                 f"{self.block_bytes:,} bytes ({block_size} slots); pass at "
                                 f"least {self.block_bytes:,}")
        if host_budget_bytes is not None:
            if not is_count(host_budget_bytes, 0):
                raise ValueError(f"host_budget_bytes must be an integer >= 0, got "
                                 f"{host_budget_bytes!r}")
            host_budget_blocks = host_budget_bytes // self.block_bytes
        self.model_key = _model_key(model)
        self.manager = BlockManager(budget_blocks, block_size, policy=policy, lru_k=lru_k,
                                    host_blocks=host_budget_blocks, host_policy=host_policy,
                                    block_bytes=self.block_bytes)
        self.block_size = block_size
        create = functools.partial(PagedKVCache.create, block_size=block_size,
                                   num_blocks=budget_blocks)
        args = (model.config, 1, block_size, self.kv_dtype)
        self.pool = (create(*args) if model.mesh is None else
                     sharding.create_sharded(model.config, model.mesh, model.rules, create, *args))
        self.host: dict[int, tuple] = {}  # host slot -> the block's buffers, [kv_heads, 1, ...]
        self._host_kind = _host_memory_kind(self.pool)

    def check_model(self, model) -> None:
        """Raises ``ValueError`` unless this cache was built for ``model``'s config, dtype
        and mesh (a block's K/V mean nothing to another model)."""
        if _model_key(model) != self.model_key:
            raise ValueError("this prefix cache was built for another model (config, dtype or "
                             "mesh differ); build a PrefixCache for each model")

    def allocate(self, rows: Sequence[Sequence[int]], reserve: int) -> list[Allocation]:
        """Blocks for each row (its prompt's token ids, then up to ``reserve`` more
        tokens), the cached prefix shared; performs each row's transfers (offloads,
        restores, copy-on-write) before the next row is allocated. All or nothing: on
        ``PoolExhausted`` the rows allocated so far are released."""
        allocations: list[Allocation] = []
        try:
            for tokens in rows:
                allocation = self.manager.allocate(tokens, reserve)
                self._transfer(allocation)
                allocations.append(allocation)
        except Exception:
            for allocation, tokens in zip(allocations, rows):
                self.manager.release(allocation, list(tokens)[:allocation.cached_tokens])
            raise
        return allocations

    def allocate_sharing(self, rows: Sequence[Sequence[int]], reserve: int,
                         prefill: Callable[[PagedKVCache, list, list], PagedKVCache]
                         ) -> tuple[list[Allocation], list[int]]:
        """``allocate`` for rows that run together, where rows sharing a prefix that no
        cached block holds yet compute it once: one row of each such group (``leading_rows``)
        is allocated and prefilled first through the blocks it shares, which are then
        cached (``BlockManager.publish``), and the others are allocated after it, sharing
        them as any later request would.

        Args:
          rows: each row's prompt token ids.
          reserve: tokens each row writes after its prompt.
          prefill: ``prefill(cache, segments, starts)`` writes the K/V of each row's
            ``segments[row]`` (token ids) from position ``starts[row]`` into ``cache``
            (the pool with those rows' tables, from ``cache_for``) and returns the pool.

        Returns:
          ``(allocations, starts)``: each row's blocks, and the position its prefill
          starts at (its cached tokens; for a leading row, the end of what it prefilled).
          All or nothing, as ``allocate``: on an error every row is released.
        """
        allocations: dict[int, Allocation] = {}
        starts: dict[int, int] = {}
        pending = list(range(len(rows)))
        try:
            while leaders := leading_rows(self.manager, [rows[i] for i in pending]):
                chosen = [pending[i] for i in leaders]
                taken = self.allocate([rows[i] for i in chosen], reserve)
                allocations.update(zip(chosen, taken))
                begin = [allocation.cached_tokens for allocation in taken]
                ends = list(leaders.values())
                self.pool = prefill(self.cache_for(taken), [
                    list(rows[i][start:end]) for i, start, end in zip(chosen, begin, ends)], begin)
                for i, allocation, end in zip(chosen, taken, ends):
                    self.manager.publish(allocation, list(rows[i][:end]))
                    starts[i] = end
                pending = [i for i in pending if i not in allocations]
            allocations.update(zip(pending, self.allocate([rows[i] for i in pending], reserve)))
        except Exception:
            for i, allocation in allocations.items():
                self.manager.release(allocation, list(rows[i])[:starts.get(
                    i, allocation.cached_tokens)])
            raise
        ordered = [allocations[i] for i in range(len(rows))]
        return ordered, [starts.get(i, a.cached_tokens) for i, a in enumerate(ordered)]

    def cache_for(self, allocations: Sequence[Allocation],
                  starts: Sequence[int] | None = None) -> PagedKVCache:
        """The pool with the rows' block tables (``int32[rows, width]``, the width a power
        of two so that nearby sizes share a program) and lengths: ``starts``, the tokens
        their blocks hold (default: their cached tokens)."""
        width = 1 << (max(len(a.blocks) for a in allocations) - 1).bit_length()
        tables = np.zeros((len(allocations), width), np.int32)
        for row, allocation in enumerate(allocations):
            tables[row, :len(allocation.blocks)] = allocation.blocks
        if starts is None:
            starts = [allocation.cached_tokens for allocation in allocations]
        return self.pool.with_tables(tables, starts)

    def release(self, allocations: Sequence[Allocation], cache: PagedKVCache,
                sequences: Sequence[Sequence[int]]) -> None:
        """Takes the pool back from a run's final ``cache`` and ends its rows:
        ``sequences[row]`` is the row's prompt then its generated tokens, of which the
        first ``cache.lengths[row]`` are in its blocks."""
        self.pool = cache
        lengths = np.asarray(jax.device_get(cache.lengths))
        for allocation, sequence, length in zip(allocations, sequences, lengths):
            self.manager.release(allocation, list(sequence)[:int(length)])

    def stats(self) -> dict:
        """``BlockManager.stats()`` (hit rate, block hits and misses, evictions and bytes
        by tier, blocks in use and free, fragmentation) and the cache's settings."""
        return {**self.manager.stats(), "block_size": self.block_size,
                "block_bytes": self.block_bytes, "kv_dtype": self.kv_dtype}

    def _transfer(self, allocation: Allocation) -> None:
        """An allocation's offloads (device -> host), then restores (host -> device) and
        copy-on-write copies (device -> device)."""
        buffers = _buffers(self.pool)
        to_host = lambda block: jax.device_put(block, block.sharding.with_memory_kind(
            self._host_kind))
        for block, slot in allocation.offloads:  # copies only: no work on host memory
            taken = _take(buffers, np.array([block]))
            self.host[slot] = jax.tree.map(to_host, taken) if self._host_kind else taken
        if allocation.restores:
            slots, blocks = map(np.asarray, zip(*allocation.restores))
            moved = [jax.tree.map(lambda block, buffer: jax.device_put(block, buffer.sharding),
                                  self.host.pop(int(slot)), buffers) for slot in slots]
            buffers = _put(buffers, jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=1),
                                                 *moved), blocks)
        if allocation.copies:
            sources, targets = map(np.asarray, zip(*allocation.copies))
            buffers = _put(buffers, _take(buffers, sources), targets)
        self.pool = _with_buffers(self.pool, buffers)


def leading_rows(manager: BlockManager, rows: Sequence[Sequence[int]]) -> dict[int, int]:
    """Which of ``rows`` (prompts about to be allocated together) to prefill first so that
    a prefix several of them share, and no cached block holds yet, is computed once:
    ``{row index: end}``, the row then prefilled through token ``end`` (a multiple of the
    block size) and its blocks cached before the others are allocated.

    Rows are grouped by their first full block that is not cached (only blocks wholly
    before a row's last token count: a row always computes its last token). A group of two
    rows or more has one leader, the row sharing the most blocks with the others (the
    first such row on a tie), which prefills them all; the others of its group share its
    blocks, and those whose prompts continue together past them form a group of their own
    in the next call. Leaders of different groups hold different blocks (equal chained keys
    mean equal prefixes), so they prefill together.
    """
    chains = []
    for tokens in rows:
        keys = list(chain_keys(list(tokens)[:-1], manager.block_size))
        first = next((i for i, key in enumerate(keys) if not manager.is_cached(key)), len(keys))
        chains.append((first, keys))
    counts = Counter(key for first, keys in chains for key in keys[first:])
    best: dict[bytes, tuple[int, int]] = {}  # first uncached key -> (blocks shared, row)
    for row, (first, keys) in enumerate(chains):
        shared = first
        while shared < len(keys) and counts[keys[shared]] > 1:
            shared += 1
        if shared > first and shared > best.get(keys[first], (0, 0))[0]:
            best[keys[first]] = (shared, row)
    return {row: shared * manager.block_size for shared, row in sorted(
        best.values(), key=lambda leader: leader[1])}


def block_bytes(config, block_size: int, kv_dtype: str) -> int:
    """Bytes one block holds over all layers (keys, values and, for codes, scales)."""
    one = jax.eval_shape(lambda: PagedKVCache.create(config, 1, block_size, kv_dtype,
                                                     block_size=block_size, num_blocks=1))
    return tree_nbytes((one.keys, one.values, one.key_scales, one.value_scales))


def _model_key(model) -> tuple:
    return model.config, jnp.dtype(model.dtype).name, model.mesh, model.rules


def _buffers(pool: PagedKVCache) -> tuple:
    """The pool's per-layer buffers, ``[kv_heads, num_blocks, ...]`` each."""
    return pool.keys, pool.values, pool.key_scales, pool.value_scales


def _with_buffers(pool: PagedKVCache, buffers: tuple) -> PagedKVCache:
    keys, values, key_scales, value_scales = buffers
    return pool.replace(keys=keys, values=values, key_scales=key_scales,
                        value_scales=value_scales)


@jax.jit
def _take(buffers, index):
    """Blocks ``index`` of every buffer: ``[kv_heads, n, ...]`` each."""
    return jax.tree.map(lambda buffer: buffer[:, index], buffers)


@functools.partial(jax.jit, donate_argnums=0)
def _put(buffers, blocks, index):
    """``buffers`` with ``blocks`` (``[kv_heads, n, ...]`` each) written at ``index``, in
    place."""
    return jax.tree.map(lambda buffer, block: buffer.at[:, index].set(block), buffers, blocks)


def _host_memory_kind(pool: PagedKVCache) -> str | None:
    """Where the host tier keeps blocks: ``"pinned_host"`` where the pool's devices offer
    it (copies to and from the device then need no staging; a block keeps its sharding
    over the devices), else None: a copy in the pool's own memory."""
    kinds = {memory.kind for device in pool.keys[0].devices()
             for memory in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None
