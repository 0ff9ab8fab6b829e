"""Rotary position embeddings: the frequencies of each RoPE scaling (as in HF
transformers), their cos and sin tables, and the rotation (the Hugging Face
``rotate_half`` layout)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig, RopeScaling


def rope_inverse_frequencies(config: ModelConfig, local: bool = False,
                             max_length: int | None = None) -> tuple[list[float], float]:
    """Returns (inverse frequencies [head_dim // 2], attention factor) as in HF transformers.

    Computed in float64 on the host once; the attention factor multiplies cos and sin
    (1.0 except for yarn and longrope).

    Args:
      config: the model's config.
      local: the tables of sliding layers (``config.local_rope_theta``, no scaling).
      max_length: the longest sequence the tables serve. Only longrope reads it: its long
        factors apply when ``max_length > original_max_position_embeddings``, its short
        factors otherwise (``None``: short).
    """
    dim = config.head_dim
    base = config.local_rope_theta if local else config.rope_theta
    s = RopeScaling() if local else config.rope_scaling
    inv = [1.0 / base ** (i / dim) for i in range(0, dim, 2)]
    if s.rope_type == "default":
        return inv, 1.0
    if s.rope_type == "longrope":
        orig = s.original_max_position_embeddings
        use_long = max_length is not None and max_length > orig
        factors = s.long_factor if use_long else s.short_factor
        attention_factor = s.attention_factor
        if attention_factor is None:
            attention_factor = (1.0 if s.factor <= 1.0
                                else math.sqrt(1 + math.log(s.factor) / math.log(orig)))
        return [f / e for f, e in zip(inv, factors)], float(attention_factor)
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


def rope_tables(config: ModelConfig, positions: jax.Array, local: bool = False,
                max_length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin for each position, ``float32[batch, seq, head_dim // 2]``.

    The attention factor of yarn and longrope scaling is folded into both tables.
    ``local`` and ``max_length`` pick the frequencies as ``rope_inverse_frequencies`` does.
    """
    inv_freq, attention_factor = rope_inverse_frequencies(config, local, max_length)
    inv_freq = jnp.asarray(np.asarray(inv_freq, np.float32))  # [head_dim // 2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim // 2]
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def layer_rope_tables(config: ModelConfig, positions: jax.Array,
                      max_length: int) -> list[tuple[jax.Array | None, jax.Array | None]]:
    """The ``rope_tables`` (cos, sin) of each layer; ``(None, None)`` without RoPE.

    Layers share one pair of tables, except the sliding layers of a model with
    ``local_rope_theta`` (Gemma 3), which share a second pair. ``max_length`` is the
    longest sequence the tables serve (the cache capacity); it picks longrope's factors.
    """
    if config.position_embedding != "rope":
        return [(None, None)] * config.num_layers
    global_tables = rope_tables(config, positions, max_length=max_length)
    if config.local_rope_theta is None:
        return [global_tables] * config.num_layers
    local_tables = rope_tables(config, positions, local=True)
    return [local_tables if config.is_local_layer(i) else global_tables
            for i in range(config.num_layers)]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` by the tables of ``rope_tables``."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)  # each [batch, seq, heads, head_dim // 2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
