"""``kvjax.serve.Engine``: many requests at once in one paged pool.

Oracle: ``kvjax.generate`` of each prompt alone (a contiguous cache of its own): greedy
tokens must be equal whatever else runs beside a request, whenever it arrives, however
its prompt is split into prefill chunks and whatever the prefix cache served; a seeded
sampled request draws generate's tokens too (same per-request keys). The bundled model
in float32; every engine has the same shapes, so all share the module's compiled programs.
"""

import asyncio
import dataclasses
import random

import jax
import numpy as np
import pytest

import kvjax
from kvjax.paged import BlockManager, PoolExhausted
from kvjax.serve import Engine, EngineOverloaded
from kvjax.serve.engine import pack_chunks, prefill_shapes
from kvjax.serve.scheduler import Job, Scheduler
from tests.test_paged_blocks import apply_transfers, check_invariants

ROWS, MAX_LEN, PREFILL = 4, 256, 64
TEXT = ("Return a list of the words in the string, using sep as the delimiter string. If "
        "maxsplit is given, at most maxsplit splits are done (thus, the list will have at most "
        "maxsplit+1 elements). If maxsplit is not specified or -1, then there is no limit on "
        "the number of splits (all possible splits are made). If sep is given, consecutive "
        "delimiters are not grouped together and are deemed to delimit empty strings. The sep "
        "argument may consist of multiple characters. Splitting an empty string with a "
        "specified separator returns a list containing one empty string. If sep is not "
        "specified or is None, a different splitting algorithm is applied: runs of "
        "consecutive whitespace are regarded as a single separator, and the result will "
        "contain no empty strings at the start or end if the string has leading or trailing "
        "whitespace. For example, splitting a string of words returns the words.")


@pytest.fixture(scope="module")
def model():
    return kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32")


@pytest.fixture(scope="module")
def words(model):
    """Token ids of a long documentation-like text: prompts are its prefixes."""
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) >= 200
    return ids


def new_engine(model, **kwargs):
    return Engine(model, **{"max_rows": ROWS, "max_len": MAX_LEN, "max_prefill_tokens": PREFILL,
                            **kwargs})


@pytest.fixture(scope="module")
def engine(model):
    """One started engine, its programs compiled up front."""
    engine = new_engine(model)
    # decode, and the mixed programs of prefill chunks [1, 16], [4, 16], [1, 32], [2, 32],
    # [1, 64], each greedy and sampled
    assert engine.warmup() == 12
    with engine.start():
        yield engine


def alone(model, prompt, max_tokens, **kwargs):
    return kvjax.generate(model, [prompt], max_new_tokens=max_tokens, **kwargs).tokens[0]


def wait_idle(engine):
    """Waits for the engine's loop to retire what it was given (handles end inside it)."""
    stats = engine.stats()
    assert stats["rows_running"] == 0 and stats["requests_waiting"] == 0, stats
    return stats


def test_concurrent_greedy_requests_equal_generate_alone(model, engine, words):
    """Six requests of different lengths and limits, four rows: two start, four more
    arrive while they run (two of them wait for a row); each gives generate's tokens."""
    requests = [(words[:5], 9), (words[:27], 16), (words[3:19], 12), (words[:11], 3),
                ("If sep is given,", 14), (words[40:71], 16)]
    handles = [engine.submit(p, max_tokens=n, stop_tokens=[]) for p, n in requests[:2]]
    next(iter(handles[0]))  # the first request is decoding
    handles += [engine.submit(p, max_tokens=n, stop_tokens=[]) for p, n in requests[2:]]
    for handle, (prompt, max_tokens) in zip(handles, requests):
        completion = handle.result(timeout=60)
        assert completion.token_ids == alone(model, prompt, max_tokens, stop_tokens=[])
        assert completion.finish_reason == "length"
        assert completion.completion_tokens == max_tokens
        assert completion.text == model.tokenizer.decode(completion.token_ids)
        assert handle.submitted_at <= handle.admitted_at <= handle.first_token_at <= \
            handle.finished_at
    wait_idle(engine)


