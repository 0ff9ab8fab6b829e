"""The model's parameters, each declared once: shape, logical axes, initializer and the
Hugging Face tensor it is read from.

Params are a plain pytree; a name is present only where the config asks for it::

    {"embed": [vocab, hidden], "final_norm", "final_norm_bias": [hidden],
     "pos_embed": [max_positions, hidden] (learned positions),
     "lm_head": [vocab, hidden] (untied only),
     "layers": ({"attn_norm", "attn_norm_bias": [hidden] (pre_norms),
                 "wq": [hidden, heads * head_dim], "bq": [heads * head_dim],
                 "wk", "wv": [hidden, kv_heads * head_dim], "bk", "bv": [kv_heads * head_dim],
                 "wo": [heads * head_dim, hidden], "bo": [hidden],
                 "q_norm", "k_norm": [head_dim] (qk_norm; without qk_norm_per_head
                                     [heads * head_dim] and [kv_heads * head_dim]),
                 "attn_post_norm": [hidden] (post_norms),
                 "mlp_norm", "mlp_norm_bias": [hidden] (pre_norms),
                 "w_gate" (gated_mlp), "w_up": [hidden, intermediate],
                 "w_down": [intermediate, hidden], "b_gate", "b_up", "b_down" (mlp_bias),
                 "mlp_post_norm": [hidden] (post_norms)}, ...)}

Norm biases (``*_norm_bias``) exist for LayerNorm models (``norm="layer"``) only.

``specs(config)`` resolves the tables below for one config into ``ParamSpec`` leaves;
everything else is derived from them: ``init_params``, ``abstract_params``,
``kvjax.sharding.param_shardings`` (from ``axes``) and ``kvjax.checkpoint`` (from
``source``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig

NORMAL, NORM = "normal", "norm"  # initializers: N(0, 0.02); the norm's identity scale


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one parameter is stored in a Hugging Face checkpoint."""

    hf_name: str  # the tensor's full name, e.g. "model.layers.0.self_attn.q_proj.weight"
    hf_shape: tuple[int, ...]  # the stored tensor's shape (the whole tensor when fused)
    transpose: bool  # stored [out, in] (torch Linear): transposed to kvjax's [in, out]
    part: tuple[int, int] | None = None  # [start, stop) along the stored output axis of a
    #                                      fused tensor (Phi-3 qkv_proj, GPT-2 c_attn)

    def select(self, array):
        """This parameter's part of the stored tensor ``array`` (all of it unless fused)."""
        if self.part is None:
            return array
        index = [slice(None)] * array.ndim
        index[0 if self.transpose else array.ndim - 1] = slice(*self.part)  # the output axis
        return array[tuple(index)]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of one config: a leaf of ``specs``."""

    name: str  # its key in the params (or layer) dict, e.g. "wq"
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axes (``kvjax.sharding.ShardingRules`` fields), one per dim
    init: str  # NORMAL: N(0, 0.02); NORM: the identity scale 1 - config.norm_offset
    source: Source | None  # None: the config's family stores no such tensor (a config
    #                        built by hand, e.g. a Llama with LayerNorm)


# ----- the tables -----

@dataclasses.dataclass(frozen=True)
class _Declared:
    """A table row: a parameter before a config resolves its shape, presence and source."""

    name: str
    dims: tuple[str, ...]  # the size of each dimension, a key of ``_sizes``
    axes: tuple[str, ...]
    stored: dict[str, tuple[str, bool]]  # layout -> (HF name, stored [out, in])
    when: Callable[[ModelConfig], bool]
    init: str


def _param(name: str, dims: tuple[str, ...], axes: tuple[str, ...], *, init: str = NORMAL,
           when: Callable[[ModelConfig], bool] = lambda c: True, **stored) -> _Declared:
    """A row; ``stored`` maps each layout (``_layouts``) to its HF name, or to
    ``_linear(name)`` for a weight stored transposed."""
    stored = {layout: hf if isinstance(hf, tuple) else (hf, False) for layout, hf in stored.items()}
    return _Declared(name, dims, axes, stored, when, init)


def _linear(hf_name: str) -> tuple[str, bool]:
    """A torch ``Linear`` weight: stored [out, in], transposed to kvjax's [in, out]."""
    return hf_name, True


def _pre_norms(c: ModelConfig) -> bool:
    return c.pre_norms


def _pre_layer_norms(c: ModelConfig) -> bool:
    return c.pre_norms and c.norm == "layer"


