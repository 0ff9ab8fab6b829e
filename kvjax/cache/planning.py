"""Memory planning: how many bytes a cache will hold, and the largest one that fits.

Every answer comes from ``jax.eval_shape`` of the same ``kvjax.cache.create`` that
``kvjax.generate`` runs, so it is the bytes of the buffers a run creates (every
``kv_dtype``, scales and lengths included) and cannot drift from them; nothing is
allocated or compiled. On a mesh the answer is per device: each leaf's shard shape under
the placement ``kvjax.sharding`` gives it (by the logical axes the cache declares).

    kvjax.cache.estimate_bytes(config, batch=8, capacity=16384, kv_dtype="int8")
    kvjax.cache.max_batch(config, capacity=16384, budget_bytes=40 * 2**30)
    kvjax.cache.max_capacity(config, batch=8, budget_bytes=40 * 2**30, mesh=mesh)
"""

from __future__ import annotations

from typing import Callable

import jax

from kvjax.cache.base import tree_nbytes
from kvjax.cache.layout import cache_layout
from kvjax.config import ModelConfig, is_count


def estimate_bytes(config: ModelConfig, batch: int, capacity: int, kv_dtype: str | None = None,
                   *, dtype="bfloat16", mesh=None, rules=None, window: int | None = None,
                   sink_tokens: int | None = None) -> int:
    """Bytes of the cache ``kvjax.cache.create(config, batch, capacity, kv_dtype, dtype)``
    would hold, without allocating it.

    Args:
      batch, capacity: the cache's rows and slots per row (integers >= 1). On a mesh,
        ``batch`` is the rows the cache is created with (``kvjax.generate`` pads a batch
        to a multiple of the mesh's ``data`` ways).
      kv_dtype: one of ``kvjax.cache.KV_DTYPES``; None: ``dtype``.
      dtype: the model's dtype.
      mesh, rules: a ``kvjax.sharding`` mesh and its ``ShardingRules`` (default
        ``DEFAULT_RULES``): the bytes on the device holding the most, by each leaf's
        shard shape.
      window, sink_tokens: streaming (``kvjax.cache.layout``). Sliding-window layers
        count their ring buffers either way.

    Raises:
      ValueError: an unknown ``kv_dtype``, sizes that are not integers >= 1, or
        (``kvjax.sharding.ShardingError``) a mesh that cannot split this model or batch.
    """
    _check_sizes(batch=batch, capacity=capacity)
    abstract = _abstract_cache(config, batch, capacity, kv_dtype, dtype, window, sink_tokens)
    if mesh is None:
        return tree_nbytes(abstract)
    from kvjax import sharding  # kvjax.sharding imports kvjax.cache

    rules = rules or sharding.DEFAULT_RULES
    sharding.check_mesh(config, mesh, batch=batch, rules=rules)
    shardings = sharding.logical_shardings(abstract.logical_axes(), config, mesh, rules,
                                           batch=batch, capacity=capacity)
    return sharding.shard_nbytes(abstract, shardings)


def max_batch(config: ModelConfig, capacity: int, budget_bytes: int,
              kv_dtype: str | None = None, *, dtype="bfloat16", mesh=None, rules=None,
              window: int | None = None, sink_tokens: int | None = None) -> int:
    """The largest batch whose cache of ``capacity`` slots a row fits in ``budget_bytes``
    (per device on a mesh), 0 when even one row does not fit. On a mesh the batch is a
    multiple of the ``data`` ways (``kvjax.sharding.batch_ways``), the batches it can
    split. Other arguments as in ``estimate_bytes``.

    Raises:
      ValueError: as ``estimate_bytes``, and for a budget that is not an integer >= 0.
    """
    _check_sizes(capacity=capacity)
    _check_budget(budget_bytes)
    ways = _ways(mesh, rules, "batch")
    return ways * _largest_fitting(
        lambda n: estimate_bytes(config, n * ways, capacity, kv_dtype, dtype=dtype, mesh=mesh,
                                 rules=rules, window=window, sink_tokens=sink_tokens),
        budget_bytes)


