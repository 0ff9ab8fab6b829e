"""kvjax.kernels.decode_attention: a decode step's cache write and attention in one Pallas kernel,
checked against the plain path (KVCache.update + attend_cache; for an int8/fp8 cache
write_quantized_block + the portable quantized attend_cache). On CPU the kernel runs in
Pallas interpret mode (on a mesh: a subprocess with 4 CPU devices); the compiled kernel
is checked on GPUs."""

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import kvjax

from kvjax.attention import attend_cache, choose, quantized
from kvjax.cache.quantized import quantize, write_quantized_block
from kvjax.kernels import decode_attention
from kvjax.sampling import SamplingParams
from tests.conftest import count_calls, make_config, make_model, run_on_cpu_devices

# What the cache holds: the queries' float dtype (None), int8 or fp8 codes with scales.
KINDS = (None, "int8", "fp8")


def plain_step(q, k, v, positions, *buffers):
    """What the kernel replaces: write the new K/V, then attend over the cache (the
    buffers of ``random_step``: float, or quantized codes and scales); returns
    ``(out, *buffers)``, zeros out for rows at position -1."""
    if len(buffers) == 2:
        cache = kvjax.KVCache(keys=buffers[:1], values=buffers[1:],
                              lengths=jnp.zeros((q.shape[0],), jnp.int32))
        cache = cache.update(0, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions)
        buffers = cache.keys[0], cache.values[0]
        out = attend_cache(q, k, v, *buffers, positions, implementation="xla")
    else:
        buffers = write_quantized_block(buffers, k.transpose(0, 2, 1, 3),
                                        v.transpose(0, 2, 1, 3), positions)
        out = quantized.attend_cache(q, *buffers, positions)
    return jnp.where((positions >= 0)[:, :, None, None], out, 0), *buffers


def kernel_step(q, k, v, positions, *buffers, **options):
    """The kernel over ``buffers`` (float or quantized); returns ``(out, *buffers)``."""
    write = (decode_attention.attend_and_write if len(buffers) == 2
             else decode_attention.attend_and_write_quantized)
    return write(q, k, v, *buffers, positions, **options)


def random_step(batch, heads, kv_heads, head_dim, capacity, dtype=jnp.float32, seed=0,
                kind=None):
    """``(q, k, v, *buffers)`` of a decode step: the cache's buffers in ``dtype``, or for
    an int8/fp8 ``kind`` random values quantized (codes and scales)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    cache = (normal(keys[3], (batch, kv_heads, capacity, head_dim)),
             normal(keys[4], (batch, kv_heads, capacity, head_dim)))
    if kind is not None:
        (key_codes, key_scales), (value_codes, value_scales) = (quantize(x, kind) for x in cache)
        cache = key_codes, value_codes, key_scales, value_scales
    return (normal(keys[0], (batch, 1, heads, head_dim)),
            normal(keys[1], (batch, 1, kv_heads, head_dim)),
            normal(keys[2], (batch, 1, kv_heads, head_dim)), *cache)


def f32(x):
    return np.asarray(x, np.float32)  # exact for bf16, f16, int8 and fp8


def assert_same_buffers(got, want):
    """The cache's buffers bit for bit (codes and scales too)."""
    for got_buffer, want_buffer in zip(got, want, strict=True):
        np.testing.assert_array_equal(f32(got_buffer), f32(want_buffer))


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


# Each shape over a float32 cache and over one kind of codes (gqa over both), so that
# each kind meets several shapes without running every pair.
CASE_KINDS = [("gqa", None), ("gqa", "int8"), ("gqa", "fp8"), ("mha", None), ("mha", "fp8"),
              ("mqa", None), ("mqa", "int8"), ("group16", None), ("group16", "fp8"),
              ("long", None), ("long", "int8"), ("head_dim256", None), ("head_dim256", "int8")]


@pytest.mark.parametrize("case, kind", CASE_KINDS)
def test_kernel_equals_the_plain_path(case, kind):
    """Interpreted, float32 queries over a float32 cache or int8/fp8 codes: the same
    attention output (float32 rounding: 2e-6) and exactly the same cache buffers (the
    new token's codes and scales too); idle rows give zeros and leave their cache
    untouched."""
    heads, kv_heads, head_dim, capacity, rows = CASES[case]
    q, k, v, *buffers = random_step(len(rows), heads, kv_heads, head_dim, capacity, kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = plain_step(q, k, v, positions, *buffers)
    got = jax.jit(lambda *a: kernel_step(*a, interpret=True))(q, k, v, positions, *buffers)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=2e-6)
    assert_same_buffers(got[1:], want[1:])
    idle = np.asarray(rows) < 0
    assert not np.any(np.asarray(got[0])[idle])
    assert_same_buffers([np.asarray(b)[idle] for b in got[1:]],
                        [np.asarray(b)[idle] for b in buffers])


@pytest.mark.parametrize("case, kind", [("gqa", None), ("gqa", "int8"), ("gqa", "fp8"),
                                        ("long", "fp8"), ("group16", "int8"),
                                        ("head_dim256", None)])
