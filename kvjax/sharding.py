"""One generation over several devices: a ``jax.sharding`` mesh, a partition table, and
params and KV cache placed on it.

The mesh has two axes, ``("data", "model")``. ``model`` splits the weight matrices
(tensor parallelism: attention heads, MLP columns, the LM head's vocabulary); ``data``
splits the batch rows and their cache. Each parameter and cache buffer gets a
``NamedSharding`` from a small table, ``ShardingRules``, that maps *logical* axes (batch,
vocab, vocab_in, embed, heads, kv_heads, mlp, cache_seq, cache_blocks, head_dim) to mesh
axes, and is placed once: by ``kvjax.load(path, mesh=mesh)`` while reading the
checkpoint, or by ``shard_params`` for params built in memory. The decode program is the
unchanged ``kvjax.decode.jit_decode``: given sharded inputs, XLA compiles it SPMD (its
partitioner inserts the collectives), once.

    mesh = kvjax.sharding.make_mesh(data=2, model=4)
    model = kvjax.load("path/to/checkpoint", mesh=mesh)
    out = kvjax.generate(model, prompts)          # any batch: padded to a multiple of data=2

A logical axis is split over its mesh axis only when that divides it evenly, counted in
whole units: query heads must divide (an error says which ``model`` sizes work); KV heads
are never split mid-head (fewer KV heads than ``model`` devices: each lives on the
devices whose query heads read it); a vocabulary or MLP width that does not divide is
replicated. The embedding table is replicated, the LM head vocab-parallel.

Multi-host: call ``initialize_distributed`` first in every process, then build the mesh
over all processes' devices (``make_mesh``) and load as above. See docs/sharding.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvjax import params as param_schema
from kvjax.cache import is_axes
from kvjax.config import ModelConfig, is_count
from kvjax.kernels.decode_attention import MeshSplit

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)


class ShardingError(ValueError):
    """A mesh that cannot run this model or batch (raised before anything compiles)."""


# ----- the mesh -----

def make_mesh(data: int | None = None, model: int | None = None, *,
              devices: list | None = None) -> Mesh:
    """A 2-D device mesh with axes ``("data", "model")``.

    Args:
      data: batch-parallel ways (batch rows split over ``data`` device groups).
      model: tensor-parallel ways (each weight matrix split over ``model`` devices).
      devices: the devices to use (default ``jax.devices()``, every process's devices).

    With neither given, every device goes to ``model`` (``data=1``): one request served
    as fast as possible and the weights split as far as possible. With one given, the
    other takes the remaining devices. ``data * model`` devices are used, the first ones
    of ``devices``, rows of the mesh are ``data`` groups, so ``model`` runs over
    neighbouring devices (the same host, the fastest links). With several processes the
    mesh must use every device of every process.

    Raises:
      ShardingError: more devices asked for than exist (saying how many exist), sizes
        < 1, or sizes that do not split the devices evenly.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    for name, size in (("data", data), ("model", model)):
        if size is not None and not is_count(size):
            raise ShardingError(f"mesh axis {name} must be an integer >= 1, got {size!r}")
    if (data or 1) * (model or 1) > count:
        raise ShardingError(
            f"mesh data={data or 1} x model={model or 1} needs {(data or 1) * (model or 1)} "
            f"devices but only {count} exist ({_describe(devices)}); use data * model <= {count}")
    if data is None and model is None:
        data, model = 1, count
    elif model is None:
        if count % data:
            raise ShardingError(f"data={data} does not divide the {count} devices; pass model "
                                f"too, or a data size in {_divisors(count)}")
        model = count // data
    elif data is None:
        if count % model:
            raise ShardingError(f"model={model} does not divide the {count} devices; pass data "
                                f"too, or a model size in {_divisors(count)}")
        data = count // model
    data, model = int(data), int(model)
    needed = data * model
    if needed < count and jax.process_count() > 1:
        raise ShardingError(
            f"mesh data={data} x model={model} uses {needed} of the {count} devices of "
            f"{jax.process_count()} processes; a multi-process mesh must use all {count}")
    grid = np.array(devices[:needed], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _describe(devices) -> str:
    kinds = "/".join(sorted({d.platform for d in devices}))
    processes = jax.process_count()
    return f"{kinds}, {processes} process{'es' if processes > 1 else ''}"


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


# ----- the partition table -----

@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axis (or None: replicated) each logical axis is split over.

    A logical axis is split only when its mesh axis divides it in whole units (heads for
    ``heads`` / ``kv_heads``, rows for ``batch``); otherwise it is replicated, except
    ``heads`` and ``batch``, which ``check_mesh`` rejects with sizes that work.

    ``vocab_in`` is the embedding table's vocabulary, replicated by default: XLA
    partitions ``embed[tokens]`` on a vocab-split table by all-gathering the whole table
    at every decode step (jax 0.11.2 on GPUs: 1 GiB a step for Llama-3.1-8B on model=2;
    docs/sharding.md), which costs more than keeping a copy. A tied table (no
    ``lm_head``) is both the lookup table and the LM head, and follows ``vocab_in``.

    ``group_kv_heads``: with fewer KV heads than ``model`` devices (``model`` a multiple
    of ``num_kv_heads``), each KV head, its cache and its ``wk``/``wv`` columns are kept
    only on the ``model / num_kv_heads`` devices whose query heads read it (the
    ``model`` axis is viewed as ``model_kv`` x ``model_rep``); a head is never split.
    False replicates every KV head on every ``model`` device instead, which costs
    ``num_kv_heads`` times the cache memory and made XLA re-split the cache inside the
    decode loop (a second, half-size cache copy and an all-gather of the whole cache
    after it: docs/sharding.md).
    """

    batch: str | None = DATA  # rows of a batch
    vocab: str | None = MODEL  # LM head rows (vocab-parallel logits)
    vocab_in: str | None = None  # embedding table rows, looked up by token id (see below)
    embed: str | None = None  # the hidden (residual) width: replicated
    heads: str | None = MODEL  # query heads: wq/bq columns, wo rows
    kv_heads: str | None = MODEL  # KV heads: wk/wv/bk/bv columns and the cache
    mlp: str | None = MODEL  # intermediate width: w_gate/w_up columns, w_down rows
    cache_seq: str | None = None  # cache slots: never split (writes go to any slot)
    cache_blocks: str | None = None  # a paged pool's blocks: any row's, never split
    head_dim: str | None = None  # within a head: never split
    group_kv_heads: bool = True


DEFAULT_RULES = ShardingRules()


def parse_rules(text: str) -> ShardingRules:
    """``ShardingRules`` from ``"field=value,..."`` (the CLI's ``--rules``): each field of
    ``ShardingRules`` set to a mesh axis name or ``none`` (replicated), and
    ``group_kv_heads`` to ``true`` or ``false``; fields left out keep their defaults.
    ``"heads=none,kv_heads=none"`` keeps attention whole on every ``model`` device and
    splits only the MLP and the LM head (one all-reduce a layer instead of two;
    docs/sharding.md)."""
    fields = [f.name for f in dataclasses.fields(ShardingRules)]
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = (s.strip() for s in part.partition("="))
        if name not in fields or not eq or not value:
            raise ShardingError(f"sharding rule {part!r} is not field=value with a field in "
                                f"{{{', '.join(fields)}}} (e.g. heads=none,kv_heads=none)")
        if name in values:
            raise ShardingError(f"sharding rule {name} given twice in {text!r}")
        if name == "group_kv_heads":
            if value.lower() not in ("true", "false"):
                raise ShardingError(f"group_kv_heads must be true or false, got {value!r}")
            values[name] = value.lower() == "true"
        else:
            values[name] = None if value.lower() == "none" else value
    return ShardingRules(**values)
LOGICAL_AXES = ("batch", "vocab", "vocab_in", "embed", "heads", "kv_heads", "mlp", "cache_seq",
                "cache_blocks", "head_dim")


def _units(config: ModelConfig, batch: int | None, capacity: int | None) -> dict[str, int | None]:
    """How many indivisible units each logical axis has (heads, not head_dim columns)."""
    return {"vocab": config.vocab_size, "vocab_in": config.vocab_size,
            "embed": config.hidden_size, "heads": config.num_heads,
            "kv_heads": config.num_kv_heads, "mlp": config.intermediate_size,
            "head_dim": config.head_dim, "batch": batch, "cache_seq": capacity,
            "cache_blocks": None}


@functools.lru_cache(maxsize=64)
def grouped_mesh(mesh: Mesh, axis: str, groups: int) -> Mesh:
    """``mesh`` with ``axis`` (size M) viewed as ``{axis}_kv`` (``groups``) x ``{axis}_rep``
    (M / groups): the same devices in the same order."""
    names = list(mesh.axis_names)
    i = names.index(axis)
    shape = list(mesh.devices.shape)
    shape[i:i + 1] = [groups, shape[i] // groups]
    names[i:i + 1] = [f"{axis}_kv", f"{axis}_rep"]
    return Mesh(mesh.devices.reshape(shape), tuple(names),
                axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def placement_mesh(config: ModelConfig, mesh: Mesh,
                   rules: ShardingRules = DEFAULT_RULES) -> tuple[Mesh, dict]:
    """The mesh a model's arrays are placed on, and how each axis of ``mesh`` is spelled
    in their specs.

    Usually ``mesh`` itself. When KV heads are grouped (fewer KV heads than ``model``
    devices, ``model`` a multiple of them), every array of the model — not only the KV
    ones — is placed on the view of the same devices whose ``model`` axis is split into
    ``model_kv`` x ``model_rep``, and a split over all of ``model`` is spelled
    ``("model_kv", "model_rep")``. One mesh for all arrays matters: jax names the
    program's output shardings on the mesh of its first argument, and an output split
    over ``model_kv`` cannot be named on the ``(data, model)`` mesh.
    """
    axis, n = rules.kv_heads, config.num_kv_heads
    if axis is None or not rules.group_kv_heads or axis not in mesh.shape:
        return mesh, {}
    ways = mesh.shape[axis]
    if not (1 < n < ways and ways % n == 0):
        return mesh, {}
    return grouped_mesh(mesh, axis, n), {axis: (f"{axis}_kv", f"{axis}_rep")}


def logical_sharding(axes: tuple[str, ...], config: ModelConfig, mesh: Mesh,
                     rules: ShardingRules = DEFAULT_RULES, *, batch: int | None = None,
                     capacity: int | None = None) -> NamedSharding:
    """The ``NamedSharding`` of an array whose dimensions have the given logical axes."""
    units = _units(config, batch, capacity)
    target, spelled = placement_mesh(config, mesh, rules)
    used: set[str] = set()
    spec: list = []
    for axis in axes:
        mesh_axis = getattr(rules, axis)
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            raise ShardingError(f"rule {axis} -> {mesh_axis!r}: the mesh has no axis "
                                f"{mesh_axis!r} (axes: {', '.join(mesh.axis_names)})")
        if mesh_axis is None or mesh_axis in used:
            spec.append(None)
            continue
        n, ways = units[axis], mesh.shape[mesh_axis]
        if n is None or n % ways == 0:
            spec.append(spelled.get(mesh_axis, mesh_axis))
        elif axis == "kv_heads" and mesh_axis in spelled:
            spec.append(spelled[mesh_axis][0])  # each KV head on the devices that read it
        else:
            spec.append(None)  # replicated along this dimension
        used.add(mesh_axis)
    return NamedSharding(target, PartitionSpec(*spec))


def logical_shardings(axes: Any, config: ModelConfig, mesh: Mesh,
                      rules: ShardingRules = DEFAULT_RULES, *, batch: int | None = None,
                      capacity: int | None = None) -> Any:
    """``logical_sharding`` of every ``LogicalAxes`` leaf of a pytree (a cache's or the
    params' declared axes): a pytree of the same structure with ``NamedSharding`` leaves."""
    return jax.tree.map(lambda names: logical_sharding(names, config, mesh, rules, batch=batch,
                                                       capacity=capacity), axes, is_leaf=is_axes)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict:
    """A pytree shaped like the params whose leaves are ``NamedSharding``s (by each
    parameter's logical axes, ``kvjax.params``)."""
    check_mesh(config, mesh, rules=rules)
    axes = jax.tree.map(lambda spec: spec.axes, param_schema.specs(config))
    return logical_shardings(axes, config, mesh, rules)


def param_specs(config: ModelConfig, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict:
    """``param_shardings`` as ``PartitionSpec``s (on the ``placement_mesh``)."""
    return jax.tree.map(lambda s: s.spec, param_shardings(config, mesh, rules),
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def shard_params(params: dict, config: ModelConfig, mesh: Mesh,
                 rules: ShardingRules = DEFAULT_RULES) -> dict:
    """Places params built in memory (``init_params``, a training run) onto ``mesh``.

    Each device receives only its own shard of each array. To avoid one full copy of the
    model in memory in the first place, load with ``kvjax.load(path, mesh=mesh)`` or
    build the params under ``jax.jit(..., out_shardings=param_shardings(config, mesh))``.
    """
    return jax.device_put(params, param_shardings(config, mesh, rules))


def shard_model(model, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """A ``kvjax.Model`` with its params placed on ``mesh`` by ``rules``, and both
    recorded (``kvjax.generate`` then places the cache and the batch by them too)."""
    return dataclasses.replace(model, params=shard_params(model.params, model.config, mesh, rules),
                               mesh=mesh, rules=rules)


def kernel_split(config: ModelConfig, mesh: Mesh | None,
                 rules: ShardingRules = DEFAULT_RULES) -> MeshSplit | None:
    """How ``kvjax.kernels.decode_attention`` runs on ``mesh``: on each device's rows and
    heads (``kvjax.attention.LayerAttention.split``), where each device's query heads read
    exactly the KV heads that device holds: KV heads split like the query heads,
    grouped (``ShardingRules.group_kv_heads``), or a single KV head. None for one
    device or no mesh (the kernel needs no split), and where several KV heads are
    replicated while query heads are split (``kvjax.generate`` then keeps the XLA
    path)."""
    if mesh is None or mesh.devices.size == 1:
        return None
    entry = lambda axis: logical_sharding((axis,), config, mesh, rules).spec[0]
    heads, kv_heads = entry("heads"), entry("kv_heads")
    grouped = isinstance(heads, tuple) and kv_heads == heads[0]  # one KV head a device
    single = kv_heads is None and config.num_kv_heads == 1  # MQA: its one head everywhere
    if heads != kv_heads and not (grouped or single):
        return None
    return MeshSplit(logical_sharding(("batch",), config, mesh, rules).mesh,
                     rows=entry("batch"), heads=heads, kv_heads=kv_heads)


def kernel_options(config: ModelConfig, mesh: Mesh | None,
                   rules: ShardingRules = DEFAULT_RULES) -> dict[str, Any]:
    """The decode-kernel arguments of ``kvjax.model.step_fn`` for params and a cache
    placed on ``mesh`` (or None) by ``rules``: ``{"decode_kernel": ..., "kernel_split":
    ...}``. The older spelling of ``kvjax.attention.choose(config, dtype, mesh=mesh,
    rules=rules)``, which decides the same and is what ``kvjax.generate`` uses; kept so
    that ``step_fn(config, **kernel_options(config, mesh, rules))`` keeps working.
    """
    split = kernel_split(config, mesh, rules)
    several = mesh is not None and mesh.devices.size > 1
    return {"decode_kernel": False if several and split is None else None,
            "kernel_split": split}


def create_sharded(config: ModelConfig, mesh: Mesh, rules: ShardingRules, create, *args):
    """``create(*args)`` (a cache kind's ``create``) made already sharded on ``mesh``: each
    device allocates only its shard, placed by the logical axes the cache declares
    (``logical_axes()``), so a new cache kind needs nothing here.

    Raises:
      ShardingError: ``mesh`` cannot split this model or the cache's batch
        (``check_mesh``), before anything is allocated.
    """
    return _sharded_creator(config, mesh, rules, create, args)()


@functools.lru_cache(maxsize=32)
def _sharded_creator(config: ModelConfig, mesh: Mesh, rules: ShardingRules, create, args):
    abstract = jax.eval_shape(lambda: create(*args))
    check_mesh(config, mesh, batch=abstract.batch, rules=rules)
    shardings = logical_shardings(abstract.logical_axes(), config, mesh, rules,
                                  batch=abstract.batch, capacity=abstract.capacity)
    return jax.jit(lambda: create(*args), out_shardings=shardings)


# ----- validation -----

def check_mesh(config: ModelConfig, mesh: Mesh | None, *, batch: int | None = None,
               rules: ShardingRules = DEFAULT_RULES) -> None:
    """Raises ``ShardingError`` when ``mesh`` cannot run ``config`` (or this batch).

    Checks that the mesh has the axes the rules name, that the query heads divide over
    their axis (a head is never split, and splitting heads unevenly would put different
    work on different devices) and that ``batch`` divides over its axis, each message
    suggesting sizes that work.
    """
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"mesh must be a jax.sharding.Mesh (kvjax.sharding.make_mesh), "
                            f"got {type(mesh).__name__}")
    for name in LOGICAL_AXES:
        axis = getattr(rules, name)
        if axis is not None and axis not in mesh.shape:
            raise ShardingError(f"rule {name} -> {axis!r}: the mesh has no axis {axis!r} "
                                f"(axes: {', '.join(mesh.axis_names)})")
    if rules.heads is not None:
        ways = mesh.shape[rules.heads]
        if config.num_heads % ways:
            ok = _divisors(config.num_heads)
            raise ShardingError(
                f"num_heads {config.num_heads} not divisible by {rules.heads}={ways}; use "
                f"{rules.heads} in {ok}")
    if batch is not None and rules.batch is not None:
        ways = mesh.shape[rules.batch]
        if batch % ways:
            ok = [d for d in range(1, ways) if batch % d == 0 and mesh.devices.size % d == 0]
            other = f"{rules.batch}={ok[0]}" if len(ok) == 1 else \
                f"{rules.batch} in {{{', '.join(map(str, ok))}}}"
            raise ShardingError(
                f"batch {batch} is not divisible by mesh axis {rules.batch}={ways}; use a batch "
                f"that is a multiple of {ways} or {other}")


def batch_ways(mesh: Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> int:
    """How many ways ``mesh`` splits a batch's rows (1 without a mesh or a batch axis):
    ``kvjax.generate`` pads its batch to a multiple of this."""
    if mesh is None or rules.batch is None or rules.batch not in mesh.shape:
        return 1
    return mesh.shape[rules.batch]


# ----- describing where things are -----

def shard_nbytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s) placed by
    ``shardings`` (``NamedSharding``s, the same structure). kvjax splits an axis only in
    whole, equal parts, so every device holds shards of the same shapes."""
    shards = jax.tree.map(lambda leaf, placed: int(np.prod(placed.shard_shape(leaf.shape),
                                                           dtype=object))
                          * np.dtype(leaf.dtype).itemsize, tree, shardings)
    return sum(jax.tree.leaves(shards))


def bytes_per_device(tree: Any) -> dict:
    """Bytes each device holds of the arrays in ``tree`` (from their addressable shards)."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


# ----- several processes -----

def initialize_distributed(coordinator: str, num_processes: int, process_id: int, *,
                           local_device_ids: int | list[int] | None = None,
                           initialization_timeout: int = 300) -> None:
    """Joins this process to a multi-process JAX job (``jax.distributed.initialize``).

    Call it in every process before anything else touches JAX devices; afterwards
    ``jax.devices()`` lists every process's devices and ``make_mesh`` spans them all.
    On CPU, cross-process collectives go through gloo (set here when the CPU backend is
    in use and no implementation was chosen).

    Args:
      coordinator: ``host:port`` of process 0 (which serves it).
      num_processes: processes in the job.
      process_id: this process's index, ``0 .. num_processes - 1``.
      local_device_ids: the local devices this process drives (default all).
    """
    if not 0 <= process_id < num_processes:
        raise ShardingError(f"process_id {process_id} is outside [0, {num_processes})")
    platforms = (jax.config.jax_platforms or "").lower()
    if platforms in ("", "cpu") and not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, in every process."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
