"""The paged KV cache (``kvjax.cache.PagedKVCache``, ``kvjax.attention.paged``): the same
logits as the contiguous cache, whatever blocks a row's table names.

Oracle: the contiguous cache fed the same blocks of tokens (itself checked against
transformers), and one forward pass without a cache.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import PagedKVCache
from kvjax.model import forward
from tests.conftest import count_calls, make_config, make_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return make_model(make_config(num_layers=2, max_position_embeddings=128))


def feed(model, cache, tokens: np.ndarray, sizes: list[tuple[int, ...]], step=None):
    """Feeds ``tokens`` (``[rows, n]``) in blocks of ``sizes`` tokens per row (0: a row
    of padding in that block) through ``step`` (default ``forward``'s own choice);
    returns each block's last logits per row and the cache."""
    config, params = model.config, model.params
    step = step or functools.partial(forward, config)
    rows = tokens.shape[0]
    fed = np.zeros(rows, np.int32)
    out = []
    for block_sizes in sizes:
        width = max(block_sizes)
        block = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        for row, size in enumerate(block_sizes):
            block[row, :size] = tokens[row, fed[row]:fed[row] + size]
            positions[row, :size] = fed[row] + np.arange(size)
        logits, cache = step(params, jnp.asarray(block), jnp.asarray(positions), cache)
        fed += np.asarray(block_sizes)
        out.append(np.asarray(logits[:, -1 if width > 1 else 0]))
    return out, cache


SIZES = [(9, 3, 1), (1, 1, 1), (1, 0, 5), (17, 2, 1), (3, 40, 1), (1, 1, 1), (24, 5, 2)]


@pytest.mark.parametrize("block_size, kv_dtype", [(4, "float32"), (4, "fp8"), (16, "float32"),
                                                  (16, "int8")])
def test_paged_equals_contiguous(model, block_size, kv_dtype):
    """Three ragged rows fed in blocks of every size (prompts, single tokens, blocks
    across block boundaries, rows of padding) through a pool whose blocks the tables
    name in a shuffled order (rows interleaved in the pool, spare blocks unused): every
    block's logits equal the contiguous cache's (float32: 1e-4; codes: the same codes,
    so 1e-4 too), and each row's positions hold the contiguous cache's first-layer keys
    (codes) exactly."""
    config = model.config
    rows, capacity = 3, 64
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (rows, capacity))
    # a block is written from its row's length on, and a contiguous cache needs room for
    # the whole block there (padding included): 128 slots
    contiguous = kvjax.cache.create(config, rows, 2 * capacity, kv_dtype, jnp.float32)
    per_row = capacity // block_size
    order = np.random.default_rng(1).permutation(rows * per_row + 5)[:rows * per_row]
    paged = PagedKVCache.create(config, rows, capacity, kv_dtype, block_size=block_size,
                                num_blocks=rows * per_row + 5)
    paged = paged.with_tables(order.reshape(rows, per_row), np.zeros(rows))
    want, contiguous = feed(model, contiguous, tokens, SIZES)
    got, paged = feed(model, paged, tokens, SIZES)
    for a, b, sizes in zip(got, want, SIZES):
        real = np.asarray(sizes) > 0  # a row of padding has no logits to compare
        np.testing.assert_allclose(a[real], b[real], atol=ATOL)
    np.testing.assert_array_equal(paged.lengths, contiguous.lengths)
    filled = np.asarray(contiguous.lengths)
    pool = np.asarray(paged.keys[0], np.float32)  # [kv_heads, blocks, block, head_dim]
    for row in range(rows):  # layer 0's keys depend on no attention: equal exactly
        positions = np.arange(filled[row])
        held = pool[:, order.reshape(rows, per_row)[row, positions // block_size],
                    positions % block_size].transpose(1, 0, 2)  # [positions, kv_heads, head_dim]
        np.testing.assert_array_equal(
            held, np.asarray(contiguous.keys[0], np.float32)[row, :, :filled[row]]
            .transpose(1, 0, 2))


def test_with_tables_under_tracing(model):
    """``with_tables`` traces (``jax.eval_shape``, as ``benchmarks/bench_lib.py`` sizes a
    pool before compiling, and ``jax.jit``): the pool with the new rows' tables. (JAX 0.11's
    tracers have no ``sharding``; 0.10's do, so this fails only there without the fix.)"""
    pool = PagedKVCache.create(model.config, 2, 16, "float32", block_size=4, num_blocks=8)
    tables = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)
    shaped = jax.eval_shape(lambda: pool.with_tables(tables, np.zeros(2)))
    assert shaped.block_tables.shape == (2, 4) and shaped.lengths.shape == (2,)
    placed = jax.jit(lambda t, n: pool.with_tables(t, n))(tables, np.full(2, 3))
    np.testing.assert_array_equal(placed.block_tables, tables)
    np.testing.assert_array_equal(placed.lengths, [3, 3])


