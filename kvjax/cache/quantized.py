"""A quantized KV cache: int8 or fp8 (``float8_e4m3fn``) keys and values, each with a
float32 scale per token and KV head.

A token's key (and value) of one KV head is stored as ``round(x / scale)`` with
``scale = max|x| / Q`` (``Q`` = 127 for int8, 448 for fp8: symmetric, the largest
value maps to the largest code), quantized once when it is written. Scales are float32:
4 bytes beside ``head_dim`` bytes of codes (3% of an int8 cache at head_dim 128), and
exact, so the only rounding is the codes' own; a bfloat16 scale would add up to 0.4%
error to every element of a token. Attention never dequantizes the whole cache: the
score of a key is ``(q . codes) * scale`` and a value's weight ``p * scale`` (the scale
of a token factors out of its dot products), computed block by block
(``kvjax.attention.quantized``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.base import PerLayerBuffers, replace_at, write_rows
from kvjax.cache.contiguous import BUFFER_AXES
from kvjax.config import ModelConfig, is_count

# kv_dtype -> (storage dtype, largest code)
QUANTIZED = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}
SCALE_AXES = ("batch", "kv_heads", "cache_seq")  # [batch, kv_heads, capacity]


def quantize(x: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array]:
    """``x [..., head_dim]`` as codes of ``kv_dtype`` and float32 scales ``[...]``
    (``x ~= codes * scale[..., None]``); an all-zero vector gets scale 1."""
    storage, largest = QUANTIZED[kv_dtype]
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / largest, 1.0)
    scaled = x32 / scale[..., None]
    if storage == jnp.int8:
        scaled = jnp.round(scaled)
    return jnp.clip(scaled, -largest, largest).astype(storage), scale


def dequantize(codes: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``codes * scale[..., None]`` in ``dtype`` (for tests and inspection; attention
    folds the scales in instead)."""
    return (codes.astype(jnp.float32) * scale[..., None]).astype(dtype)


@struct.dataclass
class QuantizedKVCache(PerLayerBuffers):
    """Keys and values of every layer as int8 or fp8 codes with float32 scales.

    Attributes:
      keys, values: one buffer per layer, each ``[batch, kv_heads, capacity, head_dim]``
        of int8 or float8_e4m3fn codes.
      key_scales, value_scales: one per layer, ``float32[batch, kv_heads, capacity]``.
      lengths: ``int32[batch]``, how many leading slots of each row hold real tokens.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_scales: tuple[jax.Array, ...]
    value_scales: tuple[jax.Array, ...]
    lengths: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int,
               kv_dtype: str = "int8") -> "QuantizedKVCache":
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens each."""
        if not (is_count(batch) and is_count(capacity)):
            raise ValueError(f"batch and capacity must be >= 1, got batch={batch}, capacity={capacity}")
        if kv_dtype not in QUANTIZED:
            raise ValueError(f"a quantized cache holds {' or '.join(QUANTIZED)}, got {kv_dtype!r}")
        storage = QUANTIZED[kv_dtype][0]
        codes = (batch, config.num_kv_heads, capacity, config.head_dim)
        layers = range(config.num_layers)
        zeros = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in layers)
        return cls(keys=zeros(codes, storage), values=zeros(codes, storage),
                   key_scales=zeros(codes[:3], jnp.float32),
                   value_scales=zeros(codes[:3], jnp.float32),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def kv_dtype(self) -> str:
        return "int8" if self.keys[0].dtype == jnp.int8 else "fp8"

    def logical_axes(self) -> "QuantizedKVCache":
        """Codes like ``KVCache``'s buffers; scales ``(batch, kv_heads, cache_seq)``, so
        they are split like their KV heads."""
        codes, scales = (BUFFER_AXES,) * len(self.keys), (SCALE_AXES,) * len(self.keys)
        return QuantizedKVCache(keys=codes, values=codes, key_scales=scales,
                                value_scales=scales, lengths=("batch",))

    def layer(self, index: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """One layer's ``(keys, values, key_scales, value_scales)``."""
        return (self.keys[index], self.values[index], self.key_scales[index],
                self.value_scales[index])

    def with_layer(self, index: int, layer: tuple) -> "QuantizedKVCache":
        """The cache with one layer's ``(keys, values, key_scales, value_scales)`` replaced."""
        keys, values, key_scales, value_scales = layer
        return self.replace(keys=replace_at(self.keys, index, keys),
                            values=replace_at(self.values, index, values),
                            key_scales=replace_at(self.key_scales, index, key_scales),
                            value_scales=replace_at(self.value_scales, index, value_scales))


def write_quantized_block(layer: tuple, new_keys: jax.Array, new_values: jax.Array,
                          positions: jax.Array) -> tuple:
    """One layer's ``(keys, values, key_scales, value_scales)`` with a block
    (``[batch, kv_heads, new, head_dim]``, full precision) quantized and written at each
    row's positions (``KVCache.update`` says what the caller guarantees)."""
    keys, values, key_scales, value_scales = layer
    kv_dtype = "int8" if keys.dtype == jnp.int8 else "fp8"
    key_codes, new_key_scales = quantize(new_keys, kv_dtype)
    value_codes, new_value_scales = quantize(new_values, kv_dtype)
    return (write_rows(keys, key_codes, positions, seq_axis=2),
            write_rows(values, value_codes, positions, seq_axis=2),
            write_rows(key_scales, new_key_scales, positions, seq_axis=2),
            write_rows(value_scales, new_value_scales, positions, seq_axis=2))
