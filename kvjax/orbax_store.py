"""Converted params as an orbax checkpoint: convert a Hugging Face checkpoint once,
then restore the kvjax param pytree directly (onto a mesh's shardings when given).

A store is a directory that ``kvjax.load`` can read without the original checkpoint::

    STORE/
      config.json, generation_config.json, tokenizer.json, ...   copied from the source
      params/             the orbax checkpoint of the params (kvjax layout and dtype)
      kvjax_store.json    {"format": "kvjax-orbax", "version": 1, "dtype": "bfloat16"}

Saves are atomic. The whole store is built in a hidden sibling directory
(``.STORE.tmp-XXXX``; orbax itself writes ``params`` under a temporary name and renames
it once its files are complete), ``kvjax_store.json`` is written last, and only then is
the directory renamed to ``STORE``. An interrupted save therefore leaves no ``STORE`` (or
the previous one, untouched), and a leftover ``.STORE.tmp-XXXX`` of a killed process
lacks ``kvjax_store.json`` unless it is complete, so it never loads half-written. Saving
over an existing store moves the old one aside only once the new one is complete, then
deletes it.

    model = kvjax.load("path/to/hf-checkpoint", dtype="bfloat16")
    orbax_store.save(model, "llama-kvjax", source_dir="path/to/hf-checkpoint")
    params = orbax_store.restore_params("llama-kvjax", model.config, mesh=mesh)

``scripts/convert.py`` does the first two lines from the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kvjax import params
from kvjax.checkpoint import DTYPES, CheckpointError
from kvjax.config import ModelConfig
from kvjax.sharding import DEFAULT_RULES, param_shardings

STORE_FILE = "kvjax_store.json"
PARAMS_DIR = "params"
FORMAT = "kvjax-orbax"
VERSION = 1
# Small files of a Hugging Face checkpoint that rebuild the model around its params.
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")


def is_orbax_store(directory: str) -> bool:
    """Whether ``directory`` is a complete kvjax orbax store (its marker file is written
    last, so an interrupted save never has one)."""
    return os.path.isfile(os.path.join(directory, STORE_FILE))


def check_writable(directory: str) -> None:
    """Raises ``CheckpointError`` unless ``save`` may write a store at ``directory``: it
    must be absent, empty or a kvjax orbax store (which is replaced)."""
    if os.path.exists(directory) and not is_orbax_store(directory) and not (
            os.path.isdir(directory) and not os.listdir(directory)):
        raise CheckpointError(f"{directory} exists and is not a kvjax orbax store; refusing to "
                              "overwrite it: choose another directory or remove it")


def save(model, directory: str, *, source_dir: str) -> str:
    """Saves ``model.params`` and the small files of ``source_dir`` as a store at ``directory``.

    Args:
      model: a ``kvjax.Model`` (``kvjax.load``), on one device or on a mesh.
      directory: the store to write; an existing store there is replaced once the new
        one is complete.
      source_dir: the Hugging Face checkpoint directory the model was loaded from; its
        ``config.json``, tokenizer and generation files are copied.

    Returns the store's absolute path.

    Raises:
      CheckpointError: ``source_dir`` has no ``config.json`` or another config than the
        model, the params do not match the config, ``directory`` exists and is not a
        kvjax store (it is never overwritten then), or several processes run (saving is
        single-process).
    """
    if jax.process_count() > 1:
        raise CheckpointError("orbax_store.save runs in a single process; save from one "
                              "process without a multi-process mesh")
    final = os.path.abspath(directory)
    check_writable(final)
    source_config = os.path.join(source_dir, "config.json")
    if not os.path.isfile(source_config):
        raise CheckpointError(f"no config.json in {source_dir}: source_dir must be the "
                              "Hugging Face checkpoint directory the model was loaded from")
    if ModelConfig.from_json(source_dir) != model.config:
        raise CheckpointError(f"the model's config differs from {source_config}; pass the "
                              "directory the model was loaded from")
    dtype = str(model.dtype)
    expected = _names_and_shapes(params.specs(model.config))
    _check_shapes(_names_and_shapes(model.params), expected, "the model's params")
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        for file in SOURCE_FILES:
            if os.path.isfile(os.path.join(source_dir, file)):
                shutil.copyfile(os.path.join(source_dir, file), os.path.join(staging, file))
        _checkpointer().save(os.path.join(staging, PARAMS_DIR),
                             args=ocp.args.PyTreeSave(model.params))
        with open(os.path.join(staging, STORE_FILE), "w") as f:  # last: marks it complete
            json.dump({"format": FORMAT, "version": VERSION, "dtype": dtype}, f, indent=2)
        _replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def restore_params(directory: str, config: ModelConfig, dtype: str | None = None, mesh=None,
                   rules=None) -> dict:
    """Restores the param pytree of ``config`` from the store at ``directory``.

    Args:
      directory: a store written by ``save``.
      config: the model's config (``ModelConfig.from_json(directory)``).
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None keeps the saved dtype,
        another converts each tensor as it is read.
      mesh: a ``kvjax.sharding.make_mesh`` mesh: every tensor is restored onto its
        ``kvjax.sharding.param_shardings(config, mesh, rules)`` sharding, each device
        reading only its own shard. Without a mesh the params go to the default device.
      rules: the ``kvjax.sharding.ShardingRules`` of the placement (default rules).

    Raises:
      FileNotFoundError: ``directory`` does not exist.
      CheckpointError: not a (complete) store, written by a newer kvjax, params whose
        tensors or shapes differ from ``config`` (naming the tensor and both shapes), or a
        damaged store: unreadable files (with TensorStore's one-line reason) or a tensor
        holding NaN or inf values (naming it).
    """
    info = _read_info(directory)
    dtype = dtype or info["dtype"]
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    path = os.path.join(directory, PARAMS_DIR)
    checkpointer = _checkpointer()
    try:
        metadata = checkpointer.metadata(path).item_metadata
    except Exception as e:  # orbax raises various errors for missing or broken metadata
        raise _damaged(directory, _root_cause(e)) from e
    if metadata is None:  # orbax's answer for unreadable metadata files
        raise _damaged(directory, f"no readable metadata in {path}")
    stored = metadata.tree
    abstract = params.abstract_params(config, DTYPES[dtype])
    _check_shapes(_names_and_shapes(stored), _names_and_shapes(abstract),
                  f"the orbax store {directory}")
    if mesh is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: default, abstract)
    else:
        shardings = param_shardings(config, mesh, rules or DEFAULT_RULES)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    try:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    except Exception as e:  # TensorStore's errors for unreadable arrays
        raise _damaged(directory, _root_cause(e)) from e
    _check_finite(restored, directory)
    return restored


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous orbax checkpointer (the save is complete when ``save`` returns) of
    uncompressed tensors: zstd saved about a fifth of the disk space of random bf16 weights
    but made restoring slower (docs/checkpoints.md)."""
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _replace(staging: str, final: str) -> None:
    """Renames the complete ``staging`` to ``final``, moving an old store aside only now
    and deleting it after. Were the process killed between the two renames, the old store
    would survive complete in ``.NAME.old-XXXX/NAME``."""
    if not os.path.exists(final):
        os.rename(staging, final)
        return
    parent, name = os.path.split(final)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(final, os.path.join(old, name))
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(os.path.join(old, name), final)  # the old store back in place
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_info(directory: str) -> dict:
    """The contents of ``kvjax_store.json``, or a clear error saying what ``directory`` is."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist (no kvjax orbax store there)")
    if not is_orbax_store(directory):
        if any(name.startswith(PARAMS_DIR) for name in os.listdir(directory)):
            raise CheckpointError(
                f"{directory} is an incomplete kvjax orbax store (no {STORE_FILE}): its save "
                "was interrupted; save or convert it again")
        raise CheckpointError(f"{directory} is not a kvjax orbax store (no {STORE_FILE}); "
                              "make one with scripts/convert.py")
    with open(os.path.join(directory, STORE_FILE)) as f:
        info = json.load(f)
    if info.get("format") != FORMAT or not isinstance(info.get("version"), int):
        raise CheckpointError(f"{os.path.join(directory, STORE_FILE)} is not a kvjax store "
                              f"marker (format {info.get('format')!r})")
    if info["version"] > VERSION:
        raise CheckpointError(f"{directory} is a version {info['version']} store; this kvjax "
                              f"reads version {VERSION}: upgrade kvjax")
    return info


def _named(tree) -> dict:
    """``{"embed": leaf, "layers.0.wq": leaf, ...}`` of a params-shaped pytree."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _names_and_shapes(tree) -> dict[str, tuple[int, ...]]:
    """``{"embed": shape, "layers.0.wq": shape, ...}`` of a params (or metadata or
    ``kvjax.params.specs``) pytree."""
    return {name: tuple(leaf.shape) for name, leaf in _named(tree).items()}


def _check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  where: str) -> None:
    """Raises ``CheckpointError`` naming the first tensor missing, extra or misshapen."""
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"tensor {name} is missing from {where}")
        if found[name] != shape:
            raise CheckpointError(f"tensor {name} in {where} has shape {found[name]}, expected "
                                  f"{shape} from config.json")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{where} has tensor {extra[0]}, which config.json does not have")