def test_rows_sharing_blocks_read_the_same_prefix(model):
    """Two rows whose tables start with the same blocks (a shared prefix, written once by
    the first row) continue from it as a forward pass over their whole sequences."""
    config = model.config
    rng = np.random.default_rng(2)
    prefix = rng.integers(0, config.vocab_size, 8)  # two blocks of 4
    tails = rng.integers(0, config.vocab_size, (2, 6))
    paged = PagedKVCache.create(config, 2, 16, "float32", block_size=4, num_blocks=8)
    tables = np.array([[0, 1, 2, 3], [0, 1, 4, 5]], np.int32)
    paged = paged.with_tables(tables[:1], np.zeros(1))
    _, paged = forward(config, model.params, jnp.asarray(prefix[None]),
                       jnp.arange(8, dtype=jnp.int32)[None], paged)  # the prefix, row 0 only
    paged = paged.with_tables(tables, np.full(2, 8))
    logits, _ = forward(config, model.params, jnp.asarray(tails),
                        jnp.broadcast_to(jnp.arange(8, 14, dtype=jnp.int32), (2, 6)), paged)
    for row in range(2):
        sequence = np.concatenate([prefix, tails[row]])[None]
        full, _ = forward(config, model.params, jnp.asarray(sequence),
                          jnp.arange(14, dtype=jnp.int32)[None])
        np.testing.assert_allclose(logits[row, -1], full[0, -1], atol=ATOL)


@pytest.mark.parametrize("kv_dtype,decode_kernel", [("float32", None), ("int8", None),
                                                    ("float32", True)])
