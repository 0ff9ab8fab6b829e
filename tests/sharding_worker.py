"""Multi-device checks for tests/test_sharding.py, run in a subprocess.

The pytest process has one CPU device; these tasks need several, which XLA only makes
when ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` is set before jax is
imported. ``test_sharding.py`` runs ``python -m tests.sharding_worker TASK ...`` with that
set and reads one JSON object from the last line of stdout.

Tasks:
  meshes HF_DIR            8 devices: meshes 1x8, 2x4, 4x2, 8x1 against one device, for a
                           model built with init_params and one loaded from HF_DIR
  errors HF_DIR            8 devices: error messages, and that nothing compiles first;
                           KV placements that fall back to replication
  process PID PORT HF_DIR  one of two processes with 4 devices each (multi-process)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]  # (data, model)
# Where the longer checks run (each compiles more programs; two cores run all of them):
KERNEL_MESHES = [(1, 8), (4, 2)]  # the decode kernel: KV heads grouped or split, rows whole or not
INT8_MESHES = [(2, 4), (8, 1)]  # int8 tokens (the placement of codes and scales: every mesh)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 1, 4, 1, 5, 9, 2], [40, 41], [7],
           [20, 30, 40, 50, 60, 70, 80, 90, 11, 12, 13], [2, 7, 1, 8], [61, 62, 63, 64, 65, 66]]
NEW_TOKENS = 24


def gqa_config():
    from tests.conftest import make_config

    # 8 query heads over 2 KV heads (fewer than 8 devices), tied embeddings, QK-norm:
    # every parameter kind except biases (the HF model has those).
    return make_config(num_heads=8, num_kv_heads=2, head_dim=8, hidden_size=64, vocab_size=96,
                       tie_word_embeddings=True, qk_norm=True)


def gqa_model():
    from tests.conftest import make_model

    return make_model(gqa_config())


def spec_of(array) -> dict:
    sharding = array.sharding
    return {"spec": [None if p is None else p for p in sharding.spec],
            "mesh": dict(sharding.mesh.shape)}


def param_specs(params) -> dict:
    out = {name: spec_of(params[name]) for name in params if name != "layers"}
    out.update({name: spec_of(a) for name, a in params["layers"][0].items()})
    # every layer is placed like layer 0
    for layer in params["layers"][1:]:
        for name, a in layer.items():
            assert a.sharding == params["layers"][0][name].sharding, name
    return out


def weight_shapes(params) -> set:
    import jax

    return {tuple(a.shape) for a in jax.tree.leaves(params) if a.ndim == 2}


def collectives(hlo: str) -> dict:
    """All-reduce count and all-gather output shapes in optimized HLO text."""
    gathers = []
    for line in hlo.splitlines():
        m = re.search(r"= \(?\w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", line)
        if m:
            gathers.append([int(x) for x in m.group(1).split(",") if x])
    return {"all_reduce": len(re.findall(r" all-reduce(?:-start)?\(", hlo)),
            "all_gather_shapes": gathers,
            "all_to_all": len(re.findall(r" all-to-all\(", hlo))}


def step_checks(model, batch: int, capacity: int) -> dict:
    """Compiles one decode step on the sharded params and cache: collectives, aliasing."""
    import jax
    import numpy as np

    from kvjax import programs, sharding
    from kvjax.model import step_fn

    cache = programs.new_cache(model, batch, capacity)
    per_device_cache = max(sharding.bytes_per_device(cache).values())
    step = jax.jit(step_fn(model.config), donate_argnums=3)
    tokens = np.ones((batch, 1), np.int32)
    positions = np.full((batch, 1), 5, np.int32)
    compiled = step.lower(model.params, tokens, positions, cache).compile()
    memory = compiled.memory_analysis()
    out = collectives(compiled.as_text())
    out.update(cache_buffer=list(cache.keys[0].shape), cache_per_device=per_device_cache,
               alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes)
    return out


def cache_placement(model, batch: int, capacity: int) -> dict:
    """Each cache kind made by ``kvjax.programs.new_cache`` on the model's mesh: whether
    ``logical_axes()`` names every dimension of every array, and whether each array's
    sharding is exactly ``sharding.logical_shardings`` of those axes (the placement a
    cache kind declares, and nothing in ``kvjax.sharding`` decides otherwise)."""
    import jax

    from kvjax import programs, sharding
    from kvjax.cache import is_axes

    out = {}
    for name, use_cache in (("kv", True), ("history", False)):
        cache = programs.new_cache(model, batch, capacity, use_cache)
        axes = cache.logical_axes()
        names, arrays = jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(cache)
        want = sharding.logical_shardings(axes, model.config, model.mesh, model.rules,
                                          batch=batch, capacity=capacity)
        got = jax.tree.map(lambda x: x.sharding, cache)
        out[name] = {
            "arrays": len(arrays),
            "axes_per_dimension": len(names) == len(arrays) and all(
                is_axes(n) and len(n) == a.ndim for n, a in zip(names, arrays)),
            "shardings_equal": jax.tree.structure(got) == jax.tree.structure(want) and all(
                g == w for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))),
            "split": any(any(p is not None for p in a.sharding.spec) for a in arrays)}
    return out


def program_gathers(model, batch: int, capacity: int, step=None) -> dict:
    """All-gather shapes of the whole compiled generation (prefill + decode loop), with
    ``step`` (default: ``step_fn(model.config)``), and the Pallas calls and shard_maps in
    its jaxpr."""
    import jax
    import numpy as np

    import kvjax
    from kvjax import programs
    from kvjax.model import step_fn
    from tests.conftest import count_calls

    cache = programs.new_cache(model, batch, capacity)
    args = (model.params, cache, np.zeros((batch, 16), np.int32), np.ones((batch,), np.int32),
            np.int32(8), kvjax.SamplingParams.create(batch), np.uint32(0),
            np.full((16,), -1, np.int32))
    run = kvjax.jit_decode(step or step_fn(model.config), num_steps=16, greedy=True)
    jaxpr = jax.make_jaxpr(run)(*args).jaxpr
    out = collectives(run.lower(*args).compile().as_text())
    return out | {"pallas_calls": count_calls(jaxpr, "pallas_call"),
                  "shard_maps": count_calls(jaxpr, "shard_map")}


@contextlib.contextmanager
def interpreted_kernel():
    """kvjax's programs (``generate``, ``generate_stream``, ``ChatSession``) with every
    decode step on the decode kernel, interpreted (these are CPUs), on each device's
    shard: ``kvjax.attention.choose`` as ``kvjax.programs`` calls it, asked for
    ``decode_kernel=True`` where it was left None (on a mesh it cannot split the kernel
    over, ``choose`` still keeps it off). Yields the plans chosen meanwhile; the programs
    made under it are forgotten before and after."""
    from kvjax import programs
    from tests.conftest import clear_programs

    choose, plans = programs.choose, []

    def choose_kernel(*args, decode_kernel=None, **kwargs):
        plan = choose(*args, decode_kernel=True if decode_kernel is None else decode_kernel,
                      **kwargs)
        plans.append(plan)
        return plan

    clear_programs()
    programs.choose = choose_kernel
    try:
        yield plans
    finally:
        programs.choose = choose
        clear_programs()


def step_kernels(plans) -> list:
    """How the decode steps of the chosen plans attend: the sorted kernel modes (None:
    XLA) of every layer of the plans over a cache that is not fresh."""
    return sorted({str(layer.kernel) for plan in plans for layer in plan.layers
                   if not layer.fresh})


def kernel_on_mesh(model, reference) -> dict:
    """``kvjax.generate`` and ``generate_stream`` under ``interpreted_kernel``: tokens
    against one device's plain path; the split; the compiled generation's all-gathers,
    Pallas calls and shard_maps."""
    import kvjax
    from kvjax import sharding
    from kvjax.model import step_fn

    split = sharding.kernel_split(model.config, model.mesh)
    with interpreted_kernel() as plans:
        opts = dict(max_new_tokens=NEW_TOKENS, stop_tokens=[])
        tokens = kvjax.generate(model, PROMPTS, **opts).tokens
        stream = kvjax.generate_stream(model, PROMPTS[:7], chunk_size=8, **opts)
        for _ in stream:
            pass
    step = step_fn(model.config, decode_kernel=True, kernel_split=split)
    return {"tokens_equal": tokens == reference,
            "stream_equal": stream.generation.tokens == reference[:7],
            "step_kernels": step_kernels(plans),
            "plan_splits": sorted({str(describe_split(layer.split)) for plan in plans
                                   for layer in plan.layers if layer.kernel}),
            "split": describe_split(split), "split_mesh": dict(split.mesh.shape),
            "program": program_gathers(model, 8, 64, step)}


def task_meshes(hf_dir: str) -> dict:
    import jax

    import kvjax
    from kvjax import programs, sharding
    from kvjax.model import step_fn
    from tests.conftest import make_config, make_model

    assert jax.device_count() == 8, jax.devices()
    result = {"devices": jax.device_count(), "memory_stats": jax.devices()[0].memory_stats()}
    opts = dict(max_new_tokens=NEW_TOKENS, stop_tokens=[])

    # --- a GQA model built in memory with init_params, placed with shard_params ---
    base = gqa_model()
    reference = kvjax.generate(base, PROMPTS, **opts).tokens
    int8_reference = kvjax.generate(base, PROMPTS, kv_dtype="int8", **opts).tokens
    windowed = make_model(dataclasses.replace(gqa_config(), sliding_window=6))
    ring_reference = {"window": kvjax.generate(windowed, PROMPTS, **opts).tokens,
                      "streaming": kvjax.generate(base, PROMPTS, sink_tokens=4, window=12,
                                                  **opts).tokens}
    gqa = {"reference": reference}
    for data, model_ways in MESHES:
        mesh = sharding.make_mesh(data=data, model=model_ways)
        model = sharding.shard_model(base, mesh)
        out = kvjax.generate(model, PROMPTS, **opts)
        cache = programs.new_cache(model, len(PROMPTS), 64)
        # 7 prompts: data=2, 4, 8 split them only after padding to 8
        uneven = kvjax.generate(model, PROMPTS[:7], **opts)
        uneven_stream = kvjax.generate_stream(model, PROMPTS[:7], chunk_size=8, **opts)
        for _ in uneven_stream:
            pass
        entry = {"tokens_equal": out.tokens == reference, "tokens": out.tokens,
                 "uneven_equal": uneven.tokens == reference[:7],
                 "uneven_stream_equal": uneven_stream.generation.tokens == reference[:7],
                 "uneven_batch": uneven.stats["batch"],
                 "params": param_specs(model.params),
                 "cache_keys": spec_of(cache.keys[0]), "cache_values": spec_of(cache.values[-1]),
                 "cache_lengths": spec_of(cache.lengths),
                 "cache_shard": list(cache.keys[0].sharding.shard_shape(cache.keys[0].shape)),
                 "weight_shapes": sorted(weight_shapes(model.params)),
                 "step": step_checks(model, 16, 256),
                 "cache_placement": cache_placement(model, 8, 64)}
        int8_cache = programs.new_cache(model, len(PROMPTS), 64, kv_dtype="int8")
        entry["int8"] = {"codes": spec_of(int8_cache.keys[0]),
                         "scales": spec_of(int8_cache.key_scales[0])}
        if (data, model_ways) in INT8_MESHES:
            entry["int8"]["tokens_equal"] = kvjax.generate(
                model, PROMPTS, kv_dtype="int8", **opts).tokens == int8_reference
        if (data, model_ways) in ((1, 8), (2, 4)):  # ring buffers: a window, streaming
            ring_cache = programs.new_cache(model, len(PROMPTS), 64, window=12, sink_tokens=4)
            entry["ring"] = {
                "window_equal": kvjax.generate(sharding.shard_model(windowed, mesh), PROMPTS,
                                               **opts).tokens == ring_reference["window"],
                "streaming_equal": kvjax.generate(model, PROMPTS, sink_tokens=4, window=12,
                                                  **opts).tokens == ring_reference["streaming"],
                "keys": spec_of(ring_cache.keys[0]), "slots": ring_cache.keys[0].shape[2]}
        if model_ways > base.config.num_kv_heads:  # KV heads grouped: whole program
            entry["program"] = program_gathers(model, 8, 64)
        if (data, model_ways) in KERNEL_MESHES:
            entry["kernel"] = kernel_on_mesh(model, reference)
        gqa[f"{data}x{model_ways}"] = entry
        del model, cache
    # MQA on data=2 x model=4: its one KV head (replicated) is read by every query head
    mqa = make_model(make_config(num_heads=4, num_kv_heads=1, head_dim=8, hidden_size=64,
                                 vocab_size=96))
    gqa["mqa_kernel"] = kernel_on_mesh(
        sharding.shard_model(mqa, sharding.make_mesh(data=2, model=4)),
        kvjax.generate(mqa, PROMPTS, **opts).tokens)
    one_device_step = step_fn(base.config, decode_kernel=True)
    gqa["kernel_one_device"] = program_gathers(base, 8, 64, one_device_step)["pallas_calls"]
    result["gqa"] = gqa
    result["padding_rows"] = padding_rows(base)
    result["custom_rules"] = custom_rules(base, reference)

    # --- a tiny HF checkpoint loaded straight onto each mesh ---
    reference = kvjax.generate(kvjax.load(hf_dir, dtype="float32"), PROMPTS, **opts).tokens
    hf = {"reference": reference}
    for data, model_ways in MESHES:
        mesh = sharding.make_mesh(data=data, model=model_ways)
        probe = LoadProbe()
        with probe:
            model = kvjax.load(hf_dir, dtype="float32", mesh=mesh)
        out = kvjax.generate(model, PROMPTS, **opts)
        hf[f"{data}x{model_ways}"] = {
            "tokens_equal": out.tokens == reference, "params": param_specs(model.params),
            "load": probe.report(model.params)}
        del model
    result["hf"] = hf
    result["chat"] = chat_on_mesh()
    return result


def padding_rows(base) -> dict:
    """One sampled prompt on data=8 (seven padding rows), with a stop token the row
    reaches early: the tokens and the steps run equal one device's, so padding rows
    (which sample differently) never keep the loop running."""
    import kvjax
    from kvjax import sharding

    opts = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=3)
    free = kvjax.generate(base, PROMPTS[2:3], stop_tokens=[], **opts).tokens[0]
    stop = free[2]
    one = kvjax.generate(base, PROMPTS[2:3], stop_tokens=[stop], **opts)
    model = sharding.shard_model(base, sharding.make_mesh(data=8, model=1))
    padded = kvjax.generate(model, PROMPTS[2:3], stop_tokens=[stop], **opts)
    return {"stop_at": free.index(stop), "one": one.tokens, "padded": padded.tokens,
            "one_steps": one.stats["decode_steps"], "padded_steps": padded.stats["decode_steps"]}


def custom_rules(base, reference) -> dict:
    """Models placed with other ``ShardingRules`` (``shard_model(..., rules)``):
    ``generate`` and a ``ChatSession`` create their cache and split their batch by the
    model's rules, and give one device's tokens."""
    import kvjax
    from kvjax import programs, sharding

    opts = dict(max_new_tokens=NEW_TOKENS, stop_tokens=[])
    out = {}
    for name, data, model_ways, rules in (
            ("no_grouping_1x8", 1, 8, sharding.ShardingRules(group_kv_heads=False)),
            ("rows_unsplit_2x4", 2, 4, sharding.ShardingRules(batch=None)),
            ("attention_whole_1x8", 1, 8, sharding.parse_rules("heads=none,kv_heads=none"))):
        model = sharding.shard_model(base, sharding.make_mesh(data=data, model=model_ways), rules)
        cache = programs.new_cache(model, 7, 64)  # 7 rows: data=2 splits them only by rules
        out[name] = {"tokens_equal": kvjax.generate(model, PROMPTS[:7], **opts).tokens
                     == reference[:7],
                     "cache_keys": spec_of(cache.keys[0]), "cache_lengths": spec_of(cache.lengths),
                     "kernel": describe_options(model.config, model.mesh, model.rules)}
        out.setdefault("placements", {})[name] = cache_placement(model, 8, 64)
    specs = param_specs(model.params)  # the last: attention whole on every model device
    out["attention_whole_1x8"] |= {
        "params": {name: specs[name]["spec"] for name in ("wq", "wk", "wo", "w_gate", "w_down")},
        "step_all_reduce": step_checks(model, 8, 64)["all_reduce"]}
    return out


def chat_on_mesh() -> dict:
    """Three greedy turns of a ChatSession with the bundled model, without a mesh and
    on data=1 x model=4 (4 query heads, 2 KV heads: grouped) and on data=2 x model=4 (the
    conversation padded to two rows), and the cache's placement; on data=1 x model=4
    with the decode kernel too (``interpreted_kernel``)."""
    import kvjax
    from kvjax import sharding

    turns = ["Hello there.", "What is a module?", "Thank you."]
    replies = {}
    for name, mesh in (("plain", None), ("2x4", sharding.make_mesh(data=2, model=4)),
                       ("1x4", sharding.make_mesh(data=1, model=4))):
        session = kvjax.ChatSession(kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32", mesh=mesh),
                                    max_new_tokens=12, capacity=256)
        replies[name] = [session.send(turn) for turn in turns]
    replies["1x4_cache"] = spec_of(session._cache.keys[0])
    with interpreted_kernel() as plans:  # the kernel on each device, turn after turn
        session = kvjax.ChatSession(kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32",
                                               mesh=sharding.make_mesh(data=1, model=4)),
                                    max_new_tokens=12, capacity=256)
        replies["1x4_kernel"] = [session.send(turn) for turn in turns]
    replies["1x4_kernel_steps"] = step_kernels(plans)
    return replies


class LoadProbe:
    """Watches ``jax.make_array_from_callback`` while a checkpoint loads onto a mesh.

    Records, for every tensor: the global shape, the shape of every host slice the
    loader hands to a device (what is actually transferred), and the bytes live on each
    device right after the tensor is placed (``jax.live_arrays``, relative to before the
    load). CPU devices report no ``memory_stats()``, so live arrays are the measure.
    """

    def __init__(self):
        self.tensors = []
        self.peak: dict = {}

    def _live(self) -> dict:
        import jax

        buffers = {}  # a buffer can be live in several arrays (a shard and its global array)
        for a in jax.live_arrays():
            for shard in a.addressable_shards:
                buffers[(shard.device.id, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
        held: dict = {}
        for (device, _), nbytes in buffers.items():
            held[device] = held.get(device, 0) + nbytes
        return held

    def __enter__(self):
        import gc

        import jax

        gc.collect()
        self.before = self._live()
        self._original = jax.make_array_from_callback

        def wrapped(shape, sharding, callback, dtype=None):
            slices = []

            def recording(index):
                piece = callback(index)
                slices.append(list(piece.shape))
                return piece

            array = self._original(shape, sharding, recording, dtype)
            expected = list(sharding.shard_shape(tuple(shape)))
            self.tensors.append({"shape": list(shape), "nbytes": array.nbytes,
                                 "slices": slices, "shard": expected})
            now = self._live()
            for device, held in now.items():
                delta = held - self.before.get(device, 0)
                self.peak[device] = max(self.peak.get(device, 0), delta)
            return array

        jax.make_array_from_callback = wrapped
        return self

    def __exit__(self, *exc):
        import jax

        jax.make_array_from_callback = self._original

    def report(self, params) -> dict:
        import jax

        final: dict = {}
        whole_copies = 0
        shard_mismatch = 0
        for a in jax.tree.leaves(params):
            full = tuple(a.shape)
            split = tuple(a.sharding.shard_shape(full)) != full
            for shard in a.addressable_shards:
                final[shard.device.id] = final.get(shard.device.id, 0) + shard.data.nbytes
                if tuple(shard.data.shape) != tuple(a.sharding.shard_shape(full)):
                    shard_mismatch += 1
                if split and tuple(shard.data.shape) == full:
                    whole_copies += 1
        return {
            "tensors": len(self.tensors),
            "slices_are_shards": all(all(s == t["shard"] for s in t["slices"]) for t in self.tensors),
            "whole_tensor_slices_of_split_tensors": sum(
                1 for t in self.tensors if t["shard"] != t["shape"]
                for s in t["slices"] if s == t["shape"]),
            "largest_tensor": max(t["nbytes"] for t in self.tensors),
            "total_bytes": sum(t["nbytes"] for t in self.tensors),
            "final_per_device": {str(k): v for k, v in sorted(final.items())},
            "peak_per_device": {str(k): v for k, v in sorted(self.peak.items())},
            "whole_copies_on_a_device": whole_copies, "shard_mismatch": shard_mismatch,
        }


def kv_placement(config, mesh, rules=None) -> dict:
    """Specs of wk, wq and the cache buffers under ``rules`` (no arrays made)."""
    from kvjax import sharding

    import jax
    import jax.numpy as jnp

    from kvjax.cache import KVCache

    rules = rules or sharding.DEFAULT_RULES
    specs = sharding.param_specs(config, mesh, rules)["layers"][0]
    abstract = jax.eval_shape(lambda: KVCache.create(config, 8, 64, jnp.float32))
    cache = sharding.logical_shardings(abstract.logical_axes(), config, mesh, rules,
                                       batch=8).keys[0].spec
    return {"wk": list(specs["wk"]), "wq": list(specs["wq"]), "cache": list(cache),
            "kernel_split": describe_split(sharding.kernel_split(config, mesh, rules))}


def describe_options(config, mesh, rules=None) -> list:
    """``sharding.kernel_options`` as JSON: [decode_kernel, describe_split(kernel_split)]."""
    from kvjax import sharding

    options = sharding.kernel_options(config, mesh, rules or sharding.DEFAULT_RULES)
    return [options["decode_kernel"], describe_split(options["kernel_split"])]


def describe_split(split) -> list | None:
    """A ``kvjax.kernels.decode_attention.MeshSplit`` as JSON: [rows, heads, kv_heads] (tuples as lists)."""
    if split is None:
        return None
    entry = lambda e: list(e) if isinstance(e, tuple) else e
    return [entry(split.rows), entry(split.heads), entry(split.kv_heads)]


def task_errors(hf_dir: str) -> dict:
    import jax

    import kvjax
    from kvjax import programs, sharding
    from tests.conftest import make_config, make_model

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_a, **_k: compiles.append(name)
        if name == "/jax/core/compile/backend_compile_duration" else None)

    def error(fn):
        before = len(compiles)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - we report whatever was raised
            return {"type": type(e).__name__, "message": str(e), "compiles": len(compiles) - before}
        return {"type": None, "message": None, "compiles": len(compiles) - before}

    base = gqa_model()
    mesh24 = sharding.make_mesh(data=2, model=4)
    model24 = sharding.shard_model(base, mesh24)
    model42 = sharding.shard_model(base, sharding.make_mesh(data=4, model=2))
    six_heads = make_model(make_config(num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=48))
    out = {
        "too_many_devices": error(lambda: sharding.make_mesh(data=4, model=4)),
        "model_not_dividing": error(lambda: sharding.make_mesh(model=3)),
        "batch": error(lambda: programs.new_cache(model24, 3, 16)),
        "batch_data4": error(lambda: programs.new_cache(model42, 6, 16)),
        "heads": error(lambda: sharding.shard_model(six_heads, mesh24)),
        "heads_load": error(lambda: kvjax.load(hf_dir, dtype="float32",
                                               mesh=sharding.make_mesh(data=1, model=3))),
        "fallback": {
            "no_grouping_1x8": kv_placement(base.config, sharding.make_mesh(data=1, model=8),
                                            sharding.ShardingRules(group_kv_heads=False)),
            "kv3_model2": kv_placement(make_config(num_heads=6, num_kv_heads=3, head_dim=8),
                                       sharding.make_mesh(data=4, model=2)),
            "mqa_model4": kv_placement(make_config(num_heads=4, num_kv_heads=1, head_dim=8),
                                       sharding.make_mesh(data=2, model=4)),
        },
        # the decode kernel: per device on a mesh that can split it, else off
        "decode_kernel": {
            "2x4": describe_options(base.config, mesh24),
            "4x2": describe_options(base.config, model42.mesh),
            "1x1": describe_options(base.config, sharding.make_mesh(data=1, model=1)),
            "none": describe_options(base.config, None),
            "kv3_model2": describe_options(make_config(num_heads=6, num_kv_heads=3, head_dim=8),
                                           sharding.make_mesh(data=4, model=2)),
            "no_grouping_1x8": describe_options(base.config, sharding.make_mesh(data=1, model=8),
                                                sharding.ShardingRules(group_kv_heads=False))},
        "default_mesh": dict(sharding.make_mesh().shape),
        "data_only": dict(sharding.make_mesh(data=2).shape),
        "subset": dict(sharding.make_mesh(data=1, model=2).shape),
    }
    return out


def task_process(process_id: int, port: str, hf_dir: str) -> dict:
    """One of two processes (4 CPU devices each): the same tokens as one process."""
    from kvjax import programs, sharding

    sharding.initialize_distributed(f"localhost:{port}", 2, process_id)
    import jax

    import kvjax

    out = {"process": jax.process_index(), "processes": jax.process_count(),
           "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    opts = dict(max_new_tokens=NEW_TOKENS, stop_tokens=[])
    base = gqa_model()

    # The model axis spans both processes: kvjax.generate as is.
    mesh = sharding.make_mesh()  # data=1, model=8
    model = sharding.shard_model(base, mesh)
    out["generate_1x8"] = kvjax.generate(model, PROMPTS, **opts).tokens

    # The data axis spans the processes: each process holds its own rows (their cache
    # and tokens); generate and generate_stream gather the rows into every process.
    mesh = sharding.make_mesh(data=2, model=4)
    model = sharding.shard_model(base, mesh)
    out["generate_2x4"] = kvjax.generate(model, PROMPTS, **opts).tokens
    stream = kvjax.generate_stream(model, PROMPTS, chunk_size=8, **opts)
    for _ in stream:
        pass
    out["stream_2x4"] = stream.generation.tokens
    cache = programs.new_cache(model, len(PROMPTS), 64)
    out["cache_rows_local"] = [list(s.index[0].indices(len(PROMPTS)))
                               for s in cache.keys[0].addressable_shards]

    # A checkpoint loaded onto a mesh spanning both processes: each process places only
    # its own devices' shards.
    loaded = kvjax.load(hf_dir, dtype="float32", mesh=sharding.make_mesh())
    out["hf_1x8"] = kvjax.generate(loaded, PROMPTS, **opts).tokens
    out["hf_embed_local_shards"] = len(loaded.params["embed"].addressable_shards)
    return out


def task_orbax_restore(store: str) -> dict:
    """8 devices: restores a kvjax orbax store onto meshes 1x8, 2x4, 4x2 and 8x1. Each
    leaf's sharding must be ``param_shardings``', each device hold only its shard, and the
    values equal a one-device restore."""
    import jax
    import numpy as np

    from kvjax import orbax_store, sharding
    from kvjax.config import ModelConfig

    config = ModelConfig.from_json(store)
    reference = orbax_store.restore_params(store, config)
    result = {"devices": len(jax.devices())}
    for data, model in MESHES:
        mesh = sharding.make_mesh(data, model)
        params = orbax_store.restore_params(store, config, mesh=mesh)
        pairs = list(zip(jax.tree.leaves(params),
                         jax.tree.leaves(sharding.param_shardings(config, mesh))))
        result[f"{data}x{model}"] = {
            "same_structure": jax.tree.structure(params) == jax.tree.structure(reference),
            "shardings_equal": all(a.sharding == s for a, s in pairs),
            "shards_only": all(shard.data.shape == s.shard_shape(a.shape)
                               for a, s in pairs for shard in a.addressable_shards),
            "split_leaves": sum(s.shard_shape(a.shape) != a.shape for a, s in pairs),
            "values_equal": all(np.array_equal(np.asarray(a), np.asarray(r))
                                for (a, _), r in zip(pairs, jax.tree.leaves(reference))),
        }
    return result


def main(argv: list[str]) -> None:
    task, *args = argv
    if task == "meshes":
        result = task_meshes(*args)
    elif task == "errors":
        result = task_errors(*args)
    elif task == "process":
        result = task_process(int(args[0]), args[1], args[2])
    elif task == "orbax_restore":
        result = task_orbax_restore(*args)
    else:
        raise SystemExit(f"unknown task {task}")
    sys.stdout.flush()
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    main(sys.argv[1:])