def test_seeded_sample_does_not_depend_on_its_neighbours(model, engine, words):
    """A sampled request draws generate's tokens (same seed), alone or beside others."""
    sampled = dict(temperature=1.0, top_k=40, seed=7, stop_tokens=[])
    want = alone(model, words[:9], 12, **sampled)
    assert engine.submit(words[:9], max_tokens=12, **sampled).result(timeout=60).token_ids == want
    others = [engine.submit(words[i:i + 13], max_tokens=15, temperature=0.8, seed=i)
              for i in range(3)]
    assert engine.submit(words[:9], max_tokens=12, **sampled).result(timeout=60).token_ids == want
    assert engine.submit(words[:9], max_tokens=12, **dict(sampled, seed=8)).result(
        timeout=60).token_ids != want
    for handle in others:
        handle.result(timeout=60)
    wait_idle(engine)


def test_short_prompts_arriving_together_prefill_in_one_call(model, words):
    """Four prompts of 5 to 14 tokens submitted together prefill in one call of the
    [4, 16] program, greedy and seeded sampled rows side by side; each gives generate's
    tokens for its prompt alone. Their first tokens stay on the device, as a decode
    step's do, and arrive in the next step, which feeds them to their first decode."""
    engine = new_engine(model)
    prompts = [words[0:5], words[20:29], words[40:54], words[60:72]]
    values = [dict(temperature=0.0), dict(temperature=1.0, top_k=40, seed=7),
              dict(temperature=0.0), dict(temperature=0.8, seed=3)]
    handles = [engine.submit(p, max_tokens=6, stop_tokens=[], **v)
               for p, v in zip(prompts, values)]
    engine.step()
    assert list(engine._compiled) == [("mixed", ((4, 16), False))]  # one call, no decode yet
    assert [handle.completion_tokens for handle in handles] == [0, 0, 0, 0]
    engine.step()
    assert [handle.completion_tokens for handle in handles] == [1, 1, 1, 1]
    assert engine.stats()["decode_steps"] == 1  # the second step decoded the four rows
    engine.shutdown()
    for handle, prompt, v in zip(handles, prompts, values):
        assert handle.result().token_ids == alone(model, prompt, 6, stop_tokens=[], **v)


def test_pack_chunks():
    """Chunks share calls of as many rows as PACK_TOKENS (256) or the step's budget hold,
    a chunk in a call of its width or wider, at the least modelled time, 256 + rows *
    width tokens a call; a lone chunk takes a one-row call."""
    shapes = prefill_shapes(512, 4096, 8)
    assert shapes == [(1, 16), (8, 16), (1, 32), (8, 32), (1, 64), (4, 64), (8, 64), (1, 128),
                      (2, 128), (4, 128), (1, 256), (2, 256), (1, 512)]
    assert prefill_shapes(64, 4096, 2) == [(1, 16), (2, 16), (1, 32), (2, 32), (1, 64)]
    widths = [16] * 10 + [64, 256, 256, 32]
    # the two 256s in one call (768, not 2 * 512); the 64, the 32 and two 16s in a call
    # of 4 x 64 (512); eight 16s in one of 8 x 16 (384): 1664, against 2144 when each
    # width ran in calls of its own (8 x 16 twice, 1 x 64, 2 x 256, 1 x 32)
    assert pack_chunks(widths, shapes) == [
        ((2, 256), [11, 12]), ((4, 64), [10, 13, 0, 1]), ((8, 16), list(range(2, 10)))]
    # a 256-token budget: a 64-token chunk rides with a 128 in one call of 2 x 128
    # (512, not 320 + 384); a lone 256 runs alone
    shapes = prefill_shapes(256, 4096, 64)
    assert pack_chunks([64, 128], shapes) == [((2, 128), [1, 0])]
    assert pack_chunks([256], shapes) == [((1, 256), [0])]
    # a 2048-token budget over 64 rows: 64-token chunks in calls of 4 or 32 rows
    shapes = prefill_shapes(2048, 4096, 64)
    assert [rows for rows, width in shapes if width == 64] == [1, 4, 32]
    assert pack_chunks([64] * 63, shapes) == [((32, 64), list(range(32))),
                                              ((32, 64), list(range(32, 63)))]
    assert pack_chunks([64] * 5, shapes) == [((1, 64), [0]), ((4, 64), [1, 2, 3, 4])]
    assert pack_chunks([512] * 4, shapes) == [((4, 512), [0, 1, 2, 3])]


