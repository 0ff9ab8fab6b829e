"""kvjax.kernels.decode_attention: a decode step's cache write and attention in one Pallas kernel,
checked against the plain path (KVCache.update + attend_cache). On CPU the kernel runs
in Pallas interpret mode; the compiled kernel is checked on GPUs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax

from kvjax.attention import attend_cache, choose
from kvjax.kernels import decode_attention
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
    got = jax.jit(lambda *a: decode_attention.attend_and_write(*a, interpret=True))(
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
    monkeypatch.setattr(decode_attention, "TARGET_PROGRAMS", 1)
    heads, kv_heads, head_dim, capacity, rows = CASES[case]
    assert decode_attention.part_count(len(rows), kv_heads, capacity, head_dim) == 1
    q, k, v, cache_k, cache_v = random_step(len(rows), heads, kv_heads, head_dim, capacity)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = plain_step(q, k, v, cache_k, cache_v, positions)
    got = decode_attention.attend_and_write(q, k, v, cache_k, cache_v, positions, interpret=True)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=2e-6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    jaxpr = str(jax.make_jaxpr(lambda *a: decode_attention.attend_and_write(*a, interpret=True))(
        q, k, v, cache_k, cache_v, positions))
    assert "reduce_max" not in jaxpr.split("pallas_call")[-1]  # no merge after the kernel


def test_kernel_in_bfloat16():
    """A bfloat16 cache: the output within bfloat16 rounding of the float32 plain path."""
    rows = [700, 3]
    q, k, v, cache_k, cache_v = random_step(2, 8, 2, 64, 768, jnp.bfloat16, seed=1)
    positions = jnp.array(rows, jnp.int32)[:, None]
    f32 = lambda x: x.astype(jnp.float32)
    want = plain_step(f32(q), f32(k), f32(v), f32(cache_k), f32(cache_v), positions)
    got = decode_attention.attend_and_write(q, k, v, cache_k, cache_v, positions, interpret=True)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    np.testing.assert_array_equal(f32(got[1]), want[1])


def test_part_count():
    """About TARGET_PROGRAMS programs, at most one part per block of the capacity (64
    slots; 32 for head_dim 256)."""
    assert decode_attention.part_count(1, 8, 32768, 128) == 32
    assert decode_attention.part_count(8, 8, 768, 128) == 4
    assert decode_attention.part_count(64, 8, 768, 128) == 1
    assert decode_attention.part_count(1, 2, 200, 64) == 4  # 200 slots: 4 parts of >= 64
    assert decode_attention.part_count(1, 1, 16, 16) == 1
    assert decode_attention.part_count(1, 1, 100, 256) == 4  # 100 slots: 4 blocks of 32
    assert decode_attention.part_count(1, 1, 100, 128) == 2


# (head_dim, dtype, keywords) -> whether the kernel handles them (``fits``): 16-bit
# caches, power-of-two head dimensions from 16 to 256, no sliding window, no soft-cap.
SHAPES = [
    ((128, jnp.bfloat16), {}, True), ((256, jnp.bfloat16), {}, True),
    ((16, jnp.float16), {}, True), ((64, jnp.float16), {}, True),
    ((128, jnp.float32), {}, False), ((64, jnp.float64), {}, False),
    ((96, jnp.bfloat16), {}, False), ((512, jnp.bfloat16), {}, False),
    ((8, jnp.bfloat16), {}, False), ((0, jnp.bfloat16), {}, False),
    ((128, jnp.bfloat16), dict(sliding_window=4096), False),
    ((128, jnp.bfloat16), dict(logit_softcap=50.0), False),
    ((128, jnp.float16), dict(sliding_window=4096, logit_softcap=50.0), False),
]


def pretend_gpu(monkeypatch, capability: tuple[int, int] | None) -> None:
    """``kvjax.platform.is_cuda_gpu`` as on a CUDA GPU of ``capability`` (None: no CUDA
    GPU)."""
    def is_cuda_gpu(min_capability=(8, 0)):
        return capability is not None and capability >= min_capability

    monkeypatch.setattr(kvjax.platform, "is_cuda_gpu", is_cuda_gpu)


def test_fits_is_the_shape_and_dtype_rule():
    for (head_dim, dtype), kwargs, expected in SHAPES:
        assert decode_attention.fits(head_dim, dtype, **kwargs) is expected, (head_dim, dtype,
                                                                               kwargs)


@pytest.mark.skipif(kvjax.platform.is_cuda_gpu(), reason="checks a machine without a CUDA GPU")
def test_never_compiled_off_cuda_gpus():
    """Here (no CUDA GPU of compute capability >= 8.0) the kernel never runs compiled,
    whatever the shapes, and saying so warns about nothing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for (head_dim, dtype), kwargs, _ in SHAPES:
            assert decode_attention.supported(head_dim, dtype, **kwargs) is False
    assert not caught


