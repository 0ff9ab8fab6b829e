"""kvjax.paged.blocks: chained keys, sharing and copy-on-write, each policy's victims on
scripted traces (computed by hand in the comments), the host tier, the counters, exact
errors, and random workloads against a model of what each block holds."""

from __future__ import annotations

import random

import pytest

from kvjax.paged import BlockManager, PoolExhausted
from kvjax.paged.blocks import chain_keys
from kvjax.paged.prefix import leading_rows


def serve(manager, prompt, reserve=0, written=()):
    """One request run alone: allocate, then release with the prompt and ``written``."""
    allocation = manager.allocate(prompt, reserve)
    manager.release(allocation, list(prompt) + list(written))
    return allocation


def snapshot(manager):
    """Everything the manager decides with (for "left unchanged")."""
    cached = sorted((b.key, b.tier, b.where, b.refs, b.accesses, tuple(b.recent),
                     tuple(b.children.values())) for b in manager._cached.values())
    return (cached, sorted(manager._free["device"]), sorted(manager._free["host"]),
            manager._clock, manager._in_use, manager.stats())


# ----- keys, sharing, copy-on-write -----

def test_equal_blocks_after_different_prefixes_get_different_keys():
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    y = [9, 9, 9, 9, 5, 6, 7, 8]
    kx, ky = list(chain_keys(x, 4)), list(chain_keys(y, 4))
    assert len(kx) == 2 and kx[1] != ky[1]
    assert list(chain_keys(x + [1, 2, 3], 4)) == kx  # the partial block has no key
    assert list(chain_keys(x, 8))[0] != kx[0]
    manager = BlockManager(8, 4)
    serve(manager, x)
    assert manager.allocate(y + [0], 0).cached_tokens == 0  # block 2 equal, prefix not


def test_equal_prefixes_share_blocks_with_reference_counts():
    manager = BlockManager(16, 4)
    prompt = list(range(8))
    first = serve(manager, prompt + [100], 2, [101, 102])
    assert first.blocks == (0, 1, 2) and first.cached_tokens == 0
    b = manager.allocate(prompt + [200], 3)
    c = manager.allocate(prompt + [300], 3)
    assert b.blocks[:2] == c.blocks[:2] == first.blocks[:2]  # the same device blocks
    assert b.cached_tokens == c.cached_tokens == 8
    assert [manager._at["device"][i].refs for i in b.blocks[:2]] == [2, 2]
    assert len(set(b.blocks[2:] + c.blocks[2:])) == 2  # each row's own third block
    assert manager.stats()["blocks"]["device"]["in_use"] == 4
    manager.release(b, prompt + [200, 201])
    assert [manager._at["device"][i].refs for i in c.blocks[:2]] == [1, 1]
    assert manager.stats()["blocks"]["device"]["in_use"] == 3
    manager.release(c, prompt + [300])
    device = manager.stats()["blocks"]["device"]
    assert (device["in_use"], device["cached"]) == (0, 2)


