"""kvjax.orbax_store and scripts/convert.py: bit-identical round trips and generations,
restoring onto meshes, atomic and overwrite-safe saves (a failing write, a killed
process), and the error messages."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import kvjax
from kvjax import orbax_store
from kvjax.config import ModelConfig
from tests.test_sharding import ROOT, device_env, run_worker

PROMPTS = ["the cat sat", "a dog ran in the park", "we like"]


def bits(tree) -> list[tuple]:
    """Every leaf as (dtype, shape, raw bytes): equal lists mean bit-identical params."""
    return [(str(x.dtype), x.shape, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def loaded(text_checkpoint) -> kvjax.Model:
    return kvjax.load(text_checkpoint, dtype="bfloat16")


@pytest.fixture(scope="module")
def store(loaded, text_checkpoint, tmp_path_factory) -> str:
    return orbax_store.save(loaded, str(tmp_path_factory.mktemp("stores") / "tiny"),
                            source_dir=text_checkpoint)


# ----- round trip -----

def test_round_trip_is_bit_identical(loaded, store):
    """Every leaf restores with the saved dtype and the same bits, in the same pytree."""
    params = orbax_store.restore_params(store, loaded.config)
    assert jax.tree.structure(params) == jax.tree.structure(loaded.params)
    assert bits(params) == bits(loaded.params)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_store_rebuilds_the_model(loaded, store, text_checkpoint):
    """The store alone (its copied config, tokenizer and generation files) gives a model
    whose greedy generations equal the loaded checkpoint's, tokens and texts."""
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        with open(os.path.join(store, name), "rb") as a, \
                open(os.path.join(text_checkpoint, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(store, orbax_store.STORE_FILE)) as f:
        assert json.load(f) == {"format": "kvjax-orbax", "version": 1, "dtype": "bfloat16"}
    assert orbax_store.is_orbax_store(store)
    assert not orbax_store.is_orbax_store(text_checkpoint)
    assert not any(name.endswith(".safetensors") for name in os.listdir(store))
    model = kvjax.load(store)  # restored from the store: it holds no safetensors
    assert model.config == loaded.config and model.stop_tokens == loaded.stop_tokens
    want = kvjax.generate(loaded, PROMPTS, max_new_tokens=24, stop_tokens=[])
    got = kvjax.generate(model, PROMPTS, max_new_tokens=24, stop_tokens=[])
    assert got.tokens == want.tokens and got.texts == want.texts


def test_restore_converts_dtype_like_loading(text_checkpoint, tmp_path):
    """A float32 store restored as bfloat16 has the bits of loading the checkpoint as
    bfloat16 (both round to nearest even)."""
    f32 = kvjax.load(text_checkpoint, dtype="float32")
    path = orbax_store.save(f32, str(tmp_path / "f32"), source_dir=text_checkpoint)
    assert bits(orbax_store.restore_params(path, f32.config)) == bits(f32.params)
    assert (bits(orbax_store.restore_params(path, f32.config, dtype="bfloat16"))
            == bits(kvjax.load(text_checkpoint, dtype="bfloat16").params))


# ----- onto a mesh -----

def test_restore_onto_meshes(tmp_path_factory):
    """8 CPU devices, meshes 1x8, 2x4, 4x2 and 8x1: every restored leaf has exactly its
    ``param_shardings`` sharding, each device holds only its shard, values unchanged.
    (The model has every bias, 8 query / 2 KV heads: grouped KV heads on 1x8 and 2x4.)"""
    from tests.hf_fixtures import make_hf_model, save_checkpoint

    hf_dir = save_checkpoint(make_hf_model("llama_bias", hidden_size=64, num_attention_heads=8,
                                           num_key_value_heads=2, head_dim=8, vocab_size=100),
                             tmp_path_factory.mktemp("hf_mesh"))
    path = orbax_store.save(kvjax.load(hf_dir, dtype="float32"),
                            str(tmp_path_factory.mktemp("mesh") / "store"), source_dir=hf_dir)
    result = run_worker("orbax_restore", path)
    assert result["devices"] == 8
    for mesh in ("1x8", "2x4", "4x2", "8x1"):
        checks = result[mesh]
        assert checks["same_structure"] and checks["shardings_equal"], mesh
        assert checks["shards_only"] and checks["values_equal"], mesh
        assert checks["split_leaves"] > 0 if mesh != "8x1" else checks["split_leaves"] == 0


# ----- atomic and overwrite-safe saves -----

class DiskFull(OSError):
    pass


def fail_after_writing(monkeypatch):
    """Makes orbax's handler write every tensor, then fail before the save is finalised."""
    import orbax.checkpoint as ocp

    original = ocp.PyTreeCheckpointHandler.save

    def save_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise DiskFull("disk full")

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "save", save_then_fail)