def test_prefill_plan_cuts_chunks_to_powers_of_two():
    """Rows in admission order take what is left of their prompts while the chunk, padded
    to a power of two (at least 16), fits in the budget; a chunk of 256 tokens or more is
    cut to a power of two; one the budget cuts is cut to a power of two too, and ends the
    step's plan."""
    def seated(scheduler, prompt_len, written=0):
        job = Job(handle=None, prompt=[1] * prompt_len, max_tokens=1, sampling=None, seed=0,
                  stops=frozenset(), text=None, written=written)
        scheduler.enqueue(job)
        scheduler.seat(job, scheduler.rows.index(None))
        return job

    scheduler = Scheduler(rows=4, max_waiting=4)
    a, b, c = seated(scheduler, 100), seated(scheduler, 400), seated(scheduler, 50)
    # a whole (100, computed as 128); b gets the 128 left; c waits for the next step
    assert scheduler.prefill_plan(256, 256, 16) == [(a, 100), (b, 128)]
    # a's 60 are computed as 64: b gets 192, cut to 128
    a.prompt = [1] * 60
    assert scheduler.prefill_plan(256, 256, 16) == [(a, 60), (b, 128)]
    # a 1088-token prompt takes 1024, b's 400 take 256, c its 50; 704 of 2048 unspent
    a.prompt, b.written = [1] * 1088, 0
    assert scheduler.prefill_plan(2048, 256, 16) == [(a, 1024), (b, 256), (c, 50)]
    # a done; b's last 10 are computed as 16, the whole budget: c waits
    a.written, b.written = 1088, 390
    assert scheduler.prefill_plan(16, 256, 16) == [(b, 10)]
    # b's last 40 would be computed as 64, more than the 48 left: cut to 32 (and c waits)
    b.written = 360
    assert scheduler.prefill_plan(48, 256, 16) == [(b, 32)]


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_chunked_prefill_interleaves_with_decoding(model, words, mixed_steps):
    """A 150-token prompt with 32 prefill tokens a step takes 5 steps to prefill; the
    decoding request beside it gets a token at every one of them; both give generate's
    tokens. A step starts its decode step before it reads the last one's tokens, so the
    short request's tokens arrive one step after its decode steps start. The long
    prompt's chunks run in the decode step's program (``mixed_steps``), whose first
    tokens arrive like a decode step's, one step later, or in programs of their own,
    whose first tokens the step waits for."""
    engine = new_engine(model, max_prefill_tokens=32, mixed_steps=mixed_steps)
    short = engine.submit(words[:7], max_tokens=14, stop_tokens=[])
    engine.step()  # prefilled: its first token
    assert short.completion_tokens == (0 if mixed_steps else 1)
    long = engine.submit(words[:150], max_tokens=6, stop_tokens=[])
    counts = []
    while long.first_token_at is None:
        engine.step()
        counts.append(short.completion_tokens)
    # ceil(150 / 32) steps, a short token each (but the first without mixed steps)
    assert counts == ([1, 2, 3, 4, 5, 6] if mixed_steps else [1, 2, 3, 4, 5])
    while engine.step():
        pass
    assert short.result().token_ids == alone(model, words[:7], 14, stop_tokens=[])
    assert long.result().token_ids == alone(model, words[:150], 6, stop_tokens=[])
    # the short prompt's chunk of 16 (no row decoding yet) and the long one's of 32, in
    # mixed programs (the first with every row idle) or in prefill programs of their own
    programs = {("decode", True), ("prefill", (1, 16)), ("prefill", (1, 32))}
    if mixed_steps:
        programs = {("decode", True), ("mixed", ((1, 16), True)), ("mixed", ((1, 32), True))}
    assert set(engine._compiled) == programs
    assert engine.stats()["prefill_calls"] == 6