def test_single_part_equals_the_plain_path(case, kind):
    """With one part a row (as at batches of 32 and more: part_count), the kernel writes
    the normalised output itself and nothing is merged after it: the same output (2e-6)
    and cache as the plain path. A quantized step quantizes its new token in the kernel:
    nothing reduces before it either."""
    tuning = decode_attention.Tuning(target_programs=1)
    heads, kv_heads, head_dim, capacity, rows = CASES[case]
    assert decode_attention.part_count(len(rows), kv_heads, capacity, head_dim, tuning) == 1
    q, k, v, *buffers = random_step(len(rows), heads, kv_heads, head_dim, capacity, kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = plain_step(q, k, v, positions, *buffers)
    got = kernel_step(q, k, v, positions, *buffers, interpret=True, tuning=tuning)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=2e-6)
    assert_same_buffers(got[1:], want[1:])
    jaxpr = jax.make_jaxpr(lambda *a: kernel_step(*a, interpret=True, tuning=tuning))(
        q, k, v, positions, *buffers)
    steps = primitives_outside_kernels(jaxpr.jaxpr)
    kernel = steps.index("pallas_call")
    assert "reduce_max" not in steps[kernel:]  # no merge after the kernel
    assert "reduce_max" not in steps[:kernel]  # no quantization before it


