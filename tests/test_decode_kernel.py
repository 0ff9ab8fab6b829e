"""kvjax.decode_kernel: a decode step's cache write and attention in one Pallas kernel,
checked against the plain path (KVCache.update + attend_cache). On CPU the kernel runs
in Pallas interpret mode; the compiled kernel is checked on GPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import decode_kernel
from kvjax.attention import attend_cache
from kvjax.sampling import SamplingParams
from tests.conftest import count_calls, make_config, make_model


def plain_step(q, k, v, cache_k, cache_v, positions):
    """What the kernel replaces: write the new K/V, then attend over the cache."""
    cache = kvjax.KVCache(keys=(cache_k,), values=(cache_v,),
                          lengths=jnp.zeros((q.shape[0],), jnp.int32))
    cache = cache.update(0, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions)
    out = attend_cache(q, k, v, cache.keys[0], cache.values[0], positions, implementation="xla")
    return jnp.where((positions >= 0)[:, :, None, None], out, 0), cache.keys[0], cache.values[0]


def random_step(batch, heads, kv_heads, head_dim, capacity, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    return (normal(keys[0], (batch, 1, heads, head_dim)),
            normal(keys[1], (batch, 1, kv_heads, head_dim)),
            normal(keys[2], (batch, 1, kv_heads, head_dim)),
            normal(keys[3], (batch, kv_heads, capacity, head_dim)),
            normal(keys[4], (batch, kv_heads, capacity, head_dim)))


# (heads, kv_heads, head_dim, capacity, positions): MHA, GQA, MQA and a group of 16;
# rows at slot 0, at the last slot, deep in a long cache and
# idle (-1); capacities that are not a multiple of the 64-slot blocks; head_dim 256 (Gemma),
# read in 32-slot blocks.
CASES = {
    "gqa": (8, 2, 16, 200, [137, 0, -1]),
    "mha": (4, 4, 32, 64, [63, 5, 30]),
    "mqa": (16, 1, 16, 300, [299, 64, 1]),
    "group16": (32, 2, 64, 128, [127, 100, -1]),
    "long": (4, 1, 16, 2000, [1999, 1000, 70]),  # 32 parts; 2 of them hold a fill of 70
    "head_dim256": (8, 1, 256, 100, [99, 31, 32]),  # 4 parts of 32 slots
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_the_plain_path(case):
    """Interpreted: the same attention output (float32 rounding) and exactly the same
    cache buffers; idle rows give zeros and leave their cache untouched."""
    heads, kv_heads, head_dim, capacity, rows = CASES[case]
    q, k, v, cache_k, cache_v = random_step(len(rows), heads, kv_heads, head_dim, capacity)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = plain_step(q, k, v, cache_k, cache_v, positions)
    got = jax.jit(lambda *a: decode_kernel.attend_and_write(*a, interpret=True))(
        q, k, v, cache_k, cache_v, positions)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=2e-6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    idle = np.asarray(rows) < 0
    assert not np.any(np.asarray(got[0])[idle])
    np.testing.assert_array_equal(np.asarray(got[1])[idle], np.asarray(cache_k)[idle])


@pytest.mark.parametrize("case", ["gqa", "long", "group16", "head_dim256"])
def test_single_part_equals_the_plain_path(case, monkeypatch):
    """With one part a row (as at batches of 32 and more: part_count), the kernel writes
    the normalised output itself and nothing is merged after it: the same output and
    cache as the plain path."""
    monkeypatch.setattr(decode_kernel, "TARGET_PROGRAMS", 1)
    heads, kv_heads, head_dim, capacity, rows = CASES[case]
    assert decode_kernel.part_count(len(rows), kv_heads, capacity, head_dim) == 1
    q, k, v, cache_k, cache_v = random_step(len(rows), heads, kv_heads, head_dim, capacity)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = plain_step(q, k, v, cache_k, cache_v, positions)
    got = decode_kernel.attend_and_write(q, k, v, cache_k, cache_v, positions, interpret=True)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=2e-6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    jaxpr = str(jax.make_jaxpr(lambda *a: decode_kernel.attend_and_write(*a, interpret=True))(
        q, k, v, cache_k, cache_v, positions))
    assert "reduce_max" not in jaxpr.split("pallas_call")[-1]  # no merge after the kernel


def test_kernel_in_bfloat16():
    """A bfloat16 cache: the output within bfloat16 rounding of the float32 plain path."""
    rows = [700, 3]
    q, k, v, cache_k, cache_v = random_step(2, 8, 2, 64, 768, jnp.bfloat16, seed=1)
    positions = jnp.array(rows, jnp.int32)[:, None]
    f32 = lambda x: x.astype(jnp.float32)
    want = plain_step(f32(q), f32(k), f32(v), f32(cache_k), f32(cache_v), positions)
    got = decode_kernel.attend_and_write(q, k, v, cache_k, cache_v, positions, interpret=True)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    np.testing.assert_array_equal(f32(got[1]), want[1])


def test_part_count():
    """About TARGET_PROGRAMS programs, at most one part per block of the capacity (64
    slots; 32 for head_dim 256)."""
    assert decode_kernel.part_count(1, 8, 32768, 128) == 32
    assert decode_kernel.part_count(8, 8, 768, 128) == 4
    assert decode_kernel.part_count(64, 8, 768, 128) == 1
    assert decode_kernel.part_count(1, 2, 200, 64) == 4  # 200 slots: 4 parts of >= 64
    assert decode_kernel.part_count(1, 1, 16, 16) == 1
    assert decode_kernel.part_count(1, 1, 100, 256) == 4  # 100 slots: 4 blocks of 32
    assert decode_kernel.part_count(1, 1, 100, 128) == 2


def test_where_the_kernel_runs():
    """Compiled only on CUDA GPUs, for 16-bit caches, power-of-two head dimensions from 16
    to 256, and layers without a sliding window or a logit soft-cap."""
    gpu = jax.default_backend() == "gpu"
    assert decode_kernel.supported(128, jnp.bfloat16) == gpu or not gpu
    assert not decode_kernel.supported(128, jnp.float32)
    assert not decode_kernel.supported(96, jnp.bfloat16)
    assert decode_kernel.supported(256, jnp.bfloat16) == gpu or not gpu
    assert not decode_kernel.supported(512, jnp.bfloat16)
    assert not decode_kernel.supported(8, jnp.bfloat16)
    assert not decode_kernel.supported(128, jnp.bfloat16, sliding_window=4096)
    assert not decode_kernel.supported(128, jnp.bfloat16, logit_softcap=50.0)
    if not gpu:
        assert not decode_kernel.supported(128, jnp.bfloat16)


def run_decode(model, kernel: bool | None, stops):
    """kvjax.generate's loop over a ragged batch with the model's decode steps on the
    kernel (interpreted off GPUs) or on the plain path."""
    config = model.config
    prompts = np.zeros((3, 16), np.int32)
    prompts[0, :7], prompts[1, :3], prompts[2, :11] = range(5, 12), [2, 71, 33], range(40, 51)
    program = kvjax.jit_decode(kvjax.model.step_fn(config, decode_kernel=kernel), num_steps=20,
                               greedy=True, sync_every=4)
    return program(model.params, kvjax.KVCache.create(config, 3, 48, jnp.float32), prompts,
                   np.array([7, 3, 11], np.int32), np.int32(20), SamplingParams.create(3),
                   np.uint32(0), np.asarray(stops, np.int32))


def test_generation_with_the_kernel_equals_the_plain_path():
    """Greedy decoding with every decode step on the interpreted kernel gives the plain
    path's tokens and cache, with rows that stop early (idle in later steps)."""
    model = make_model(make_config(num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64))
    free = run_decode(model, False, [-1])
    stops = [int(free.tokens[0, 4]), int(free.tokens[2, 9])]
    plain, fused = run_decode(model, False, stops), run_decode(model, True, stops)
    np.testing.assert_array_equal(fused.tokens, plain.tokens)
    np.testing.assert_array_equal(fused.num_generated, plain.num_generated)
    assert min(np.asarray(plain.num_generated)) < 20  # some row stopped early
    for got, want in zip(jax.tree.leaves(fused.cache), jax.tree.leaves(plain.cache)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_keeps_the_plain_path_without_a_gpu():
    """decode_kernel=None compiles the kernel only where it is supported: on CPU the
    step has no Pallas call; True puts one in each layer."""
    model = make_model(make_config())
    config = model.config
    cache = kvjax.KVCache.create(config, 1, 32, jnp.float32)
    args = (model.params, np.ones((1, 1), np.int32), np.full((1, 1), 5, np.int32), cache)
    calls = lambda setting: count_calls(jax.make_jaxpr(
        kvjax.model.step_fn(config, decode_kernel=setting))(*args).jaxpr, "pallas_call")
    if not decode_kernel.supported(config.head_dim, cache.keys[0].dtype):
        assert calls(None) == 0
    assert calls(True) == calls(False) + config.num_layers == config.num_layers


@pytest.mark.skipif(not decode_kernel.supported(128, jnp.bfloat16), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (8, 1, 256), (16, 16, 256)])
@pytest.mark.parametrize("rows", [[0, 511, -1], [2047, 5, 1000]])
def test_compiled_kernel_equals_the_plain_path(rows, heads, kv_heads, head_dim):
    """The compiled kernel (bf16; Llama-3's heads, Gemma's MQA and MHA at head_dim 256)
    against the float32 plain path; its cache writes exactly."""
    capacity = 2112
    q, k, v, cache_k, cache_v = random_step(len(rows), heads, kv_heads, head_dim, capacity,
                                            jnp.bfloat16)
    positions = jnp.array(rows, jnp.int32)[:, None]
    f32 = lambda x: x.astype(jnp.float32)
    want = plain_step(f32(q), f32(k), f32(v), f32(cache_k), f32(cache_v), positions)
    got = jax.jit(decode_kernel.attend_and_write)(q, k, v, cache_k, cache_v, positions)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    np.testing.assert_array_equal(f32(got[1]), want[1])
    np.testing.assert_array_equal(f32(got[2]), want[2])