def test_blocks_in_one_pass_equal_blocks_one_after_another(model, kv_dtype, decode_kernel):
    """``forward_parts`` (the serving engine's mixed step): a decode step of two rows (one
    idle, at position -1) and prompt chunks of three others (one of padding) in one pass
    give the logits, pool and lengths of ``forward`` over the decode step, then the
    chunks (their rows' tables in the same pool); also with the decode step in kvjax's
    decode kernel (interpreted), which writes and attends before the chunks are written."""
    if decode_kernel and not kvjax.kernels.decode_attention.available():
        pytest.skip("this JAX has no Pallas Triton")
    config, params = model.config, model.params
    rng = np.random.default_rng(3)
    plan = kvjax.attention.choose(config, jnp.float32, kv_dtype=kv_dtype,
                                  decode_kernel=decode_kernel)
    tables = rng.permutation(48)[:40].reshape(5, 8).astype(np.int32)
    pool = PagedKVCache.create(config, 1, 32, kv_dtype, block_size=4, num_blocks=48)
    history = rng.integers(0, config.vocab_size, (2, 13))
    _, pool = forward(config, params, jnp.asarray(history),
                      jnp.broadcast_to(jnp.arange(13, dtype=jnp.int32), (2, 13)),
                      pool.with_tables(tables[:2], np.zeros(2)), attention=plan)
    step = (jnp.asarray(rng.integers(0, config.vocab_size, (2, 1))), jnp.array([[13], [-1]]))
    chunk_positions = np.full((3, 8), -1, np.int32)
    chunk_positions[0, :7], chunk_positions[2, :5] = np.arange(7), np.arange(3, 8)
    chunk = (jnp.asarray(rng.integers(0, config.vocab_size, (3, 8))), jnp.asarray(chunk_positions))
    lengths = np.array([13, 13, 0, 0, 3])

    (step_logits, chunk_logits), mixed = kvjax.model.forward_parts(
        config, params, [step, chunk], pool.with_tables(tables, lengths), attention=plan)
    want_step, alone = forward(config, params, *step, pool.with_tables(tables[:2], lengths[:2]),
                               attention=plan)
    want_chunk, alone = forward(config, params, *chunk,
                                alone.with_tables(tables[2:], lengths[2:]), attention=plan)
    np.testing.assert_allclose(step_logits[0], want_step[0, 0], atol=ATOL)  # row 1 is idle
    np.testing.assert_allclose(chunk_logits[np.array([0, 2])], want_chunk[np.array([0, 2]), 0],
                               atol=ATOL)
    np.testing.assert_array_equal(mixed.lengths, [14, 13, 7, 0, 8])
    for got, want in zip(mixed.keys + mixed.values, alone.keys + alone.values):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=ATOL if kv_dtype == "float32" else 1)


def test_block_size_must_be_a_power_of_two_within_the_capacity(model):
    config = model.config
    with pytest.raises(ValueError) as error:
        PagedKVCache.create(config, 1, 64, "float32", block_size=12)
    assert str(error.value) == ("block_size must be a power of two >= 1 (slots a block; 16 is the "
                                "usual choice), got 12")
    with pytest.raises(ValueError) as error:
        PagedKVCache.create(config, 1, 8, "float32", block_size=16)
    assert str(error.value) == ("block_size (16) exceeds the capacity (8): a row's table would "
                                "hold less than one block; pass block_size <= 8")


@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "fp8"])
def test_decode_kernel_reads_the_block_tables(model, kv_dtype):
    """Decode steps through kvjax's decode kernel over the pool (interpreted on CPU:
    ``decode_kernel=True`` where JAX's TPU kernel does not take the step): the portable
    path's logits (1e-4) for ragged rows in shuffled blocks, one kernel call per layer
    in a decode step, and in a block of several tokens over int8/fp8 codes (the block
    kernel: ``attend_cached_block_paged``) but none over a float pool."""
    config = model.config
    tokens = np.random.default_rng(7).integers(0, config.vocab_size, (3, 64))
    order = np.random.default_rng(8).permutation(16)[:12].reshape(3, 4)
    cache = lambda: (PagedKVCache.create(config, 3, 64, kv_dtype, block_size=16, num_blocks=16)
                     .with_tables(order, np.zeros(3)))
    kernel_step = kvjax.model.step_fn(config, decode_kernel=True)
    sizes = [(9, 3, 1), (1, 1, 1), (1, 0, 1), (17, 2, 1), (1, 1, 1), (1, 1, 0)]
    want, _ = feed(model, cache(), tokens, sizes)
    got, _ = feed(model, cache(), tokens, sizes, step=kernel_step)
    for a, b, row_sizes in zip(got, want, sizes):
        real = np.asarray(row_sizes) > 0
        np.testing.assert_allclose(a[real], b[real], atol=ATOL)
    calls = lambda width: count_calls(jax.make_jaxpr(kernel_step)(
        model.params, np.zeros((3, width), np.int32),
        np.broadcast_to(np.arange(width, dtype=np.int32), (3, width)), cache()).jaxpr,
        "pallas_call")
    block_calls = 0 if kv_dtype == "float32" else config.num_layers
    assert (calls(1), calls(4)) == (config.num_layers, block_calls)


