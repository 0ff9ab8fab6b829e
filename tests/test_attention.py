"""The attention paths: within a block (a prefill into an empty cache), over the first
``key_limit`` slots, and cuDNN flash attention against the plain path (CUDA GPUs only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.attention import attend_block, choose, flash
from kvjax.decode import prompt_positions
from kvjax.kernels import decode_attention
from kvjax.model import forward, step_fn
from kvjax.sampling import SamplingParams

from tests.conftest import clear_programs, make_config, make_model

flash_supported = flash.supported


def _ragged_block(lengths, width, vocab, seed=0):
    tokens = np.random.default_rng(seed).integers(0, vocab, (len(lengths), width), np.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    return jnp.asarray(tokens), prompt_positions(lengths, width, jnp.zeros_like(lengths))


@pytest.mark.parametrize("window", [None, 3])
def test_fresh_prefill_equals_attention_over_the_cache(window):
    """A block attending within itself gives the logits and the cache of the same block
    attending over an (empty) cache, for ragged rows and a window shorter than them."""
    config = make_config(sliding_window=window)
    model = make_model(config)
    tokens, positions = _ragged_block([8, 5, 1], 8, config.vocab_size)
    empty = kvjax.KVCache.create(config, 3, 32, jnp.float32)
    want_logits, want_cache = forward(config, model.params, tokens, positions, empty)
    got_logits, got_cache = forward(config, model.params, tokens, positions, empty,
                                    attention=choose(config, jnp.float32, fresh=True))
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_cache.lengths, want_cache.lengths)
    for got, want in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # later layers: other sums


def test_key_limit_reads_only_the_slots_before_it(gqa_model):
    """A decode step limited to the first 64 of 4096 slots gives the unlimited step's
    logits, and XLA's cost analysis counts at least the skipped slots' bytes fewer
    (its count of the in-place cache write covers whole buffers, so it is compared by
    difference)."""
    config, params = gqa_model.config, gqa_model.params
    tokens, positions = _ragged_block([20, 9], 32, config.vocab_size)
    cache = kvjax.KVCache.create(config, 2, 4096, jnp.float32)
    _, cache = forward(config, params, tokens, positions, cache,
                       attention=choose(config, jnp.float32, fresh=True))
    step_tokens, step_positions = tokens[:, :1], cache.lengths[:, None]

    def step(key_limit):  # the cache updated in place, as in the decode loop
        plan = choose(config, jnp.float32, key_limit=key_limit)
        return jax.jit(lambda p, c: forward(config, p, step_tokens, step_positions, c,
                                            attention=plan), donate_argnums=1)

    copy = lambda: jax.tree.map(jnp.copy, cache)
    want = step(None)(params, copy())[0]
    np.testing.assert_allclose(step(64)(params, copy())[0], want, rtol=1e-5, atol=1e-5)
    bytes_accessed = lambda f: f.lower(params, cache).compile().cost_analysis()["bytes accessed"]
    skipped = cache.nbytes * (1 - 64 / 4096)
    assert bytes_accessed(step(None)) - bytes_accessed(step(64)) >= skipped


def test_generation_with_room_to_spare_equals_one_over_the_whole_cache(gqa_model):
    """generate() into a cache far larger than it can fill (fresh prefill, key limit)
    gives the logits of kvjax.decode continuing a cache over every slot."""
    config = gqa_model.config
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]
    gen = kvjax.generate(gqa_model, prompts, max_new_tokens=12, capacity=256,
                         return_logits=True)
    block = np.zeros((2, 16), np.int32)
    for row, ids in enumerate(prompts):
        block[row, :len(ids)] = ids
    run = kvjax.jit_decode(step_fn(config), num_steps=16, greedy=True, return_logits=True)
    result = run(gqa_model.params, kvjax.KVCache.create(config, 2, 256, jnp.float32), block,
                 np.array([6, 3], np.int32), np.int32(12), SamplingParams.create(2),
                 np.uint32(0), np.full((1,), -1, np.int32))
    for row in range(2):
        assert gen.tokens[row] == result.tokens[row, :12].tolist()
        np.testing.assert_allclose(gen.logits[row], result.logits[row, :12], rtol=1e-4, atol=1e-4)


def test_flash_attention_falls_back_off_cuda():
    """Without a CUDA GPU (CI), attend_block picks the plain path by itself; soft-capped
    logits never take the fused kernel."""
    q = jax.random.normal(jax.random.key(0), (2, 8, 4, 16), jnp.bfloat16)
    k = v = jax.random.normal(jax.random.key(1), (2, 8, 2, 16), jnp.bfloat16)
    _, positions = _ragged_block([8, 5], 8, 10)
    assert kvjax.attention.flash_supported is flash.supported  # the name before the package
    assert not flash_supported(16, jnp.bfloat16, logit_softcap=50.0)
    assert not flash_supported(16, jnp.float32)
    if jax.default_backend() != "gpu":
        assert not flash_supported(16, jnp.bfloat16)
        np.testing.assert_array_equal(attend_block(q, k, v, positions),
                                      attend_block(q, k, v, positions, implementation="xla"))
    with pytest.raises(ValueError, match="does not apply a logit soft-cap; use 'xla'"):
        attend_block(q, k, v, positions, logit_softcap=50.0, implementation="cudnn")


@pytest.mark.skipif(not flash_supported(128, jnp.bfloat16), reason="needs cuDNN flash attention")
@pytest.mark.parametrize("window", [None, 48])
def test_cudnn_flash_attention_matches_the_plain_path(window):
    """cuDNN's fused kernel against the float32 plain path: ragged rows, GQA, windows."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (3, 256, 16, 128), jnp.float32)
    k = jax.random.normal(keys[1], (3, 256, 4, 128), jnp.float32)
    v = jax.random.normal(keys[2], (3, 256, 4, 128), jnp.float32)
    _, positions = _ragged_block([256, 100, 1], 256, 10)
    want = attend_block(q, k, v, positions, window, implementation="xla")
    bf16 = lambda x: x.astype(jnp.bfloat16)
    got = attend_block(bf16(q), bf16(k), bf16(v), positions, window, implementation="cudnn")
    real = np.asarray(positions >= 0)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want)[real],
                               rtol=0.05, atol=0.03)
    assert not np.any(np.asarray(got, np.float32)[~real])  # padding rows are zeros


