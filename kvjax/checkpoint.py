"""Hugging Face safetensors checkpoints -> the kvjax parameter pytree.

Tensors are read one at a time (memory-mapped by safetensors), checked against the
shape the config implies, converted to the requested dtype on the host and only then
put on the device, so the host holds at most one converted tensor at a time. With a
mesh (``kvjax.sharding``), each tensor goes straight from the host onto its sharding:
every device receives only its own shard (``jax.make_array_from_callback``), and no
device ever holds a whole sharded tensor.
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

from kvjax.config import ModelConfig
from kvjax.model import layer_param_shapes, top_param_shapes
from kvjax.sharding import DEFAULT_RULES, param_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# kvjax name -> Hugging Face name (inside the layer prefix for layer params) and whether
# the HF tensor is stored [out, in] (torch Linear) and must be transposed to kvjax's
# [in, out]. Several kvjax names with one HF name are parts of a fused tensor, split along
# its output axis in the order of the table (see ``TensorSpec.part``).
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
_LAYER_PREFIX = "model.layers.{}."
# With post-norms (Gemma 2/3, OLMo-2) "post_attention_layernorm" norms the attention
# output; the MLP input's norm is "pre_feedforward_layernorm".
_POST_NORM_NAMES = {
    "mlp_norm": ("pre_feedforward_layernorm.weight", False),
    "attn_post_norm": ("post_attention_layernorm.weight", False),
    "mlp_post_norm": ("post_feedforward_layernorm.weight", False),
}
# Phi-3 fuses q/k/v ([q | k | v] rows) and gate/up ([gate | up] rows).
_PHI3_FUSED_NAMES = {
    "wq": ("self_attn.qkv_proj.weight", True), "wk": ("self_attn.qkv_proj.weight", True),
    "wv": ("self_attn.qkv_proj.weight", True),
    "w_gate": ("mlp.gate_up_proj.weight", True), "w_up": ("mlp.gate_up_proj.weight", True),
}
# GPT-2: Conv1D weights are stored [in, out] (no transpose); c_attn fuses [q | k | v] columns.
_GPT2_LAYER_NAMES = {
    "attn_norm": ("ln_1.weight", False), "attn_norm_bias": ("ln_1.bias", False),
    "wq": ("attn.c_attn.weight", False), "wk": ("attn.c_attn.weight", False),
    "wv": ("attn.c_attn.weight", False),
    "bq": ("attn.c_attn.bias", False), "bk": ("attn.c_attn.bias", False),
    "bv": ("attn.c_attn.bias", False),
    "wo": ("attn.c_proj.weight", False), "bo": ("attn.c_proj.bias", False),
    "mlp_norm": ("ln_2.weight", False), "mlp_norm_bias": ("ln_2.bias", False),
    "w_up": ("mlp.c_fc.weight", False), "b_up": ("mlp.c_fc.bias", False),
    "w_down": ("mlp.c_proj.weight", False), "b_down": ("mlp.c_proj.bias", False),
}
_GPT2_TOP_NAMES = {
    "embed": ("transformer.wte.weight", False),
    "pos_embed": ("transformer.wpe.weight", False),
    "final_norm": ("transformer.ln_f.weight", False),
    "final_norm_bias": ("transformer.ln_f.bias", False),
    "lm_head": ("lm_head.weight", False),
}
_GPT2_LAYER_PREFIX = "transformer.h.{}."


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (missing, misshapen or unreadable)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one kvjax parameter comes from in a Hugging Face checkpoint."""

    hf_name: str
    hf_shape: tuple[int, ...]  # the stored tensor's shape (the whole tensor when fused)
    transpose: bool  # stored [out, in]: transposed to kvjax's [in, out]
    part: tuple[int, int] | None = None  # [start, stop) along the stored output axis of a
    #                                      fused tensor (Phi-3 qkv_proj, GPT-2 c_attn)

    def select(self, array: np.ndarray) -> np.ndarray:
        """This parameter's part of the stored tensor ``array`` (all of it unless fused)."""
        if self.part is None:
            return array
        index = [slice(None)] * array.ndim
        index[0 if self.transpose else array.ndim - 1] = slice(*self.part)  # the output axis
        return array[tuple(index)]


