"""``kvjax.PrefixCache``: requests in a paged pool that keeps the prefixes they computed.

Oracle: the same requests without a prefix cache (a contiguous cache per request,
itself checked against transformers): greedy tokens must be equal, float32 and int8,
whatever the cache served, evicted, recomputed or restored from the host tier.
"""

import numpy as np
import pytest

import kvjax
from kvjax.paged.blocks import PoolExhausted
from kvjax.paged.prefix import PrefixCache
from tests.conftest import make_config, make_model

NEW = 12


@pytest.fixture(scope="module")
def model():
    return make_model(make_config(num_layers=2, max_position_embeddings=256))


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(0)
    system = rng.integers(0, model.config.vocab_size, 37).tolist()  # ends mid-block (8)
    return [system + rng.integers(0, model.config.vocab_size, n).tolist() for n in (5, 9, 3)]


def plain(model, prompts, **kwargs):
    return kvjax.generate(model, prompts, max_new_tokens=NEW, stop_tokens=[], **kwargs).tokens


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_tokens_equal_without_the_prefix_cache(model, prompts, kv_dtype):
    """Three ragged rows sharing a 37-token prefix (ending mid-block), run three times
    in one pool: the tokens of a run without it every time; the first run finds
    nothing, later runs serve each row's whole cached blocks (prompt and replies)."""
    pc = PrefixCache(model, block_size=8, budget_blocks=64, kv_dtype=kv_dtype)
    want = plain(model, prompts, kv_dtype=kv_dtype)
    rates = []
    for _ in range(3):
        assert plain(model, prompts, prefix_cache=pc) == want
        rates.append(pc.stats()["hit_rate"])
    # run 1: row 0 prefills the 4 full blocks all three rows share (32 tokens) before
    # the others start, which find them: 64 of 128 prompt tokens. Run 2: rows of 42, 46
    # and 40 tokens find all 5 full blocks of their prompts; the 40-token row recomputes
    # its last token: 64 + 40 + 40 + 39 of the 2 x 128 prompt tokens so far
    assert rates[0] == 0.5 and rates[1] == pytest.approx(183 / 256)
    assert pc.stats()["blocks"]["device"]["in_use"] == 0  # every row released


@pytest.fixture(scope="module")
def nested_prompts(model):
    """Blocks of 8. ``base`` (50 tokens) and ``fork`` (its first 20, then 30 others)."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, model.config.vocab_size, 50).tolist()
    fork = base[:20] + rng.integers(0, model.config.vocab_size, 30).tolist()
    return [base, base, base[:33], fork, fork + [5], base + [1, 2, 3]]


def test_rows_of_one_call_compute_a_shared_prefix_once(model, nested_prompts):
    """Six rows into an empty pool (full blocks before each row's last token: base's
    k0..k5, base[:33]'s k0..k3, fork's k0 k1 m2..m5). Row 0 prefills k0..k5 first (the
    longest run the others share), then row 3 m2..m5 (shared with row 4 only); the
    others start after them and find: row 1 6 blocks, row 2 4, row 4 6, row 5 6, and
    row 3 had found k0 k1: 24 block hits, 192 of 287 prompt tokens served, 10 misses.
    Tokens equal those of a run without a prefix cache."""
    pc = PrefixCache(model, block_size=8, budget_blocks=128)
    assert plain(model, nested_prompts, prefix_cache=pc) == plain(model, nested_prompts)
    stats = pc.stats()
    assert (stats["block_hits"], stats["block_misses"], stats["cached_tokens"],
            stats["prompt_tokens"]) == (24, 10, 192, 287)
    assert stats["blocks"]["device"]["in_use"] == 0


def test_rows_that_do_not_fit_after_their_leader_release_it(model, nested_prompts):
    """A pool of 12 blocks: row 0 (50 + 12 tokens: 8 blocks) is allocated and prefills
    its 6 shared blocks; row 3 then needs 6 fresh blocks (k0 k1 are held by row 0) and
    4 are left. Everything is released and row 0's 6 prefilled blocks stay cached."""
    pc = PrefixCache(model, block_size=8, budget_blocks=12)
    with pytest.raises(PoolExhausted) as error:
        plain(model, nested_prompts, prefix_cache=pc)
    assert str(error.value) == ("the pool has 12 blocks of 8 slots, 8 in use by running rows; "
                                "this row needs 6: raise budget_blocks (prefix_cache_mb) or run "
                                "fewer rows at once")
    blocks = pc.stats()["blocks"]["device"]
    assert (blocks["in_use"], blocks["cached"]) == (0, 6)
    assert plain(model, nested_prompts[:1], prefix_cache=pc) == plain(model, nested_prompts[:1])
    assert pc.stats()["cached_tokens"] == 48


def test_whole_prompt_cached_is_copied_not_shared(model):
    """A prompt of exactly 4 blocks run twice: the second run serves 31 of its 32 tokens,
    recomputes the last in a copy of the last block, and leaves the cached block as it
    was (a third run gives the same tokens again)."""
    prompt = np.random.default_rng(3).integers(0, model.config.vocab_size, 32).tolist()
    pc = PrefixCache(model, block_size=8, budget_blocks=32)
    want = plain(model, [prompt])
    assert plain(model, [prompt], prefix_cache=pc) == want
    assert plain(model, [prompt], prefix_cache=pc) == want
    assert pc.stats()["cached_tokens"] == 31
    assert plain(model, [prompt], prefix_cache=pc) == want