_DAMAGED = "the store is damaged: convert the checkpoint again (scripts/convert.py)"


def _damaged(directory: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"cannot restore the params of the orbax store {directory}: {reason}; {_DAMAGED}")


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception behind ``error``: orbax wraps TensorStore's
    one-line reason (``OUT_OF_RANGE: Error reading "layers.1.wo/0.0" ...``) in a message
    of kilobytes of TensorStore internals."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    """Whether ``x`` holds only finite values (one fused reduction: no temporary the size
    of ``x``)."""
    return jnp.isfinite(x).all()


def _check_finite(tree, directory: str) -> None:
    """Raises ``CheckpointError`` naming the first tensor with NaN or inf values: orbax
    stores no checksums, so a tensor file overwritten with other bytes restores without
    an error."""
    finite = jax.device_get({name: _all_finite(x) for name, x in _named(tree).items()})
    for name, ok in finite.items():
        if not ok:
            raise CheckpointError(f"tensor {name} of the orbax store {directory} holds NaN or "
                                  f"inf values; {_DAMAGED}")


def stored_dtype(directory: str) -> str | None:
    """The dtype of a kvjax orbax store's params (what ``kvjax.load`` keeps), None for a
    safetensors checkpoint."""
    if not is_orbax_store(directory):
        return None
    with open(os.path.join(directory, STORE_FILE)) as f:
        return json.load(f).get("dtype")
