"""Model configuration: a frozen dataclass read from a Hugging Face ``config.json``.

One ``ModelConfig`` describes every supported decoder family; the families differ only
by field values (norms, activation, biases, QK-norm, positions, RoPE scaling, soft-capping,
sliding windows, tied embeddings), never by separate model classes. docs/models.md lists
which fields each family sets.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                         "phi3", "gpt2", "olmo2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# HF activation name -> kvjax activation (ModelConfig.activation).
SUPPORTED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                         "gelu_new": "gelu_tanh", "gelu": "gelu"}
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
NORMS = ("rms", "layer")
POSITION_EMBEDDINGS = ("rope", "learned")
LAYER_TYPES = ("full_attention", "sliding_attention")

# What each family sets beyond the fields every config.json carries (ModelConfig fields).
_GEMMA = dict(norm_offset=1.0, norm_scale_float32=True, scale_embeddings=True)
_FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "phi3": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "gemma": _GEMMA,
    "gemma2": {**_GEMMA, "post_norms": True},
    "gemma3_text": {**_GEMMA, "post_norms": True, "qk_norm": True},
    "gpt2": dict(norm="layer", position_embedding="learned", gated_mlp=False, qkv_bias=True,
                 o_bias=True, mlp_bias=True),
    "olmo2": dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_per_head=False,
                  norm_scale_float32=True),
}
# The HF config class defaults of keys kvjax reads, for config.json files that omit them.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=2,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
    "gpt2": dict(tie_word_embeddings=True, n_positions=1024, activation_function="gelu_new",
                 layer_norm_epsilon=1e-5),
}
# GPT-2's config.json names -> the names the other families use.
_GPT2_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers",
              "n_head": "num_attention_heads", "n_positions": "max_position_embeddings",
              "n_inner": "intermediate_size", "layer_norm_epsilon": "rms_norm_eps",
              "activation_function": "hidden_act"}
_SLIDING_WINDOW_FAMILIES = ("mistral", "phi3", "gemma2", "gemma3_text")
_LOCAL_GLOBAL_FAMILIES = ("gemma2", "gemma3_text")  # alternate sliding and full layers
_NO_SLIDING_WINDOW_FAMILIES = ("qwen2", "qwen3")  # reject use_sliding_window=true


class ConfigError(ValueError):
    """A ``config.json`` that kvjax cannot run as written."""


def is_count(value: Any, minimum: int = 1) -> bool:
    """Whether ``value`` is an integer of at least ``minimum``: a Python or numpy integer
    (or a 0-d integer array), not a bool, a float or a string. The check behind kvjax's
    count arguments (steps, sizes, seeds, top_k)."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= minimum
    except TypeError:
        return False


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` in HF configs)."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn and longrope
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope: per-frequency divisors for sequences up to / beyond the original length
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer.

    Hashable, so it can be a static argument of ``jax.jit``. Every feature is decided
    by these fields in Python, so a feature that is off adds no operation.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # epsilon of every norm (layer_norm_epsilon for LayerNorm)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Llama attention_bias, Qwen2 always)
    o_bias: bool = False  # bias on the attention output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on q and k before RoPE (Qwen3, Gemma 3, OLMo-2)
    qk_norm_per_head: bool = True  # qk_norm over each head; False: over all heads (OLMo-2)
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with a bias, GPT-2)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1.0 is Gemma's (1 + w)
    norm_scale_float32: bool = False  # scale by the weight before rounding to the activation
    #                                   dtype (Gemma, OLMo-2); else round, then scale (Llama)
    pre_norms: bool = True  # norm the input of attention and of the MLP (all but OLMo-2)
    post_norms: bool = False  # norm the output of attention and of the MLP (Gemma 2/3, OLMo-2)
    activation: str = "silu"  # MLP activation: "silu", "gelu_tanh" or "gelu" (exact)
    gated_mlp: bool = True  # act(x @ w_gate) * (x @ w_up); False: act(x @ w_up) (GPT-2)
    position_embedding: str = "rope"  # "rope" or "learned" (a [max_positions, hidden] table, GPT-2)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the output logits (Gemma 2)
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" or "full_attention"
    #                                     (Gemma 2/3); empty: every layer uses sliding_window
    local_rope_theta: float | None = None  # RoPE base of sliding layers, without scaling
    #                                        (Gemma 3); None: every layer uses rope_theta

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS),
                              ("position_embedding", POSITION_EMBEDDINGS)):
            _check_choice(name, getattr(self, name), allowed)
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                                  f"{self.num_layers} layers")
            for kind in self.layer_types:
                _check_choice("layer_types entry", kind, LAYER_TYPES)

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_local_layer(self, layer: int) -> bool:
        """Whether ``layer`` is a sliding (local) layer of a local/global model."""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, ``None`` where it attends to every position."""
        if self.layer_types and not self.is_local_layer(layer):
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Builds a config from the contents of a Hugging Face ``config.json``."""
        model_type = d.get("model_type")
        _check_choice("model_type", model_type, SUPPORTED_MODEL_TYPES)
        d = {**_FAMILY_DEFAULTS.get(model_type, {}), **d}
        if model_type == "gpt2":
            d = _gpt2_keys(d)
        _reject_unsupported(model_type, d)
        features = _FAMILY_FIELDS[model_type]

        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim") or hidden // num_heads
        num_layers = d["num_hidden_layers"]
        attention_bias = bool(d.get("attention_bias", False))
        max_pos = d.get("max_position_embeddings", 4096)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        local_global = model_type in _LOCAL_GLOBAL_FAMILIES
        return cls(**{
            **features,
            "model_type": model_type,
            "vocab_size": d["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": d["intermediate_size"],
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": d.get("num_key_value_heads") or num_heads,
            "head_dim": head_dim,
            "rms_norm_eps": d.get("rms_norm_eps", 1e-6),
            "rope_theta": _rope_theta(d),
            "rope_scaling": _rope_scaling(d, max_pos, model_type),
            "max_position_embeddings": max_pos,
            "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
            "qkv_bias": features.get("qkv_bias", False) or attention_bias,
            "o_bias": features.get("o_bias", False) or (attention_bias and model_type != "qwen2"),
            "mlp_bias": features.get("mlp_bias", False) or bool(d.get("mlp_bias", False)),
            "sliding_window": (d.get("sliding_window") if model_type in _SLIDING_WINDOW_FAMILIES
                               else None),
            "bos_token_id": d.get("bos_token_id"),
            "eos_token_ids": eos_ids,
            "activation": _activation(model_type, d),
            "query_scale": _query_scale(model_type, d),
            "attn_logit_softcap": d.get("attn_logit_softcapping") if local_global else None,
            "final_logit_softcap": d.get("final_logit_softcapping") if local_global else None,
            "layer_types": _layer_types(d, num_layers) if local_global else (),
            "local_rope_theta": _local_rope_theta(d) if model_type == "gemma3_text" else None,
        })

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads a ``config.json`` file (or the one inside a checkpoint directory)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no config.json at {path}: point kvjax at a Hugging Face checkpoint directory "
                "(one holding config.json and model.safetensors)")
        return cls.from_dict(read_json(path))


def read_json(path: str) -> dict[str, Any]:
    """The JSON object in the file ``path`` (``config.json``, ``generation_config.json``).

    Raises:
      ConfigError: the file is not valid JSON or holds no object, naming ``path`` and the
        problem in one line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno} column "
                          f"{e.colno})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: it is not UTF-8 text ({e.reason} at "
                          f"byte {e.start})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object: it holds a {type(data).__name__}")
    return data


def _check_choice(name: str, value: Any, supported) -> None:
    if value not in supported:
        raise ConfigError(f"unsupported {name} {value!r}; supported: {', '.join(supported)}")


def _gpt2_keys(d: dict[str, Any]) -> dict[str, Any]:
    """GPT-2's keys under the common names; keys GPT-2 does not read are dropped."""
    kept = {key: value for key, value in d.items()
            if key not in ("num_key_value_heads", "head_dim", *_GPT2_KEYS.values())}
    renamed = kept | {new: d[old] for old, new in _GPT2_KEYS.items() if old in d}
    renamed["intermediate_size"] = renamed.get("intermediate_size") or 4 * renamed["hidden_size"]
    return renamed


def _reject_unsupported(model_type: str, d: dict[str, Any]) -> None:
    """Raises ``ConfigError`` for config values kvjax does not implement."""
    if d.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError("pretraining_tp != 1 is not supported; supported: 1")
    if model_type in _NO_SLIDING_WINDOW_FAMILIES and d.get("use_sliding_window"):
        raise ConfigError(f"{model_type} with use_sliding_window=true is not supported; "
                          "supported: use_sliding_window=false")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true is not supported; supported: "
                          "false (causal attention)")
    if model_type == "gpt2":
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if d.get(key):
                raise ConfigError(f"gpt2 with {key}=true is not supported; supported: false")


def _activation(model_type: str, d: dict[str, Any]) -> str:
    key = "hidden_activation" if model_type in ("gemma2", "gemma3_text") else "hidden_act"
    name = d.get(key) or "silu"
    if model_type == "gemma" and name == "gelu":  # legacy Gemma value, meant as tanh (as in HF)
        name = "gelu_pytorch_tanh"
    _check_choice(key, name, SUPPORTED_ACTIVATIONS)
    return SUPPORTED_ACTIVATIONS[name]


def _query_scale(model_type: str, d: dict[str, Any]) -> float | None:
    if model_type in ("gemma2", "gemma3_text"):
        return float(d["query_pre_attn_scalar"]) ** -0.5
    if model_type == "gpt2" and not d.get("scale_attn_weights", True):
        return 1.0
    return None


def _layer_types(d: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """Gemma's per-layer kinds: ``layer_types``, else every ``sliding_window_pattern``-th
    layer full and the others sliding (as HF derives them)."""
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    pattern = d.get("_sliding_window_pattern") or d["sliding_window_pattern"]
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(num_layers))


def _rope_params(d: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (Gemma 3: one dict per layer type);
    # older configs `rope_theta` + `rope_scaling`.
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if layer_type in params:
        params = params[layer_type] or {}
    return dict(params)


def _rope_theta(d: dict[str, Any]) -> float:
    return float(_rope_params(d).get("rope_theta", d.get("rope_theta", 10000.0)))


def _local_rope_theta(d: dict[str, Any]) -> float:
    """Gemma 3's RoPE base for sliding layers (which HF runs without scaling)."""
    p = (d.get("rope_parameters") or {}).get("sliding_attention") or {}
    if p.get("rope_type", "default") != "default":
        raise ConfigError(f"unsupported rope type {p['rope_type']!r} for sliding_attention "
                          "layers; supported: default")
    return float(p.get("rope_theta", d["rope_local_base_freq"]))


def _rope_scaling(d: dict[str, Any], max_pos: int, model_type: str) -> RopeScaling:
    p = _rope_params(d)
    rope_type = p.get("rope_type", p.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # legacy Phi-3 names (as in HF)
        rope_type = "longrope"
    _check_choice("rope type", rope_type, SUPPORTED_ROPE_TYPES)
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported; supported: 1.0")
    if rope_type == "default":
        return RopeScaling()
    if "factor" not in p and rope_type not in ("yarn", "longrope"):
        raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    orig = p.get("original_max_position_embeddings")
    if rope_type == "llama3" and orig is None:
        raise ConfigError("rope type 'llama3' needs 'original_max_position_embeddings'")
    if rope_type == "yarn":
        orig = orig or d.get("original_max_position_embeddings") or max_pos
    if rope_type == "longrope":  # Phi-3: the top-level value wins, as in HF
        orig = d.get("original_max_position_embeddings") or orig or max_pos
    factor = p.get("factor")
    if factor is None:  # the ratio of the extended to the original context
        factor = max_pos / orig
    return RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=orig,
        beta_fast=float(p.get("beta_fast") or 32.0),
        beta_slow=float(p.get("beta_slow") or 1.0),
        attention_factor=p.get("attention_factor"),
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
        truncate=bool(p.get("truncate", True)),
        **(_longrope_factors(p, d) if rope_type == "longrope" else {}),
    )


def _longrope_factors(p: dict[str, Any], d: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = p.get(name)
        if not isinstance(values, list) or len(values) != head_dim // 2:
            raise ConfigError(f"rope type 'longrope' needs '{name}', a list of head_dim // 2 = "
                              f"{head_dim // 2} numbers; got {values!r}")
        factors[name] = tuple(float(v) for v in values)
    return factors