@pytest.mark.parametrize("host_blocks", [0, 16])
def test_evicted_prefixes_are_recomputed_or_restored(model, host_blocks):
    """A pool of 12 blocks of 8 holds one 64-token prompt + 12 new tokens (10 blocks) at
    a time: A, B, A, B. A run leaves 9 full blocks cached and 1 free, so the next one
    evicts 7 of the other's 9 (its last ones: leaves first), keeping its first 2: without
    a host tier each later run finds 2 blocks and recomputes the rest (32 of 256 prompt
    tokens served; 7 evictions a run after the first). With a host tier the 7 go to the
    host, and run 3 finds all 8 prompt blocks (2 on the device, 6 restored), serves 63
    tokens and copies the last block: 9 fresh blocks, 8 evictions; run 4 likewise (1 on
    the device, 7 restored): 126 tokens served, 13 restored, 23 evictions. Tokens equal
    to runs without a prefix cache."""
    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, model.config.vocab_size, 64).tolist() for _ in range(2))
    want = {0: plain(model, [a]), 1: plain(model, [b])}
    pc = PrefixCache(model, block_size=8, budget_blocks=12, host_budget_blocks=host_blocks)
    for turn in range(4):
        assert plain(model, [(a, b)[turn % 2]], prefix_cache=pc) == want[turn % 2]
    stats = pc.stats()
    want_stats = (23, 13, 126) if host_blocks else (21, 0, 32)
    assert (stats["evictions"]["device"], stats["restored_blocks"],
            stats["cached_tokens"]) == want_stats
    assert stats["hit_rate"] == want_stats[2] / 256


def test_stream_left_early_gives_the_pool_back(model, prompts):
    """A stream left after its first chunk releases its rows: nothing stays in use,
    and the next request reuses what the stream cached."""
    pc = PrefixCache(model, block_size=8, budget_blocks=64)
    stream = kvjax.generate_stream(model, prompts, max_new_tokens=NEW, stop_tokens=[],
                                   chunk_size=2, prefix_cache=pc)
    chunks = iter(stream)
    next(chunks)
    chunks.close()  # what leaving a for loop early does to the generator
    assert pc.stats()["blocks"]["device"]["in_use"] == 0
    assert plain(model, prompts, prefix_cache=pc) == plain(model, prompts)
    assert pc.stats()["cached_tokens"] > 0


def test_chat_turns_and_a_repeated_system_prompt_hit():
    """A chat over a prefix cache replies as a plain chat, each turn reusing the turns
    before; after a reset, the same system prompt and first message hit again."""
    model = kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32")
    pc = PrefixCache(model, block_size=16, budget_blocks=64)
    system = "You document Python."
    paged = kvjax.ChatSession(model, max_new_tokens=20, temperature=0, system=system,
                              prefix_cache=pc)
    reference = kvjax.ChatSession(model, max_new_tokens=20, temperature=0, system=system)
    for message in ["Tell me about lists.", "And tuples?"]:
        assert paged.send(message) == reference.send(message)
    before = pc.stats()["cached_tokens"]
    assert before > 0
    paged.reset()
    assert paged.send("Tell me about lists.") == kvjax.ChatSession(
        model, max_new_tokens=20, temperature=0, system=system).send("Tell me about lists.")
    assert pc.stats()["cached_tokens"] > before


def test_bad_requests(model, prompts):
    pc = PrefixCache(model, block_size=8, budget_blocks=4)
    with pytest.raises(PoolExhausted) as error:
        plain(model, prompts, prefix_cache=pc)
    assert str(error.value) == ("the pool has 4 blocks of 8 slots, 0 in use by running rows; "
                                "this row needs 7: raise budget_blocks (prefix_cache_mb) or run "
                                "fewer rows at once")
    assert pc.stats()["blocks"]["device"]["free"] == 4  # nothing kept
    other = make_model(make_config(num_layers=3, max_position_embeddings=256))
    with pytest.raises(ValueError) as error:
        plain(other, prompts, prefix_cache=pc)
    assert str(error.value) == ("this prefix cache was built for another model (config, dtype "
                                "or mesh differ); build a PrefixCache for each model")
    with pytest.raises(ValueError) as error:
        plain(model, prompts, prefix_cache=pc, kv_dtype="int8")
    assert str(error.value) == ("kv_dtype='int8', but the prefix cache stores float32: pass "
                                "kv_dtype=None or build the PrefixCache with kv_dtype='int8'")
    with pytest.raises(ValueError) as error:
        plain(model, prompts, prefix_cache=pc, window=16)
    assert str(error.value) == ("a prefix cache keeps whole prefixes; streaming (window, "
                                "sink_tokens) drops them: pass one or the other")
    with pytest.raises(ValueError) as error:
        PrefixCache(model, block_size=12, budget_blocks=4)
    assert str(error.value) == ("block_size must be a power of two >= 1 (slots a block; 16 is the "
                                "usual choice), got 12")
    with pytest.raises(ValueError) as error:
        PrefixCache(model, block_size=8, budget_bytes=100)
    assert str(error.value) == ("budget_bytes (100) holds no block of 2,048 bytes (8 slots); "
                                "pass at least 2,048")
    with pytest.raises(ValueError) as error:
        PrefixCache(model, block_size=8)
    assert str(error.value) == "give the pool's size as budget_blocks or budget_bytes (one of the two)"
