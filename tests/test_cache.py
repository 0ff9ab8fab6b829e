"""KVCache: creation, size, per-row writes, in-place updates under donation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import programs
from kvjax.sampling import SamplingParams
from tests.conftest import make_config, make_model


def test_create_shapes_and_bytes():
    config = make_config(num_kv_heads=2, head_dim=8, num_layers=3)
    cache = kvjax.KVCache.create(config, batch=4, capacity=100, dtype=jnp.bfloat16)
    assert len(cache.keys) == len(cache.values) == 3
    assert all(k.shape == (4, 2, 100, 8) and k.dtype == jnp.bfloat16 for k in cache.keys)
    assert cache.lengths.shape == (4,) and cache.lengths.dtype == jnp.int32
    assert cache.capacity == 100 and cache.batch == 4
    assert cache.nbytes == 2 * 3 * 4 * 2 * 100 * 8 * 2 + 4 * 4
    assert not bool(cache.is_full.any())


def test_create_rejects_bad_sizes_and_dtypes():
    config = make_config()
    cases = [(dict(batch=0, capacity=8),
              "batch and capacity must be >= 1, got batch=0, capacity=8"),
             (dict(batch=1, capacity=8, dtype="int7"),
              "the cache dtype must be a floating type (float32, bfloat16, float16, float64), "
              "got 'int7'"),
             (dict(batch=1, capacity=8, dtype=jnp.int32), "the cache dtype must be a floating type "
              "(float32, bfloat16, float16, float64), got int32")]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            kvjax.KVCache.create(config, **kwargs)
        assert str(e.value) == message
    assert kvjax.KVCache.create(config, 1, 8, "float16").keys[0].dtype == jnp.float16


def test_update_writes_each_row_at_its_position():
    config = make_config(num_kv_heads=2, head_dim=4, num_layers=2)
    cache = kvjax.KVCache.create(config, batch=4, capacity=10, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    first_k = rng.normal(size=(4, 2, 2, 4)).astype(np.float32)  # [batch, kv_heads, new, head_dim]
    cache = cache.update(1, first_k, first_k, np.array([[-1, -1]] * 3 + [[0, 1]], np.int32))
    new_k = rng.normal(size=(4, 2, 2, 4)).astype(np.float32)
    new_v = rng.normal(size=(4, 2, 2, 4)).astype(np.float32)
    # row 2: one token + padding; row 3: padding only (a prompt chunk past its end)
    positions = np.array([[0, 1], [5, 6], [8, -1], [-1, -1]], np.int32)
    updated = cache.update(1, new_k, new_v, positions).advance(positions)

    expected_k = np.zeros((4, 2, 10, 4), np.float32)
    for row, start, count in [(0, 0, 2), (1, 5, 2), (2, 8, 1)]:
        expected_k[row, :, start:start + count] = new_k[row, :, :count]
    expected_k[3, :, 0:2] = first_k[3]  # padding writes nothing: the earlier tokens stay
    np.testing.assert_array_equal(updated.keys[1], expected_k)
    np.testing.assert_array_equal(updated.keys[0], 0)  # other layers untouched
    np.testing.assert_array_equal(updated.lengths, [2, 7, 9, 0])


def test_layer_and_with_layer():
    """``layer(i)`` is layer i's ``(keys, values)``; ``with_layer(i, (keys, values))``
    replaces just that layer's pair and keeps the lengths; ``update`` writes through them."""
    config = make_config(num_kv_heads=2, head_dim=4, num_layers=3)
    cache = kvjax.KVCache.create(config, batch=2, capacity=6, dtype=jnp.float32)
    cache = cache.replace(lengths=jnp.array([3, 1], jnp.int32))
    keys, values = cache.layer(1)
    assert keys is cache.keys[1] and values is cache.values[1]
    new_keys, new_values = jnp.ones_like(keys), jnp.full_like(values, 2.0)
    replaced = cache.with_layer(1, (new_keys, new_values))
    assert replaced.layer(1) == (new_keys, new_values)
    for index in (0, 2):
        assert replaced.layer(index) == cache.layer(index)
    np.testing.assert_array_equal(replaced.lengths, [3, 1])
    assert jax.tree.structure(replaced) == jax.tree.structure(cache)
    block = jnp.full((2, 2, 1, 4), 7.0)
    updated = cache.update(2, block, -block, jnp.array([[4], [0]], jnp.int32))
    np.testing.assert_array_equal(updated.layer(2)[0][0, :, 4], 7.0)
    np.testing.assert_array_equal(updated.layer(2)[1][1, :, 0], -7.0)
    assert int(jnp.count_nonzero(updated.layer(2)[0])) == 2 * 2 * 4
    assert updated.layer(0) == cache.layer(0) and updated.layer(1) == cache.layer(1)


def test_decode_step_updates_cache_in_place():
    """With the cache donated, the compiled step aliases every cache buffer to its output
    and needs far less scratch memory than one copy of the cache."""
    config = make_config(num_kv_heads=2, head_dim=16, num_layers=2, max_position_embeddings=8192)
    model = make_model(config)
    cache = kvjax.KVCache.create(config, batch=4, capacity=4096, dtype=jnp.float32)
    step = jax.jit(kvjax.model.step_fn(config), donate_argnums=3)
    tokens = jnp.ones((4, 1), jnp.int32)
    positions = jnp.full((4, 1), 7, jnp.int32)
    memory = step.lower(model.params, tokens, positions, cache).compile().memory_analysis()
    assert memory.alias_size_in_bytes >= cache.nbytes
    assert memory.temp_size_in_bytes < cache.nbytes / 4

    # And it really runs in place: the donated buffers are consumed.
    _, new_cache = step(model.params, tokens, positions, cache)
    assert cache.keys[0].is_deleted() and not new_cache.keys[0].is_deleted()
    assert int(new_cache.lengths[0]) == 8


def test_whole_generation_holds_one_cache():
    """The compiled generation (prefill + decode loop) needs no second copy of the cache.

    A one-token prompt block keeps prefill's score matrix small, so the scratch memory
    measured is the decode loop's."""
    config = make_config(num_kv_heads=2, head_dim=16, num_layers=2, max_position_embeddings=8192)
    model = make_model(config)
    batch, capacity = 4, 4096
    cache = kvjax.KVCache.create(config, batch, capacity, jnp.float32)
    args = (model.params, cache, np.zeros((batch, 1), np.int32), np.ones((batch,), np.int32),
            np.int32(8), SamplingParams.create(batch), np.uint32(0), np.full((16,), -1, np.int32))
    program = programs.generation_program(model, num_steps=16, greedy=True)
    memory = program.lower(*args).compile().memory_analysis()
    assert memory.alias_size_in_bytes >= cache.nbytes
    assert memory.temp_size_in_bytes < cache.nbytes / 4
