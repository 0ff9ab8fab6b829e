"""kvjax.params: each parameter declared once, and what is derived from the declarations
(presence, shapes, logical axes, initial values, abstract shapes, checkpoint sources)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import params
from kvjax.sharding import ShardingRules
from tests.conftest import make_config
from tests.hf_fixtures import VARIANTS, hf_config

LOGICAL_AXES = {f.name for f in dataclasses.fields(ShardingRules)} - {"group_kv_heads"}


def _config(variant: str) -> kvjax.ModelConfig:
    return kvjax.ModelConfig.from_dict(hf_config(variant).to_dict())


def _leaves(config) -> list[params.ParamSpec]:
    return jax.tree.leaves(params.specs(config))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_specs_are_leaves_with_one_logical_axis_per_dimension(variant):
    config = _config(variant)
    tree = params.specs(config)
    assert len(tree["layers"]) == config.num_layers
    for spec in _leaves(config):
        assert isinstance(spec, params.ParamSpec)
        assert len(spec.axes) == len(spec.shape), spec
        assert set(spec.axes) <= LOGICAL_AXES, spec
        assert all(size >= 1 for size in spec.shape), spec
        assert spec.init in (params.NORMAL, params.NORM)
        assert spec.source is not None  # every family's config.json names a tensor for each


# (config change, layer names added, layer names removed, top names added, top removed)
PRESENCE = [
    ({}, set(), set(), set(), set()),
    ({"qkv_bias": True}, {"bq", "bk", "bv"}, set(), set(), set()),
    ({"o_bias": True}, {"bo"}, set(), set(), set()),
    ({"mlp_bias": True}, {"b_gate", "b_up", "b_down"}, set(), set(), set()),
    ({"mlp_bias": True, "gated_mlp": False}, {"b_up", "b_down"}, {"w_gate"}, set(), set()),
    ({"qk_norm": True}, {"q_norm", "k_norm"}, set(), set(), set()),
    ({"post_norms": True}, {"attn_post_norm", "mlp_post_norm"}, set(), set(), set()),
    ({"pre_norms": False}, set(), {"attn_norm", "mlp_norm"}, set(), set()),
    ({"norm": "layer"}, {"attn_norm_bias", "mlp_norm_bias"}, set(), {"final_norm_bias"}, set()),
    ({"position_embedding": "learned"}, set(), set(), {"pos_embed"}, set()),
    ({"tie_word_embeddings": True}, set(), set(), set(), {"lm_head"}),
]
LLAMA_LAYER = {"attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"}
LLAMA_TOP = {"embed", "final_norm", "lm_head", "layers"}


@pytest.mark.parametrize("change, layer_added, layer_removed, top_added, top_removed", PRESENCE)
def test_a_name_is_present_only_where_the_config_asks(change, layer_added, layer_removed,
                                                      top_added, top_removed):
    tree = params.specs(make_config(**change))
    assert set(tree) == LLAMA_TOP - top_removed | top_added
    for layer in tree["layers"]:
        assert set(layer) == LLAMA_LAYER - layer_removed | layer_added


def test_shapes_follow_the_config():
    config = make_config(num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32,
                         vocab_size=97, qkv_bias=True, qk_norm=True,
                         position_embedding="learned", max_position_embeddings=40)
    tree = params.specs(config)
    layer = tree["layers"][0]
    q, kv, f = 32, 16, 64  # 4 * 8, 2 * 8, intermediate_size
    assert {name: layer[name].shape for name in ("wq", "wk", "wv", "wo", "w_up", "w_down")} == {
        "wq": (32, q), "wk": (32, kv), "wv": (32, kv), "wo": (q, 32), "w_up": (32, f),
        "w_down": (f, 32)}
    assert (layer["bq"].shape, layer["bk"].shape) == ((q,), (kv,))
    assert (layer["q_norm"].shape, layer["k_norm"].shape) == ((8,), (8,))  # one head's width
    assert tree["embed"].shape == (97, 32) and tree["pos_embed"].shape == (40, 32)
    # OLMo-2 norms q and k over the whole projection.
    whole = params.specs(dataclasses.replace(config, qk_norm_per_head=False))["layers"][0]
    assert (whole["q_norm"].shape, whole["k_norm"].shape) == ((q,), (kv,))
    assert whole["q_norm"].axes == ("head_dim",)  # replicated, as per head


@pytest.mark.parametrize("variant", ["llama_bias", "gemma3", "gpt2", "olmo2"])
def test_init_params_has_the_specs_shapes_and_initializers(variant):
    config = _config(variant)
    tree = params.specs(config)
    values = params.init_params(config, jax.random.key(0), jnp.float32)
    assert jax.tree.structure(values) == jax.tree.structure(tree)
    assert list(values) == list(tree)  # the same key order: it fixes the random values
    for spec, value in zip(jax.tree.leaves(tree), jax.tree.leaves(values)):
        assert value.shape == spec.shape and value.dtype == jnp.float32, spec.name
        value = np.asarray(value)
        if spec.init == params.NORM:  # ones; zeros for Gemma's (1 + w)
            assert np.all(value == 1.0 - config.norm_offset), spec.name
        elif value.size >= 1000:
            assert abs(value.std() - 0.02) < 0.002 and abs(value.mean()) < 0.002, spec.name
    leaves = jax.tree.leaves(tree)  # norm weights, not norm biases, start at the identity
    assert ({spec.name for spec in leaves if spec.init == params.NORM}
            == {spec.name for spec in leaves if spec.name.endswith("norm")})
    # Every parameter draws from its own key.
    layers = values["layers"]
    assert not np.array_equal(layers[0]["wk"], layers[0]["wv"])
    assert not np.array_equal(layers[0]["wq"], layers[1]["wq"])


def test_init_params_is_deterministic_in_key_and_dtype():
    config = make_config()
    a = params.init_params(config, jax.random.key(1), jnp.bfloat16)
    b = params.init_params(config, jax.random.key(1))
    assert {str(x.dtype) for x in jax.tree.leaves(a)} == {"bfloat16"}
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    c = params.init_params(config, jax.random.key(2), jnp.bfloat16)
    assert not np.array_equal(a["embed"], c["embed"])


@pytest.mark.parametrize("variant", ["llama_tied", "phi3", "gpt2"])
def test_abstract_params_are_init_params_shapes_without_memory(variant):
    config = _config(variant)
    for dtype in (jnp.float32, jnp.bfloat16):
        abstract = params.abstract_params(config, dtype)
        want = jax.eval_shape(lambda: params.init_params(config, jax.random.key(0), dtype))
        assert jax.tree.structure(abstract) == jax.tree.structure(want)
        assert jax.tree.leaves(abstract) == jax.tree.leaves(want)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_sources_tile_their_tensor_in_declared_order(variant):
    """Parameters share a stored tensor only as parts that tile it along its output axis
    (Phi-3's [q | k | v] rows, GPT-2's [q | k | v] columns), each part as wide as its
    parameter's output axis."""
    tree = params.specs(_config(variant))
    parts = {}
    for group in ({k: v for k, v in tree.items() if k != "layers"}, *tree["layers"]):
        for spec in group.values():  # in declared order (jax.tree.leaves sorts the names)
            parts.setdefault(spec.source.hf_name, []).append(spec)
    for hf_name, group in parts.items():
        if len(group) == 1:
            assert group[0].source.part is None, hf_name
            continue
        ranges = [spec.source.part for spec in group]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        axis = 0 if group[0].source.transpose else -1
        assert ranges[-1][1] == group[0].source.hf_shape[axis], hf_name
        assert all(stop - start == spec.shape[-1] for (start, stop), spec in zip(ranges, group))


def test_source_select_takes_the_output_axis_part():
    stored = np.arange(24).reshape(6, 4)
    rows = params.Source("qkv", (6, 4), transpose=True, part=(2, 5))  # stored [out, in]
    columns = params.Source("c_attn", (6, 4), transpose=False, part=(1, 3))  # [in, out]
    assert np.array_equal(rows.select(stored), stored[2:5])
    assert np.array_equal(columns.select(stored), stored[:, 1:3])
    assert params.Source("w", (6, 4), transpose=True).select(stored) is stored


def test_a_hand_built_config_has_params_but_no_source_for_unstored_names():
    """A Llama with LayerNorm (no config.json asks for one) still gets params; only the
    names its family's checkpoints do not store lack a source."""
    config = make_config(norm="layer")
    layer = params.specs(config)["layers"][0]
    assert layer["attn_norm_bias"].source is None
    assert layer["attn_norm"].source.hf_name == "model.layers.0.input_layernorm.weight"
    layer = params.init_params(config, jax.random.key(0))["layers"][0]
    assert layer["attn_norm_bias"].shape == (32,)