def test_failed_save_leaves_nothing(loaded, text_checkpoint, tmp_path, monkeypatch):
    target = str(tmp_path / "store")
    fail_after_writing(monkeypatch)
    with pytest.raises(DiskFull):
        orbax_store.save(loaded, target, source_dir=text_checkpoint)
    assert os.listdir(tmp_path) == []  # no store, no staging directory left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        orbax_store.restore_params(target, loaded.config)


def test_failed_overwrite_keeps_the_old_store(loaded, store, text_checkpoint, tmp_path,
                                             monkeypatch):
    target = str(tmp_path / "store")
    shutil.copytree(store, target)
    fail_after_writing(monkeypatch)
    with pytest.raises(DiskFull):
        orbax_store.save(loaded, target, source_dir=text_checkpoint)
    assert os.listdir(tmp_path) == ["store"]
    assert bits(orbax_store.restore_params(target, loaded.config)) == bits(loaded.params)


KILLED_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
import kvjax
from kvjax import orbax_store

original = ocp.PyTreeCheckpointHandler.save
def save_then_die(self, *args, **kwargs):
    original(self, *args, **kwargs)  # every tensor written, nothing finalised
    os.kill(os.getpid(), signal.SIGKILL)
ocp.PyTreeCheckpointHandler.save = save_then_die
source, target = sys.argv[1:]
orbax_store.save(kvjax.load(source, dtype="float32"), target, source_dir=source)
"""


def test_killed_save_never_loads(loaded, store, text_checkpoint, tmp_path):
    """A process killed (SIGKILL, no cleanup) mid-save over an existing bfloat16 store:
    the old store still restores bit-identically, and the leftover staging directory is
    refused with a clear error instead of being half-loaded."""
    target = str(tmp_path / "store")
    shutil.copytree(store, target)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, text_checkpoint, target],
                          cwd=ROOT, env=device_env(1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [name for name in os.listdir(tmp_path) if name != "store"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".store.tmp-")
    assert bits(orbax_store.restore_params(target, loaded.config)) == bits(loaded.params)
    staging = str(tmp_path / leftovers[0])
    assert not orbax_store.is_orbax_store(staging)
    with pytest.raises(kvjax.CheckpointError) as e:
        orbax_store.restore_params(staging, loaded.config)
    assert str(e.value) == (
        f"{staging} is an incomplete kvjax orbax store (no kvjax_store.json): its save was "
        "interrupted; save or convert it again")


def test_overwrite_replaces_a_store(loaded, text_checkpoint, tmp_path):
    target = str(tmp_path / "store")
    f32 = kvjax.load(text_checkpoint, dtype="float32")
    orbax_store.save(loaded, target, source_dir=text_checkpoint)
    orbax_store.save(f32, target, source_dir=text_checkpoint)
    assert os.listdir(tmp_path) == ["store"]  # no staging or old directory left
    assert bits(orbax_store.restore_params(target, f32.config)) == bits(f32.params)


def test_refuses_to_overwrite_other_directories(loaded, text_checkpoint):
    before = sorted(os.listdir(text_checkpoint))
    with pytest.raises(kvjax.CheckpointError) as e:
        orbax_store.save(loaded, text_checkpoint, source_dir=text_checkpoint)
    assert str(e.value) == (
        f"{os.path.abspath(text_checkpoint)} exists and is not a kvjax orbax store; refusing "
        "to overwrite it: choose another directory or remove it")
    assert sorted(os.listdir(text_checkpoint)) == before


# ----- errors -----

def test_restore_errors(loaded, store, text_checkpoint, tmp_path):
    config = loaded.config

    def message(directory, cfg=config, error=kvjax.CheckpointError) -> str:
        with pytest.raises(error) as e:
            orbax_store.restore_params(directory, cfg)
        return str(e.value)

    missing = str(tmp_path / "nowhere")
    assert message(missing, error=FileNotFoundError) == (
        f"{missing} does not exist (no kvjax orbax store there)")
    assert message(text_checkpoint) == (
        f"{text_checkpoint} is not a kvjax orbax store (no kvjax_store.json); make one with "
        "scripts/convert.py")
    wider = dataclasses.replace(config, intermediate_size=96)
    assert message(store, wider) == (
        f"tensor layers.0.w_down in the orbax store {store} has shape (64, 32), expected "
        "(96, 32) from config.json")
    deeper = dataclasses.replace(config, num_layers=3)
    assert message(store, deeper) == (
        f"tensor layers.2.attn_norm is missing from the orbax store {store}")
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    assert message(store, tied) == (
        f"the orbax store {store} has tensor lm_head, which config.json does not have")


DAMAGED = "; the store is damaged: convert the checkpoint again (scripts/convert.py)"


def _restore_error(directory, config) -> str:
    with pytest.raises(kvjax.CheckpointError) as e:
        orbax_store.restore_params(directory, config)
    return str(e.value)


def test_truncated_tensor_files_give_one_line_naming_the_store(loaded, store, tmp_path):
    """Not kilobytes of TensorStore internals: the store, TensorStore's one-line reason
    (which names the tensor) and what to do."""
    target = str(tmp_path / "store")
    shutil.copytree(store, target)
    data = glob.glob(os.path.join(target, "params", "ocdbt.process_*", "d", "*"))  # tensors
    assert data
    for path in data:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    message = _restore_error(target, loaded.config)
    assert message.startswith(f"cannot restore the params of the orbax store {target}: ")
    assert "Error reading" in message and message.endswith(DAMAGED)
    assert "\n" not in message and len(message) < 600, message


def test_unreadable_metadata_names_the_store(loaded, store, tmp_path):
    target = str(tmp_path / "store")
    shutil.copytree(store, target)
    with open(os.path.join(target, "params", "_METADATA"), "w") as f:
        f.write("{garbage")
    assert _restore_error(target, loaded.config) == (
        f"cannot restore the params of the orbax store {target}: no readable metadata in "
        f"{os.path.join(target, 'params')}{DAMAGED}")


def test_nan_values_in_a_store_name_the_tensor(loaded, text_checkpoint, tmp_path):
    """orbax keeps no checksums: a tensor file overwritten with other bytes restores
    without an error, its NaN or inf are found."""
    layers = list(loaded.params["layers"])
    layers[1] = {**layers[1], "wv": layers[1]["wv"].at[0, 3].set(np.inf)}
    broken = kvjax.Model(loaded.config, {**loaded.params, "layers": tuple(layers)})
    target = orbax_store.save(broken, str(tmp_path / "store"), source_dir=text_checkpoint)
    assert _restore_error(target, loaded.config) == (
        f"tensor layers.1.wv of the orbax store {target} holds NaN or inf values{DAMAGED}")


def test_save_errors(loaded, text_checkpoint, tmp_path):
    other = dataclasses.replace(loaded.config, rms_norm_eps=0.5)
    with pytest.raises(kvjax.CheckpointError) as e:
        orbax_store.save(kvjax.Model(other, loaded.params), str(tmp_path / "a"),
                         source_dir=text_checkpoint)
    assert str(e.value) == (
        f"the model's config differs from {os.path.join(text_checkpoint, 'config.json')}; "
        "pass the directory the model was loaded from")
    params = {**loaded.params, "embed": loaded.params["embed"][:5]}
    with pytest.raises(kvjax.CheckpointError) as e:
        orbax_store.save(kvjax.Model(loaded.config, params), str(tmp_path / "b"),
                         source_dir=text_checkpoint)
    assert str(e.value) == (
        f"tensor embed in the model's params has shape (5, 32), expected "
        f"({loaded.config.vocab_size}, 32) from config.json")
    assert os.listdir(tmp_path) == []


# ----- scripts/convert.py -----

def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert.py"), *args],
                          cwd=ROOT, env=device_env(1), capture_output=True, text=True,
                          timeout=120)


def test_convert_script(loaded, text_checkpoint, tmp_path):
    out = str(tmp_path / "store")
    proc = convert("--model", text_checkpoint, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"wrote {out} (bfloat16) in ")
    assert bits(orbax_store.restore_params(out, loaded.config)) == bits(loaded.params)
    bad = convert("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 1  # bad input (scripts/convert.py: 2 is for bad flags)
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'missing'} is neither a directory nor a Hugging Face Hub id "
        "(org/name)")


# ----- kvjax.checkpoint.load_params: the progress bar -----

def test_progress_bar_only_when_asked_or_big(text_checkpoint, capsys):
    """A bar (tensors loaded) on stderr with progress=True; by default none for a small
    checkpoint (and never when stderr is not a terminal, as under pytest)."""
    from kvjax.checkpoint import load_params

    config = ModelConfig.from_json(text_checkpoint)
    load_params(text_checkpoint, config, "float32")
    assert capsys.readouterr().err == ""
    load_params(text_checkpoint, config, "float32", progress=True)
    leaves = len(jax.tree.leaves(kvjax.checkpoint.tensor_specs(config)))
    err = capsys.readouterr().err
    assert "loading:" in err and f"/{leaves} [" in err
