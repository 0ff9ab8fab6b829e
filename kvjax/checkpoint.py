"""Hugging Face safetensors checkpoints -> the kvjax parameter pytree.

Tensors are read one at a time (memory-mapped by safetensors), checked against the
shape the config implies and for finite floating-point values, converted to the requested
dtype on the host and only then put on the device, so the host holds at most one
converted tensor at a time. With a mesh (``kvjax.sharding``), each tensor goes straight
from the host onto its sharding: every device receives only its own shard
(``jax.make_array_from_callback``), and no device ever holds a whole sharded tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from kvjax import params
from kvjax.config import ModelConfig
from kvjax.sharding import DEFAULT_RULES, param_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (missing, misshapen, corrupted or
    unreadable tensors)."""


def tensor_specs(config: ModelConfig) -> dict:
    """A pytree shaped like the params whose leaves are the ``kvjax.params.Source`` each
    parameter is read from.

    Raises:
      CheckpointError: the config asks for a parameter its family's checkpoints do not
        store (a config built by hand, not read from a ``config.json``).
    """

    def source(spec: params.ParamSpec) -> params.Source:
        if spec.source is None:
            raise CheckpointError(
                f"{config.model_type} checkpoints store no tensor for the parameter "
                f"{spec.name} that this config asks for; read the config from the "
                "checkpoint's config.json (ModelConfig.from_json)")
        return spec.source

    return jax.tree.map(source, params.specs(config))


def tensor_files(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file (single ``model.safetensors`` or a sharded index)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(
            f"no model.safetensors or model.safetensors.index.json in {directory}; kvjax reads "
            "Hugging Face safetensors checkpoints (save with save_pretrained(..., "
            "safe_serialization=True))")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def load_params(directory: str, config: ModelConfig, dtype: str = "bfloat16", mesh=None,
                rules=None, progress: bool | None = None) -> dict:
    """Reads the parameter pytree of ``config`` from the safetensors in ``directory``.

    One tensor at a time is read (its file opened for that tensor only, so the pages read
    are released with it), converted to ``dtype`` and placed: host memory beyond the
    loaded params stays near the largest tensor (docs/checkpoints.md has measurements).

    With ``mesh`` (a ``kvjax.sharding.make_mesh`` mesh), each tensor is converted on the
    host and placed directly onto its ``NamedSharding`` (``kvjax.sharding.ShardingRules``,
    default ``rules``), each device receiving only its shard; in a multi-process job each
    process places only the shards of its own devices.

    ``progress``: show a progress bar on stderr; None (default) shows one when stderr is
    a terminal and the checkpoint's files exceed 1 GiB.

    Raises:
      CheckpointError: a tensor is missing, has the wrong shape (naming the tensor, the
        expected and found shapes and the file), is not floating-point or holds NaN or inf
        values (naming the tensor and the file), or a file cannot be read.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    np_dtype = np.float32 if dtype == "float32" else getattr(ml_dtypes, dtype, np.float16)
    shardings = None
    if mesh is not None:  # validates the mesh against the config before reading anything
        shardings = param_shardings(config, mesh, rules or DEFAULT_RULES)
    files = tensor_files(directory)
    specs = _match_base_prefix(tensor_specs(config), files)
    leaves = jax.tree.leaves(specs)
    for spec in leaves:  # check every name before reading anything
        if spec.hf_name not in files:
            sharded = os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
            where = "model.safetensors.index.json" if sharded else "model.safetensors"
            raise CheckpointError(f"tensor {spec.hf_name} is missing from {where} in {directory}")
    if progress is None:
        size = sum(os.path.getsize(path) for path in {files[spec.hf_name] for spec in leaves})
        progress = sys.stderr.isatty() and size > 1 << 30
    bar = tqdm(total=len(leaves), desc="loading", unit="tensor", file=sys.stderr, leave=False,
               disable=not progress)

    parts_left = collections.Counter(spec.hf_name for spec in leaves)
    fused: dict[str, np.ndarray] = {}  # fused tensors read whose parts are not all placed

    def stored(spec: params.Source) -> np.ndarray:
        """The stored tensor of ``spec``, read from its file once even when fused."""
        array = fused.pop(spec.hf_name, None)
        if array is None:
            path = files[spec.hf_name]
            # safetensors copies the tensor out of its memory map, and the mapped pages
            # stay resident until the file is closed: closing it here keeps one tensor's
            # pages, not the whole checkpoint's, in the process's memory.
            with _open(path) as f:
                array = f.get_tensor(spec.hf_name)
            _check_tensor(array, spec, os.path.basename(path))
        parts_left[spec.hf_name] -= 1
        if parts_left[spec.hf_name]:
            fused[spec.hf_name] = array
        return array

    def read(spec: params.Source, placement=None) -> jax.Array:
        array = spec.select(stored(spec))  # this parameter's part of a fused tensor
        array = array.astype(np_dtype, copy=False)
        array = array.T if spec.transpose else array
        if placement is None:
            placed = jnp.asarray(array)
        else:
            placed = jax.make_array_from_callback(array.shape, placement,
                                                  lambda index: array[index])
        bar.update()
        return placed

    with bar:
        if shardings is None:
            return jax.tree.map(read, specs)
        return jax.tree.map(read, specs, shardings)


def _check_tensor(array: np.ndarray, spec: params.Source, file: str) -> None:
    """Raises ``CheckpointError`` naming the tensor and ``file`` unless ``array`` is a
    finite floating-point tensor of the stored shape ``spec`` expects."""
    if tuple(array.shape) != spec.hf_shape:
        raise CheckpointError(f"tensor {spec.hf_name} in {file} has shape {tuple(array.shape)}, "
                              f"expected {spec.hf_shape} from config.json")
    if not jnp.issubdtype(array.dtype, jnp.floating):  # numpy's floating excludes bfloat16
        raise CheckpointError(f"tensor {spec.hf_name} in {file} has dtype {array.dtype}, "
                              "expected a floating-point tensor")
    # One pass over the host copy with a bool temporary, freed before the conversion.
    if not np.isfinite(array).all():
        raise CheckpointError(f"tensor {spec.hf_name} in {file} holds NaN or inf values; the "
                              "checkpoint is corrupted")


# Prefixes of the base model inside a *ForCausalLM (``base_model_prefix`` in transformers).
_BASE_PREFIXES = ("model.", "transformer.")


def _match_base_prefix(specs: dict, files: dict[str, str]) -> dict:
    """``specs`` with the base-model prefix dropped from names the files store without it.

    ``save_pretrained`` of a *ForCausalLM writes ``transformer.h.0...`` (GPT-2) or
    ``model.layers.0...``; checkpoints of the bare base model (the Hub's ``gpt2``,
    ``distilgpt2``) store ``h.0...``. transformers accepts both, and so does kvjax."""

    def match(spec: params.Source) -> params.Source:
        if spec.hf_name in files:
            return spec
        for prefix in _BASE_PREFIXES:
            bare = spec.hf_name.removeprefix(prefix)
            if bare != spec.hf_name and bare in files:
                return dataclasses.replace(spec, hf_name=bare)
        return spec  # reported missing under its full name

    return jax.tree.map(match, specs)


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {path}: {e}; the file is truncated or not safetensors")
