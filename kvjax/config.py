"""Model configuration: a frozen dataclass read from a Hugging Face ``config.json``.

One ``ModelConfig`` describes every supported decoder family; the families differ only
by field values (biases, QK-norm, RoPE scaling, tied embeddings, sliding window), never
by separate model classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = ("silu",)


class ConfigError(ValueError):
    """A ``config.json`` that kvjax cannot run as written."""


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
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer.

    Hashable, so it can be a static argument of ``jax.jit``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Llama attention_bias, Qwen2 always)
    o_bias: bool = False  # bias on the attention output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Builds a config from the contents of a Hugging Face ``config.json``."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = d.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp != 1 is not supported; supported: 1")
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ConfigError("qwen2 with use_sliding_window=true is not supported; supported: "
                              "use_sliding_window=false")
        if model_type == "qwen3" and d.get("use_sliding_window"):
            raise ConfigError("qwen3 with use_sliding_window=true is not supported; supported: "
                              "use_sliding_window=false")

        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim") or hidden // num_heads
        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = model_type == "qwen2" or attention_bias
        o_bias = attention_bias and model_type != "qwen2"
        max_pos = d.get("max_position_embeddings", 4096)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        window = d.get("sliding_window") if model_type == "mistral" else None
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(d),
            rope_scaling=_rope_scaling(d, max_pos),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

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
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _rope_params(d: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    return dict(d.get("rope_parameters") or d.get("rope_scaling") or {})


def _rope_theta(d: dict[str, Any]) -> float:
    return float(_rope_params(d).get("rope_theta", d.get("rope_theta", 10000.0)))


def _rope_scaling(d: dict[str, Any], max_pos: int) -> RopeScaling:
    p = _rope_params(d)
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported; supported: 1.0")
    if rope_type == "default":
        return RopeScaling()
    if "factor" not in p and rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    orig = p.get("original_max_position_embeddings")
    if rope_type == "llama3" and orig is None:
        raise ConfigError("rope type 'llama3' needs 'original_max_position_embeddings'")
    if rope_type == "yarn":
        orig = orig or d.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor")
    if factor is None:  # yarn without a factor: the ratio of the extended to the original context
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
    )


def rope_inverse_frequencies(config: ModelConfig) -> tuple[list[float], float]:
    """Returns (inverse frequencies [head_dim // 2], attention factor) as in HF transformers.

    Computed in float64 on the host once; the attention factor multiplies cos and sin
    (1.0 except for yarn).
    """
    dim = config.head_dim
    base = config.rope_theta
    s = config.rope_scaling
    inv = [1.0 / base ** (i / dim) for i in range(0, dim, 2)]
    if s.rope_type == "default":
        return inv, 1.0
    if s.rope_type == "linear":
        return [f / s.factor for f in inv], 1.0
    if s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / s.factor)
            else:
                smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor)
                out.append((1 - smooth) * f / s.factor + smooth * f)
        return out, 1.0
    # yarn
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(s.factor)

    def correction_dim(rotations):
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(inv):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1.0 - ramp
        out.append(f / s.factor * (1 - extrapolation) + f * extrapolation)
    return out, float(attention_factor)