# The order of each table is the params' key order, which fixes init_params' random values
# (one key per name, split in this order): append new names, never reorder. It is also
# the order in which the parts of a fused tensor are stacked (q | k | v, gate | up).
_TOP = (
    _param("embed", ("vocab", "hidden"), ("vocab_in", "embed"),
           llama="model.embed_tokens.weight", gpt2="transformer.wte.weight"),
    _param("final_norm", ("hidden",), ("embed",), init=NORM,
           llama="model.norm.weight", gpt2="transformer.ln_f.weight"),
    _param("final_norm_bias", ("hidden",), ("embed",), when=lambda c: c.norm == "layer",
           gpt2="transformer.ln_f.bias"),
    _param("pos_embed", ("positions", "hidden"), ("cache_seq", "embed"),  # rows are positions
           when=lambda c: c.position_embedding == "learned", gpt2="transformer.wpe.weight"),
    _param("lm_head", ("vocab", "hidden"), ("vocab", "embed"),
           when=lambda c: not c.tie_word_embeddings, llama="lm_head.weight", gpt2="lm_head.weight"),
)
# Layer names sit under the layout's layer prefix (``_LAYER_PREFIXES``). GPT-2's Conv1D
# weights are stored [in, out], its c_attn fusing [q | k | v] columns; Phi-3 fuses
# [q | k | v] and [gate | up] rows. With post-norms (Gemma 2/3, OLMo-2)
# "post_attention_layernorm" norms the attention output, "pre_feedforward_layernorm" the
# MLP input.
_LAYER = (
    _param("attn_norm", ("hidden",), ("embed",), init=NORM, when=_pre_norms,
           llama="input_layernorm.weight", gpt2="ln_1.weight"),
    _param("attn_norm_bias", ("hidden",), ("embed",), when=_pre_layer_norms, gpt2="ln_1.bias"),
    _param("wq", ("hidden", "q"), ("embed", "heads"), llama=_linear("self_attn.q_proj.weight"),
           phi3=_linear("self_attn.qkv_proj.weight"), gpt2="attn.c_attn.weight"),
    _param("wk", ("hidden", "kv"), ("embed", "kv_heads"), llama=_linear("self_attn.k_proj.weight"),
           phi3=_linear("self_attn.qkv_proj.weight"), gpt2="attn.c_attn.weight"),
    _param("wv", ("hidden", "kv"), ("embed", "kv_heads"), llama=_linear("self_attn.v_proj.weight"),
           phi3=_linear("self_attn.qkv_proj.weight"), gpt2="attn.c_attn.weight"),
    _param("wo", ("q", "hidden"), ("heads", "embed"), llama=_linear("self_attn.o_proj.weight"),
           gpt2="attn.c_proj.weight"),
    _param("mlp_norm", ("hidden",), ("embed",), init=NORM, when=_pre_norms,
           llama="post_attention_layernorm.weight", post_norms="pre_feedforward_layernorm.weight",
           gpt2="ln_2.weight"),
    _param("mlp_norm_bias", ("hidden",), ("embed",), when=_pre_layer_norms, gpt2="ln_2.bias"),
    _param("w_gate", ("hidden", "mlp"), ("embed", "mlp"), when=lambda c: c.gated_mlp,
           llama=_linear("mlp.gate_proj.weight"), phi3=_linear("mlp.gate_up_proj.weight")),
    _param("w_up", ("hidden", "mlp"), ("embed", "mlp"), llama=_linear("mlp.up_proj.weight"),
           phi3=_linear("mlp.gate_up_proj.weight"), gpt2="mlp.c_fc.weight"),
    _param("w_down", ("mlp", "hidden"), ("mlp", "embed"), llama=_linear("mlp.down_proj.weight"),
           gpt2="mlp.c_proj.weight"),
    _param("bq", ("q",), ("heads",), when=lambda c: c.qkv_bias,
           llama="self_attn.q_proj.bias", gpt2="attn.c_attn.bias"),
    _param("bk", ("kv",), ("kv_heads",), when=lambda c: c.qkv_bias,
           llama="self_attn.k_proj.bias", gpt2="attn.c_attn.bias"),
    _param("bv", ("kv",), ("kv_heads",), when=lambda c: c.qkv_bias,
           llama="self_attn.v_proj.bias", gpt2="attn.c_attn.bias"),
    _param("bo", ("hidden",), ("embed",), when=lambda c: c.o_bias,
           llama="self_attn.o_proj.bias", gpt2="attn.c_proj.bias"),
    # replicated ("head_dim") also at OLMo-2's whole-projection width
    _param("q_norm", ("q_norm",), ("head_dim",), init=NORM, when=lambda c: c.qk_norm,
           llama="self_attn.q_norm.weight"),
    _param("k_norm", ("k_norm",), ("head_dim",), init=NORM, when=lambda c: c.qk_norm,
           llama="self_attn.k_norm.weight"),
    _param("b_gate", ("mlp",), ("mlp",), when=lambda c: c.mlp_bias and c.gated_mlp,
           llama="mlp.gate_proj.bias"),
    _param("b_up", ("mlp",), ("mlp",), when=lambda c: c.mlp_bias,
           llama="mlp.up_proj.bias", gpt2="mlp.c_fc.bias"),
    _param("b_down", ("hidden",), ("embed",), when=lambda c: c.mlp_bias,
           llama="mlp.down_proj.bias", gpt2="mlp.c_proj.bias"),
    _param("attn_post_norm", ("hidden",), ("embed",), init=NORM, when=lambda c: c.post_norms,
           post_norms="post_attention_layernorm.weight"),
    _param("mlp_post_norm", ("hidden",), ("embed",), init=NORM, when=lambda c: c.post_norms,
           post_norms="post_feedforward_layernorm.weight"),
)
_LAYER_PREFIXES = {"gpt2": "transformer.h.{}.", "llama": "model.layers.{}."}  # base layouts


