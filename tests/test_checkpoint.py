"""Loading Hugging Face checkpoints: sharded files, broken checkpoints, configs kvjax
rejects, stop tokens and Hub ids. No generation here, so nothing is compiled."""

import json
import os
import shutil

import huggingface_hub
import huggingface_hub.constants
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import kvjax
from tests.hf_fixtures import make_hf_model, save_checkpoint

TENSOR = "model.layers.1.mlp.up_proj.weight"  # HF shape [intermediate 128, hidden 64]


@pytest.fixture(scope="module")
def hf_model():
    # Biases on every projection, so their names and shapes are checked too.
    return make_hf_model("llama_bias", seed=7)


@pytest.fixture(scope="module")
def single_dir(hf_model, tmp_path_factory):
    return save_checkpoint(hf_model, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded_dir(hf_model, tmp_path_factory):
    return save_checkpoint(hf_model, tmp_path_factory.mktemp("sharded"), max_shard_size="20KB")


def _copy(directory, tmp_path) -> str:
    target = str(tmp_path / "checkpoint")
    shutil.copytree(directory, target)
    return target


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _shard_of(directory, name) -> str:
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


def _rewrite(path, edit):
    """Rewrites a safetensors file after ``edit(dict of numpy arrays)``."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# -- sharded checkpoints ---------------------------------------------------------------

def test_sharded_checkpoint_loads_bit_identical_to_single_file(single_dir, sharded_dir, hf_model):
    files = sorted(os.listdir(sharded_dir))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len(shards) >= 3, files

    single = kvjax.load(single_dir, dtype="float32")
    sharded = kvjax.load(sharded_dir, dtype="float32")
    assert sharded.config == single.config
    leaves_single, tree_single = jax.tree.flatten(single.params)
    leaves_sharded, tree_sharded = jax.tree.flatten(sharded.params)
    assert tree_sharded == tree_single
    for a, b in zip(leaves_single, leaves_sharded):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))

    # And both are the torch weights, [out, in] linear weights transposed to [in, out].
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    layer = sharded.params["layers"][1]
    assert np.array_equal(np.asarray(layer["w_up"]), state[TENSOR].T)
    assert np.array_equal(np.asarray(layer["bo"]), state["model.layers.1.self_attn.o_proj.bias"])
    assert np.array_equal(np.asarray(sharded.params["lm_head"]), state["lm_head.weight"])
    # The tensors really are spread over the shards.
    with open(os.path.join(sharded_dir, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) == len(shards)


# -- missing, misshapen and unreadable tensors -----------------------------------------

def test_missing_tensor_single_file_names_tensor_and_file(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    _rewrite(os.path.join(directory, "model.safetensors"), lambda t: t.pop(TENSOR))
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory, dtype="float32")
    assert str(e.value) == f"tensor {TENSOR} is missing from model.safetensors in {directory}"


def test_missing_tensor_sharded_names_tensor_and_index(sharded_dir, tmp_path):
    directory = _copy(sharded_dir, tmp_path)
    _edit_json(os.path.join(directory, "model.safetensors.index.json"),
               lambda index: index["weight_map"].pop(TENSOR))
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory, dtype="float32")
    assert str(e.value) == (
        f"tensor {TENSOR} is missing from model.safetensors.index.json in {directory}")


def test_wrong_shape_single_file_names_tensor_shapes_and_file(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)

    def transpose(tensors):
        tensors[TENSOR] = np.ascontiguousarray(tensors[TENSOR].T)  # (64, 128)

    _rewrite(os.path.join(directory, "model.safetensors"), transpose)
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory, dtype="float32")
    assert str(e.value) == (
        f"tensor {TENSOR} in model.safetensors has shape (64, 128), expected (128, 64) "
        "from config.json")


def test_wrong_shape_sharded_names_the_shard(sharded_dir, tmp_path):
    directory = _copy(sharded_dir, tmp_path)
    name = "model.layers.0.self_attn.k_proj.bias"  # [kv_heads * head_dim] = (32,)
    shard = _shard_of(directory, name)
    _rewrite(os.path.join(directory, shard),
             lambda t: t.__setitem__(name, np.zeros((31,), np.float32)))
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory, dtype="float32")
    assert str(e.value) == (
        f"tensor {name} in {shard} has shape (31,), expected (32,) from config.json")


def test_directory_without_config_json(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    os.remove(os.path.join(directory, "config.json"))
    with pytest.raises(FileNotFoundError) as e:
        kvjax.load(directory)
    assert "config.json" in str(e.value) and directory in str(e.value)


def test_directory_without_safetensors(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory)
    assert str(e.value).startswith(
        f"no model.safetensors or model.safetensors.index.json in {directory}")


def test_truncated_single_file(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory)
    message = str(e.value)
    assert message.startswith(f"cannot read {path}: ")
    assert message.endswith("the file is truncated or not safetensors")


def test_truncated_shard(sharded_dir, tmp_path):
    directory = _copy(sharded_dir, tmp_path)
    path = os.path.join(directory, _shard_of(directory, TENSOR))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory)
    assert str(e.value).startswith(f"cannot read {path}: ")


# -- configs kvjax rejects -------------------------------------------------------------

def test_unknown_model_type(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    _edit_json(os.path.join(directory, "config.json"),
               lambda c: c.update(model_type="gpt_neox"))
    with pytest.raises(kvjax.ConfigError) as e:
        kvjax.load(directory)
    assert str(e.value) == (
        "unsupported model_type 'gpt_neox'; supported: llama, mistral, qwen2, qwen3")


@pytest.mark.parametrize("style", ["rope_parameters", "legacy_rope_scaling"])
def test_unsupported_rope_type(style, single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)

    def edit(config):
        if style == "rope_parameters":  # transformers >= 5
            config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0,
                                         "rope_theta": 10000.0}
        else:  # transformers 4: rope_theta + rope_scaling with "type"
            del config["rope_parameters"]
            config["rope_theta"] = 10000.0
            config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}

    _edit_json(os.path.join(directory, "config.json"), edit)
    with pytest.raises(kvjax.ConfigError) as e:
        kvjax.load(directory)
    assert str(e.value) == (
        "unsupported rope type 'dynamic'; supported: default, linear, llama3, yarn")


# -- stop tokens -----------------------------------------------------------------------

def test_stop_tokens_from_generation_config(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    path = os.path.join(directory, "generation_config.json")
    assert os.path.isfile(path)  # save_pretrained writes one (eos_token_id 2)
    with open(path, "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [5, 7]}, f)
    assert kvjax.load(directory, dtype="float32").stop_tokens == (5, 7)
    with open(path, "w") as f:
        json.dump({"eos_token_id": 9}, f)
    assert kvjax.load(directory, dtype="float32").stop_tokens == (9,)


def test_stop_tokens_fall_back_to_config_json(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    _edit_json(os.path.join(directory, "config.json"), lambda c: c.update(eos_token_id=[3, 11]))
    os.remove(os.path.join(directory, "generation_config.json"))
    assert kvjax.load(directory, dtype="float32").stop_tokens == (3, 11)
    # A generation_config.json without eos_token_id also falls back.
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1}, f)
    assert kvjax.load(directory, dtype="float32").stop_tokens == (3, 11)


# -- Hub ids and bad paths -------------------------------------------------------------

def test_uncached_hub_id_offline_says_how_to_download(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    # huggingface_hub reads both at import time, so patch the module constants as well.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.chdir(tmp_path)  # so "org/name" is not a local directory by accident
    hub_id = "kvjax-test-org/not-cached-model"
    with pytest.raises(FileNotFoundError) as e:
        kvjax.load(hub_id)
    message = str(e.value)
    assert hub_id in message
    assert f"`hf download {hub_id}`" in message
    # It failed for lack of a cached copy with the Hub switched off, not on the network.
    cause = e.value.__cause__
    assert isinstance(cause, huggingface_hub.errors.LocalEntryNotFoundError), repr(cause)
    assert "HF_HUB_OFFLINE" in str(cause)
    assert os.listdir(hf_home) in ([], ["hub"])  # nothing downloaded


@pytest.mark.parametrize("name", ["missing/deeper/model", "no_such_checkpoint"])
def test_path_neither_directory_nor_hub_id(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / name) if "/" in name else name
    with pytest.raises(FileNotFoundError) as e:
        kvjax.load(path)
    assert str(e.value) == f"{path} is neither a directory nor a Hugging Face Hub id (org/name)"
