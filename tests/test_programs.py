"""kvjax.programs and the choices its programs are built from: the bounded program
cache, threads generating at once (tokens and prefill clock of their own), the program
generate runs, ``kvjax.attention.choose`` and the caches' logical axes (one device; the
8-device placements are checked by tests/sharding_worker.py's ``meshes`` task)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import programs, sharding
from kvjax.attention import LayerAttention, choose, flash
from kvjax.cache import is_axes
from kvjax.kernels import decode_attention
from kvjax.requests import make_request
from tests.conftest import make_config

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [2, 71, 33]]


# ----- the program cache -----

def test_program_cache_keeps_the_most_recent():
    """``ProgramCache(maxsize=2)``: three shapes compiled, two kept (the least recently
    used dropped), every program computing the right values; a kept one is looked up
    (the same executable), a dropped one compiled again (a new one)."""
    cache = programs.ProgramCache(maxsize=2)
    affine = jax.jit(lambda x: x * 2 + 1)
    args = [(np.arange(n, dtype=np.float32),) for n in (3, 4, 5)]

    def run(i):
        program = cache.compiled(affine, args[i])
        np.testing.assert_array_equal(program(*args[i]), args[i][0] * 2 + 1)
        assert len(cache) <= 2
        return program

    first = [run(i) for i in range(3)]
    assert len(cache) == 2 and len({id(p) for p in first}) == 3
    assert run(2) is first[2] and run(1) is first[1]  # kept: looked up; 1 the most recent
    again = run(0)  # dropped before: compiled anew, dropping 2 (the least recently used)
    assert again is not first[0]
    assert run(1) is first[1] and run(0) is again
    assert run(2) is not first[2] and len(cache) == 2


def test_program_cache_keys_jax_settings():
    """A program compiled under another matmul precision is another program: the cache
    compiles anew instead of serving the one traced under the old setting (the suite
    runs at "highest", conftest.py)."""
    cache = programs.ProgramCache()
    product = jax.jit(lambda a, b: a @ b)
    args = (np.ones((4, 4), np.float32), np.ones((4, 4), np.float32))
    highest = cache.compiled(product, args)
    with jax.default_matmul_precision("bfloat16"):
        fast = cache.compiled(product, args)
        assert cache.compiled(product, args) is fast
    assert fast is not highest and cache.compiled(product, args) is highest
    assert len(cache) == 2


def test_generate_with_a_program_cache_of_two(gqa_model, monkeypatch):
    """generate with a process cache of two programs: three batch shapes (three
    programs), at most two kept, each generation's tokens those of the default cache;
    the first shape again is compiled again and still right."""
    batches = [PROMPTS[:1], PROMPTS, PROMPTS + [[4, 4, 8, 1]]]  # 1, 2, 3 rows
    opts = dict(max_new_tokens=10, stop_tokens=[])
    expected = [kvjax.generate(gqa_model, prompts, **opts).tokens for prompts in batches]
    small = programs.ProgramCache(maxsize=2)
    monkeypatch.setattr(programs, "PROGRAMS", small)
    for prompts, tokens in zip(batches + batches[:1], expected + expected[:1]):
        out = kvjax.generate(gqa_model, prompts, **opts)
        assert out.tokens == tokens
        assert len(small) <= 2
    assert len(small) == 2


# ----- threads -----

def test_threads_generating_at_once_get_their_own_results(gqa_model):
    """Two threads run the same compiled program at once on different prompts: each gets
    the tokens of a single-threaded run and its own prefill time (taken by its own run
    id: set, positive, shorter than its whole generation)."""
    prompts = [[[5, 17, 3, 88], [2, 71, 33]], [[9, 8, 7], [60, 61, 62, 63, 64]]]
    opts = dict(max_new_tokens=24, stop_tokens=[])
    alone = [kvjax.generate(gqa_model, p, **opts).tokens for p in prompts]  # compiles once
    assert alone[0] != alone[1]
    compiled = len(programs.PROGRAMS)
    for _ in range(3):
        barrier = threading.Barrier(2)
        results, errors = [None, None], []

        def work(i):
            try:
                barrier.wait(timeout=60)
                results[i] = kvjax.generate(gqa_model, prompts[i], **opts)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        for i, out in enumerate(results):
            assert out.tokens == alone[i]
            stats = out.stats
            assert stats["prefill_s"] is not None
            assert 0 < stats["prefill_s"] < stats["generate_s"]
            assert stats["decode_s"] == pytest.approx(stats["generate_s"] - stats["prefill_s"])
    assert len(programs.PROGRAMS) == compiled  # one program served both threads


def test_prefill_clock_tells_runs_apart():
    clock = programs.PrefillClock()
    first, second = clock.start_run(), clock.start_run()
    assert first != second and first.dtype == np.int32
    clock(np.zeros(2, np.int32), second)
    clock(np.zeros(2, np.int32), second)  # a second device shard: the first report counts
    clock(np.zeros(2, np.int32), first)
    at_second, at_first = clock.finish_run(second), clock.finish_run(first)
    assert at_second is not None and at_first is not None and at_second <= at_first
    assert clock.finish_run(first) is None  # read once
    assert clock.finish_run(clock.start_run()) is None  # never reported


# ----- the program generate runs -----

def test_generation_program_is_what_generate_runs(gqa_model):
    """``generation_program`` with the request's shapes gives generate's tokens when
    called as ``jit_decode``'s program is; it is made once per setting (so PROGRAMS can
    find it again); ``timed=True`` takes a run id last and reports its prefill."""
    opts = dict(max_new_tokens=12, stop_tokens=[])
    out = kvjax.generate(gqa_model, PROMPTS, **opts)
    req = make_request(gqa_model, PROMPTS, temperature=None, top_k=None, top_p=None,
                       min_p=None, seed=0, capacity=None, **opts)
    settings = dict(num_steps=req.num_steps, greedy=req.greedy, key_limit=req.key_limit)
    program = programs.generation_program(gqa_model, **settings)
    assert programs.generation_program(gqa_model, **settings) is program

    def tokens(result):
        return [np.asarray(result.tokens)[row, :int(result.num_generated[row])].tolist()
                for row in range(req.batch)]

    args = (req.prompt_tokens, req.prompt_lengths, *req.controls.values())
    cache = programs.new_cache(gqa_model, req.rows, req.capacity)
    assert tokens(program(gqa_model.params, cache, *args)) == out.tokens
    timed = programs.generation_program(gqa_model, timed=True, **settings)
    run_id = programs.PREFILL_CLOCK.start_run()
    result = timed(gqa_model.params, programs.new_cache(gqa_model, req.rows, req.capacity),
                   *args, run_id)
    assert tokens(result) == out.tokens
    assert programs.PREFILL_CLOCK.finish_run(run_id) is not None
    assert programs.state_shardings(gqa_model, cache) is None  # no mesh


def test_new_cache(gqa_model):
    config = gqa_model.config
    cache = programs.new_cache(gqa_model, 3, 32)
    assert isinstance(cache, kvjax.KVCache)
    assert (cache.batch, cache.capacity, len(cache.keys)) == (3, 32, config.num_layers)
    assert cache.keys[0].shape == (3, config.num_kv_heads, 32, config.head_dim)
    assert cache.keys[0].dtype == gqa_model.dtype and not np.any(cache.lengths)
    history = programs.new_cache(gqa_model, 3, 32, use_cache=False)
    assert isinstance(history, kvjax.TokenHistory) and history.tokens.shape == (3, 32)


# ----- the caches' logical axes -----

@pytest.mark.parametrize("use_cache", [True, False])
def test_logical_axes_name_every_dimension(gqa_model, use_cache):
    """``logical_axes()`` has the cache's structure with, for every array, one logical
    axis name per dimension (names ``ShardingRules`` knows)."""
    cache = programs.new_cache(gqa_model, 2, 16, use_cache)
    axes = cache.logical_axes()
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(cache)
    names = jax.tree.leaves(axes, is_leaf=is_axes)
    arrays = jax.tree.leaves(cache)
    assert len(names) == len(arrays) >= 2
    for axis_names, array in zip(names, arrays):
        assert is_axes(axis_names) and len(axis_names) == array.ndim, (axis_names, array.shape)
        assert set(axis_names) <= set(sharding.LOGICAL_AXES)
    assert axes.lengths == ("batch",)
    if use_cache:
        assert set(axes.keys) == set(axes.values) == {("batch", "kv_heads", "cache_seq",
                                                       "head_dim")}
    else:
        assert axes.tokens == ("batch", "cache_seq")


def test_cache_on_a_one_device_mesh_is_placed_by_its_logical_axes(gqa_model):
    model = sharding.shard_model(gqa_model, sharding.make_mesh(data=1, model=1))
    for use_cache in (True, False):
        cache = programs.new_cache(model, 2, 16, use_cache)
        want = sharding.logical_shardings(cache.logical_axes(), model.config, model.mesh,
                                          model.rules, batch=2, capacity=16)
        got = jax.tree.map(lambda x: x.sharding, cache)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert jax.tree.leaves(got) == jax.tree.leaves(want)


# ----- which attention a program runs -----

WINDOWS = ("sliding_attention", "full_attention", "sliding_attention")


def windowed_config(**kw):
    """Three layers: the first and last with a sliding window of 8, the middle one full."""
    return make_config(num_layers=3, sliding_window=8, layer_types=WINDOWS, **kw)


def kernels(plan):
    return [layer.kernel for layer in plan.layers]


def implementations(plan):
    return [layer.implementation for layer in plan.layers]


OFF_GPUS = pytest.mark.skipif(kvjax.platform.is_cuda_gpu(),
                              reason="what a machine without a CUDA GPU picks")


@OFF_GPUS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_choose_by_default_off_gpus(dtype):
    """Here, by default: XLA attention in every layer, no kernel; each layer's window,
    the key limit and ``fresh`` passed on; ``decode_kernel=False`` the same."""
    config = windowed_config(head_dim=16)
    plan = choose(config, dtype, key_limit=24)
    assert plan.layers == (LayerAttention(window=8, key_limit=24),
                           LayerAttention(window=None, key_limit=24),
                           LayerAttention(window=8, key_limit=24))
    assert implementations(plan) == ["xla"] * 3 and kernels(plan) == [None] * 3
    assert plan.describe() == "blocks: xla, steps: xla"
    assert choose(config, dtype, key_limit=24, decode_kernel=False) == plan
    fresh = choose(config, dtype, fresh=True)
    assert all(layer.fresh for layer in fresh.layers) and kernels(fresh) == [None] * 3
    assert implementations(choose(config, dtype, use_cache=False)) == ["xla"] * 3


@OFF_GPUS
def test_choose_decode_kernel_true_off_gpus():
    """``decode_kernel=True``: decode steps over a cache on the interpreted kernel except
    in windowed (and soft-capped) layers; never for blocks into an empty cache or
    without a cache."""
    config = windowed_config(head_dim=16)
    plan = choose(config, jnp.bfloat16, decode_kernel=True)
    assert kernels(plan) == [None, "interpret", None]
    assert implementations(plan) == ["xla"] * 3
    assert plan.describe() == "blocks: xla, steps: kernel (interpret)/xla"
    for kwargs in (dict(fresh=True), dict(use_cache=False)):
        plan = choose(config, jnp.bfloat16, decode_kernel=True, **kwargs)
        assert kernels(plan) == [None] * 3 and implementations(plan) == ["xla"] * 3
    softcapped = make_config(head_dim=16, attn_logit_softcap=50.0)
    assert kernels(choose(softcapped, jnp.bfloat16, decode_kernel=True)) == [None, None]


def test_choose_interprets_the_kernel_for_float32_caches():
    """Interpreted (``decode_kernel=True``) the kernel takes what it took before the
    attention package: any float cache and head dimension (the float32, head_dim 8 and
    16 models of the tests run their decode steps on it and match the plain path); only
    windows and soft-caps keep the plain path."""
    for config in (make_config(), windowed_config(), make_config(head_dim=16)):
        want = ["interpret" if config.layer_window(i) is None else None
                for i in range(config.num_layers)]
        assert kernels(choose(config, jnp.float32, decode_kernel=True)) == want, config


def test_choose_on_a_cuda_gpu(monkeypatch):
    """Where cuDNN and the compiled kernel run (pretended): cuDNN for blocks (windowed
    too) and for steps over a cache without a window, XLA for windowed layers over a
    cache; the compiled kernel for decode steps without a window, also by default."""
    monkeypatch.setattr(flash, "supported", lambda *a, **k: True)
    monkeypatch.setattr(decode_attention, "supported", lambda *a, **k: True)
    config = windowed_config(head_dim=16)
    for setting in (None, True):
        plan = choose(config, jnp.bfloat16, decode_kernel=setting)
        assert implementations(plan) == ["xla", "cudnn", "xla"]
        assert kernels(plan) == [None, "compiled", None]
        assert [layer.window for layer in plan.layers] == [8, None, 8]
    assert plan.describe() == "blocks: cudnn/xla, steps: kernel (compiled)/xla"
    plan = choose(config, jnp.bfloat16, decode_kernel=False)
    assert implementations(plan) == ["xla", "cudnn", "xla"] and kernels(plan) == [None] * 3
    for kwargs in (dict(fresh=True), dict(use_cache=False)):  # attention within a block
        plan = choose(config, jnp.bfloat16, **kwargs)
        assert implementations(plan) == ["cudnn"] * 3 and kernels(plan) == [None] * 3
