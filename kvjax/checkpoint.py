"""Hugging Face safetensors checkpoints -> the kvjax parameter pytree.

Tensors are read one at a time (memory-mapped by safetensors), checked against the
shape the config implies, converted to the requested dtype on the host and only then
put on the device, so the host holds at most one converted tensor at a time. With a
mesh (``kvjax.sharding``), each tensor goes straight from the host onto its sharding:
every device receives only its own shard (``jax.make_array_from_callback``), and no
device ever holds a whole sharded tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from kvjax.config import ModelConfig
from kvjax.model import layer_param_shapes, top_param_shapes
from kvjax.sharding import DEFAULT_RULES, param_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# kvjax name -> Hugging Face name (inside "model.layers.{i}." for layer params) and
# whether the HF tensor is stored [out, in] and must be transposed to kvjax's [in, out].
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True), "bq": ("self_attn.q_proj.bias", False),
    "wk": ("self_attn.k_proj.weight", True), "bk": ("self_attn.k_proj.bias", False),
    "wv": ("self_attn.v_proj.weight", True), "bv": ("self_attn.v_proj.bias", False),
    "wo": ("self_attn.o_proj.weight", True), "bo": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True), "b_gate": ("mlp.gate_proj.bias", False),
    "w_up": ("mlp.up_proj.weight", True), "b_up": ("mlp.up_proj.bias", False),
    "w_down": ("mlp.down_proj.weight", True), "b_down": ("mlp.down_proj.bias", False),
}
_TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", False),
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (missing, misshapen or unreadable)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one kvjax parameter comes from in a Hugging Face checkpoint."""

    hf_name: str
    hf_shape: tuple[int, ...]
    transpose: bool


def tensor_specs(config: ModelConfig) -> dict:
    """A pytree shaped like the params whose leaves are ``TensorSpec``s."""

    def spec(name_table, name, shape, prefix=""):
        hf_name, transpose = name_table[name]
        return TensorSpec(prefix + hf_name, tuple(reversed(shape)) if transpose else shape, transpose)

    specs = {name: spec(_TOP_NAMES, name, shape) for name, shape in top_param_shapes(config).items()}
    specs["layers"] = tuple(
        {name: spec(_LAYER_NAMES, name, shape, f"model.layers.{i}.")
         for name, shape in layer_param_shapes(config).items()}
        for i in range(config.num_layers))
    return specs


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
                rules=None) -> dict:
    """Reads the parameter pytree of ``config`` from the safetensors in ``directory``.

    With ``mesh`` (a ``kvjax.sharding.make_mesh`` mesh), each tensor is converted on the
    host and placed directly onto its ``NamedSharding`` (``kvjax.sharding.ShardingRules``,
    default ``rules``), each device receiving only its shard; in a multi-process job each
    process places only the shards of its own devices.

    Raises:
      CheckpointError: a tensor is missing or has the wrong shape (naming the tensor,
        the expected and found shapes and the file), or a file cannot be read.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    np_dtype = np.float32 if dtype == "float32" else getattr(ml_dtypes, dtype, np.float16)
    shardings = None
    if mesh is not None:  # validates the mesh against the config before reading anything
        shardings = param_shardings(config, mesh, rules or DEFAULT_RULES)
    files = tensor_files(directory)
    specs = tensor_specs(config)
    for spec in jax.tree.leaves(specs):  # check every name before reading anything
        if spec.hf_name not in files:
            sharded = os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
            where = "model.safetensors.index.json" if sharded else "model.safetensors"
            raise CheckpointError(f"tensor {spec.hf_name} is missing from {where} in {directory}")
    handles: dict[str, object] = {}
    try:
        def read(spec: TensorSpec, placement=None) -> jax.Array:
            path = files[spec.hf_name]
            if path not in handles:
                handles[path] = _open(path).__enter__()
            array = handles[path].get_tensor(spec.hf_name)
            if tuple(array.shape) != spec.hf_shape:
                raise CheckpointError(
                    f"tensor {spec.hf_name} in {os.path.basename(path)} has shape "
                    f"{tuple(array.shape)}, expected {spec.hf_shape} from config.json")
            array = array.astype(np_dtype)
            array = array.T if spec.transpose else array
            if placement is None:
                return jnp.asarray(array)
            return jax.make_array_from_callback(array.shape, placement,
                                                lambda index: array[index])

        if shardings is None:
            return jax.tree.map(read, specs)
        return jax.tree.map(read, specs, shardings)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {path}: {e}; the file is truncated or not safetensors")