def primitives_outside_kernels(jaxpr) -> list[str]:
    """The names of ``jaxpr``'s primitives in order, those of nested jaxprs (``jit``)
    inlined, a Pallas kernel's body left out."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        inner = eqn.params.get("jaxpr")
        if eqn.primitive.name != "pallas_call" and inner is not None:
            names += primitives_outside_kernels(getattr(inner, "jaxpr", inner))
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_in_bfloat16(kind):
    """bfloat16 queries over a bfloat16 cache or int8/fp8 codes (int8 keys scored by
    int8 products, other codes converted to bfloat16 in the kernel, as compiled): the
    output within bfloat16 rounding (atol 0.03, rtol 0.05) of the float32 plain path;
    the cache exactly."""
    rows = [700, 3]
    q, k, v, *buffers = random_step(2, 8, 2, 64, 768, jnp.bfloat16, seed=1, kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    to_f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
    want = plain_step(*map(to_f32, (q, k, v)), positions, *map(to_f32, buffers))
    got = kernel_step(q, k, v, positions, *buffers, interpret=True)
    assert got[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    assert_same_buffers(got[1:], want[1:])


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
    deep = decode_attention.DEEP_TUNING  # 128-slot blocks, 512 programs
    assert decode_attention.part_count(8, 8, 16448, 128, deep) == 8
    assert decode_attention.part_count(1, 1, 200, 128, deep) == 2


# (head_dim, dtype, keywords) -> whether the kernel handles them (``fits``): 16-bit
# queries over a cache of their dtype or of int8/fp8 codes, power-of-two head dimensions
# from 16 to 256, no sliding window, no soft-cap.
SHAPES = [
    ((128, jnp.bfloat16), {}, True), ((256, jnp.bfloat16), {}, True),
    ((16, jnp.float16), {}, True), ((64, jnp.float16), {}, True),
    ((128, jnp.float32), {}, False), ((64, jnp.float64), {}, False),
    ((96, jnp.bfloat16), {}, False), ((512, jnp.bfloat16), {}, False),
    ((8, jnp.bfloat16), {}, False), ((0, jnp.bfloat16), {}, False),
    ((128, jnp.bfloat16), dict(sliding_window=4096), False),
    ((128, jnp.bfloat16), dict(logit_softcap=50.0), False),
    ((128, jnp.float16), dict(sliding_window=4096, logit_softcap=50.0), False),
    ((128, jnp.bfloat16), dict(kv_dtype="int8"), True),
    ((256, jnp.float16), dict(kv_dtype="int8"), True),
    ((128, jnp.bfloat16), dict(kv_dtype="fp8"), True),
    ((64, jnp.bfloat16), dict(kv_dtype="bfloat16"), True),
    ((64, jnp.bfloat16), dict(kv_dtype="float16"), False),  # one float dtype for both
    ((128, jnp.float32), dict(kv_dtype="int8"), False),
    ((96, jnp.bfloat16), dict(kv_dtype="fp8"), False),
    ((128, jnp.bfloat16), dict(kv_dtype="int8", sliding_window=4096), False),
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
    pretend_gpu(monkeypatch, (8, 0))  # Ampere: no fp8 conversions in Triton
    assert decode_attention.supported(128, jnp.bfloat16) is True
    assert decode_attention.supported(128, jnp.bfloat16, kv_dtype="int8") is True
    assert decode_attention.supported(128, jnp.bfloat16, kv_dtype="fp8") is False
    pretend_gpu(monkeypatch, (8, 9))
    assert decode_attention.supported(128, jnp.bfloat16, kv_dtype="fp8") is True
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
    for kind in KINDS:
        step = random_step(1, 4, 2, 16, 64, jnp.bfloat16, kind=kind)
        with pytest.raises(RuntimeError, match="needs JAX's Pallas Triton backend"):
            kernel_step(*step[:3], jnp.zeros((1, 1), jnp.int32), *step[3:], interpret=True)


def run_decode(model, kernel: bool | None, stops, kv_dtype: str | None = None):
    """kvjax.generate's loop over a ragged batch with the model's decode steps on the
    kernel (interpreted off GPUs) or on the plain path, over a cache of ``kv_dtype``;
    returns the result and how many Pallas calls the program holds."""
    config = model.config
    prompts = np.zeros((3, 16), np.int32)
    prompts[0, :7], prompts[1, :3], prompts[2, :11] = range(5, 12), [2, 71, 33], range(40, 51)
    program = kvjax.jit_decode(kvjax.model.step_fn(config, decode_kernel=kernel), num_steps=20,
                               greedy=True, sync_every=4)
    args = (model.params, kvjax.cache.create(config, 3, 48, kv_dtype, jnp.float32), prompts,
            np.array([7, 3, 11], np.int32), np.int32(20), SamplingParams.create(3),
            np.uint32(0), np.asarray(stops, np.int32))
    pallas_calls = count_calls(jax.make_jaxpr(program)(*args).jaxpr, "pallas_call")
    return program(*args), pallas_calls


@pytest.mark.parametrize("kind", KINDS)
def test_generation_with_the_kernel_equals_the_plain_path(kind):
    """Greedy decoding with every decode step on the interpreted kernel (a float32 model:
    interpreted, the kernel takes any float cache), over a float, int8 or fp8 cache (its
    prompt block on ``attend_cached_block``), gives the plain path's tokens and cache,
    with rows that stop early (idle in later steps)."""
    model = make_model(make_config(num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64))
    free, _ = run_decode(model, False, [-1], kind)
    stops = [int(free.tokens[0, 4]), int(free.tokens[2, 9])]
    (plain, plain_calls), (fused, fused_calls) = (run_decode(model, False, stops, kind),
                                                  run_decode(model, True, stops, kind))
    # the decode step's layers on the kernel; the prefill (a block) too over codes
    # (attend_cached_block), never over a float cache
    blocks = model.config.num_layers if kind in ("int8", "fp8") else 0
    assert (plain_calls, fused_calls) == (0, model.config.num_layers + blocks)
    np.testing.assert_array_equal(fused.tokens, plain.tokens)
    np.testing.assert_array_equal(fused.num_generated, plain.num_generated)
    assert min(np.asarray(plain.num_generated)) < 20  # some row stopped early
    for got, want in zip(jax.tree.leaves(fused.cache), jax.tree.leaves(plain.cache)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=1e-5)


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


@pytest.mark.parametrize("tokens, calls", [(128, 2), (129, 0)])
def test_blocks_over_codes_on_the_block_kernel_up_to_its_tiles(tokens, calls):
    """With the kernel on, a block over an int8 cache runs ``attend_cached_block`` in each
    layer while its query rows (tokens x a group of 4) fit ``BLOCK_TILES`` tiles of
    ``BLOCK_ROWS``, 512 here, and the portable path beyond."""
    assert decode_attention.BLOCK_ROWS * decode_attention.BLOCK_TILES == 512
    config = make_config(num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=64)
    model = make_model(config)
    cache = kvjax.cache.create(config, 1, 256, "int8", jnp.float32)
    args = (model.params, np.ones((1, tokens), np.int32),
            np.arange(tokens, dtype=np.int32)[None], cache)
    jaxpr = jax.make_jaxpr(kvjax.model.step_fn(config, decode_kernel=True))(*args).jaxpr
    assert config.num_layers == 2
    assert count_calls(jaxpr, "pallas_call") == calls


def skip_unless_compiled(head_dim: int, kind: str | None) -> None:
    if not decode_attention.supported(head_dim, jnp.bfloat16, kv_dtype=kind):
        pytest.skip(f"needs a CUDA GPU that runs the kernel over a {kind or 'bf16'} cache")


def float32_plain_step(q, k, v, positions, *buffers):
    """``plain_step`` in float32: the oracle of the bf16 kernel."""
    to_f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
    return plain_step(*map(to_f32, (q, k, v)), positions, *map(to_f32, buffers))


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreted", "compiled"])
def test_int8_as_float16_is_exact(compiled):
    """Every int8 code, turned into float16 by integer arithmetic (in JAX, or compiled:
    the kernel's PTX, four codes a register), is its value."""
    codes = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    if compiled:
        skip_unless_compiled(128, "int8")

        def convert(codes_ref, out_ref):
            out_ref[...] = decode_attention._int8_as_float16(codes_ref[...], interpret=False)

        settings = decode_attention.plgpu.CompilerParams(num_warps=1)
        got = pl.pallas_call(convert, out_shape=jax.ShapeDtypeStruct(codes.shape, jnp.float16),
                             compiler_params=settings)(codes)
    else:
        got = decode_attention._int8_as_float16(codes, interpret=True)
    assert got.dtype == jnp.float16
    np.testing.assert_array_equal(f32(got).ravel(), np.arange(-128, 128, dtype=np.float32))


# (heads, kv_heads, head_dim, capacity, tokens, first positions; None: an idle row):
# one tile of query rows, several (40 tokens x a group of 4 = 160 rows: 3 tiles of 64),
# MHA at head_dim 32.
BLOCK_CASES = {
    "gqa": (8, 2, 16, 200, 5, [137, 0, None]),
    "tiles": (8, 2, 16, 300, 40, [100, 7, 250]),
    "mha": (4, 4, 32, 64, 6, [50, 3, 20]),
}


def random_block(heads, kv_heads, head_dim, capacity, tokens, firsts, dtype=jnp.float32,
                 kind=None):
    """``(q, k, v, positions, *buffers)`` of a block of ``tokens`` a row at ``firsts``
    (None: an idle row; the last row's last two tokens are padding, -1), the cache's
    buffers as ``random_step`` makes them."""
    _, _, _, *buffers = random_step(len(firsts), heads, kv_heads, head_dim, capacity, dtype,
                                    kind=kind)
    keys = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(key, (len(firsts), tokens, n, head_dim)).astype(dtype)
               for key, n in zip(keys, (heads, kv_heads, kv_heads)))
    positions = np.array([np.arange(tokens) + first if first is not None
                          else np.full(tokens, -1) for first in firsts])
    positions[-1, -2:] = -1
    return q, k, v, jnp.asarray(positions, jnp.int32), *buffers


