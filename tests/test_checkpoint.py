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
import torch
from safetensors.numpy import load_file, save_file

import kvjax
from kvjax.checkpoint import tensor_specs
from kvjax.sharding import make_mesh, param_shardings
from tests.conftest import make_config
from tests.hf_fixtures import (HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, VARIANTS,
                               make_hf_model, save_checkpoint)

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


def _load_error(directory) -> str:
    """The message of the ``CheckpointError`` that loading ``directory`` raises."""
    with pytest.raises(kvjax.CheckpointError) as e:
        kvjax.load(directory, dtype="float32")
    return str(e.value)


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


def _assert_same_params(a, b):
    leaves_a, tree_a = jax.tree.flatten(a.params)
    leaves_b, tree_b = jax.tree.flatten(b.params)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_sharded_fused_checkpoint_splits_like_single_file(tmp_path):
    """Phi-3's fused qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up] rows),
    read through a sharded index, split into kvjax's separate projections."""
    hf_model = make_hf_model("phi3", seed=3)
    single = kvjax.load(save_checkpoint(hf_model, tmp_path / "single"), dtype="float32")
    sharded_dir = save_checkpoint(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    with open(os.path.join(sharded_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    fused = ["model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"]
    assert len({weight_map[name] for name in fused}) == 2  # in different shards
    sharded = kvjax.load(sharded_dir, dtype="float32")
    _assert_same_params(single, sharded)

    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    qkv, gate_up = state[fused[0]], state[fused[1]]  # [out, in]
    layer = sharded.params["layers"][1]
    q, kv, f = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, INTERMEDIATE
    assert qkv.shape == (q + 2 * kv, HIDDEN) and gate_up.shape == (2 * f, HIDDEN)
    for name, rows in (("wq", qkv[:q]), ("wk", qkv[q:q + kv]), ("wv", qkv[q + kv:]),
                       ("w_gate", gate_up[:f]), ("w_up", gate_up[f:])):
        assert np.array_equal(np.asarray(layer[name]), rows.T), name


def test_gpt2_conv1d_weights_are_not_transposed_and_c_attn_splits_by_column(tmp_path):
    hf_model = make_hf_model("gpt2", seed=4)
    model = kvjax.load(save_checkpoint(hf_model, tmp_path), dtype="float32")
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    c_attn = state["transformer.h.0.attn.c_attn.weight"]  # Conv1D: [in, out] = [64, 3 * 64]
    c_attn_bias = state["transformer.h.0.attn.c_attn.bias"]
    assert c_attn.shape == (HIDDEN, 3 * HIDDEN)
    layer = model.params["layers"][0]
    for i, (w, b) in enumerate((("wq", "bq"), ("wk", "bk"), ("wv", "bv"))):
        columns = slice(i * HIDDEN, (i + 1) * HIDDEN)
        assert np.array_equal(np.asarray(layer[w]), c_attn[:, columns]), w
        assert np.array_equal(np.asarray(layer[b]), c_attn_bias[columns]), b
    assert np.array_equal(np.asarray(layer["w_up"]), state["transformer.h.0.mlp.c_fc.weight"])
    assert np.array_equal(np.asarray(model.params["pos_embed"]), state["transformer.wpe.weight"])
    assert np.array_equal(np.asarray(model.params["final_norm_bias"]),
                          state["transformer.ln_f.bias"])


def test_default_dtype_is_float32_on_cpu(single_dir):
    """Without a dtype, CPU gets float32 (bfloat16 would be converted in every call)."""
    assert jax.default_backend() == "cpu"
    model = kvjax.load(single_dir)
    assert {str(x.dtype) for x in jax.tree.leaves(model.params)} == {"float32"}
    assert kvjax.load(single_dir, dtype="bfloat16").dtype == jax.numpy.bfloat16


def test_base_model_names_without_prefix_load_like_prefixed(tmp_path):
    """The Hub's gpt2 stores the bare GPT2Model's names (``h.0.attn...``, ``wte.weight``),
    save_pretrained of GPT2LMHeadModel ``transformer.h.0...``: both load the same params."""
    directory = save_checkpoint(make_hf_model("gpt2", seed=4), tmp_path / "prefixed")
    prefixed = kvjax.load(directory, dtype="float32")
    bare = _copy(directory, tmp_path)
    _rewrite(os.path.join(bare, "model.safetensors"), lambda tensors: tensors.update(
        {name.removeprefix("transformer."): tensors.pop(name) for name in list(tensors)}))
    assert "wte.weight" in load_file(os.path.join(bare, "model.safetensors"))
    _assert_same_params(prefixed, kvjax.load(bare, dtype="float32"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_family_reads_exactly_the_transformers_parameters(variant, tmp_path):
    """The tensors kvjax reads are the parameters of the transformers model, each with its
    stored shape, none left over; loading places each (its part, transposed where stored
    [out, in]) at a name of the params pytree, which the mesh placement shares."""
    hf_model = make_hf_model(variant, seed=2)
    state = {name: p.detach().numpy() for name, p in hf_model.named_parameters()}  # untied
    config = kvjax.ModelConfig.from_dict(hf_model.config.to_dict())
    specs = tensor_specs(config)
    assert {s.hf_name: s.hf_shape for s in jax.tree.leaves(specs)} == {
        name: array.shape for name, array in state.items()}
    assert jax.tree.structure(param_shardings(config, make_mesh())) == jax.tree.structure(specs)

    loaded = kvjax.load(save_checkpoint(hf_model, tmp_path), dtype="float32").params
    assert jax.tree.structure(loaded) == jax.tree.structure(specs)
    for spec, value in zip(jax.tree.leaves(specs), jax.tree.leaves(loaded)):
        want = spec.select(state[spec.hf_name])
        assert np.array_equal(np.asarray(value), want.T if spec.transpose else want), spec


def test_a_config_asking_for_unstored_tensors_is_refused():
    """A hand-built Llama with LayerNorm: Llama checkpoints store no norm biases."""
    with pytest.raises(kvjax.CheckpointError) as e:
        tensor_specs(make_config(norm="layer"))
    assert str(e.value) == (
        "llama checkpoints store no tensor for the parameter final_norm_bias that this config "
        "asks for; read the config from the checkpoint's config.json (ModelConfig.from_json)")


# -- missing, misshapen and unreadable tensors -----------------------------------------

def test_missing_tensor_single_file_names_tensor_and_file(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    _rewrite(os.path.join(directory, "model.safetensors"), lambda t: t.pop(TENSOR))
    assert _load_error(directory) == f"tensor {TENSOR} is missing from model.safetensors in {directory}"


def test_missing_tensor_sharded_names_tensor_and_index(sharded_dir, tmp_path):
    directory = _copy(sharded_dir, tmp_path)
    _edit_json(os.path.join(directory, "model.safetensors.index.json"),
               lambda index: index["weight_map"].pop(TENSOR))
    assert _load_error(directory) == (
        f"tensor {TENSOR} is missing from model.safetensors.index.json in {directory}")


def test_wrong_shape_single_file_names_tensor_shapes_and_file(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)

    def transpose(tensors):
        tensors[TENSOR] = np.ascontiguousarray(tensors[TENSOR].T)  # (64, 128)

    _rewrite(os.path.join(directory, "model.safetensors"), transpose)
    assert _load_error(directory) == (
        f"tensor {TENSOR} in model.safetensors has shape (64, 128), expected (128, 64) "
        "from config.json")


def test_wrong_shape_sharded_names_the_shard(sharded_dir, tmp_path):
    directory = _copy(sharded_dir, tmp_path)
    name = "model.layers.0.self_attn.k_proj.bias"  # [kv_heads * head_dim] = (32,)
    shard = _shard_of(directory, name)
    _rewrite(os.path.join(directory, shard),
             lambda t: t.__setitem__(name, np.zeros((31,), np.float32)))
    assert _load_error(directory) == (
        f"tensor {name} in {shard} has shape (31,), expected (32,) from config.json")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_values_name_tensor_and_file(bad, single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"

    def corrupt(tensors):
        tensors[name][3, 5] = bad

    _rewrite(os.path.join(directory, "model.safetensors"), corrupt)
    assert _load_error(directory) == (
        f"tensor {name} in model.safetensors holds NaN or inf values; the checkpoint is "
        "corrupted")


def test_nan_in_a_sharded_bfloat16_fused_tensor_names_the_shard(tmp_path):
    """bfloat16 (numpy does not count it as floating) loads, and its NaN are found; in a
    fused tensor (Phi-3 qkv_proj) in a shard of a sharded checkpoint."""
    directory = save_checkpoint(make_hf_model("phi3", seed=3).to(torch.bfloat16),
                                tmp_path / "phi3", max_shard_size="20KB")
    kvjax.load(directory, dtype="float32")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    shard = _shard_of(directory, name)

    def corrupt(tensors):
        assert str(tensors[name].dtype) == "bfloat16"
        tensors[name][-1, -1] = np.nan  # in wv, the last part

    _rewrite(os.path.join(directory, shard), corrupt)
    assert _load_error(directory) == (
        f"tensor {name} in {shard} holds NaN or inf values; the checkpoint is corrupted")


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_non_float_tensor_names_tensor_file_and_dtype(dtype, single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    name = "model.layers.0.input_layernorm.weight"

    def to_integer(tensors):
        tensors[name] = np.ones(tensors[name].shape, dtype)

    _rewrite(os.path.join(directory, "model.safetensors"), to_integer)
    assert _load_error(directory) == (
        f"tensor {name} in model.safetensors has dtype {np.dtype(dtype)}, expected a "
        "floating-point tensor")


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


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_truncated_file_is_named(layout, single_dir, sharded_dir, tmp_path):
    directory = _copy(single_dir if layout == "single" else sharded_dir, tmp_path)
    name = "model.safetensors" if layout == "single" else _shard_of(directory, TENSOR)
    path = os.path.join(directory, name)
    _truncate(path)
    message = _load_error(directory)
    assert message.startswith(f"cannot read {path}: ")
    assert message.endswith("the file is truncated or not safetensors")


# -- configs kvjax rejects -------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ('{\n"model_type": "llama",,}', "Expecting property name enclosed in double quotes "
                                   "(line 2 column 23)"),
    ('{"model_type": "llama"', "Expecting ',' delimiter (line 1 column 23)"),
    ("", "Expecting value (line 1 column 1)"),
    (b"\xff\xfe{}", "it is not UTF-8 text (invalid start byte at byte 0)"),
])
def test_malformed_config_json_names_the_file(text, problem, single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    path = os.path.join(directory, "config.json")
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(kvjax.ConfigError) as e:
        kvjax.load(directory)
    assert str(e.value) == f"{path} is not valid JSON: {problem}"
    assert "\n" not in str(e.value)


def test_config_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('["llama"]')
    with pytest.raises(kvjax.ConfigError) as e:
        kvjax.ModelConfig.from_json(tmp_path)
    assert str(e.value) == f"{path} is not a JSON object: it holds a list"


def test_unknown_model_type(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    _edit_json(os.path.join(directory, "config.json"),
               lambda c: c.update(model_type="gpt_neox"))
    with pytest.raises(kvjax.ConfigError) as e:
        kvjax.load(directory)
    assert str(e.value) == (
        "unsupported model_type 'gpt_neox'; supported: llama, mistral, qwen2, qwen3, gemma, "
        "gemma2, gemma3_text, phi3, gpt2, olmo2")


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
        "unsupported rope type 'dynamic'; supported: default, linear, llama3, yarn, longrope")


_GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "relu"},
     "unsupported hidden_activation 'relu'; supported: silu, swish, gelu_pytorch_tanh, "
     "gelu_new, gelu"),
    ({"use_bidirectional_attention": True},
     "use_bidirectional_attention=true is not supported; supported: false (causal attention)"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                          "full_attention": {"rope_type": "default"}}},
     "unsupported rope type 'linear' for sliding_attention layers; supported: default"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8}},
     "rope type 'longrope' needs 'long_factor', a list of head_dim // 2 = 8 numbers; got None"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.5,
      "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor != 1 is not supported; supported: 1.0"),
    ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2,
      "scale_attn_by_inverse_layer_idx": True},
     "gpt2 with scale_attn_by_inverse_layer_idx=true is not supported; supported: false"),
])
def test_unsupported_family_settings(change, message):
    with pytest.raises(kvjax.ConfigError) as e:
        kvjax.ModelConfig.from_dict({**_GEMMA3, **change})
    assert str(e.value) == message