def gpus() -> int:
    return jax.device_count() if jax.default_backend() == "gpu" else 0


@pytest.mark.skipif(gpus() < 2 or not decode_kernel.supported(128, jnp.bfloat16),
                    reason="needs two CUDA GPUs")
@pytest.mark.parametrize("data, model", [(1, 2), (2, 1)])
def test_compiled_kernel_on_each_device_of_a_mesh(data, model):
    """Under a MeshSplit (rows over data, KV heads and their query heads over model) the
    compiled kernel runs on each GPU's shard: the float32 plain path's output, an exact
    cache written in place (its per-device buffers aliased), and no collective at all."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kvjax import sharding

    config = make_config(num_heads=32, num_kv_heads=8, head_dim=128, hidden_size=4096)
    mesh = sharding.make_mesh(data=data, model=model)
    split = sharding.kernel_split(config, mesh)
    rows, capacity = [0, 511, 2047, -1], 2112
    q, k, v, cache_k, cache_v = random_step(len(rows), 32, 8, 128, capacity, jnp.bfloat16)
    positions = jnp.array(rows, jnp.int32)[:, None]
    f32 = lambda x: x.astype(jnp.float32)
    want = plain_step(f32(q), f32(k), f32(v), f32(cache_k), f32(cache_v), positions)
    place = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    args = (place(q, "data", None, "model"), place(k, "data", None, "model"),
            place(v, "data", None, "model"), place(cache_k, "data", "model"),
            place(cache_v, "data", "model"), place(positions, "data"))
    step = jax.jit(lambda *a: decode_kernel.attend_and_write(*a, split=split),
                   donate_argnums=(3, 4))
    compiled = step.lower(*args).compile()
    text = compiled.as_text()
    assert "kvjax_decode_attention" in text
    assert not any(op in text for op in ("all-gather", "all-reduce", "all-to-all",
                                         "collective-permute"))
    # each device's halves of the two buffers: cache_k.nbytes in all
    assert compiled.memory_analysis().alias_size_in_bytes >= cache_k.nbytes
    cache_sharding = args[3].sharding
    got = compiled(*args)
    assert got[1].sharding.is_equivalent_to(cache_sharding, 4)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    np.testing.assert_array_equal(f32(got[1]), want[1])
    np.testing.assert_array_equal(f32(got[2]), want[2])
