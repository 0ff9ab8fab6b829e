"""The decode loop: cache vs recompute, ragged batches, early stop, compile reuse."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.requests import bucket
from kvjax.decode import PAD_TOKEN
from kvjax.sampling import SamplingParams
from tests.conftest import make_config, make_model

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [2, 71, 33]]

def prompt_block() -> np.ndarray:
    """PROMPTS right-padded to ``int32[2, 16]``."""
    block = np.zeros((2, 16), np.int32)
    for row, p in enumerate(PROMPTS):
        block[row, :len(p)] = p
    return block


ATTENTION_KINDS = {
    "mha": dict(num_heads=4, num_kv_heads=4, head_dim=8),
    "gqa": dict(num_heads=4, num_kv_heads=2, head_dim=8),
    "mqa": dict(num_heads=4, num_kv_heads=1, head_dim=8),
    # head_dim 10 with 3 heads: heads * head_dim (30) != hidden_size (32)
    "odd_head_dim": dict(num_heads=3, num_kv_heads=1, head_dim=10),
}


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_cache_equals_recompute(kind):
    model = make_model(make_config(**ATTENTION_KINDS[kind]), seed=1)
    kwargs = dict(max_new_tokens=64, stop_tokens=[], return_logits=True)
    cached = kvjax.generate(model, PROMPTS, **kwargs)
    recomputed = kvjax.generate(model, PROMPTS, use_cache=False, **kwargs)
    assert [len(t) for t in cached.tokens] == [64, 64]
    assert cached.tokens == recomputed.tokens
    for a, b in zip(cached.logits, recomputed.logits):
        assert a.shape == (64, model.config.vocab_size)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # Not a trivial pass: the logits vary and more than one token was chosen.
    assert len(set(cached.tokens[0])) > 1 and np.ptp(cached.logits[0]) > 1.0


def test_ragged_batch_rows_equal_single_prompts(gqa_model):
    prompts = [[7, 3, 9, 1, 40, 22, 13, 5, 8, 11, 2], [4], [60, 61, 62, 63, 64]]
    kwargs = dict(max_new_tokens=20, stop_tokens=[], return_logits=True)
    batched = kvjax.generate(gqa_model, prompts, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = kvjax.generate(gqa_model, [prompt], **kwargs)
        assert batched.tokens[row] == alone.tokens[0]
        np.testing.assert_allclose(batched.logits[row], alone.logits[0], atol=1e-5, rtol=0)


def test_max_new_tokens_and_stop_tokens(gqa_model):
    full = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=24, stop_tokens=[])
    short = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=5, stop_tokens=[])
    assert short.tokens == [t[:5] for t in full.tokens]
    # Stop at the 4th token of row 0: row 0 ends there (stop token included), row 1
    # goes on unless it meets the same id.
    stop = full.tokens[0][3]
    stopped = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=24, stop_tokens=[stop])
    for row, tokens in enumerate(full.tokens):
        expected = tokens[:tokens.index(stop) + 1] if stop in tokens else tokens
        assert stopped.tokens[row] == expected
    assert stopped.tokens[0][-1] == stop and len(stopped.tokens[0]) == full.tokens[0].index(stop) + 1


def test_no_model_work_after_every_row_stopped(gqa_model):
    """Counts step_fn executions at run time through a host callback."""
    config = gqa_model.config
    full = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=30, stop_tokens=[])
    stops = [full.tokens[0][2], full.tokens[1][5]]  # row 0 stops by token 3, row 1 by token 6
    last_stop = max(min(t.index(s) for s in stops if s in t) for t in full.tokens)

    calls = []
    model_step = kvjax.model.step_fn(config)

    def counting_step(params, tokens, positions, cache):
        jax.debug.callback(lambda t: calls.append(t.shape), tokens)
        return model_step(params, tokens, positions, cache)

    cache = kvjax.KVCache.create(config, 2, 64, jnp.float32)
    prompt_tokens = prompt_block()
    run = kvjax.jit_decode(counting_step, num_steps=32, greedy=True)
    result = run(gqa_model.params, cache, prompt_tokens, np.array([7, 3], np.int32),
                 np.int32(30), SamplingParams.create(2), np.uint32(0), np.array(stops, np.int32))
    jax.block_until_ready(result)
    # One prefill call, then one call per decode step until the last row stopped.
    assert int(result.steps_run) == last_stop
    assert calls == [(2, 16)] + [(2, 1)] * last_stop
    assert last_stop < 29  # the loop could have run 29 decode steps


@pytest.mark.parametrize("sync_every", [4, 64])
def test_steps_in_groups_equal_steps_checked_one_by_one(gqa_model, sync_every):
    """Groups of steps between done-checks (30 steps: not a whole number of groups of 4;
    64: one group, never checked) give the tokens, step count and cache of a loop that
    checks after every step; rows that stopped write nothing more to their cache."""
    config = gqa_model.config
    full = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=31, stop_tokens=[])
    stops = np.array([full.tokens[0][2], full.tokens[1][9]], np.int32)
    prompt_tokens = prompt_block()

    def run(sync_every):
        program = kvjax.jit_decode(kvjax.model.step_fn(config), num_steps=31, greedy=True,
                                   sync_every=sync_every)
        return program(gqa_model.params, kvjax.KVCache.create(config, 2, 64, jnp.float32),
                       prompt_tokens, np.array([7, 3], np.int32), np.int32(31),
                       SamplingParams.create(2), np.uint32(0), stops)

    grouped, single = run(sync_every), run(1)
    np.testing.assert_array_equal(grouped.tokens, single.tokens)
    np.testing.assert_array_equal(grouped.num_generated, single.num_generated)
    assert int(grouped.steps_run) == int(single.steps_run) < 30
    lengths = np.array([7, 3]) + np.asarray(single.num_generated) - 1  # the last token is not fed
    np.testing.assert_array_equal(grouped.cache.lengths, lengths)
    for a, b in zip(jax.tree.leaves(grouped.cache), jax.tree.leaves(single.cache)):
        np.testing.assert_array_equal(a, b)


def test_one_step_program_is_the_prefill(gqa_model):
    """jit_decode(num_steps=1) runs the prefill alone: its token is generate's first."""
    expected = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=4, stop_tokens=[])
    prompt_tokens = prompt_block()
    run = kvjax.jit_decode(kvjax.model.step_fn(gqa_model.config), num_steps=1, greedy=True)
    result = run(gqa_model.params, kvjax.KVCache.create(gqa_model.config, 2, 64, jnp.float32),
                 prompt_tokens, np.array([7, 3], np.int32), np.int32(1), SamplingParams.create(2),
                 np.uint32(0), np.full((4,), -1, np.int32))
    assert np.asarray(result.tokens).tolist() == [[t[0]] for t in expected.tokens]
    assert np.asarray(result.num_generated).tolist() == [1, 1] and int(result.steps_run) == 0


