"""Rotary position embeddings (the Hugging Face ``rotate_half`` layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig, rope_inverse_frequencies


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