@pytest.mark.skipif(not flash_supported(128, jnp.bfloat16), reason="needs cuDNN flash attention")
@pytest.mark.parametrize("seq", [1, 64])
def test_cudnn_attention_over_a_cache_matches_the_plain_path(seq):
    """Decode steps (one token) and blocks continuing a cache: rows that start their
    sequence, continue it, or hold only padding; a cache far larger than its fill."""
    batch, capacity = 4, 1024
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (batch, seq, 16, 128), jnp.float32)
    block_k = jax.random.normal(keys[1], (batch, seq, 4, 128), jnp.float32)
    block_v = jax.random.normal(keys[2], (batch, seq, 4, 128), jnp.float32)
    cache = kvjax.KVCache(keys=(jax.random.normal(keys[3], (batch, 4, capacity, 128)),),
                          values=(jax.random.normal(keys[4], (batch, 4, capacity, 128)),),
                          lengths=jnp.zeros((batch,), jnp.int32))
    starts = jnp.array([0, 300, 17, 900], jnp.int32)
    lengths = jnp.array([seq, seq, max(seq // 2, 1), 0 if seq > 1 else 1], jnp.int32)
    positions = prompt_positions(lengths, seq, starts)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    cache = cache.update(0, heads_major(block_k), heads_major(block_v), positions)
    bf16 = lambda x: x.astype(jnp.bfloat16)
    want = kvjax.attention.attend_cache(q, block_k, block_v, cache.keys[0], cache.values[0],
                                        positions, implementation="xla")
    got = kvjax.attention.attend_cache(bf16(q), bf16(block_k), bf16(block_v), bf16(cache.keys[0]),
                                       bf16(cache.values[0]), positions, implementation="cudnn")
    real = np.asarray(positions >= 0)
    got = np.asarray(got, np.float32)
    np.testing.assert_allclose(got[real], np.asarray(want)[real], rtol=0.05, atol=0.03)
    assert not np.any(got[~real])


@pytest.mark.skipif(not flash_supported(64, jnp.bfloat16), reason="needs cuDNN flash attention")
def test_bfloat16_generation_with_cudnn_matches_the_plain_path(monkeypatch):
    """A bfloat16 model generates with cuDNN attention and kvjax's decode kernel
    (generate: fresh prefill and decode steps; then kvjax.decode continuing that cache
    with a second prompt, as a chat turn does) and with the plain path: the logits agree to bf16 precision and nearly every
    greedy token is the same."""
    config = make_config(num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256,
                         vocab_size=512, num_layers=3)
    model = make_model(config, dtype=jnp.bfloat16, scale=2.0)
    prompts = [list(range(3, 40)), list(range(100, 110))]
    block = np.zeros((2, 16), np.int32)
    block[:, :5] = [[7, 8, 9, 10, 11], [12, 13, 14, 15, 16]]
    controls = (np.int32(12), SamplingParams.create(2), np.uint32(0), np.full((1,), -1, np.int32))

    def run():
        gen = kvjax.generate(model, prompts, max_new_tokens=24, capacity=256, return_logits=True)
        first = kvjax.jit_decode(step_fn(config), num_steps=16, greedy=True)(
            model.params, kvjax.KVCache.create(config, 2, 256, jnp.bfloat16), block[:, :8],
            np.array([5, 3], np.int32), *controls)
        turn = kvjax.decode(step_fn(config), model.params, first.cache, block,
                            np.array([5, 2], np.int32), num_steps=16, max_new_tokens=controls[0],
                            sampling=controls[1], seed=controls[2], stop_tokens=controls[3],
                            greedy=True, start=first.cache.lengths, return_logits=True)
        return [gen.logits[0][0], gen.logits[1][0], turn.logits[:, 0]], gen.tokens + [
            first.tokens.tolist(), turn.tokens.tolist()]

    def calls(name):  # custom calls of generate's program: cuDNN's, kvjax's decode kernel
        return sum(c.as_text().count(name) for c in kvjax.programs.PROGRAMS._programs.values())

    clear_programs()
    logits_flash, tokens_flash = run()
    assert calls("__cudnn$fmha") >= config.num_layers  # the prefill
    assert calls("kvjax_decode_attention") >= config.num_layers  # the decode step
    # what kvjax.attention.choose asks
    monkeypatch.setattr(flash, "supported", lambda *a, **k: False)
    monkeypatch.setattr(decode_attention, "supported", lambda *a, **k: False)
    clear_programs()  # generate's programs were made with the plan chosen before
    jax.clear_caches()  # the traced programs, a layer's own (kvjax.model._layer) too
    logits_plain, tokens_plain = run()
    plain_calls = (len(kvjax.programs.PROGRAMS), calls("__cudnn$fmha"),
                   calls("kvjax_decode_attention"))
    clear_programs()  # made with the patched plan: no later test may reuse them
    assert plain_calls[0] >= 1 and plain_calls[1:] == (0, 0)
    for got, want in zip(logits_flash, logits_plain):
        np.testing.assert_allclose(got, want, atol=0.1)
    same = np.mean(np.concatenate([np.ravel(a) == np.ravel(b)
                                   for a, b in zip(tokens_flash, tokens_plain)]))
    assert same >= 0.9, (tokens_flash, tokens_plain)


@pytest.mark.parametrize("seq", [1, 5])
def test_sliding_window_over_a_cache_reads_only_the_window(seq):
    """Rows at the start, in the middle and at the end of a 1024-slot cache, window 8: the
    window's slices give the attention over the whole cache, and its work (XLA's count
    of FLOPs) is a small fraction of masking the whole cache's."""
    batch, capacity, window = 4, 1024, 8
    keys = jax.random.split(jax.random.key(2), 5)
    q = jax.random.normal(keys[0], (batch, seq, 4, 16))
    block_k = jax.random.normal(keys[1], (batch, seq, 2, 16))
    block_v = jax.random.normal(keys[2], (batch, seq, 2, 16))
    cache_k = jax.random.normal(keys[3], (batch, 2, capacity, 16))
    cache_v = jax.random.normal(keys[4], (batch, 2, capacity, 16))
    starts = jnp.array([0, 3, 500, capacity - seq], jnp.int32)
    lengths = jnp.array([seq, seq, max(seq - 2, 1), seq], jnp.int32)
    positions = prompt_positions(lengths, seq, starts)
    slots = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
    want = kvjax.attention.attend(q, cache_k, cache_v, positions, slots, window)

    def over_cache(window):
        return jax.jit(lambda q, k, v: kvjax.attention.attend_cache(
            q, block_k, block_v, k, v, positions, window, implementation="xla"))

    real = np.asarray(positions >= 0)  # padding queries' outputs are never read
    np.testing.assert_allclose(np.asarray(over_cache(window)(q, cache_k, cache_v))[real],
                               np.asarray(want)[real], rtol=1e-5, atol=1e-5)
    flops = lambda window: over_cache(window).lower(q, cache_k, cache_v).compile(
        ).cost_analysis()["flops"]
    assert flops(window) < flops(capacity) / 16  # a window of the capacity: the whole cache