@pytest.mark.parametrize("case, kind", [("gqa", None), ("gqa", "int8"), ("tiles", None),
                                        ("tiles", "fp8"), ("mha", "int8"), ("mha", "fp8")])
def test_block_kernel_equals_the_plain_path(case, kind):
    """``attend_cached_block``, interpreted: a block of several tokens a row over a
    float32 cache or int8/fp8 codes that hold it gives the plain path's attention (float32 rounding:
    2e-6); padding tokens (-1) give zeros, as an idle row's do."""
    q, k, v, positions, *buffers = random_block(*BLOCK_CASES[case], kind=kind)
    want, *written = plain_step(q, k, v, positions, *buffers)
    got = jax.jit(lambda *a: decode_attention.attend_cached_block(*a, interpret=True))(
        q, tuple(written), positions)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
    assert not np.any(np.asarray(got)[np.asarray(positions) < 0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", [16, 64, 128])
def test_compiled_block_kernel_equals_the_plain_path(tokens, kind):
    """The compiled ``attend_cached_block`` (bf16 queries over a bf16, int8 or fp8 cache;
    Llama-3's heads, one tile, four and eight) against the float32 plain path (atol 0.03,
    rtol 0.05)."""
    skip_unless_compiled(128, kind)
    q, k, v, positions, *buffers = random_block(32, 8, 128, 2112, tokens, [2000, 5, 1000],
                                                jnp.bfloat16, kind)
    want, *_ = float32_plain_step(q, k, v, positions, *buffers)
    _, *written = plain_step(q, k, v, positions, *buffers)  # in the cache's dtype
    got = jax.jit(decode_attention.attend_cached_block)(q, tuple(written), positions)
    np.testing.assert_allclose(f32(got), want, atol=0.03, rtol=0.05)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_codes_as_float16(kind):
    """``Tuning(codes_as_float16=True)``, interpreted: bfloat16 queries over int8/fp8
    codes, the dots in float16; the output within bfloat16 rounding (atol 0.03, rtol
    0.05) of the float32 plain path, the cache exactly."""
    rows = [700, 3]
    q, k, v, *buffers = random_step(2, 8, 2, 64, 768, jnp.bfloat16, seed=1, kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    to_f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
    want = plain_step(*map(to_f32, (q, k, v)), positions, *map(to_f32, buffers))
    tuning = decode_attention.Tuning(codes_as_float16=True)
    got = kernel_step(q, k, v, positions, *buffers, interpret=True, tuning=tuning)
    assert got[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    assert_same_buffers(got[1:], want[1:])


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_codes_as_float16_small_values(kind):
    """Values near 1e-4 (value scales near 1e-6: probability times scale would fall
    below float16's normal range) stay within the test above's tolerances of the float32
    plain path, relative to their size."""
    rows, size = [700, 3], 1e-4
    q, k, v, keys, values = random_step(2, 8, 2, 64, 768, seed=3)
    (key_codes, key_scales), (value_codes, value_scales) = (
        quantize(keys, kind), quantize(values * size, kind))
    q, k, v = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (v * size).astype(jnp.bfloat16)
    buffers = key_codes, value_codes, key_scales, value_scales
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = float32_plain_step(q, k, v, positions, *buffers)
    tuning = decode_attention.Tuning(codes_as_float16=True)
    got = kernel_step(q, k, v, positions, *buffers, interpret=True, tuning=tuning)
    np.testing.assert_allclose(f32(got[0]) / size, want[0] / size, atol=0.03, rtol=0.05)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_compiled_codes_as_float16(kind):
    """The compiled kernel with ``Tuning(codes_as_float16=True)`` at Llama-3's heads
    against the float32 plain path (atol 0.03, rtol 0.05), its writes exact."""
    skip_unless_compiled(128, kind)
    rows = [2047, 5, 1000]
    q, k, v, *buffers = random_step(len(rows), 32, 8, 128, 2112, jnp.bfloat16, kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = float32_plain_step(q, k, v, positions, *buffers)
    tuning = decode_attention.Tuning(codes_as_float16=True)
    got = jax.jit(lambda *a: kernel_step(*a, tuning=tuning))(q, k, v, positions, *buffers)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    assert_same_buffers(got[1:], want[1:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (8, 1, 256), (16, 16, 256)])
@pytest.mark.parametrize("rows", [[0, 511, -1], [2047, 5, 1000]])
def test_compiled_kernel_equals_the_plain_path(rows, heads, kv_heads, head_dim, kind):
    """The compiled kernel (bf16 queries over a bf16, int8 or fp8 cache; Llama-3's heads,
    Gemma's MQA and MHA at head_dim 256) against the float32 plain path (atol 0.03,
    rtol 0.05); its cache writes exactly."""
    skip_unless_compiled(head_dim, kind)
    capacity = 2112
    q, k, v, *buffers = random_step(len(rows), heads, kv_heads, head_dim, capacity,
                                    jnp.bfloat16, kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = float32_plain_step(q, k, v, positions, *buffers)
    got = jax.jit(kernel_step)(q, k, v, positions, *buffers)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    assert_same_buffers(got[1:], want[1:])


def gpus() -> int:
    return jax.device_count() if jax.default_backend() == "gpu" else 0


def split_step(data: int, model: int, kind: str | None, dtype, rows: list[int], capacity: int,
               heads: int, kv_heads: int, head_dim: int, interpret: bool = False):
    """A decode step of the kernel under ``kvjax.sharding.kernel_split`` on a (data,
    model) mesh: its operands placed as the split says (scales like their KV heads) and
    its cache donated. Returns ``(compiled, args, want)``: ``want`` the float32 plain
    path's ``(out, *buffers)`` on one device."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kvjax import sharding

    config = make_config(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         hidden_size=heads * head_dim)
    split = sharding.kernel_split(config, sharding.make_mesh(data=data, model=model))
    q, k, v, *buffers = random_step(len(rows), heads, kv_heads, head_dim, capacity, dtype,
                                    kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = float32_plain_step(q, k, v, positions, *buffers)
    place = lambda x, *spec: jax.device_put(x, NamedSharding(split.mesh, P(*spec)))
    args = (place(q, split.rows, None, split.heads), place(k, split.rows, None, split.kv_heads),
            place(v, split.rows, None, split.kv_heads), place(positions, split.rows),
            *(place(b, split.rows, split.kv_heads) for b in buffers))
    step = jax.jit(lambda *a: kernel_step(*a, split=split, interpret=interpret),
                   donate_argnums=tuple(range(4, len(args))))
    return step.lower(*args).compile(), args, want


def collectives(hlo: str) -> list[str]:
    return [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
            if op in hlo]


@pytest.mark.skipif(gpus() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data, model", [(1, 2), (2, 1)])
def test_compiled_kernel_on_each_device_of_a_mesh(data, model, kind):
    """Under a MeshSplit (rows over data, KV heads and their query heads over model) the
    compiled kernel runs on each GPU's shard: the float32 plain path's output (atol
    0.03, rtol 0.05), an exact cache written in place (its per-device buffers aliased),
    and no collective at all."""
    skip_unless_compiled(128, kind)
    compiled, args, want = split_step(data, model, kind, jnp.bfloat16, [0, 511, 2047, -1],
                                      2112, 32, 8, 128)
    text = compiled.as_text()
    assert "kvjax_decode_attention" in text
    assert not collectives(text)
    # each device's halves of the K and V buffers (and scales): the keys' bytes in all
    assert compiled.memory_analysis().alias_size_in_bytes >= args[4].nbytes
    shardings = [a.sharding for a in args[4:]]
    got = compiled(*args)
    for buffer, sharding in zip(got[1:], shardings):
        assert buffer.sharding.is_equivalent_to(sharding, buffer.ndim)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    assert_same_buffers(got[1:], want[1:])


# (data, model) meshes of 4 CPU devices: 2 KV heads split over model; and grouped, each
# KV head on the two devices whose query heads read it.
CPU_MESHES = [(2, 2), (1, 4)]
# What runs on them (cache kinds spread over the meshes; blocks take the kernel over codes
# only, see block_kernel_takes; a pool keeps rows whole, so paged blocks need data=1):
MESH_STEPS = [((2, 2), None), ((2, 2), "fp8"), ((1, 4), None), ((1, 4), "int8")]
MESH_BLOCKS = [((2, 2), "int8", False), ((1, 4), "fp8", False), ((1, 4), "int8", True),
               ((1, 4), "fp8", True)]  # (mesh, kind, paged)


@pytest.fixture(scope="module")
def on_a_cpu_mesh() -> dict:
    return run_on_cpu_devices("tests.test_decode_kernel", 4)


def test_interpreted_kernel_on_each_device_of_a_mesh(on_a_cpu_mesh):
    """Interpreted under a MeshSplit on 4 CPU devices (a subprocess), over a float32
    cache and int8/fp8 codes with scales split like their KV heads: a decode step gives
    the plain path's output (2e-6) and its cache exactly, a block of 5 tokens a row over
    codes (``attend_cached_block``; over a pool, ``attend_cached_block_paged``, where the
    rows stay whole) the plain path's output, none with a collective; and a model's block
    over an int8 cache on the mesh runs the block kernel in each layer."""
    steps, blocks = on_a_cpu_mesh["steps"], on_a_cpu_mesh["blocks"]
    assert [(tuple(c["mesh"]), c["kind"]) for c in steps] == MESH_STEPS
    assert [(tuple(c["mesh"]), c["kind"], c["paged"]) for c in blocks] == MESH_BLOCKS
    for cases in steps, blocks:
        for case in cases:
            assert case["collectives"] == [], case
            assert case["error"] <= 2e-6, case
    assert all(case["same_buffers"] for case in steps), steps
    assert on_a_cpu_mesh["model_block_kernels"] == [2, 2]  # 2 layers, each mesh


def split_block(data: int, model: int, kind: str | None, paged: bool):
    """``attend_cached_block`` (or ``attend_cached_block_paged``, 16-slot blocks) of a
    5-token block a row under ``kernel_split`` on a (data, model) mesh, interpreted.
    Returns ``(compiled, got, want)``: ``want`` the plain (or portable paged) path's
    output on one device."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kvjax import sharding

    config = make_config(num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=128)
    split = sharding.kernel_split(config, sharding.make_mesh(data=data, model=model))
    place = lambda x, *spec: jax.device_put(x, NamedSharding(split.mesh, P(*spec)))
    if paged:
        lasts = [10, 70, 120, -1]
        q, k, v, pools, tables = paged_block(4, 16, 9, 5, lasts, kind)
        positions = paged_block_positions(lasts, 5, 16 * 9)
        want, *written = portable_paged_step(q, k, v, pools, tables, positions)
        cache = (place(tables), *(place(b, split.kv_heads) for b in written))
        attend = lambda q, p, tables, *b: decode_attention.attend_cached_block_paged(
            q, b, tables, p, interpret=True, split=split)
    else:
        q, k, v, positions, *buffers = random_block(8, 2, 16, 136, 5, [0, 70, 120, None],
                                                    kind=kind)
        want, *written = plain_step(q, k, v, positions, *buffers)
        cache = tuple(place(b, split.rows, split.kv_heads) for b in written)
        attend = lambda q, p, *b: decode_attention.attend_cached_block(
            q, b, p, interpret=True, split=split)
    args = (place(q, split.rows, None, split.heads), place(positions, split.rows), *cache)
    compiled = jax.jit(attend).lower(*args).compile()
    return compiled, compiled(*args), want


def model_block_kernels(data: int, model: int) -> int:
    """The kernels a 2-layer model's 5-token block over an int8 cache runs with the
    kernel on, under ``kernel_split`` on a (data, model) mesh."""
    from kvjax import sharding

    config = make_config(num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=64)
    split = sharding.kernel_split(config, sharding.make_mesh(data=data, model=model))
    cache = kvjax.cache.create(config, 2, 128, "int8", jnp.float32)
    args = (make_model(config).params, np.ones((2, 5), np.int32),
            np.tile(np.arange(5, 10, dtype=np.int32), (2, 1)), cache)
    step = kvjax.model.step_fn(config, decode_kernel=True, kernel_split=split)
    return count_calls(jax.make_jaxpr(step)(*args).jaxpr, "pallas_call")


def _mesh_worker() -> dict:
    """The subprocess's steps and blocks (4 CPU devices); returns what the test above
    asserts on."""
    assert jax.device_count() == 4, "set XLA_FLAGS=--xla_force_host_platform_device_count=4"
    largest_error = lambda got, want: float(np.max(np.abs(f32(got) - f32(want))))
    steps, blocks = [], []
    for (data, model), kind in MESH_STEPS:
        compiled, args, want = split_step(data, model, kind, jnp.float32, [0, 70, 129, -1],
                                          136, 8, 2, 16, interpret=True)
        got = compiled(*args)
        try:
            assert_same_buffers(got[1:], want[1:])
            same = True
        except AssertionError:
            same = False
        steps.append({"mesh": [data, model], "kind": kind, "same_buffers": same,
                      "collectives": collectives(compiled.as_text()),
                      "error": largest_error(got[0], want[0])})
    for (data, model), kind, paged in MESH_BLOCKS:
        compiled, got, want = split_block(data, model, kind, paged)
        blocks.append({"mesh": [data, model], "kind": kind, "paged": paged,
                       "collectives": collectives(compiled.as_text()),
                       "error": largest_error(got, want)})
    return {"steps": steps, "blocks": blocks,
            "model_block_kernels": [model_block_kernels(*mesh) for mesh in CPU_MESHES]}


def test_every_cache_kind_takes_the_kernel_where_it_runs(monkeypatch):
    """Where the kernel runs compiled, ``choose`` picks it by default for float and
    int8/fp8 caches alike, and never with ``decode_kernel=False``."""
    monkeypatch.setattr(decode_attention, "supported", lambda *args, **kwargs: True)
    config = make_config(head_dim=128)
    kernel_of = lambda **kwargs: {a.kernel for a in choose(config, jnp.bfloat16, **kwargs).layers}
    assert kernel_of() == kernel_of(kv_dtype="int8") == kernel_of(kv_dtype="fp8") == {"compiled"}
    assert kernel_of(kv_dtype="int8", decode_kernel=False) == {None}


def random_paged_step(batch, heads, kv_heads, head_dim, block_size, blocks_per_row,
                      dtype=jnp.float32, seed=0, kind=None):
    """``(q, k, v, pools, tables)`` of a decode step over a paged layer: random pools of
    ``batch * blocks_per_row + 3`` blocks (codes and scales for an int8/fp8 ``kind``),
    the rows' tables a shuffled choice of them."""
    num_blocks = batch * blocks_per_row + 3
    q, k, v, *pools = random_step(1, heads, kv_heads, head_dim, num_blocks * block_size,
                                  dtype, seed, kind)
    pools = [pool[0].reshape(kv_heads, num_blocks, block_size, *pool.shape[3:])
             for pool in pools]  # [kv_heads, num_blocks, block_size(, head_dim)]
    rng = np.random.default_rng(seed)
    tables = rng.permutation(num_blocks)[:batch * blocks_per_row].reshape(batch, blocks_per_row)
    row_factors = jnp.arange(1, batch + 1, dtype=dtype)[:, None, None, None]
    q, k, v = (jnp.repeat(x, batch, axis=0) * row_factors for x in (q, k, v))
    return q, k, v, tuple(pools), jnp.asarray(tables, jnp.int32)


def portable_paged_step(q, k, v, pools, tables, positions):
    """What the paged kernel replaces: ``kvjax.attention.paged.write`` then its
    ``attend_cache``; ``(out, *pools)``, zeros out for rows at position -1."""
    from kvjax.attention import paged

    layer = paged.write((*pools, tables), k, v, positions, len(pools) == 4)
    out = paged.attend_cache(q, layer, positions)
    return jnp.where((positions >= 0)[:, :, None, None], out, 0), *layer[:-1]


# (block_size, blocks_per_row, positions): blocks smaller than, equal to and larger than
# the kernel's 64-slot loop; rows deep in their tables, at their first slot and idle.
PAGED_CASES = {"16": (16, 12, [191, 0, -1, 70]), "64": (64, 3, [150, 64, 63, -1]),
               "128": (128, 2, [255, 1, 129, -1])}


@pytest.mark.parametrize("case, kind", [("16", None), ("16", "int8"), ("64", None),
                                        ("64", "fp8"), ("128", "int8"), ("128", "fp8")])
def test_paged_kernel_equals_the_portable_path(case, kind):
    """The kernel reading a paged layer through its block tables (interpreted): the
    portable paged path's output (1e-5) and the same pools bit for bit (the new token's
    K/V, codes and scales in its block and slot)."""
    block_size, per_row, rows = PAGED_CASES[case]
    q, k, v, pools, tables = random_paged_step(len(rows), 8, 2, 16, block_size, per_row, kind=kind)
    positions = jnp.array(rows, jnp.int32)[:, None]
    want = portable_paged_step(q, k, v, pools, tables, positions)
    got = decode_attention.attend_and_write_paged(q, k, v, pools, tables, positions,
                                                  interpret=True)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    assert_same_buffers(got[1:], want[1:])


@pytest.mark.parametrize("case, tokens, kind", [("16", 40, "int8"), ("16", 40, "fp8"),
                                                ("64", 5, None), ("64", 5, "fp8"),
                                                ("128", 40, None), ("128", 40, "int8")])
def test_paged_block_kernel_equals_the_portable_path(case, tokens, kind):
    """``attend_cached_block_paged``, interpreted: a block of tokens a row (one tile of
    query rows, or 40 tokens x a group of 4: 3 tiles), written to a paged layer through
    shuffled tables, attends as the portable paged path does (1e-5); padding tokens and
    an idle row give zeros."""
    block_size, per_row, lasts = PAGED_CASES[case]
    q, k, v, pools, tables = paged_block(len(lasts), block_size, per_row, tokens, lasts, kind)
    positions = paged_block_positions(lasts, tokens, block_size * per_row)
    want, *written = portable_paged_step(q, k, v, pools, tables, positions)
    got = jax.jit(lambda *a: decode_attention.attend_cached_block_paged(*a, interpret=True))(
        q, tuple(written), tables, positions)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.any(np.asarray(got)[np.asarray(positions) < 0])


def paged_block(batch, block_size, per_row, tokens, lasts, kind, dtype=jnp.float32,
                heads=8, kv_heads=2, head_dim=16):
    """``(q, k, v, pools, tables)``: ``random_paged_step``'s pools and tables with a
    random block of ``tokens`` a row."""
    _, _, _, pools, tables = random_paged_step(batch, heads, kv_heads, head_dim, block_size,
                                               per_row, dtype, kind=kind)
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (batch, tokens, n, head_dim)).astype(dtype)
               for key, n in zip(keys, (heads, kv_heads, kv_heads)))
    return q, k, v, pools, tables


def paged_block_positions(lasts, tokens: int, capacity: int) -> jax.Array:
    """``int32[rows, tokens]``: each row's block ending near its entry of ``lasts``
    (within the capacity; -1: an idle row), the first row's last two tokens padding."""
    positions = np.full((len(lasts), tokens), -1)
    for row, last in enumerate(lasts):
        if last >= 0:
            first = min(max(last - tokens + 1, 0), capacity - tokens)
            positions[row] = np.arange(first, first + tokens)
    positions[0, -2:] = -1
    return jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("tokens", [16, 64, 128])
def test_compiled_paged_block_kernel_equals_the_portable_path(tokens, kind):
    """The compiled ``attend_cached_block_paged`` (bf16 queries over int8/fp8 pools of
    16-slot blocks; Llama-3's heads, one tile, four and eight) against the float32 portable
    path (atol 0.03, rtol 0.05)."""
    skip_unless_compiled(128, kind)
    lasts = [2079, 0, -1, 700]
    q, k, v, pools, tables = paged_block(4, 16, 130, tokens, lasts, kind, jnp.bfloat16,
                                         heads=32, kv_heads=8, head_dim=128)
    positions = paged_block_positions(lasts, tokens, 16 * 130)
    to_f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
    want, *_ = portable_paged_step(*map(to_f32, (q, k, v)), pools, tables, positions)
    _, *written = portable_paged_step(q, k, v, pools, tables, positions)
    got = jax.jit(decode_attention.attend_cached_block_paged)(q, tuple(written), tables,
                                                              positions)
    np.testing.assert_allclose(f32(got), want, atol=0.03, rtol=0.05)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim", [128, 256])
def test_compiled_paged_kernel_equals_the_portable_path(head_dim, kind):
    """The compiled kernel over a paged layer (bf16 queries, a bf16/int8/fp8 pool of
    16-slot blocks) against the float32 portable path (atol 0.03, rtol 0.05); its pool
    writes exactly."""
    skip_unless_compiled(head_dim, kind)
    q, k, v, pools, tables = random_paged_step(4, 32, 8, head_dim, 16, 130, jnp.bfloat16,
                                               kind=kind)
    positions = jnp.array([2079, 0, -1, 700], jnp.int32)[:, None]
    to_f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
    want = portable_paged_step(*map(to_f32, (q, k, v)), tuple(map(to_f32, pools)), tables,
                               positions)
    got = jax.jit(decode_attention.attend_and_write_paged)(q, k, v, pools, tables, positions)
    np.testing.assert_allclose(f32(got[0]), want[0], atol=0.03, rtol=0.05)
    assert_same_buffers(got[1:], want[1:])


@pytest.mark.skipif(not decode_attention.available(), reason="needs Pallas Triton")
@pytest.mark.parametrize("tuning", [None, decode_attention.DEEP_TUNING])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_lowers_to_triton_on_any_machine(kind, tuning):
    """The compiled kernel's Pallas program lowers to Triton for CUDA here too (no GPU
    needed: what a GPU run would reject first, an operation Pallas Triton cannot lower,
    fails on CPU), contiguous and paged, decode steps and 16-token blocks, at Llama-3's
    heads in bf16."""
    q, k, v, *buffers = jax.eval_shape(lambda: random_step(2, 32, 8, 128, 256, jnp.bfloat16,
                                                           kind=kind))
    positions = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    lowered = jax.jit(lambda *a: kernel_step(*a, tuning=tuning)).trace(
        q, k, v, positions, *buffers).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("kvjax_decode_attention") >= 1
    pools = [jax.ShapeDtypeStruct((8, 40, 16, *b.shape[3:]), b.dtype) for b in buffers]
    tables = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    paged_step = functools.partial(decode_attention.attend_and_write_paged, tuning=tuning)
    lowered = jax.jit(paged_step).trace(q, k, v, pools, tables, positions).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("kvjax_decode_attention") >= 1
    block = jax.ShapeDtypeStruct((2, 16, 32, 128), jnp.bfloat16)
    block_positions = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    for attend, cache in ((decode_attention.attend_cached_block, (tuple(buffers),)),
                          (decode_attention.attend_cached_block_paged, (tuple(pools), tables))):
        lowered = jax.jit(functools.partial(attend, tuning=tuning)).trace(
            block, *cache, block_positions).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("kvjax_block_attention") >= 1


if __name__ == "__main__":
    print(json.dumps(_mesh_worker()))