def test_prefix_ending_mid_block_shares_only_full_blocks():
    manager = BlockManager(16, 4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    serve(manager, prompt, 0)
    assert manager.stats()["blocks"]["device"]["cached"] == 2  # the partial block was freed
    a = manager.allocate(prompt, 0)
    b = manager.allocate(prompt, 0)
    assert a.cached_tokens == b.cached_tokens == 8
    assert a.blocks[:2] == b.blocks[:2] and a.blocks[2] != b.blocks[2]
    cached = set(manager._at["device"])
    assert a.blocks[2] not in cached and b.blocks[2] not in cached
    assert a.copies == b.copies == ()


def test_whole_cached_prompt_copies_its_last_block():
    manager = BlockManager(16, 4)
    prompt = list(range(8))
    first = serve(manager, prompt, 4, [8, 9, 10, 11])
    a = manager.allocate(prompt, 4)
    assert a.cached_tokens == 7  # the last prompt token is computed again
    assert a.blocks[0] == first.blocks[0]
    assert a.copies == ((first.blocks[1], a.blocks[1]),) and a.blocks[1] != first.blocks[1]
    source = manager._at["device"][first.blocks[1]]
    assert source.refs == 1  # held while the row runs: nothing may reuse it before the copy
    manager.release(a, prompt + [20, 21])
    assert manager._at["device"][first.blocks[1]] is source  # the original kept
    assert a.blocks[1] in manager._free["device"]  # the duplicate freed
    assert manager.allocate(prompt + [8, 9, 10, 11], 0).cached_tokens == 11  # first's outputs


def test_a_row_that_never_ran_releases_with_its_cached_prefix():
    manager = BlockManager(8, 4)
    serve(manager, list(range(8)))
    before = manager.stats()["blocks"]["device"]
    for prompt in (list(range(8)), list(range(10)), [9] * 6):  # copy-on-write, shared, none
        allocation = manager.allocate(prompt, 4)
        manager.release(allocation, prompt[:allocation.cached_tokens])
        assert manager.stats()["blocks"]["device"] == before  # nothing held, nothing new


def test_leading_rows_one_per_group_of_rows_sharing_uncached_blocks():
    """Blocks of 4; A = [1..4] and B = [5..8] cached. Over each row's tokens before its
    last: rows 0 and 2 hold A B C D, row 1 A B C, row 3 E, row 4 E F, row 5 A (cached),
    row 6 no full block. C is in 3 rows, D and E in 2, F in 1. Group C: rows 0 and 2
    share C D (row 1 only C): row 0 leads, the first on the tie, through 4 blocks (16
    tokens). Group E: rows 3 and 4 share E (F is row 4's alone): row 3 leads through 1
    block. Rows 5 and 6 have nothing uncached to share."""
    manager = BlockManager(32, 4)
    serve(manager, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    ab, c, d = [1, 2, 3, 4, 5, 6, 7, 8], [10, 11, 12, 13], [14, 15, 16, 17]
    rows = [ab + c + d + [0], ab + c + [20], ab + c + d + [30, 31], [50, 51, 52, 53, 60],
            [50, 51, 52, 53, 54, 55, 56, 57, 1], [1, 2, 3, 4, 5], [70, 71, 72]]
    assert leading_rows(manager, rows) == {0: 16, 3: 4}
    assert leading_rows(manager, [c + d + [9]] * 3) == {0: 8}  # equal rows: all but the last
    assert leading_rows(manager, [ab + c + [9], ab + d + [9]]) == {}  # A B cached; C, D differ


# ----- policies -----

def policy_trace(policy, lru_k=2):
    """Single-block prompts A..E on 6 blocks of 2 slots, hits, then a 4-block prompt:
    its table is the free block 5 and then the policy's first three victims.

    Clock (one tick per block access): A..D registered at t1..t4 on blocks 0..3; hits
    (each on the spare block 4, freed again) A t5, A t6, A t7, B t8, C t9, C t10, D t11,
    B t12, D t13; E registered at t14 on block 4. Accesses:
    A 1,5,6,7 (4)   B 2,8,12 (3)   C 3,9,10 (3)   D 4,11,13 (3)   E 14 (1)."""
    manager = BlockManager(6, 2, policy=policy, lru_k=lru_k)
    prompts = {name: [10 * i, 10 * i + 1] for i, name in enumerate("ABCDE", 1)}
    for name in "ABCD":
        serve(manager, prompts[name])
    for name in "AAABCCDBD":
        assert serve(manager, prompts[name] + [99]).blocks == ("ABCD".index(name), 4)
    assert serve(manager, prompts["E"]).blocks == (4,)
    return manager.allocate(list(range(100, 108)), 0).blocks


@pytest.mark.parametrize("policy, lru_k, table", [
    # last access: A 7, C 10, B 12, D 13, E 14
    ("lru", 2, (5, 0, 2, 1)),
    # fewest accesses: E 1; then C, B, D (3 each) by last access 10 < 12 < 13
    ("lfu", 2, (5, 4, 2, 1)),
    # 2nd latest access: E none (infinite), A 6, B 8, C 9, D 11
    ("lru-k", 2, (5, 4, 0, 1)),
    # 3rd latest: E none, B 2, C 3, D 4, A 5
    ("lru-k", 3, (5, 4, 1, 2)),
    # below 4 accesses (infinite): B, C, D, E, by last access C 10, B 12, D 13, E 14
    ("lru-k", 4, (5, 2, 1, 3)),
    ("lru-k", 1, (5, 0, 2, 1)),  # K = 1 is lru
])
def test_policy_victims(policy, lru_k, table):
    assert policy_trace(policy, lru_k) == table


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru-k"])
def test_leaves_go_before_their_parents(policy):
    """P = two blocks registered at t1, t2 on blocks 0, 1; Q one block at t3 on 2, hit at
    t4 (on block 3, freed). By every order P's root (t1, 1 access) would go first; it is
    not a leaf until its child has gone. lru: leaves P2 (t2), Q (t4): P2, then P1 (t1).
    lfu: P2 (1 access) before Q (2), then P1. lru-2: P2 (infinite) then P1 (infinite,
    t1) before Q (finite)."""
    manager = BlockManager(4, 2, policy=policy)
    serve(manager, [1, 2, 3, 4])
    serve(manager, [5, 6])
    serve(manager, [5, 6, 7])
    assert manager.allocate([9, 9, 9, 9, 9, 9], 0).blocks == (3, 1, 0)


def test_referenced_blocks_are_never_evicted():
    manager = BlockManager(4, 2)
    serve(manager, [1, 2])  # block 0, t1: the oldest
    serve(manager, [3, 4])  # block 1, t2
    running = manager.allocate([1, 2, 5], 0)  # shares block 0 (hit t3), writes block 2
    assert running.blocks == (0, 2)
    assert manager.allocate([7, 7, 7, 7], 0).blocks == (3, 1)  # block 0 is held: 1 goes
    with pytest.raises(PoolExhausted):
        manager.allocate([8, 8], 0)
    manager.release(running, [1, 2, 5])  # block 2 freed, block 0 unreferenced
    assert manager.allocate([8, 8, 8, 8], 0).blocks == (2, 0)


# ----- host tier -----

def test_host_tier_offloads_restores_and_drops_leaves_only():
    """2 device blocks, 2 host slots, 2 slots a block, lru in both tiers."""
    manager = BlockManager(2, 2, host_blocks=2)
    # P1 (t1) on block 0, P2 (t2) on block 1.
    assert serve(manager, [1, 2, 3, 4]).blocks == (0, 1)
    # Q: the device leaves are P2 only (P1 has a device child): P2 -> host slot 0.
    q = serve(manager, [5, 6])
    assert (q.blocks, q.offloads) == ((1,), ((1, 0),))  # Q at t3 on block 1
    # R: device leaves P1 (t1; its child is on the host) and Q (t3): P1 -> host slot 1.
    r = serve(manager, [7, 8])
    assert (r.blocks, r.offloads) == ((0,), ((0, 1),))  # R at t4 on block 0
    # S: device leaves R (t4), Q (t3): Q goes; the host is full, its only leaf is P2
    # (P1, older, has a child): P2 dropped, Q -> slot 0.
    s = serve(manager, [9, 10])
    assert (s.blocks, s.offloads) == ((1,), ((1, 0),))  # S at t5 on block 1
    assert manager.stats()["evictions"] == {"device": 3, "host": 1}
    # P1 found on the host (P2 is gone): restored. Two fresh blocks: R (t4) goes, the
    # host's leaves are Q (t3) and P1 (being restored, held): Q dropped, R -> slot 0.
    # Then S (t5) goes; host leaves: R (just offloaded), dropped, so R's copy is moot and
    # S -> slot 0. P1 comes back into block 0, the row writes block 1.
    a = manager.allocate([1, 2, 3], 0)
    assert a.cached_tokens == 2 and a.blocks == (0, 1)
    assert a.restores == ((1, 0),) and a.offloads == ((1, 0),)
    stats = manager.stats()
    assert stats["evictions"] == {"device": 5, "host": 3}
    assert stats["restored_blocks"] == 1 and stats["block_hits"] == 1
    assert stats["blocks"]["host"] == {"in_use": 0, "cached": 1, "free": 1, "total": 2}
    manager.release(a, [1, 2, 3])
    assert manager.allocate([9, 10, 0], 0).restores == ((0, 1),)  # S, from slot 0


@pytest.mark.parametrize("host_policy, survivor", [("lru", "B"), ("lfu", "A")])
def test_host_tier_evicts_by_its_own_policy(host_policy, survivor):
    """2 device blocks, 2 host slots, device lru. At the end the host holds A (3
    accesses, last t4) and B (2 accesses, last t5) and must take C: lru drops A, lfu B."""
    manager = BlockManager(2, 2, host_blocks=2, host_policy=host_policy)
    a, b = [1, 1], [2, 2]
    serve(manager, a)  # A t1 on block 0
    serve(manager, b)  # B t2 on block 1
    serve(manager, a + [0])  # hit A t3; the row's block: B (leaf) -> host slot 0
    serve(manager, a + [0])  # hit A t4 (block 1 is free again)
    restored = serve(manager, b + [0])  # hit B t5 on the host: block 1, and A (t4) ->
    assert restored.restores == ((0, 1),) and restored.offloads == ((0, 1),)  # slot 1
    serve(manager, [3, 3])  # C t6 on the free block 0
    serve(manager, [4, 4])  # D t7: B (t5) -> host slot 0; the host is full
    serve(manager, [5, 5])  # E t8: C (t6) -> host: the host policy drops A or B
    assert manager.stats()["evictions"] == {"device": 4, "host": 1}
    on_host = {block.key for block in manager._at["host"].values()}
    keys = {name: next(chain_keys(p, 2)) for name, p in (("A", a), ("B", b), ("C", [3, 3]))}
    assert on_host == {keys[survivor], keys["C"]}


# ----- counters -----

def test_counters_match_a_hand_trace():
    manager = BlockManager(4, 4, block_bytes=1000)
    a1 = manager.allocate(list(range(10)), 5)  # 4 blocks (15 of 16 slots), 2 full misses
    assert manager.stats()["fragmentation"] == 1 / 16
    manager.release(a1, list(range(14)))  # keys 0-3, 4-7, 8-11 on blocks 0, 1, 2
    a2 = manager.allocate(list(range(9)), 2)  # hits 2 blocks: 8 cached; 11 of 12 slots
    assert a2.blocks == (0, 1, 3)
    a3 = manager.allocate(list(range(8)), 0)  # whole prompt: 7 cached, copy of block 1 into
    assert a3.blocks == (0, 2) and a3.copies == ((1, 2),)  # the evicted leaf 8-11's block 2
    stats = manager.stats()
    assert stats["prompt_tokens"] == 27 and stats["cached_tokens"] == 15
    assert stats["hit_rate"] == 15 / 27
    assert (stats["block_hits"], stats["block_misses"]) == (4, 2)
    assert stats["evictions"] == {"device": 1, "host": 0}
    assert stats["blocks"]["device"] == {"in_use": 4, "cached": 0, "free": 0, "total": 4}
    assert stats["bytes_in_use"] == {"device": 4000, "host": 0}
    assert stats["fragmentation"] == (20 - 19) / 20
    assert stats["running_rows"] == 2
    manager.release(a3, list(range(8)))
    manager.release(a2, list(range(11)))
    stats = manager.stats()
    assert stats["blocks"]["device"] == {"in_use": 0, "cached": 2, "free": 2, "total": 4}
    assert stats["fragmentation"] == 0.0 and stats["running_rows"] == 0
    assert BlockManager(4, 4).stats()["hit_rate"] == 0.0


# ----- errors -----

def test_pool_exhausted_names_the_numbers_and_leaves_the_manager_unchanged():
    manager = BlockManager(4, 4, host_blocks=1)
    serve(manager, list(range(8)))  # blocks 0, 1 cached
    running = manager.allocate([7] * 9, 3)  # blocks 2, 3 free, 1 (leaf 4-7) -> host
    before = snapshot(manager)
    with pytest.raises(PoolExhausted) as error:  # block 0 to hold, 4-7 to restore, 1 own
        manager.allocate(list(range(9)), 0)
    assert str(error.value) == (
        "the pool has 4 blocks of 4 slots, 3 in use by running rows; this row needs 3: raise "
        "budget_blocks (prefix_cache_mb) or run fewer rows at once")
    assert isinstance(error.value, ValueError)
    assert snapshot(manager) == before
    manager.release(running, [7] * 9)
    assert manager.allocate(list(range(9)), 0).cached_tokens == 8  # 4-7 from the host


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_blocks=8, block_size=12),
     "block_size must be a power of two >= 1 (slots a block; 16 is the usual choice), got 12"),
    (dict(num_blocks=8, block_size=0),
     "block_size must be a power of two >= 1 (slots a block; 16 is the usual choice), got 0"),
    (dict(num_blocks=0, block_size=4),
     "num_blocks must be an integer >= 1 (device blocks in the pool), got 0"),
    (dict(num_blocks=8, block_size=4, host_blocks=-1),
     "host_blocks must be an integer >= 0 (host-tier blocks; 0: no host tier), got -1"),
    (dict(num_blocks=8, block_size=4, block_bytes=1.5),
     "block_bytes must be an integer >= 0 (bytes a block holds), got 1.5"),
    (dict(num_blocks=8, block_size=4, policy="fifo"),
     "policy must be one of lru, lfu, lru-k, got 'fifo'"),
    (dict(num_blocks=8, block_size=4, host_policy="lru2"),
     "host_policy must be one of lru, lfu, lru-k, got 'lru2'"),
    (dict(num_blocks=8, block_size=4, policy="lru-k", lru_k=0),
     "lru_k must be an integer >= 1 (the K of lru-k: accesses a block remembers; 1 is plain "
     "lru), got 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        BlockManager(**kwargs)
    assert str(error.value) == message


def test_bad_calls():
    manager = BlockManager(8, 4)
    with pytest.raises(ValueError) as error:
        manager.allocate([], 4)
    assert str(error.value) == ("tokens must hold at least one token: a row computes its last "
                                "prompt token's logits")
    with pytest.raises(ValueError) as error:
        manager.allocate([1], -1)
    assert str(error.value) == ("reserve must be an integer >= 0 (tokens the row writes after "
                                "its prompt), got -1")
    serve(manager, [1, 2, 3, 4, 5])
    a = manager.allocate([1, 2, 3, 4, 5], 2)  # 4 cached, 2 blocks of 4 slots
    with pytest.raises(ValueError) as error:
        manager.release(a, list(range(9)))
    assert str(error.value) == ("release got 9 tokens for a row of 8 slots with 4 cached: pass "
                                "the prompt and the tokens the row wrote, between 4 (a row that "
                                "never ran) and 8")
    with pytest.raises(ValueError) as error:
        manager.release(a, [1, 2, 3, 5, 5])
    assert str(error.value) == ("release got tokens whose first 4 differ from the prompt given "
                                "to allocate: pass that prompt, then the tokens the row wrote")
    manager.release(a, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError) as error:
        manager.release(a, [1, 2, 3, 4, 5])
    assert str(error.value) == ("release got an allocation that is not running (released "
                                "already, or from another BlockManager): release each "
                                "allocation once")


# ----- random workloads against a model of the blocks' contents -----

def apply_transfers(allocation, device: dict, host: dict) -> None:
    """Replays an allocation's offloads, restores and copies on a model of the pool
    (``device``: block -> what it holds; ``host``: slot -> the same), in the order the
    prefix cache performs them."""
    for block, slot in allocation.offloads:
        host[slot] = device[block]
    for slot, block in allocation.restores:
        device[block] = host[slot]
    for src, dst in allocation.copies:
        device[dst] = device[src]


def check_invariants(manager, running):
    """The pool's blocks split exactly into free, cached and the rows' own; references
    count the running rows; the tree has no hole and the device part no host parent."""
    size = manager.block_size
    free = manager._free["device"]
    cached = manager._at["device"]
    own, refs = [], {}
    for allocation, _, _ in running:
        shared = allocation.cached_tokens // size
        own += allocation.blocks[shared:]
        for block in allocation.blocks[:shared] + tuple(s for s, _ in allocation.copies):
            refs[block] = refs.get(block, 0) + 1
    assert len(set(free)) == len(free) and len(set(own)) == len(own)
    assert sorted(free + own + list(cached)) == list(range(manager.num_blocks))
    assert {b: c.refs for b, c in cached.items() if c.refs} == refs
    host_free, host_cached = manager._free["host"], manager._at["host"]
    assert sorted(host_free + list(host_cached)) == list(range(manager.host_blocks))
    children = {}
    for block in manager._cached.values():
        assert block.refs >= 0 and manager._at[block.tier][block.where] is block
        assert block.tier == "device" or block.refs == 0
        if block.parent is not None:
            assert manager._cached.get(block.parent.key) is block.parent  # no hole
            assert block.tier == "host" or block.parent.tier == "device"
            counts = children.setdefault(id(block.parent), {"device": 0, "host": 0})
            counts[block.tier] += 1
    for block in manager._cached.values():
        assert block.children == children.get(id(block), {"device": 0, "host": 0})
    stats = manager.stats()
    for tier in ("device", "host"):
        counts = stats["blocks"][tier]
        assert counts["in_use"] + counts["cached"] + counts["free"] == counts["total"]
    assert stats["blocks"]["device"]["in_use"] == len(own) + len(refs)


def infinite_cache_hit(seen, prompt, size):
    """Cached tokens of ``prompt`` were no block ever evicted: its longest prefix of full
    blocks that some row wrote, less one when that is the whole prompt."""
    full = 0
    while (full + 1) * size <= len(prompt) and tuple(prompt[:(full + 1) * size]) in seen:
        full += 1
    return full * size - (full * size == len(prompt))


@pytest.mark.parametrize("seed", range(24))
def test_random_workloads_keep_every_block_right(seed):
    """Rows come and go (up to 4 at once; one in ten released as if it never ran) over
    prompts drawn from a few shared documents with a 3-token vocabulary (equal blocks
    after different prefixes abound). The test moves each block's content as the caller
    would (offloads, then restores, then copies, then the row writes its blocks): every
    position a row reads must hold the K/V of its own prefix. With no eviction yet, the
    hits are an infinite cache's."""
    rng = random.Random(seed)
    size = rng.choice([1, 2, 4])
    manager = BlockManager(rng.randint(8, 40), size, policy=rng.choice(["lru", "lfu", "lru-k"]),
                           lru_k=rng.randint(1, 3), host_blocks=rng.choice([0, 0, 3, 12]),
                           host_policy=rng.choice(["lru", "lfu", "lru-k"]))
    documents = [[rng.randrange(3) for _ in range(40)] for _ in range(3)]
    device, host = {}, {}  # block / slot -> the prefix whose K/V it holds
    seen = set()  # the full-block prefixes rows wrote
    running = []  # (allocation, prompt, written tokens)
    for _ in range(150):
        if running and (len(running) == 4 or rng.random() < 0.45):
            allocation, prompt, written = running.pop(rng.randrange(len(running)))
            if rng.random() < 0.1:  # as if the row never ran (its writes stay unnamed)
                written = prompt[:allocation.cached_tokens]
            manager.release(allocation, written)
            seen.update(tuple(written[:end]) for end in range(size, len(written) + 1, size))
        else:
            prompt = rng.choice(documents)[:rng.randint(1, 30)] + [
                rng.randrange(3) for _ in range(rng.choice([0, 0, 3]))]
            reserve = rng.randint(0, 6)
            before = snapshot(manager)
            try:
                allocation = manager.allocate(prompt, reserve)
            except PoolExhausted:
                assert snapshot(manager) == before
                continue
            expected = infinite_cache_hit(seen, prompt, size)
            assert allocation.cached_tokens <= expected
            if manager.stats()["evictions"]["device"] == 0:
                assert allocation.cached_tokens == expected
            apply_transfers(allocation, device, host)
            cached = allocation.cached_tokens
            for index in range(-(-cached // size)):  # what the row reads
                end = min((index + 1) * size, cached)
                assert device[allocation.blocks[index]][:end] == tuple(prompt[:end])
            written = prompt + [rng.randrange(3) for _ in range(rng.randint(0, reserve))]
            for index in range(cached // size, -(-len(written) // size)):  # what it writes
                device[allocation.blocks[index]] = tuple(written[:(index + 1) * size])
            running.append((allocation, prompt, written))
        check_invariants(manager, running)
