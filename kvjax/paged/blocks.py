"""Which pool blocks hold which tokens: the host side of the paged KV cache (issue 28).

The device holds a pool of ``num_blocks`` blocks of ``block_size`` slots per layer and a
block table per row (``kvjax.cache.paged``). ``BlockManager`` decides, per request row,
which blocks its table lists, which of them it shares with other rows through cached
prefixes, and which cached blocks give way when the pool runs short. It is plain Python
(no JAX): it runs on the host once per request, and a call costs O(blocks it touches)
dict and heap operations, whatever the pool's size.

Prefix cache. A FULL block is named by a chained key, ``key_i = blake2b(key_{i-1} ||
tokens of block i)``: equal keys mean equal whole prefixes, so the same tokens after
different prefixes never share K/V (vLLM's automatic prefix caching names blocks the same
way, the parent's hash chained with the block's tokens). Only full blocks are named: a
row's last partial block is private, so a shared block is never written. The cached
blocks form a tree (a block's parent is the block before it in its prefix), as in
sglang's radix cache; a lookup walks a prompt's keys until the first miss, and the row
takes a reference on each block found. A running row may cache the full blocks it has
written before it ends (``publish``): rows allocated while it still runs then share them,
as the serving engine's requests do.

Eviction. When no block is free, a fresh block is taken from an unreferenced cached one
(vLLM: freed blocks stay cached until their slot is needed, least recently used first),
and only from a leaf, so no prefix is left with a hole (sglang: a heap of unlocked
leaves). Which leaf goes first is the tier's policy (``POLICIES``); the candidates sit in
a heap per tier, invalidated lazily.

Host tier (``host_blocks > 0``): a device block that gives way moves to a host slot (an
*offload*) instead of being dropped, and a later hit brings it back (a *restore*), as in
sglang's hierarchical cache. What "leaf" means per tier, so that nothing is dropped while
a cached descendant remains in either tier:

* a device leaf has no cached child ON THE DEVICE (children on the host may remain):
  moving it to the host drops nothing, and its host children keep their parent;
* a host leaf has no cached child in either tier; only host leaves are dropped.

The blocks on the device are closed under taking parents (a device block's parent is on
the device), so a prompt's cached prefix is some device blocks followed by host blocks.
Restores run in prefix order and a row's release moves a block it finds on the host back
to the row's device copy, which keeps that so. When the host tier has no room (there is
none, or it is full and its only leaves are blocks the same allocation restores), a
device victim is dropped; it then has no child in either tier (a host child's subtree
would hold a host leaf no allocation restores).

Policies (``O'Neil, O'Neil and Weikum 1993`` for LRU-K), each an order over a block's
accesses (hits on ``allocate``, registration on ``release``), counted by a logical clock
that ticks once per block access, so runs are deterministic:

* ``"lru"``: least recently accessed first;
* ``"lfu"``: fewest accesses first, ties least recently accessed first;
* ``"lru-k"``: largest backward K-distance first (time since the K-th most recent access,
  infinite below K accesses), ties least recently accessed first. One-off blocks (a
  scanned document) go before blocks used K times, which LRU does not do. A block's
  history is forgotten when it is dropped (no retained-information period).

The caller's part, per allocation, in the order ``allocate`` returned them: perform
``offloads`` (device -> host), then ``restores`` (host -> device), then ``copies`` (device
-> device; a copy's source may be a block just restored), then run the row; ``release``
the row when it is done. Performing each
allocation's transfers before the next allocation's keeps every read before the write
that reuses its block or slot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
from array import array
from collections import deque
from typing import Iterator, Sequence

from kvjax.config import is_count

POLICIES = ("lru", "lfu", "lru-k")
TIERS = ("device", "host")


def check_block_size(block_size, capacity: int | None = None) -> None:
    """Raises ``ValueError`` unless ``block_size`` is a power of two (at most
    ``capacity``, the positions a row's table spans)."""
    if not (is_count(block_size) and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two >= 1 (slots a block; 16 is the "
                         f"usual choice), got {block_size!r}")
    if capacity is not None and block_size > capacity:
        raise ValueError(f"block_size ({block_size}) exceeds the capacity ({capacity}): a row's "
                         f"table would hold less than one block; pass block_size <= {capacity}")


class PoolExhausted(ValueError):
    """A row needs more blocks than the pool has free or evictable (everything else is
    held by running rows)."""


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One row's blocks, from ``BlockManager.allocate``.

    Attributes:
      blocks: the row's block table: device block ids, one per ``block_size`` positions
        of its prompt and reserve. The first ``cached_tokens // block_size`` are shared
        cached blocks the row only reads; the rest are the row's own (the copy-on-write
        block, its partial block and all after).
      cached_tokens: leading prompt tokens whose K/V the blocks already hold: the row's
        prefill starts there. At most ``len(tokens) - 1``: the row computes its last
        prompt token, whose logits it needs.
      offloads: ``(device_block, host_slot)`` copies to perform first, before anything
        overwrites those device blocks.
      restores: ``(host_slot, device_block)`` copies of cached blocks back to the device.
      copies: ``(src_device_block, dst_device_block)``: copy-on-write of a whole cached
        prompt's last block into the row's own block, which the row then writes (the
        row holds the source until its release).
    """

    blocks: tuple[int, ...]
    cached_tokens: int
    offloads: tuple[tuple[int, int], ...] = ()
    restores: tuple[tuple[int, int], ...] = ()
    copies: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(eq=False)
class _Cached:
    """A cached full block: a node of the prefix tree, in one tier at a time."""

    key: bytes
    parent: _Cached | None
    tier: str | None  # "device", "host"; None once dropped
    where: int  # device block id or host slot
    recent: deque  # the clock at its last K accesses, oldest first
    accesses: int = 0
    refs: int = 0  # running rows reading it (and, within allocate, a restore pending)
    children: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(TIERS, 0))


def chain_keys(tokens: Sequence[int], block_size: int) -> Iterator[bytes]:
    """The keys of the full blocks of ``tokens``, in order: ``key_i = blake2b(key_{i-1}
    || block i's tokens as int64)``, ``key_{-1}`` empty. Stable across processes (unlike
    ``hash()``); a 128-bit digest, so collisions are negligible."""
    data = array("q", tokens).tobytes()
    step = 8 * block_size
    key = b""
    for start in range(0, len(data) - step + 1, step):
        key = hashlib.blake2b(key + data[start:start + step], digest_size=16).digest()
        yield key


def _eviction_order(policy: str, k: int, block: _Cached) -> tuple:
    """The sort key of an evictable block under ``policy``: the smallest goes first.
    Constant between the block's accesses, so a heap entry stays valid until the next."""
    last = block.recent[-1]
    if policy == "lru":
        return (last,)
    if policy == "lfu":
        return (block.accesses, last)
    return (0, last) if block.accesses < k else (1, block.recent[0])  # recent[0]: K-th latest


class BlockManager:
    """Hands out pool blocks to rows, shares cached prefixes and evicts under the budget.

    Args:
      num_blocks: device blocks in the pool (ids ``0 .. num_blocks - 1``).
      block_size: slots a block (a power of two).
      policy: the device tier's eviction order, one of ``POLICIES``.
      lru_k: the K of ``"lru-k"`` (either tier).
      host_blocks: host-tier slots (0: no host tier; evicted blocks are dropped).
      host_policy: the host tier's eviction order.
      block_bytes: bytes one block holds on the device (all layers), for ``stats``.

    Raises:
      ValueError: sizes out of range or an unknown policy, naming what fits.
    """

    def __init__(self, num_blocks: int, block_size: int, *, policy: str = "lru", lru_k: int = 2,
                 host_blocks: int = 0, host_policy: str = "lru", block_bytes: int = 0):
        check_block_size(block_size)
        if not is_count(num_blocks):
            raise ValueError(f"num_blocks must be an integer >= 1 (device blocks in the pool), "
                             f"got {num_blocks!r}")
        if not is_count(host_blocks, 0):
            raise ValueError(f"host_blocks must be an integer >= 0 (host-tier blocks; 0: no host "
                             f"tier), got {host_blocks!r}")
        if not is_count(block_bytes, 0):
            raise ValueError(f"block_bytes must be an integer >= 0 (bytes a block holds), got "
                             f"{block_bytes!r}")
        for name, value in (("policy", policy), ("host_policy", host_policy)):
            if value not in POLICIES:
                raise ValueError(f"{name} must be one of {', '.join(POLICIES)}, got {value!r}")
        if not is_count(lru_k):
            raise ValueError(f"lru_k must be an integer >= 1 (the K of lru-k: accesses a block "
                             f"remembers; 1 is plain lru), got {lru_k!r}")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self.host_blocks, self.block_bytes, self.lru_k = int(host_blocks), int(block_bytes), int(lru_k)
        self.policies = {"device": policy, "host": host_policy}
        self._cached: dict[bytes, _Cached] = {}  # key -> cached block
        self._at = {tier: {} for tier in TIERS}  # tier -> {block id or slot: _Cached}
        self._free = {"device": list(range(self.num_blocks)),  # heaps: lowest id first
                      "host": list(range(self.host_blocks))}
        self._candidates = {tier: [] for tier in TIERS}  # heaps of (order, seq, _Cached)
        self._seq = itertools.count()
        self._clock = 0
        self._in_use = 0  # device blocks running rows hold (shared or their own)
        self._running: dict[int, tuple[Allocation, int]] = {}  # id -> (allocation, reserved)
        self._published: dict[int, int] = {}  # id -> the row's own blocks it cached (publish)
        self._counts = dict.fromkeys(("prompt_tokens", "cached_tokens", "block_hits",
                                      "block_misses", "restored_blocks", "offloaded_blocks",
                                      "device_evictions", "host_evictions"), 0)

    # ----- the two calls a request makes -----

    def allocate(self, tokens: Sequence[int], reserve: int) -> Allocation:
        """The blocks of a row whose prompt is ``tokens`` and which writes up to ``reserve``
        tokens after them: the longest cached prefix of full blocks, shared (referenced),
        then fresh blocks from the free list or by eviction. All or nothing.

        Raises:
          PoolExhausted: fewer blocks are free or evictable than the row needs (its fresh
            blocks and the unreferenced cached blocks it would share); the manager is
            left as it was.
          ValueError: empty ``tokens`` or a ``reserve`` below 0.
        """
        if len(tokens) == 0:
            raise ValueError("tokens must hold at least one token: a row computes its last "
                             "prompt token's logits")
        if not is_count(reserve, 0):
            raise ValueError(f"reserve must be an integer >= 0 (tokens the row writes after its "
                             f"prompt), got {reserve!r}")
        size = self.block_size
        hits = []  # the cached prefix, root first
        for key in chain_keys(tokens, size):
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        whole = len(hits) * size == len(tokens)  # every token cached: copy-on-write the last
        shared = len(hits) - whole  # table entries shared with the cache
        table = -(-(len(tokens) + reserve) // size)
        restoring = [block for block in hits if block.tier == "host"]
        fresh = len(restoring) + table - shared
        needed = fresh + sum(block.tier == "device" and block.refs == 0 for block in hits)
        if needed > self.num_blocks - self._in_use:
            raise PoolExhausted(
                f"the pool has {self.num_blocks} blocks of {size} slots, {self._in_use} in use "
                f"by running rows; this row needs {needed}: raise budget_blocks "
                "(prefix_cache_mb) or run fewer rows at once")

        self._in_use += needed
        for block in hits:  # referenced first: neither tier evicts them below
            self._access(block)
            block.refs += 1
        offloads: dict[int, int] = {}  # host slot -> device block
        new = [self._fresh_block(offloads) for _ in range(fresh)]
        restores = []
        for block, target in zip(restoring, new):  # root first: each one's parent is back
            restores.append((block.where, target))
            heapq.heappush(self._free["host"], block.where)
            self._move(block, "device", target)
        own = new[len(restoring):]
        copies = ((hits[-1].where, own[0]),) if whole else ()
        allocation = Allocation(blocks=tuple([block.where for block in hits[:shared]] + own),
                                cached_tokens=len(hits) * size - whole,
                                offloads=tuple((block, slot) for slot, block in offloads.items()),
                                restores=tuple(restores), copies=copies)
        self._running[id(allocation)] = (allocation, len(tokens) + reserve)
        counts = self._counts
        counts["prompt_tokens"] += len(tokens)
        counts["cached_tokens"] += allocation.cached_tokens
        counts["block_hits"] += len(hits)
        counts["block_misses"] += len(tokens) // size - len(hits)
        counts["restored_blocks"] += len(restores)
        counts["offloaded_blocks"] += len(allocation.offloads)
        return allocation

    def release(self, allocation: Allocation, tokens: Sequence[int]) -> None:
        """Ends a row: registers each of its full blocks under its chained key (a key
        already cached keeps its block and the row's duplicate is freed; one found on the
        host moves back to the row's device copy), drops the row's references and frees
        its blocks that hold no full block. Blocks the row published (``publish``) are
        cached already: the row only drops its references to them.

        Args:
          allocation: what ``allocate`` returned for the row.
          tokens: the row's prompt and then the tokens whose K/V the row wrote (its
            generated tokens but possibly the last), exactly what its blocks hold: the
            cached prefix alone (``tokens[:cached_tokens]``) for a row that never ran.

        Raises:
          ValueError: an allocation that is not running, or ``tokens`` that do not fit it.
        """
        size = self.block_size
        entry = self._running.get(id(allocation))
        if entry is None or entry[0] is not allocation:
            raise ValueError("release got an allocation that is not running (released already, "
                             "or from another BlockManager): release each allocation once")
        capacity = len(allocation.blocks) * size
        if not allocation.cached_tokens <= len(tokens) <= capacity:
            raise ValueError(f"release got {len(tokens)} tokens for a row of {capacity} slots "
                             f"with {allocation.cached_tokens} cached: pass the prompt and the "
                             f"tokens the row wrote, between {allocation.cached_tokens} (a row "
                             f"that never ran) and {capacity}")
        keys = list(chain_keys(tokens, size))
        shared = allocation.cached_tokens // size + self._published.get(id(allocation), 0)
        held = [self._at["device"][block] for block in allocation.blocks[:shared]]
        held += [self._at["device"][src] for src, _ in allocation.copies]
        if [block.key for block in held][:len(keys)] != keys[:len(held)]:
            raise ValueError(f"release got tokens whose first {len(held) * size} differ from the "
                             "prompt given to allocate: pass that prompt, then the tokens the "
                             "row wrote")

        del self._running[id(allocation)]
        self._published.pop(id(allocation), None)
        for block in held:
            block.refs -= 1
            if block.refs == 0:
                self._in_use -= 1
                self._offer(block)
        parent = held[-1] if held else None
        self._in_use -= len(allocation.blocks) - shared
        for index in range(shared, len(allocation.blocks)):
            device_block = allocation.blocks[index]
            if index >= len(keys):  # a partial or unwritten block
                heapq.heappush(self._free["device"], device_block)
                continue
            block = self._cached.get(keys[index])
            if block is None:
                block = self._register(keys[index], parent, device_block)
            elif block.tier == "host":
                heapq.heappush(self._free["host"], block.where)
                self._move(block, "device", device_block)
            else:
                heapq.heappush(self._free["device"], device_block)
            if index >= len(held):  # not a block this row hit (those were accessed then)
                self._access(block)
                self._offer(block)
            parent = block

    def publish(self, allocation: Allocation, tokens: Sequence[int]) -> int:
        """Caches the full blocks a running row has written so far, so that rows allocated
        from now on share them while it still runs (``release`` alone caches them when it
        ends). Its blocks are registered in table order from the first one not cached yet,
        up to the first whose key another row cached first (or a copy-on-write row's
        first own block, whose key its source holds); the row holds them (a reference
        each) until its release.

        Args:
          allocation: a running row's, from ``allocate``.
          tokens: the row's prompt and then the tokens whose K/V it wrote so far (as
            ``release`` takes them); fewer than it published before publish nothing.

        Returns:
          How many of the row's own blocks are published now.

        Raises:
          ValueError: an allocation that is not running, or ``tokens`` that do not
            continue what the row holds.
        """
        entry = self._running.get(id(allocation))
        if entry is None or entry[0] is not allocation:
            raise ValueError("publish got an allocation that is not running (released already, "
                             "or from another BlockManager)")
        size = self.block_size
        first = allocation.cached_tokens // size
        index = first + self._published.get(id(allocation), 0)  # the next block to publish
        keys = list(chain_keys(tokens, size))
        parent = self._at["device"][allocation.blocks[index - 1]] if index else None
        if parent is not None and len(keys) >= index and keys[index - 1] != parent.key:
            raise ValueError("publish got tokens that differ from what the row holds: pass its "
                             "prompt, then the tokens it wrote")
        while index < len(keys) and keys[index] not in self._cached:
            parent = self._register(keys[index], parent, allocation.blocks[index])
            parent.refs = 1  # the row's own block: counted in use already
            self._access(parent)
            index += 1
        self._published[id(allocation)] = index - first
        return index - first

    def is_cached(self, key: bytes) -> bool:
        """Whether the block of chained key ``key`` (``chain_keys``) is cached, in either
        tier: a row allocated now would share it."""
        return key in self._cached

    def stats(self) -> dict:
        """Counters since the manager was made, and its state now.

        * ``hit_rate``: ``cached_tokens / prompt_tokens`` (0.0 before any allocation).
        * ``prompt_tokens``, ``cached_tokens``: summed over allocations (cached: served
          from the cache, the prefill skipped).
        * ``block_hits``, ``block_misses``: full prompt blocks found in the cache / not
          (a block after the first miss counts as a miss; a whole cached prompt's last
          block, copied, as a hit).
        * ``restored_blocks``, ``offloaded_blocks``: blocks copied host -> device /
          device -> host.
        * ``evictions``: ``{"device": blocks that gave way on the device (offloaded or
          dropped), "host": host blocks dropped}``.
        * ``blocks``: per tier ``{"in_use": held by running rows, "cached": holding a
          cached block no row holds, "free": holding nothing, "total": the tier's
          size}``; host blocks are never held by rows (rows read the device).
        * ``bytes_in_use``: per tier, blocks holding data (in use or cached) x
          ``block_bytes``.
        * ``fragmentation``: over running rows, the slots of their blocks they did not
          reserve (``prompt + reserve``) / the slots of their blocks (0.0 with none): the
          waste of rounding rows up to whole blocks.
        * ``running_rows``: rows allocated and not yet released.
        """
        counts = self._counts
        free = {tier: len(self._free[tier]) for tier in TIERS}
        cached = {"device": self.num_blocks - self._in_use - free["device"],
                  "host": len(self._at["host"])}
        total = {"device": self.num_blocks, "host": self.host_blocks}
        in_use = {"device": self._in_use, "host": 0}
        slots = sum(len(a.blocks) for a, _ in self._running.values()) * self.block_size
        reserved = sum(r for _, r in self._running.values())
        return {
            "hit_rate": (counts["cached_tokens"] / counts["prompt_tokens"]
                         if counts["prompt_tokens"] else 0.0),
            "prompt_tokens": counts["prompt_tokens"],
            "cached_tokens": counts["cached_tokens"],
            "block_hits": counts["block_hits"],
            "block_misses": counts["block_misses"],
            "restored_blocks": counts["restored_blocks"],
            "offloaded_blocks": counts["offloaded_blocks"],
            "evictions": {"device": counts["device_evictions"], "host": counts["host_evictions"]},
            "blocks": {tier: {"in_use": in_use[tier], "cached": cached[tier], "free": free[tier],
                              "total": total[tier]} for tier in TIERS},
            "bytes_in_use": {tier: (in_use[tier] + cached[tier]) * self.block_bytes
                             for tier in TIERS},
            "fragmentation": (slots - reserved) / slots if slots else 0.0,
            "running_rows": len(self._running),
        }

    # ----- the tree and the tiers -----

    def _fresh_block(self, offloads: dict[int, int]) -> int:
        """A device block for a row to write: the lowest free one, else the device
        policy's first leaf, which moves to the host (an offload) or, with no room
        there, is dropped."""
        if self._free["device"]:
            return heapq.heappop(self._free["device"])
        victim = self._pop_candidate("device")  # allocate checked that one exists
        device_block = victim.where
        slot = self._host_slot()
        if slot is None:
            self._drop(victim)
        else:
            self._move(victim, "host", slot)
            offloads[slot] = device_block  # replaces an offload this allocation dropped since
        self._counts["device_evictions"] += 1
        return device_block

    def _host_slot(self) -> int | None:
        """A host slot to offload into: the lowest free one, else the host policy's first
        leaf's, dropped; None when there is neither."""
        if self._free["host"]:
            return heapq.heappop(self._free["host"])
        victim = self._pop_candidate("host")
        if victim is None:
            return None
        self._drop(victim)
        self._counts["host_evictions"] += 1
        return victim.where

    def _register(self, key: bytes, parent: _Cached | None, device_block: int) -> _Cached:
        block = _Cached(key, parent, "device", device_block, deque(maxlen=self.lru_k))
        self._cached[key] = block
        self._at["device"][device_block] = block
        if parent is not None:
            parent.children["device"] += 1
        return block

    def _move(self, block: _Cached, tier: str, where: int) -> None:
        """Moves a cached block to another tier (its old block or slot is the caller's)."""
        del self._at[block.tier][block.where]
        if block.parent is not None:
            block.parent.children[block.tier] -= 1
            block.parent.children[tier] += 1
        block.tier, block.where = tier, where
        self._at[tier][where] = block
        self._offer(block)
        if block.parent is not None:
            self._offer(block.parent)

    def _drop(self, block: _Cached) -> None:
        """Forgets a cached leaf (its block or slot is the caller's)."""
        del self._cached[block.key], self._at[block.tier][block.where]
        if block.parent is not None:
            block.parent.children[block.tier] -= 1
            self._offer(block.parent)
        block.tier = None

    def _access(self, block: _Cached) -> None:
        self._clock += 1
        block.accesses += 1
        block.recent.append(self._clock)

    # ----- eviction candidates: a heap per tier, entries checked when popped -----

    def _evictable(self, block: _Cached, tier: str) -> bool:
        """Whether ``block`` is a leaf of ``tier`` that no row holds (module docstring:
        a device leaf may keep host children, a host leaf keeps none)."""
        return (block.tier == tier and block.refs == 0 and block.children["device"] == 0
                and (tier == "device" or block.children["host"] == 0))

    def _order(self, block: _Cached) -> tuple:
        return _eviction_order(self.policies[block.tier], self.lru_k, block)

    def _offer(self, block: _Cached) -> None:
        """Pushes ``block`` as a candidate of its tier if it is evictable now. Called on
        every change that can make it so (refs to 0, last child gone, a move, an access);
        stale entries are skipped when popped, and the heap is rebuilt from the cached
        blocks once stale ones outnumber them (amortized O(1) a push)."""
        tier = block.tier
        if not self._evictable(block, tier):
            return
        heap = self._candidates[tier]
        heapq.heappush(heap, (self._order(block), next(self._seq), block))
        if len(heap) > 2 * len(self._cached) + 64:
            heap[:] = [(self._order(b), next(self._seq), b) for b in self._cached.values()
                       if self._evictable(b, tier)]
            heapq.heapify(heap)

    def _pop_candidate(self, tier: str) -> _Cached | None:
        """The tier's policy's first evictable block, None when it has none."""
        heap = self._candidates[tier]
        while heap:
            order, _, block = heapq.heappop(heap)
            if self._evictable(block, tier) and order == self._order(block):
                return block
        return None
