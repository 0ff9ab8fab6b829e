"""A run's memory per device, planned without loading weights or compiling: the weights
(by the parameter schema and the param shardings), the KV cache (``kvjax.cache.estimate_bytes``)
and an estimate of XLA's scratch, against the device's memory (the CLI's ``--dry-run``)."""

from __future__ import annotations

import os

import jax
import numpy as np

from kvjax import attention, params, sharding
from kvjax.cache import QUANTIZED, KV_DTYPES, tree_nbytes
from kvjax.cache.planning import estimate_bytes, max_batch, max_capacity
from kvjax.config import ModelConfig
from kvjax.programs import PREFILL_CHUNK
from kvjax.requests import Request


def plan(config: ModelConfig, request: Request, dtype: str, *, kv_dtype: str | None = None,
         mesh=None, rules=None, memory: int | None = None) -> dict:
    """What ``request`` holds on one device and whether it fits: a dict with
    ``weights_bytes``, ``cache_bytes``, ``scratch_bytes`` (and its terms,
    ``scratch_estimate``), ``total_bytes``, ``memory_bytes`` (``memory``, else the
    device's ``bytes_limit``, else on CPU the host's RAM divided among this process's
    devices in the run; ``memory_source`` says which), ``fits``, and when it does not
    fit, ``fitting``: the largest batch and capacity that would, at this ``kv_dtype``
    and with int8."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    platform = devices[0].platform
    place = dict(dtype=dtype, mesh=mesh, rules=rules)
    rows, capacity = request.rows, request.capacity
    streaming = dict(window=request.window, sink_tokens=request.sink_tokens)

    def needs(kind):  # (cache, scratch, its terms) per device
        return (estimate_bytes(config, rows, capacity, kind, **place, **streaming),
                *scratch_bytes(config, dtype, request, kind, mesh, rules, platform))

    weights = weights_bytes(config, dtype, mesh, rules)
    cache, scratch, terms = needs(kv_dtype)
    memory, source = (memory, "--memory-budget") if memory is not None else device_memory(devices)
    total = weights + cache + scratch
    report = {"devices": len(devices), "platform": platform,
              "mesh": dict(mesh.shape) if mesh is not None else None, "batch": request.batch,
              "rows": rows, "capacity": capacity, "prompt_block": request.prompt_tokens.shape[1],
              "dtype": dtype, "kv_dtype": kv_dtype or dtype, "weights_bytes": weights,
              "cache_bytes": cache, "scratch_bytes": scratch, "scratch_estimate": terms,
              "total_bytes": total, "memory_bytes": memory, "memory_source": source,
              "fits": total <= memory}
    if total > memory:
        needed = max(len(ids) for ids in request.encoded) + int(request.controls["max_new_tokens"][0])
        if request.window is not None or request.sink_tokens is not None:
            needed = (request.sink_tokens or 0) + 1  # streaming: any window runs
        report["fitting"] = {"capacity_needed": needed,
                             kv_dtype or dtype: largest(config, request, weights, scratch,
                                                        memory, kv_dtype, place)}
        if kv_dtype not in QUANTIZED and "int8" in KV_DTYPES:
            cache8, scratch8, _ = needs("int8")
            report["fitting"]["int8"] = dict(
                cache_bytes=cache8, total_bytes=weights + cache8 + scratch8,
                **largest(config, request, weights, scratch8, memory, "int8", place))
    return report


def weights_bytes(config, dtype: str, mesh, rules) -> int:
    """Bytes of the weights on one device (every device holds shards of the same shapes)."""
    abstract = params.abstract_params(config, np.dtype(dtype))
    if mesh is None:
        return tree_nbytes(abstract)
    return sharding.shard_nbytes(abstract, sharding.param_shardings(config, mesh, rules))


def scratch_bytes(config, dtype: str, request, kv_dtype, mesh, rules,
                  platform: str) -> tuple[int, dict[str, int]]:
    """An estimate of the scratch XLA needs on one device beside the weights and the
    cache, and its terms (bytes by what they hold).

    A generation's largest temporaries are its prefill's, one piece of at most
    ``kvjax.programs.PREFILL_CHUNK`` tokens at a time: that piece's activations (gate, up
    and their product ``[rows, piece, mlp]``; four ``[rows, piece, hidden]``; q, k, v),
    its float32 attention scores and probabilities ``[rows, heads, piece, keys]`` where
    the layers attend on the XLA path (cuDNN flash attention keeps none), the float32
    logits ``[rows, vocab]`` with sampling's scaled and sorted copies, and the token buffer.
    XLA:CPU computes bfloat16 and float16 in float32: there the activations count 4
    bytes an element, plus a float32 copy of the weights. Against XLA's own figures
    (``memory_analysis()`` of the compiled generation, the bundled model on CPU), the
    estimate was, float32: 0.54 MB for 0.40 MB (batch 1, prompt block 32), 9.7 for 4.8 MB
    (batch 4, 128), 126 for 109 MB (batch 8, 512), 774 for 839 MB (batch 16, 1024);
    bfloat16: 25 for 23 MB (batch 4, 128), 142 for 148 MB (batch 8, 512).
    """
    def per_device(axis: str, size: int) -> int:
        if mesh is None:
            return size
        placed = sharding.logical_sharding((axis,), config, mesh, rules, batch=request.rows)
        return placed.shard_shape((size,))[0]

    rows = per_device("batch", request.rows)
    heads, kv_heads = per_device("heads", config.num_heads), per_device("kv_heads",
                                                                         config.num_kv_heads)
    width = request.prompt_tokens.shape[1]
    piece = min(width, PREFILL_CHUNK)
    fresh = width <= PREFILL_CHUNK  # one piece into an empty cache: attends within it
    keys = piece if fresh else (request.key_limit or request.capacity)
    itemsize = 4 if platform == "cpu" else np.dtype(dtype).itemsize
    plan = attention.choose(config, dtype, fresh=fresh, key_limit=request.key_limit,
                                  mesh=mesh, rules=rules, kv_dtype=kv_dtype)
    terms = {
        "activations": rows * piece * itemsize * (
            3 * per_device("mlp", config.intermediate_size) + 4 * config.hidden_size
            + (heads + 2 * kv_heads) * config.head_dim),
        "attention_scores": (2 * rows * heads * piece * keys * 4
                             if any(a.implementation == "xla" for a in plan.layers) else 0),
        "logits_and_sampling": 3 * rows * config.vocab_size * 4 + rows * request.num_steps * 4,
        "float32_weights": (weights_bytes(config, "float32", mesh, rules)
                            if platform == "cpu" and np.dtype(dtype) != np.float32 else 0)}
    return sum(terms.values()), terms


def largest(config, request, weights: int, scratch: int, memory: int, kv_dtype,
             place: dict) -> dict[str, int]:
    """The largest batch (at this run's capacity) and capacity (at its rows) whose cache
    fits beside the weights and this run's scratch (which a smaller run does not exceed)."""
    room = max(memory - weights - scratch, 0)
    return {"max_batch": max_batch(config, request.capacity, room, kv_dtype, **place,
                                   window=request.window, sink_tokens=request.sink_tokens),
            "max_capacity": max_capacity(config, request.rows, room, kv_dtype, **place,
                                         sink_tokens=request.sink_tokens)}


def device_memory(devices: list) -> tuple[int, str]:
    """The memory of the run's devices in this process (the least, where they differ) and
    where that figure comes from: the device's ``bytes_limit``, else (CPU, which reports
    none) the host's RAM divided among them."""
    local = [d for d in devices if d.process_index == jax.process_index()] or devices
    limits = [bytes_limit(d) for d in local]
    if all(limits):
        return min(limits), f"{local[0].platform} bytes_limit"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // len(local), (f"host RAM / {len(local)} devices" if len(local) > 1
                               else "host RAM")


def bytes_limit(device) -> int | None:
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except (RuntimeError, NotImplementedError):  # a backend without memory stats
        return None