def test_shared_prefix_is_served_from_the_cache(model, engine, words):
    """A request sharing a 100-token prefix with a finished one prefills from its cached
    blocks (96 tokens: 6 blocks of 16) and gives generate's tokens; repeated, its prompt of
    7 whole blocks is served but its last token (recomputed in a copy of the last block)."""
    prefix = words[60:160]  # no other test's prompt starts so
    first = engine.submit(prefix + words[160:170], max_tokens=8, stop_tokens=[])
    assert first.result(timeout=60).cached_tokens == 0
    before = engine.stats()["cached_prompt_tokens"]
    second = engine.submit(prefix + words[170:182], max_tokens=8, stop_tokens=[])
    completion = second.result(timeout=60)
    assert completion.cached_tokens == 96 == second.cached_tokens
    assert completion.token_ids == alone(model, prefix + words[170:182], 8, stop_tokens=[])
    again = engine.submit(prefix + words[170:182], max_tokens=8, stop_tokens=[])
    assert again.result(timeout=60).cached_tokens == 111  # 7 whole blocks, the last copied
    assert again.result().token_ids == completion.token_ids
    stats = wait_idle(engine)
    assert stats["cached_prompt_tokens"] - before == 96 + 111
    assert stats["prefix_cache"]["hit_rate"] > 0


def test_a_running_requests_prompt_is_shared(model, words):
    """A request admitted while another with the same 100-token prefix still decodes
    shares its prefilled blocks (published as its chunks complete them)."""
    engine = new_engine(model)
    prefix = words[20:120]  # no other test's prompt starts so
    first = engine.submit(prefix + words[130:140], max_tokens=40, stop_tokens=[])
    for _ in range(3):
        engine.step()  # 110 prompt tokens in chunks of 64, then decoding
    assert first.first_token_at is not None
    second = engine.submit(prefix + words[150:160], max_tokens=8, stop_tokens=[])
    engine.step()
    assert second.cached_tokens == 96 and first.finish_reason is None
    engine.shutdown()
    assert second.result().token_ids == alone(model, prefix + words[150:160], 8, stop_tokens=[])
    assert first.result().token_ids == alone(model, prefix + words[130:140], 40, stop_tokens=[])
    assert engine.stats()["pool_blocks_used"] == 0


def test_without_prefix_caching_nothing_is_shared(model, words):
    """``prefix_caching=False``: the same prompt twice, one after the other, is prefilled
    whole both times, gives generate's tokens, and leaves no block cached."""
    engine = new_engine(model, prefix_caching=False)
    prompt = words[30:130]
    expected = alone(model, prompt, 6, stop_tokens=[])
    for _ in range(2):
        handle = engine.submit(prompt, max_tokens=6, stop_tokens=[])
        while not handle.done:
            engine.step()
        assert handle.result().cached_tokens == 0
        assert handle.result().token_ids == expected
    stats = engine.stats()
    assert stats["cached_prompt_tokens"] == 0
    assert stats["pool_blocks_cached"] == 0 and stats["pool_blocks_used"] == 0


def test_requests_arriving_together_prefill_a_shared_prefix_once(model, words):
    """Three requests submitted at once, two sharing a 100-token prefix: the second waits
    while the first prefills the prefix (the unrelated third goes ahead of it), then
    shares its 6 full blocks; all give generate's tokens. Without prefix caching all three
    start at once and nothing is shared."""
    prefix = words[40:140]  # no other test's prompt starts so
    prompts = [prefix + words[140:150], prefix + words[150:158], words[0:20]]
    for caching in (True, False):
        engine = new_engine(model, prefix_caching=caching)
        handles = [engine.submit(p, max_tokens=5, stop_tokens=[]) for p in prompts]
        engine.step()  # admits, prefills 64 tokens of the first prompt
        admitted = [h.cached_tokens is not None for h in handles]
        assert admitted == ([True, False, True] if caching else [True, True, True])
        engine.shutdown()
        assert [h.cached_tokens for h in handles] == ([0, 96, 0] if caching else [0, 0, 0])
        for handle, prompt in zip(handles, prompts):
            assert handle.result().token_ids == alone(model, prompt, 5, stop_tokens=[])


def test_block_manager_publish():
    """``BlockManager.publish``: a running row's full blocks, cached as it writes them,
    are shared by rows allocated after; a row that finds its keys cached publishes none;
    releases give every block back."""
    manager = BlockManager(16, 4)
    prompt = list(range(10))
    a = manager.allocate(prompt, 2)  # 3 blocks
    twin = manager.allocate(prompt, 2)  # the same prompt, before anything is cached
    assert manager.publish(a, prompt[:6]) == 1
    assert manager.publish(a, prompt) == 2
    assert manager.publish(twin, prompt) == 0  # a's keys are cached first
    b = manager.allocate(prompt + [50], 1)
    assert b.cached_tokens == 8 and b.blocks[:2] == a.blocks[:2]
    assert manager.stats()["blocks"]["device"]["in_use"] == 3 + 3 + 1
    manager.release(a, prompt + [20])
    manager.release(twin, prompt + [30])  # its duplicates of a's blocks are freed
    assert manager.stats()["blocks"]["device"]["in_use"] == 3  # b's
    manager.release(b, prompt + [50, 51])
    device = manager.stats()["blocks"]["device"]
    assert (device["in_use"], device["cached"], device["free"]) == (0, 3, 13)
    with pytest.raises(ValueError, match="not running"):
        manager.publish(a, prompt)