def test_max_new_tokens_per_row(gqa_model):
    """max_new_tokens as int32[batch]: each row stops at its own limit with the tokens of
    a run without limits, and the loop ends with the longest."""
    full = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=12, stop_tokens=[])
    prompt_tokens = prompt_block()
    run = kvjax.jit_decode(kvjax.model.step_fn(gqa_model.config), num_steps=16, greedy=True)
    result = run(gqa_model.params, kvjax.KVCache.create(gqa_model.config, 2, 64, jnp.float32),
                 prompt_tokens, np.array([7, 3], np.int32), np.array([9, 4], np.int32),
                 SamplingParams.create(2), np.uint32(0), np.full((4,), -1, np.int32))
    assert np.asarray(result.num_generated).tolist() == [9, 4]
    tokens = np.asarray(result.tokens)
    assert [tokens[0, :9].tolist(), tokens[1, :4].tolist()] == [full.tokens[0][:9],
                                                                 full.tokens[1][:4]]
    assert (tokens[1, 4:] == PAD_TOKEN).all() and int(result.steps_run) == 8


def test_prefill_computes_only_each_rows_last_logits():
    """A block written to the cache returns [batch, 1, vocab]: the logits of each row's
    last real token, equal to a full forward's there; the [batch, seq, vocab] float32
    logits are never materialised (scratch memory below their size)."""
    config = make_config(vocab_size=16384, max_position_embeddings=512)
    model = make_model(config, seed=2)
    batch, seq, lengths = 2, 256, [256, 100]
    tokens = np.random.default_rng(0).integers(0, 16384, (batch, seq)).astype(np.int32)
    positions = np.where(np.arange(seq)[None] < np.array(lengths)[:, None],
                         np.arange(seq)[None], -1).astype(np.int32)
    step = jax.jit(kvjax.model.step_fn(config), donate_argnums=3)
    cache = kvjax.KVCache.create(config, batch, 512, jnp.float32)
    memory = step.lower(model.params, tokens, positions, cache).compile().memory_analysis()
    assert memory.temp_size_in_bytes < batch * seq * config.vocab_size * 4 / 2
    logits, _ = step(model.params, tokens, positions, cache)
    full, _ = kvjax.forward(config, model.params, tokens, positions, None)
    assert logits.shape == (batch, 1, config.vocab_size)
    np.testing.assert_allclose(np.asarray(logits[:, 0]),
                               np.asarray(full)[[0, 1], [lengths[0] - 1, lengths[1] - 1]],
                               atol=1e-5, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA:GPU's merge of products")
def test_prefill_projections_read_the_weights_as_stored():
    """A prefill's q/k/v and gate/up products read their weights in place: the compiled
    GPU program has no [hidden, ...] concatenation of weights (XLA:GPU would merge each
    group of products into one GEMM over such a copy, made on every call)."""
    config = make_config(num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256,
                         vocab_size=512, num_layers=2)
    model = make_model(config, dtype=jnp.bfloat16)
    tokens = jnp.zeros((1, 128), jnp.int32)
    positions = jnp.arange(128, dtype=jnp.int32)[None]
    cache = kvjax.KVCache.create(config, 1, 256, jnp.bfloat16)
    text = jax.jit(kvjax.model.step_fn(config)).lower(
        model.params, tokens, positions, cache).compile().as_text()
    assert not re.findall(r"bf16\[256,\d+\]\{[0-9,]+\} concatenate\(", text)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA:GPU's merge of products")
def test_compiler_options_merge_large_gate_and_up_in_decode_steps_only():
    """With ``kvjax.model.compiler_options()`` a decode step's gate and up products of
    64 MiB weights (too large for XLA's default merge threshold) run as one GEMM, and a
    prefill block still reads its weights as stored (no concatenated copy)."""
    config = dataclasses.replace(make_config(num_heads=8, num_kv_heads=2, head_dim=128,
                                             hidden_size=2048, vocab_size=512, num_layers=1),
                                 intermediate_size=16384)
    model = make_model(config, dtype=jnp.bfloat16)
    options = kvjax.model.compiler_options()
    assert options == {"xla_gpu_dot_merger_threshold_mb": 1024}

    def compiled_text(seq, **jit_options):
        tokens = jnp.zeros((1, seq), jnp.int32)
        positions = jnp.arange(seq, dtype=jnp.int32)[None] + (0 if seq > 1 else 7)
        cache = kvjax.KVCache.create(config, 1, 256, jnp.bfloat16)
        return jax.jit(kvjax.model.step_fn(config), **jit_options).lower(
            model.params, tokens, positions, cache).compile().as_text()

    gemms = lambda text: len(re.findall(r" dot\(|custom_call_target=\"__cublas", text))
    default, merged = compiled_text(1), compiled_text(1, compiler_options=options)
    # gate|up: one GEMM instead of two
    assert gemms(merged) == gemms(default) - 1, (gemms(default), gemms(merged))
    assert not re.findall(r"bf16\[2048,\d+\]\{[0-9,]+\} concatenate\(",
                          compiled_text(128, compiler_options=options))


@pytest.mark.parametrize("chunk", [16, 24])
def test_chunked_prefill_equals_one_block(gqa_model, chunk):
    """A 64-token prompt block fed in pieces (16: four pieces; 24: three, the last one
    padded) gives the same logits and tokens as one block, for rows that end in
    different pieces (lengths 61, 7 and 33) and rows continuing a cache (start > 0)."""
    config = gqa_model.config
    rng = np.random.default_rng(3)
    lengths = np.array([61, 7, 33], np.int32)
    block = np.zeros((3, 64), np.int32)
    for row, n in enumerate(lengths):
        block[row, :n] = rng.integers(0, config.vocab_size, n)
    step = kvjax.model.step_fn(config)
    controls = dict(max_new_tokens=jnp.int32(20), sampling=SamplingParams.create(3),
                    seed=jnp.uint32(0), stop_tokens=jnp.full((4,), -1, jnp.int32), greedy=True)

    def run(prefill_chunk, start):
        cache = kvjax.KVCache.create(config, 3, 128, jnp.float32)
        return jax.jit(lambda c: kvjax.decode(
            step, gqa_model.params, c, block, lengths, num_steps=20, return_logits=True,
            start=jnp.asarray(start, jnp.int32), prefill_chunk=prefill_chunk, **controls))(cache)

    for start in ([0, 0, 0], [5, 0, 40]):
        whole, pieces = run(None, start), run(chunk, start)
        assert np.asarray(pieces.tokens).tolist() == np.asarray(whole.tokens).tolist()
        np.testing.assert_allclose(np.asarray(pieces.logits), np.asarray(whole.logits),
                                   atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(pieces.cache.lengths),
                                      np.asarray(whole.cache.lengths))


def test_reuses_compiled_program(gqa_model, compile_counter):
    """After the first call per sampling mode, other prompts, lengths in the same bucket,
    max_new_tokens in the same step bucket, seeds and sampling values compile nothing."""
    kvjax.generate(gqa_model, [[1, 2, 3], [4, 5]], max_new_tokens=10, capacity=128)
    kvjax.generate(gqa_model, [[1, 2, 3], [4, 5]], max_new_tokens=10, capacity=128,
                   temperature=0.7, top_k=5)
    with compile_counter as counter:
        kvjax.generate(gqa_model, [[9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 9, 9, 9], [11]],
                       max_new_tokens=16, capacity=128)
        kvjax.generate(gqa_model, [[30, 31], [32, 33, 34, 35]], max_new_tokens=9,
                       capacity=128, stop_tokens=[3, 4, 5])
        for seed, temperature, top_k, top_p, min_p in [(1, 0.5, None, 0.9, None),
                                                       (7, 1.3, 20, None, 0.05),
                                                       (123, 2.0, 1, 0.5, 0.2)]:
            kvjax.generate(gqa_model, [[40, 41, 42], [43]], max_new_tokens=12, capacity=128,
                           temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           seed=seed)
    assert counter.count == 0


def test_bucket():
    assert [bucket(n, 16) for n in (1, 16, 17, 100, 1024, 1025)] == [16, 16, 32, 128, 1024, 2048]


def test_stats(gqa_model):
    out = kvjax.generate(gqa_model, PROMPTS, max_new_tokens=8, stop_tokens=[])
    stats = out.stats
    assert stats["new_tokens"] == 16 and stats["decode_steps"] == 7 and stats["batch"] == 2
    config = gqa_model.config
    expected_cache = (2 * config.num_layers * 2 * stats["capacity"] * config.num_kv_heads
                      * config.head_dim * 4 + 2 * 4)
    assert stats["cache_bytes"] == expected_cache
    assert stats["prefill_s"] > 0 and stats["decode_s"] > 0 and stats["tokens_per_s"] > 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_batches(dtype):
    """Half-precision models run batched on every backend (XLA:CPU lacks some mixed
    bf16 -> f32 kernels) and stay close to float32: prefill logits within 5% of the
    float32 logits' range (bf16 keeps ~3 significant digits)."""
    config = make_config()
    ref = make_model(config, seed=3)
    half = kvjax.Model(config, jax.tree.map(lambda x: x.astype(dtype), ref.params))
    kwargs = dict(max_new_tokens=4, stop_tokens=[], return_logits=True)
    out = kvjax.generate(half, PROMPTS, **kwargs)
    expected = kvjax.generate(ref, PROMPTS, **kwargs)
    assert [len(t) for t in out.tokens] == [4, 4]
    for a, b in zip(out.logits, expected.logits):
        assert np.ptp(b[0]) > 1.0
        np.testing.assert_allclose(a[0], b[0], atol=0.05 * np.ptp(b[0]), rtol=0)