@pytest.mark.skipif(not decode_attention.available(), reason="this JAX has no Pallas Triton")
def test_supported_on_a_cuda_gpu_is_fits(monkeypatch):
    """On a CUDA GPU of compute capability 8.0 or newer (pretended), with Pallas Triton,
    ``supported`` is exactly ``fits``; on an older GPU or none, never."""
    pretend_gpu(monkeypatch, (9, 0))
    for (head_dim, dtype), kwargs, expected in SHAPES:
        assert decode_attention.supported(head_dim, dtype, **kwargs) is expected
    pretend_gpu(monkeypatch, (8, 0))
    assert decode_attention.supported(128, jnp.bfloat16) is True
    for capability in [(7, 5), None]:
        pretend_gpu(monkeypatch, capability)
        assert not any(decode_attention.supported(head_dim, dtype, **kwargs)
                       for (head_dim, dtype), kwargs, _ in SHAPES)


def test_without_pallas_triton(monkeypatch):
    """Where this JAX has no Pallas Triton: never supported, one RuntimeWarning on a CUDA
    GPU (however often asked), none elsewhere; ``choose`` keeps the XLA path by
    default and refuses ``decode_kernel=True``; the kernel itself raises."""
    monkeypatch.setattr(decode_attention, "plgpu", None)
    assert not decode_attention.available()
    pretend_gpu(monkeypatch, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not any(decode_attention.supported(head_dim, dtype, **kwargs)
                       for (head_dim, dtype), kwargs, _ in SHAPES)
    assert not caught  # not a CUDA GPU: nothing is missing

    pretend_gpu(monkeypatch, (9, 0))
    decode_attention._warn_missing_triton.cache_clear()  # forget any earlier warning
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                assert not any(decode_attention.supported(head_dim, dtype, **kwargs)
                               for (head_dim, dtype), kwargs, _ in SHAPES)
            config = make_config(num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
            plan = choose(config, jnp.bfloat16)
        assert [layer.kernel for layer in plan.layers] == [None] * config.num_layers
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1, [str(w.message) for w in caught]
        assert "no Pallas Triton" in str(runtime[0].message)
    finally:
        decode_attention._warn_missing_triton.cache_clear()
    with pytest.raises(RuntimeError, match="this JAX has no Pallas Triton"):
        choose(config, jnp.bfloat16, decode_kernel=True)
    q, k, v, cache_k, cache_v = random_step(1, 4, 2, 16, 64, jnp.bfloat16)
    with pytest.raises(RuntimeError, match="needs JAX's Pallas Triton backend"):
        decode_attention.attend_and_write(q, k, v, cache_k, cache_v, jnp.zeros((1, 1), jnp.int32),
                                          interpret=True)


def run_decode(model, kernel: bool | None, stops):
    """kvjax.generate's loop over a ragged batch with the model's decode steps on the
    kernel (interpreted off GPUs) or on the plain path; returns the result and how many
    Pallas calls the program holds."""
    config = model.config
    prompts = np.zeros((3, 16), np.int32)
    prompts[0, :7], prompts[1, :3], prompts[2, :11] = range(5, 12), [2, 71, 33], range(40, 51)
    program = kvjax.jit_decode(kvjax.model.step_fn(config, decode_kernel=kernel), num_steps=20,
                               greedy=True, sync_every=4)
    args = (model.params, kvjax.KVCache.create(config, 3, 48, jnp.float32), prompts,
            np.array([7, 3, 11], np.int32), np.int32(20), SamplingParams.create(3),
            np.uint32(0), np.asarray(stops, np.int32))
    pallas_calls = count_calls(jax.make_jaxpr(program)(*args).jaxpr, "pallas_call")
    return program(*args), pallas_calls


def test_generation_with_the_kernel_equals_the_plain_path():
    """Greedy decoding with every decode step on the interpreted kernel (a float32 model:
    interpreted, the kernel takes any float cache) gives the plain path's tokens and
    cache, with rows that stop early (idle in later steps)."""
    model = make_model(make_config(num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64))
    free, _ = run_decode(model, False, [-1])
    stops = [int(free.tokens[0, 4]), int(free.tokens[2, 9])]
    (plain, plain_calls), (fused, fused_calls) = (run_decode(model, False, stops),
                                                  run_decode(model, True, stops))
    # the decode step's layers on the kernel; the prefill (a block) never is
    assert (plain_calls, fused_calls) == (0, model.config.num_layers)
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
    if not decode_attention.supported(config.head_dim, cache.keys[0].dtype):
        assert calls(None) == 0
    assert calls(True) == calls(False) + config.num_layers == config.num_layers


@pytest.mark.skipif(not decode_attention.supported(128, jnp.bfloat16), reason="needs a CUDA GPU")
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
    got = jax.jit(decode_attention.attend_and_write)(q, k, v, cache_k, cache_v, positions)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    np.testing.assert_array_equal(f32(got[1]), want[1])
    np.testing.assert_array_equal(f32(got[2]), want[2])


def gpus() -> int:
    return jax.device_count() if jax.default_backend() == "gpu" else 0


@pytest.mark.skipif(gpus() < 2 or not decode_attention.supported(128, jnp.bfloat16),
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
    step = jax.jit(lambda *a: decode_attention.attend_and_write(*a, split=split),
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