def _name_tables(config: ModelConfig) -> tuple[dict, dict, str]:
    """(top-level names, layer names, layer prefix) of the config's checkpoint layout."""
    if config.model_type == "gpt2":
        return _GPT2_TOP_NAMES, _GPT2_LAYER_NAMES, _GPT2_LAYER_PREFIX
    layer_names = _LAYER_NAMES
    if config.post_norms:
        layer_names = {**layer_names, **_POST_NORM_NAMES}
    if config.model_type == "phi3":
        layer_names = {**layer_names, **_PHI3_FUSED_NAMES}
    return _TOP_NAMES, layer_names, _LAYER_PREFIX


def _specs(name_table: dict, shapes: dict[str, tuple[int, ...]], prefix: str) -> dict:
    """``TensorSpec`` of each parameter in ``shapes`` (kvjax shapes, output axis last)."""
    parts: dict[str, list[str]] = {}  # HF name -> the kvjax names stored in it, in order
    for name in name_table:
        if name in shapes:
            parts.setdefault(name_table[name][0], []).append(name)
    specs = {}
    for name, shape in shapes.items():
        hf_name, transpose = name_table[name]
        fused = parts[hf_name]
        start = sum(shapes[other][-1] for other in fused[:fused.index(name)])
        stored = shape[:-1] + (sum(shapes[other][-1] for other in fused),)  # kvjax layout
        specs[name] = TensorSpec(
            prefix + hf_name, tuple(reversed(stored)) if transpose else stored, transpose,
            (start, start + shape[-1]) if len(fused) > 1 else None)
    return specs


def tensor_specs(config: ModelConfig) -> dict:
    """A pytree shaped like the params whose leaves are ``TensorSpec``s."""
    top_names, layer_names, layer_prefix = _name_tables(config)
    specs = _specs(top_names, top_param_shapes(config), "")
    layer_shapes = layer_param_shapes(config)
    specs["layers"] = tuple(_specs(layer_names, layer_shapes, layer_prefix.format(i))
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

    def stored(spec: TensorSpec) -> np.ndarray:
        """The stored tensor of ``spec``, read from its file once even when fused."""
        array = fused.pop(spec.hf_name, None)
        if array is None:
            path = files[spec.hf_name]
            # safetensors copies the tensor out of its memory map, and the mapped pages
            # stay resident until the file is closed: closing it here keeps one tensor's
            # pages, not the whole checkpoint's, in the process's memory.
            with _open(path) as f:
                array = f.get_tensor(spec.hf_name)
            if tuple(array.shape) != spec.hf_shape:
                raise CheckpointError(
                    f"tensor {spec.hf_name} in {os.path.basename(path)} has shape "
                    f"{tuple(array.shape)}, expected {spec.hf_shape} from config.json")
        parts_left[spec.hf_name] -= 1
        if parts_left[spec.hf_name]:
            fused[spec.hf_name] = array
        return array

    def read(spec: TensorSpec, placement=None) -> jax.Array:
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


# Prefixes of the base model inside a *ForCausalLM (``base_model_prefix`` in transformers).
_BASE_PREFIXES = ("model.", "transformer.")


def _match_base_prefix(specs: dict, files: dict[str, str]) -> dict:
    """``specs`` with the base-model prefix dropped from names the files store without it.

    ``save_pretrained`` of a *ForCausalLM writes ``transformer.h.0...`` (GPT-2) or
    ``model.layers.0...``; checkpoints of the bare base model (the Hub's ``gpt2``,
    ``distilgpt2``) store ``h.0...``. transformers accepts both, and so does kvjax."""

    def match(spec: TensorSpec) -> TensorSpec:
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