def test_tpu_paged_attention_interpreted():
    """Decode steps over a paged pool through JAX's Pallas TPU paged attention, in its
    TPU interpret mode on CPU (``decode_kernel=True``): a model whose head_dim (128)
    and blocks (16 slots) it takes gives the portable path's logits within what its
    bfloat16 arithmetic allows (0.05; the logits spread over more than 1); a decode
    step holds one kernel call per layer, blocks of several tokens none."""
    config = make_config(num_heads=4, num_kv_heads=2, head_dim=128, hidden_size=64,
                         num_layers=2, max_position_embeddings=128)
    model = make_model(config, scale=2.0)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, 40))
    sizes = [(9, 30), (1, 1), (1, 1), (17, 1), (1, 1)]
    order = np.random.default_rng(6).permutation(10)[:8].reshape(2, 4)
    cache = lambda: (PagedKVCache.create(config, 2, 64, "float32", block_size=16,
                                         num_blocks=10).with_tables(order, np.zeros(2)))
    kernel_step = kvjax.model.step_fn(config, decode_kernel=True)
    want, _ = feed(model, cache(), tokens, sizes)
    got, _ = feed(model, cache(), tokens, sizes, step=kernel_step)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=0.05)
    assert max(np.ptp(b) for b in want) > 1.0
    calls = lambda width: count_calls(jax.make_jaxpr(kernel_step)(
        model.params, np.zeros((2, width), np.int32),
        np.broadcast_to(np.arange(width, dtype=np.int32), (2, width)), cache()).jaxpr,
        "pallas_call")
    assert (calls(1), calls(4)) == (config.num_layers, 0)


@pytest.mark.skipif(not kvjax.attention.flash_supported(64, jnp.bfloat16),
                    reason="needs cuDNN flash attention")
def test_cudnn_prompt_chunks_over_the_pool_match_the_portable_path():
    """On GPUs a bfloat16 pool's prompt chunks (several tokens a row, over blocks the
    rows wrote before, ragged, with rows of padding) attend through cuDNN
    (``kvjax.attention.paged.attend_cache_cudnn``): each block's logits equal the
    portable path's within bfloat16's precision (2% of their spread), and a chunk's
    program holds cuDNN's attention and no loop."""
    config = make_config(num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256,
                         vocab_size=512, num_layers=2, max_position_embeddings=128)
    model = make_model(config, dtype=jnp.bfloat16, scale=2.0)
    rows, capacity, block_size = 3, 64, 16
    tokens = np.random.default_rng(7).integers(0, config.vocab_size, (rows, capacity))
    order = np.random.default_rng(8).permutation(14)[:12].reshape(rows, 4)
    cache = lambda: PagedKVCache.create(config, rows, capacity, "bfloat16", block_size=block_size,
                                        num_blocks=14).with_tables(order, np.zeros(rows))
    cudnn_plan = kvjax.attention.choose(config, jnp.bfloat16)
    assert {layer.implementation for layer in cudnn_plan.layers} == {"cudnn"}
    portable = kvjax.attention.AttentionPlan(tuple(
        dataclasses.replace(layer, implementation="xla", kernel=None)
        for layer in cudnn_plan.layers))
    step = lambda plan: jax.jit(functools.partial(forward, config, attention=plan))
    want, _ = feed(model, cache(), tokens, SIZES, step=step(portable))
    got, _ = feed(model, cache(), tokens, SIZES, step=step(cudnn_plan))
    for a, b, sizes in zip(got, want, SIZES):
        real = np.asarray(sizes) > 0
        np.testing.assert_allclose(a[real], b[real], atol=0.02 * np.ptp(b[real]))
    chunk = np.broadcast_to(np.arange(8, 16, dtype=np.int32), (rows, 8))
    text = step(cudnn_plan).lower(model.params, np.zeros((rows, 8), np.int32), chunk,
                                  cache()).compile().as_text()
    assert text.count("__cudnn$fmha") >= 2 * config.num_layers  # before the chunk, within it
    assert " while(" not in text
