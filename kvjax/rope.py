"""Rotary position embeddings (the Hugging Face ``rotate_half`` layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig, rope_inverse_frequencies


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin for each position, ``float32[batch, seq, head_dim // 2]``.

    The attention factor of yarn scaling is folded into both tables.
    """
    inv_freq, attention_factor = rope_inverse_frequencies(config)
    inv_freq = jnp.asarray(np.asarray(inv_freq, np.float32))  # [head_dim // 2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim // 2]
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` by the tables of ``rope_tables``."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)  # each [batch, seq, heads, head_dim // 2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