def max_capacity(config: ModelConfig, batch: int, budget_bytes: int,
                 kv_dtype: str | None = None, *, dtype="bfloat16", mesh=None,
                 rules=None, sink_tokens: int | None = None) -> int:
    """The largest capacity (slots a row) whose cache of ``batch`` rows fits in
    ``budget_bytes`` (per device on a mesh), 0 when even one slot does not fit. Not
    bounded by the model's ``max_position_embeddings``. On a mesh whose rules split
    ``cache_seq`` (the default does not), a multiple of those ways. Other arguments as
    in ``max_batch``; with ``sink_tokens``, the capacity of a streaming cache (its
    window is the rest). Sliding-window layers stop growing at their window: a model
    whose every layer has one (Mistral) fits any capacity once its windows fit, and the
    answer is then ``max_position_embeddings``, the most a row can use."""
    _check_sizes(batch=batch)
    _check_budget(budget_bytes)
    ways = _ways(mesh, rules, "cache_seq")
    sinks = sink_tokens or 0  # a streaming cache holds the sinks and a window of >= 1 slot
    windowed = all(config.layer_window(i) for i in range(config.num_layers))
    most = (config.max_position_embeddings - sinks) // ways if windowed else None
    windows = _largest_fitting(
        lambda n: estimate_bytes(config, batch, sinks + n * ways, kv_dtype, dtype=dtype,
                                 mesh=mesh, rules=rules, sink_tokens=sink_tokens),
        budget_bytes, most)
    return sinks + windows * ways if windows else 0


def _largest_fitting(bytes_at: Callable[[int], int], budget: int,
                     most: int | None = None) -> int:
    """The largest ``n >= 1`` (at most ``most``) with ``bytes_at(n) <= budget`` (0 when
    none), for ``bytes_at`` non-decreasing.

    A cache's bytes grow linearly in its rows and in its slots, so two points predict the
    boundary; the prediction is then checked at the boundary itself (``n`` fits, ``n +
    1`` does not): four calls of ``bytes_at`` in all. Were the growth not linear, the
    search goes on from what the checks found (doubling, then bisecting), so the answer is
    exact either way.
    """
    first = bytes_at(1)
    if first > budget:
        return 0
    slope = bytes_at(2) - first
    if slope <= 0:  # every kind's leaves hold the batch and the slots: a bug, not input
        raise RuntimeError(f"cache bytes do not grow with its size ({first} -> {first + slope})")
    fits, too_big = 1, None  # bytes_at(fits) <= budget < bytes_at(too_big)
    if most is not None:
        if bytes_at(most) <= budget:
            return most
        too_big = most
    guess = 1 + (budget - first) // slope
    for n in (guess, guess + 1):
        if n > fits and (too_big is None or n < too_big):
            if bytes_at(n) <= budget:
                fits = n
            else:
                too_big = n
    while too_big is None:
        n = 2 * fits
        if bytes_at(n) <= budget:
            fits = n
        else:
            too_big = n
    while too_big - fits > 1:
        n = (fits + too_big) // 2
        if bytes_at(n) <= budget:
            fits = n
        else:
            too_big = n
    return fits


def _abstract_cache(config: ModelConfig, batch: int, capacity: int, kv_dtype: str | None,
                    dtype, window: int | None, sink_tokens: int | None):
    """The cache ``create`` makes, as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    from kvjax.cache import check_kv_dtype, create  # defined in the package, after this import

    check_kv_dtype(kv_dtype)  # before tracing: the messages alone, without a trace
    cache_layout(config, int(capacity), window=window, sink_tokens=sink_tokens)
    return jax.eval_shape(lambda: create(config, int(batch), int(capacity), kv_dtype, dtype,
                                         window=window, sink_tokens=sink_tokens))


def _ways(mesh, rules, axis: str) -> int:
    """How many ways ``mesh`` splits the logical ``axis`` (``batch`` or ``cache_seq``): the
    step a size moves in, since an axis the mesh does not divide is kept whole on every
    device (more bytes a device, not fewer)."""
    if mesh is None:
        return 1
    from kvjax import sharding

    rules = rules or sharding.DEFAULT_RULES
    if axis == "batch":
        return sharding.batch_ways(mesh, rules)
    mesh_axis = getattr(rules, axis)
    return mesh.shape[mesh_axis] if mesh_axis in mesh.shape else 1


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if not is_count(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_budget(budget_bytes) -> None:
    if not is_count(budget_bytes, 0):
        raise ValueError(f"budget_bytes must be an integer number of bytes >= 0, got "
                         f"{budget_bytes!r}")