def test_legacy_gemma3_config_derives_layer_types_and_rope_bases():
    """A Hub config.json from before transformers 5 (rope_theta, rope_local_base_freq,
    sliding_window_pattern, rope_scaling; no layer_types) reads as HF reads it."""
    config = kvjax.ModelConfig.from_dict({
        **_GEMMA3, "sliding_window": 512, "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 3,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert config.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2
    assert [config.layer_window(i) for i in range(6)] == [512, 512, None, 512, 512, None]
    assert (config.rope_theta, config.local_rope_theta) == (1_000_000.0, 10_000.0)
    assert config.rope_scaling.rope_type == "linear" and config.rope_scaling.factor == 8.0
    # Omitted keys take Gemma 3's defaults: tied head, GeGLU, 1/sqrt(256) query scale.
    assert config.tie_word_embeddings and config.activation == "gelu_tanh"
    assert config.query_scale == 256 ** -0.5 and config.final_logit_softcap is None


def test_gpt2_config_names():
    config = kvjax.ModelConfig.from_dict({
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_positions": 1024, "n_inner": None, "layer_norm_epsilon": 1e-5})
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (
        768, 12, 12, 12)
    assert (config.head_dim, config.intermediate_size, config.max_position_embeddings) == (
        64, 3072, 1024)
    assert config.rms_norm_eps == 1e-5 and config.activation == "gelu_tanh"
    assert config.tie_word_embeddings and config.position_embedding == "learned"


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


@pytest.mark.parametrize("generation, defaults", [
    ({"eos_token_id": 2}, {}),  # no do_sample: greedy
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, {}),  # as transformers: greedy
    ({"do_sample": True}, {"temperature": 1.0, "top_k": 50}),  # transformers' defaults
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9},
     {"temperature": 0.6, "top_k": 50, "top_p": 0.9}),
    ({"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.05},
     {"temperature": 0.7, "min_p": 0.05}),  # neutral filters dropped
])
def test_sampling_defaults_from_generation_config(single_dir, tmp_path, generation, defaults):
    directory = _copy(single_dir, tmp_path)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(generation, f)
    assert kvjax.load(directory, dtype="float32").generation_defaults == defaults


def test_bad_sampling_value_in_generation_config(single_dir, tmp_path):
    directory = _copy(single_dir, tmp_path)
    path = os.path.join(directory, "generation_config.json")
    with open(path, "w") as f:
        json.dump({"do_sample": True, "top_p": 1.5}, f)
    with pytest.raises(kvjax.ConfigError) as e:
        kvjax.load(directory, dtype="float32")
    assert str(e.value) == f"{path}: top_p must be in (0, 1] (or None to disable), got 1.5"


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