@pytest.mark.parametrize("seed", range(8))
def test_publishing_keeps_every_block_right(seed):
    """Random rows over a 3-token vocabulary (equal blocks abound) publish what they wrote
    at random moments before their release: test_paged_blocks' invariants hold (a row
    holds its published blocks as it holds its hits) and every block a row reads holds
    its own prefix."""
    rng = random.Random(seed)
    size = rng.choice([1, 2, 4])
    manager = BlockManager(rng.randint(12, 40), size, host_blocks=rng.choice([0, 6]))
    documents = [[rng.randrange(3) for _ in range(40)] for _ in range(3)]
    device, host, running = {}, {}, []  # block / slot -> the prefix it holds; rows
    for _ in range(120):
        if running and (len(running) == 4 or rng.random() < 0.4):
            allocation, written = running.pop(rng.randrange(len(running)))
            manager.release(allocation, written)
        elif running and rng.random() < 0.5:
            allocation, written = rng.choice(running)
            manager.publish(allocation, written[:rng.randint(allocation.cached_tokens,
                                                             len(written))])
        else:
            prompt = rng.choice(documents)[:rng.randint(1, 30)]
            try:
                allocation = manager.allocate(prompt, rng.randint(0, 6))
            except PoolExhausted:
                continue
            apply_transfers(allocation, device, host)
            for index in range(-(-allocation.cached_tokens // size)):  # what the row reads
                end = min((index + 1) * size, allocation.cached_tokens)
                assert device[allocation.blocks[index]][:end] == tuple(prompt[:end])
            written = prompt + [rng.randrange(3) for _ in range(rng.randint(0, 3))]
            written = written[:len(allocation.blocks) * size]
            for index in range(allocation.cached_tokens // size, -(-len(written) // size)):
                device[allocation.blocks[index]] = tuple(written[:(index + 1) * size])
            running.append((allocation, written))
        published = [dataclasses.replace(a, cached_tokens=a.cached_tokens + size *
                                         manager._published.get(id(a), 0))
                     for a, _ in running]
        check_invariants(manager, [(a, None, None) for a in published])


def test_host_tier_restores_count_as_hits(model):
    """Six 190-token prompts overflow the pool (65 blocks): the first one's blocks move to
    the host tier; run again, its prompt is served from there (restored blocks are hits)
    and it gives the same tokens."""
    pc = kvjax.PrefixCache(model, block_size=16, budget_blocks=ROWS * 16 + 1,
                           host_budget_blocks=32)
    engine = new_engine(model, prefix_cache=pc)  # the module engine's shapes and programs
    prompts = np.random.default_rng(1).integers(3, 4096, (6, 190)).tolist()
    first = [engine.submit(p, max_tokens=4, stop_tokens=[]) for p in prompts]
    engine.shutdown()  # drains: runs every request
    engine = new_engine(model, prefix_cache=pc)
    again = engine.submit(prompts[0], max_tokens=4, stop_tokens=[])
    engine.shutdown()
    assert pc.stats()["offloaded_blocks"] > 0 and pc.stats()["restored_blocks"] > 0
    assert again.result().cached_tokens == 176  # its 11 full prompt blocks
    assert again.result().token_ids == first[0].result().token_ids


def test_stop_strings_stop_tokens_and_length(model, engine, words):
    """A stop string cuts the text before it (OpenAI's ``stop``), also when it spans
    tokens and deltas; a stop token ends the request, in its ids but not its text;
    ``max_tokens`` ends it with "length"."""
    prompt = words[:20]
    full = engine.submit(prompt, max_tokens=16, stop_tokens=[]).result(timeout=60)
    pieces = [model.tokenizer.decode(full.token_ids[:i]) for i in range(17)]
    cut = next(i for i in range(4, 16) if len(pieces[i]) > len(pieces[i - 1]) + 1)
    stop = pieces[cut][len(pieces[cut - 1]) - 1:][:4]  # ends one token, begins the next
    assert len(stop) >= 2
    handle = engine.submit(prompt, max_tokens=16, stop_tokens=[], stop=["no such text", stop])
    deltas = list(handle)
    completion = handle.result()
    assert completion.finish_reason == "stop"
    assert completion.text == "".join(d.text for d in deltas) == full.text[:full.text.index(stop)]
    assert completion.token_ids == [t for d in deltas for t in d.token_ids]
    assert completion.token_ids == full.token_ids[:len(completion.token_ids)]

    token = full.token_ids[2]
    stopped = engine.submit(prompt, max_tokens=16, stop_tokens=[token]).result(timeout=60)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[:full.token_ids.index(token) + 1]
    assert stopped.text == model.tokenizer.decode(stopped.token_ids[:-1])

    eos = engine.submit("Once upon a time", max_tokens=8).result(timeout=60)  # model's stops
    assert eos.token_ids == alone(model, "Once upon a time", 8)
    assert eos.finish_reason == "stop" and eos.token_ids[-1] in model.stop_tokens
    assert full.finish_reason == "length"
    wait_idle(engine)


def test_chat_messages_use_the_chat_template(model, engine):
    messages = [{"role": "system", "content": "You document Python."},
                {"role": "user", "content": "Tell me about lists."}]
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(messages),
                                 add_special_tokens=False)
    handle = engine.submit(messages, max_tokens=10)
    assert handle.prompt_tokens == len(ids)
    assert handle.result(timeout=60).token_ids == alone(model, ids, 10)


def test_async_stream(model, engine, words):
    async def collect(handle):
        return [delta async for delta in handle.stream()]

    handle = engine.submit(words[:12], max_tokens=10, stop_tokens=[])
    deltas = asyncio.run(collect(handle))
    assert len(deltas) == 10
    assert "".join(d.text for d in deltas) == handle.result().text


def test_cancel_frees_the_row_and_its_blocks(engine, words):
    """A request cancelled mid-stream ends with "cancelled" and gives its row and blocks
    back; a cancelled waiting request never runs."""
    running = engine.submit(words[:30], max_tokens=200, stop_tokens=[])
    busy = [engine.submit(words[:20], max_tokens=200, stop_tokens=[]) for _ in range(ROWS - 1)]
    waiting = engine.submit(words[:10], max_tokens=5)
    waiting.cancel()
    seen = 0
    for _ in running:
        seen += 1
        if seen == 3:
            running.cancel()
    assert running.finish_reason == "cancelled" and 3 <= running.completion_tokens < 200
    assert running.result().finish_reason == "cancelled"
    for handle in busy:
        handle.cancel()
        assert handle.result(timeout=60).finish_reason == "cancelled"
    assert waiting.result(timeout=60).finish_reason == "cancelled"
    assert waiting.admitted_at is None and waiting.completion_tokens == 0
    stats = wait_idle(engine)
    assert stats["pool_blocks_used"] == 0 and stats["prefix_cache"]["running_rows"] == 0
    assert stats["pool_blocks_free"] + stats["pool_blocks_cached"] == stats["pool_blocks_total"]


def test_compilations_stay_fixed_after_warmup(engine, words, compile_counter):
    """Requests of 1 to 200 prompt tokens, greedy and sampled, arriving at once: no
    program compiles (static rows, prefill chunks in power-of-two buckets). No prompt is
    a whole number of blocks: a whole cached prompt's copy-on-write compiles the prefix
    cache's one-block copy once per process (kvjax.paged.prefix), not per request."""
    rng = np.random.default_rng(0)
    with compile_counter:
        handles = [engine.submit(words[:n], max_tokens=int(rng.integers(1, 40)), stop_tokens=[],
                                 temperature=float(rng.choice([0.0, 0.7])), seed=n)
                   for n in (1, 2, 5, 15, 17, 31, 33, 63, 65, 100, 129, 200)]
        for handle in handles:
            assert handle.result(timeout=60).finish_reason == "length"
    assert compile_counter.count == 0
    assert engine.stats()["programs_compiled"] == 12


def test_warmup_runs_every_program_and_writes_nothing(model, engine, words):
    """warmup() runs each program once over idle rows, before start() or between the
    steps of a started engine: the pool's keys and values stay as they were (a fresh
    pool's zeros; the started engine's cached blocks), and requests after it still equal
    generate."""
    buffers = lambda pool: [np.asarray(x) for x in jax.tree.leaves((pool.keys, pool.values))]
    for target in (new_engine(model), engine):
        wait_idle(target)
        before = [x.copy() for x in buffers(target.prefix_cache.pool)]
        assert target.warmup() == 12
        after = buffers(target.prefix_cache.pool)
        assert len(after) == 2 * model.config.num_layers
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert any(x.any() for x in after)  # the started engine's pool holds blocks
    prompt = words[:40]
    handle = engine.submit(prompt, max_tokens=12, stop_tokens=[], temperature=0)
    assert handle.result(timeout=60).token_ids == alone(model, prompt, 12, stop_tokens=[])


def test_queue_full_and_bad_requests(model, words):
    engine = new_engine(model, max_waiting=2)
    first = [engine.submit(words[:5], max_tokens=4) for _ in range(2)]
    with pytest.raises(EngineOverloaded) as error:
        engine.submit(words[:5], max_tokens=4)
    assert str(error.value) == ("the engine's queue is full (2 requests waiting): retry later, or "
                                "build the Engine with a larger max_waiting")
    assert engine.stats()["requests_refused"] == 1
    with pytest.raises(ValueError) as error:
        engine.submit(words[:200], max_tokens=60)
    assert str(error.value) == ("prompt (200 tokens) + max_tokens (60) = 260 exceeds the engine's "
                                "max_len (256); shorten the prompt or lower max_tokens, or build "
                                "the Engine with a larger max_len (at most 1024)")
    with pytest.raises(ValueError) as error:  # no room left for a token
        engine.submit((words * 2)[:256], max_tokens=None)
    assert str(error.value).startswith("prompt (256 tokens) + max_tokens (1) = 257 exceeds")
    bad = [({"temperature": -1.0}, "temperature must be >= 0 (0 = greedy), got -1.0"),
           ({"top_p": 0.0}, "top_p must be in (0, 1] (or None to disable), got 0.0"),
           ({"max_tokens": 0}, "max_tokens must be an integer >= 1 (None: to the end of the "
                               "context), got 0"),
           ({"seed": -1}, "seed must be an integer in [0, 2**32) (None: a random one), got -1"),
           ({"stop": [""]}, "stop must be a non-empty string or a list of them, got ['']"),
           ({"stop_tokens": [5000]}, "stop token 5000 is outside the vocabulary [0, 4096)")]
    for kwargs, message in bad:
        with pytest.raises(ValueError) as error:
            engine.submit(words[:5], **kwargs)
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        engine.submit([4096])
    assert str(error.value) == "prompt 0 has token id 4096 outside the vocabulary [0, 4096)"
    engine.shutdown(drain=False)
    assert [h.result().finish_reason for h in first] == ["cancelled", "cancelled"]
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(words[:5])


def test_engine_sizes_are_checked(model):
    with pytest.raises(ValueError) as error:
        Engine(model, max_len=2048)
    assert str(error.value) == ("max_len (2048) exceeds the model's max_position_embeddings "
                                "(1024); pass max_len <= 1024")
    with pytest.raises(ValueError) as error:
        Engine(model, max_len=256, pool_blocks=10)
    assert str(error.value) == ("a pool of 10 blocks of 16 slots cannot hold a request of max_len "
                                "(256) tokens: it needs 17 blocks (16 and a copy-on-write block); "
                                "pass pool_blocks >= 17 or a smaller max_len")
    assert Engine(model, pool_blocks=10).max_len == 144  # what 9 blocks hold
    pc = kvjax.PrefixCache(model, block_size=8, budget_blocks=40)
    with pytest.raises(ValueError) as error:
        Engine(model, prefix_cache=pc, block_size=16)
    assert str(error.value) == ("block_size=16, but the prefix cache has blocks of 8: pass "
                                "block_size=None")
    assert Engine(model, prefix_cache=pc).max_len == 312
    with pytest.raises(ValueError) as error:
        Engine(model, max_prefill_tokens=8)
    assert str(error.value) == ("max_prefill_tokens must be >= 16 (a prefill call computes at "
                                "least 16 tokens), got 8")


def test_errors_in_the_loop_reach_the_handles(model, words, monkeypatch):
    """A failing program ends its requests with the error (no handle hangs) and stops
    the engine."""
    engine = new_engine(model)

    def broken(*args):
        raise ValueError("boom")

    monkeypatch.setattr(engine, "_program", broken)
    engine.start()
    handle = engine.submit(words[:5], max_tokens=4)
    with pytest.raises(RuntimeError, match="boom"):
        handle.result(timeout=60)
    with pytest.raises(RuntimeError, match="boom"):
        list(handle)
    with pytest.raises(RuntimeError, match="stopped after an error"):
        engine.submit(words[:5])


def test_context_manager_drains(model, words):
    with new_engine(model) as engine:
        handles = [engine.submit(words[:n], max_tokens=5, stop_tokens=[]) for n in (3, 8)]
    assert [h.finish_reason for h in handles] == ["length", "length"]
    assert not engine._thread.is_alive()


# ----- on a mesh ------------------------------------------------------------------------

def _mesh_worker() -> dict:
    """Run on 4 CPU devices (``run_on_cpu_devices``): the bundled model on a (data=1,
    model=2) mesh, its prefix cache's pool and an engine over it, against ``generate`` on
    one device; and a mesh that splits rows, refused."""
    import jax

    from kvjax import sharding

    single = kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32")
    mesh = sharding.make_mesh(data=1, model=2, devices=jax.devices()[:2])
    model = kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32", mesh=mesh)
    ids = single.tokenizer.encode(TEXT)
    prompts = [ids[:40], ids[:37] + [5, 6, 7], ids[100:130]]
    want = [kvjax.generate(single, [p], max_new_tokens=8, temperature=0).tokens[0] for p in prompts]
    # a pool of 4 blocks of 16 slots (a request takes 3) and a host tier: later prompts
    # evict earlier blocks to the host, and the repeated first prompt restores them
    pc = kvjax.PrefixCache(model, block_size=16, budget_blocks=4, host_budget_blocks=8)
    runs = [kvjax.generate(model, [p], max_new_tokens=8, temperature=0, prefix_cache=pc)
            .tokens[0] for p in prompts + prompts[:1]]
    with Engine(model, max_rows=2, max_len=128, max_prefill_tokens=32) as engine:
        handles = [engine.submit(p, max_tokens=8, temperature=0) for p in prompts]
        served = [h.result().token_ids for h in handles]
    try:
        kvjax.PrefixCache(kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32",
                                     mesh=sharding.make_mesh(data=2, model=2)), budget_blocks=8)
        refused = None
    except ValueError as error:
        refused = str(error)
    return {"want": [list(map(int, w)) for w in want], "runs": [list(map(int, r)) for r in runs],
            "served": [list(map(int, s)) for s in served],
            "pool_spec": list(pc.pool.keys[0].sharding.spec),
            "restored": pc.stats()["restored_blocks"], "hits": pc.stats()["block_hits"],
            "refused": refused}


if __name__ == "__main__":
    import json

    print(json.dumps(_mesh_worker()))


def test_on_a_mesh_the_heads_split_and_the_rows_stay_whole():
    """On a (data=1, model=2) mesh of CPU devices (a subprocess): ``generate`` over a
    prefix cache (blocks evicted to the host tier and restored) and the engine give one
    device's tokens; the pool's KV heads are split over ``model``; a mesh that splits
    rows is refused with a message naming the fix."""
    from tests.conftest import run_on_cpu_devices

    out = run_on_cpu_devices("tests.test_serve_engine", 4)
    assert out["runs"] == out["want"] + out["want"][:1]
    assert out["served"] == out["want"]
    assert out["pool_spec"] == ["model", None, None, None]
    assert out["restored"] > 0 and out["hits"] > 0
    assert out["refused"] == (
        "a paged pool holds every row's blocks, so its rows cannot split over devices, but "
        "this mesh splits the batch 2 ways ({'data': 2, 'model': 2}); use a mesh whose batch "
        "axes have size 1 (e.g. data=1,model=4): the heads split instead")