def _sizes(config: ModelConfig) -> dict[str, int]:
    """The size of each dimension name of the tables."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"vocab": config.vocab_size, "hidden": config.hidden_size, "q": q, "kv": kv,
            "mlp": config.intermediate_size, "positions": config.max_position_embeddings,
            # QK-norm weights: one head's width, shared by every head, or the whole
            # projection's (OLMo-2)
            "q_norm": config.head_dim if config.qk_norm_per_head else q,
            "k_norm": config.head_dim if config.qk_norm_per_head else kv}


def _layouts(config: ModelConfig) -> tuple[str, ...]:
    """The checkpoint layouts the config's tensor names come from, the most specific
    first: GPT-2's own; else Llama's, with Phi-3's fused and post-norm names over it."""
    if config.model_type == "gpt2":
        return ("gpt2",)
    layouts = ("llama",)
    if config.post_norms:
        layouts = ("post_norms", *layouts)
    if config.model_type == "phi3":
        layouts = ("phi3", *layouts)
    return layouts


# ----- resolved for one config -----

def _resolve(table: tuple[_Declared, ...], config: ModelConfig, prefix: str) -> dict:
    """``{name: ParamSpec}`` of the rows of ``table`` present in ``config``, in table
    order; ``prefix`` comes before each HF name."""
    sizes, layouts = _sizes(config), _layouts(config)
    rows = [row for row in table if row.when(config)]
    shapes = {row.name: tuple(sizes[d] for d in row.dims) for row in rows}
    stored = {row.name: next((row.stored[l] for l in layouts if l in row.stored), None)
              for row in rows}
    fused: dict[str, list[str]] = {}  # HF name -> the kvjax names stored in it, in order
    for name, where in stored.items():
        if where is not None:
            fused.setdefault(where[0], []).append(name)

    def source(name: str) -> Source | None:
        if stored[name] is None:
            return None
        hf_name, transpose = stored[name]
        parts = fused[hf_name]
        widths = [shapes[part][-1] for part in parts]  # along the output axis (kvjax: last)
        start = sum(widths[:parts.index(name)])
        whole = shapes[name][:-1] + (sum(widths),)  # the stored tensor in kvjax's layout
        return Source(prefix + hf_name, whole[::-1] if transpose else whole, transpose,
                      (start, start + shapes[name][-1]) if len(parts) > 1 else None)

    return {row.name: ParamSpec(row.name, shapes[row.name], row.axes, row.init, source(row.name))
            for row in rows}


def specs(config: ModelConfig) -> dict:
    """The ``ParamSpec`` of every parameter of ``config``, in a pytree shaped like the
    params: ``{"embed": ParamSpec, ..., "layers": ({"wq": ParamSpec, ...}, ...)}``."""
    prefix = _LAYER_PREFIXES[_layouts(config)[-1]]  # the base layout's
    tree = _resolve(_TOP, config, "")
    tree["layers"] = tuple(_resolve(_LAYER, config, prefix.format(i))
                           for i in range(config.num_layers))
    return tree


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> dict:
    """Random parameters of the right shapes (for tests and benchmarks; speed does not
    depend on the values). Norm weights are the identity scale (ones, or zeros for
    ``(offset + w)`` norms), everything else N(0, 0.02)."""

    def make(spec: ParamSpec, k: jax.Array) -> jax.Array:
        if spec.init == NORM:
            return jnp.full(spec.shape, 1.0 - config.norm_offset, dtype)
        return (0.02 * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    def make_all(group: dict, k: jax.Array) -> dict:
        keys = jax.random.split(k, len(group))
        return {name: make(spec, kk) for (name, spec), kk in zip(group.items(), keys)}

    tree = specs(config)
    layers = tree.pop("layers")
    top_key, *layer_keys = jax.random.split(key, config.num_layers + 1)
    params = make_all(tree, top_key)
    params["layers"] = tuple(make_all(layer, k) for layer, k in zip(layers, layer_keys))
    return params


def abstract_params(config: ModelConfig, dtype=jnp.bfloat16) -> dict:
    """The params of ``config`` as ``jax.ShapeDtypeStruct``s (nothing allocated)."""
    return jax.tree.map(lambda spec: jax.ShapeDtypeStruct(spec.shape, dtype), specs(config))
