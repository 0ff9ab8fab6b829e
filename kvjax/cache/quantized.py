"""A quantized KV cache: int8 or fp8 (``float8_e4m3fn``) keys and values, each with a
float32 scale per token and KV head.

A token's key (and value) of one KV head is stored as ``round(x / scale)`` with
``scale = max|x| / Q`` (``Q`` = 127 for int8, 448 for fp8: symmetric, the largest value
maps to the largest code; both divisions as multiplications by reciprocals:
``quantize``), quantized once when it is written. Scales are float32:
4 bytes beside ``head_dim`` bytes of codes (3% of an int8 cache at head_dim 128), and
exact, so the only rounding is the codes' own; a bfloat16 scale would add up to 0.4%
error to every element of a token. Attention never dequantizes the whole cache: the
score of a key is ``(q . codes) * scale`` and a value's weight ``p * scale`` (the scale
of a token factors out of its dot products), computed block by block
(``kvjax.attention.quantized``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.base import PerLayerBuffers, check_cache_sizes, replace_at, write_rows
from kvjax.cache.contiguous import BUFFER_AXES
from kvjax.cache.layout import CacheLayout, cache_layout
from kvjax.config import ModelConfig

# kv_dtype -> (storage dtype, largest code)
QUANTIZED = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}
SCALE_AXES = ("batch", "kv_heads", "cache_seq")  # [batch, kv_heads, capacity]


def quantize(x: jax.Array, kv_dtype: str, round_even=jnp.round) -> tuple[jax.Array, jax.Array]:
    """``x [..., head_dim]`` as codes of ``kv_dtype`` and float32 scales ``[...]``
    (``x ~= codes * scale[..., None]``); an all-zero vector gets scale 1.

    The divisions are written as the multiplications by reciprocals that XLA makes of
    them (``scale = max|x| * (1 / Q)``, ``codes = round(x * (1 / scale))``), so that the
    decode kernel, which quantizes a step's new token in registers, writes the same
    bits: its ``1 / scale`` is the GPU's division XLA's is (on an H100 XLA divides as
    PTX's ``div.full.f32``, as Triton does, not correctly rounded), and it passes
    ``round_even`` (rounding half to even; ``jnp.round`` elsewhere)."""
    storage, largest = QUANTIZED[kv_dtype]
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax * (1 / largest), 1.0)
    scaled = x32 * (1 / scale)[..., None]
    if storage == jnp.int8:
        scaled = round_even(scaled)
    return jnp.clip(scaled, -largest, largest).astype(storage), scale


def check_storable(kv_dtype: str | None, platform: str | None = None) -> None:
    """Raises ``ValueError`` naming what works when this backend (``platform``, default
    JAX's default) cannot hold ``kv_dtype``'s codes (fp8 needs ``float8_e4m3fn``
    arrays); nothing for float dtypes and None. Checked once per backend, by compiling
    a quantization there."""
    if kv_dtype not in QUANTIZED:
        return
    platform = platform or jax.default_backend()
    if not can_store(kv_dtype, platform):
        works = [name for name in QUANTIZED if can_store(name, platform)]
        raise ValueError(
            f"kv_dtype={kv_dtype!r} stores {jnp.dtype(QUANTIZED[kv_dtype][0]).name} codes, which "
            f"this JAX cannot hold on {platform}; use kv_dtype="
            f"{' or '.join(repr(name) for name in works) or 'None'} there (or a float kv_dtype)")


@functools.cache
def can_store(kv_dtype: str, platform: str) -> bool:
    """Whether ``platform`` compiles ``kv_dtype``'s quantization (codes written, read back)."""
    example = jax.device_put(jnp.ones((2, 8), jnp.float32), jax.local_devices(backend=platform)[0])
    try:
        jax.jit(lambda x: dequantize(*quantize(x, kv_dtype))).lower(example).compile()
    except (jax.errors.JaxRuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return True


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
      lengths: ``int32[batch]``, how many positions of each row were written.
      layout: static; each layer's slots, as in ``KVCache`` (ring buffers of sliding
        windows, streaming).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_scales: tuple[jax.Array, ...]
    value_scales: tuple[jax.Array, ...]
    lengths: jax.Array
    layout: CacheLayout | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int,
               kv_dtype: str = "int8", *, window: int | None = None,
               sink_tokens: int | None = None) -> "QuantizedKVCache":
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens each
        (``window``, ``sink_tokens``: as in ``KVCache.create``)."""
        check_cache_sizes(batch, capacity)
        if kv_dtype not in QUANTIZED:
            raise ValueError(f"a quantized cache holds {' or '.join(QUANTIZED)}, got {kv_dtype!r}")
        storage = QUANTIZED[kv_dtype][0]
        layout = cache_layout(config, capacity, window=window, sink_tokens=sink_tokens)
        heads = (batch, config.num_kv_heads)
        codes = lambda: tuple(jnp.zeros((*heads, layer.slots, config.head_dim), storage)
                              for layer in layout.layers)
        scales = lambda: tuple(jnp.zeros((*heads, layer.slots), jnp.float32)
                               for layer in layout.layers)
        return cls(keys=codes(), values=codes(), key_scales=scales(), value_scales=scales(),
                   lengths=jnp.zeros((batch,), jnp.int32), layout=layout)

    @property
    def kv_dtype(self) -> str:
        return layer_kv_dtype(self.layer(0))

    def logical_axes(self) -> "QuantizedKVCache":
        """Codes like ``KVCache``'s buffers; scales ``(batch, kv_heads, cache_seq)``, so
        they are split like their KV heads."""
        codes, scales = (BUFFER_AXES,) * len(self.keys), (SCALE_AXES,) * len(self.keys)
        return QuantizedKVCache(keys=codes, values=codes, key_scales=scales,
                                value_scales=scales, lengths=("batch",), layout=self.layout)

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


def quantize_block(keys: jax.Array, values: jax.Array, kv_dtype: str, **arithmetic) -> tuple:
    """A block's keys and values (``[batch, kv_heads, new, head_dim]``) as a layer's
    ``(keys, values, key_scales, value_scales)`` of ``kv_dtype`` codes (``arithmetic``:
    as in ``quantize``)."""
    key_codes, key_scales = quantize(keys, kv_dtype, **arithmetic)
    value_codes, value_scales = quantize(values, kv_dtype, **arithmetic)
    return key_codes, value_codes, key_scales, value_scales


def layer_kv_dtype(layer: tuple) -> str:
    """What a layer's buffers ``(keys, values, ...)`` store, as a ``kv_dtype``
    (``"int8"``, ``"fp8"`` or a float dtype's name)."""
    name = jnp.dtype(layer[0].dtype).name
    return next((kind for kind, (storage, _) in QUANTIZED.items()
                 if jnp.dtype(storage).name == name), name)


def write_quantized_block(layer: tuple, new_keys: jax.Array, new_values: jax.Array,
                          positions: jax.Array) -> tuple:
    """One layer's ``(keys, values, key_scales, value_scales)`` with a block
    (``[batch, kv_heads, new, head_dim]``, full precision) quantized and written at each
    row's positions (``KVCache.update`` says what the caller guarantees)."""
    block = quantize_block(new_keys, new_values, layer_kv_dtype(layer))
    return tuple(write_rows(buffer, new, positions, seq_axis=2)
                 for buffer, new in zip(layer, block))
