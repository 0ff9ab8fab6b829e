"""The functional decoder: ``forward(params, tokens, positions, cache) -> (logits, cache)``.

One parameterised block covers Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3 (MHA, GQA and
MQA); the families differ only by ``ModelConfig`` fields. Layers are a Python loop over
a tuple of per-layer parameter dicts, each with its own cache buffer (measured faster
than scanning over stacked layers: docs/architecture.md).

Params are a plain pytree::

    {"embed": [vocab, hidden], "final_norm": [hidden], "lm_head": [vocab, hidden] (untied only),
     "layers": ({"attn_norm": [hidden], "wq": [hidden, heads * head_dim], "bq": ...,
                 "wk", "bk", "wv", "bv": [hidden, kv_heads * head_dim] / [kv_heads * head_dim],
                 "wo": [heads * head_dim, hidden], "bo": [hidden],
                 "q_norm", "k_norm": [head_dim] (qk_norm only),
                 "mlp_norm": [hidden], "w_gate", "w_up": [hidden, intermediate],
                 "w_down": [intermediate, hidden], "b_gate", "b_up", "b_down" (mlp_bias only)}, ...)}
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax.attention import attend
from kvjax.cache import KVCache, TokenHistory
from kvjax.config import ModelConfig
from kvjax.rope import apply_rope, rope_tables


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters, by name (biases and norms only where configured)."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"attn_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d),
              "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    if config.qkv_bias:
        shapes |= {"bq": (q,), "bk": (kv,), "bv": (kv,)}
    if config.o_bias:
        shapes["bo"] = (d,)
    if config.qk_norm:
        shapes |= {"q_norm": (config.head_dim,), "k_norm": (config.head_dim,)}
    if config.mlp_bias:
        shapes |= {"b_gate": (f,), "b_up": (f,), "b_down": (d,)}
    return shapes


def top_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters outside the layers, by name."""
    shapes = {"embed": (config.vocab_size, config.hidden_size), "final_norm": (config.hidden_size,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, config.hidden_size)
    return shapes


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> dict:
    """Random parameters of the right shapes (for tests and benchmarks; speed does not
    depend on the values). Norm weights are ones, everything else N(0, 0.02)."""

    def make(name, shape, k):
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    def make_all(shapes, k):
        keys = jax.random.split(k, len(shapes))
        return {name: make(name, shape, kk) for (name, shape), kk in zip(shapes.items(), keys)}

    top_key, *layer_keys = jax.random.split(key, config.num_layers + 1)
    params = make_all(top_param_shapes(config), top_key)
    params["layers"] = tuple(make_all(layer_param_shapes(config), k) for k in layer_keys)
    return params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, scaled in the input dtype (as in HF transformers)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _linear(x: jax.Array, layer: dict, weight: str, bias: str) -> jax.Array:
    y = jnp.einsum("btd,df->btf", x, layer[weight])
    return y + layer[bias] if bias in layer else y


def qkv_projection(config: ModelConfig, layer: dict, x: jax.Array, cos: jax.Array,
                   sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normed, projected (QK-normed) and rotated queries, keys and values of one layer.

    Returns ``q [batch, seq, heads, head_dim]`` and ``k, v [batch, seq, kv_heads, head_dim]``.
    """
    batch, seq, _ = x.shape
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    q = _linear(h, layer, "wq", "bq").reshape(batch, seq, config.num_heads, config.head_dim)
    k = _linear(h, layer, "wk", "bk").reshape(batch, seq, config.num_kv_heads, config.head_dim)
    v = _linear(h, layer, "wv", "bv").reshape(batch, seq, config.num_kv_heads, config.head_dim)
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def finish_layer(config: ModelConfig, layer: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection and residual, then the gated MLP and residual.

    ``x``: the layer's input ``[batch, seq, hidden]``; ``attn``: ``[batch, seq, heads, head_dim]``.
    """
    batch, seq, _ = x.shape
    x = x + _linear(attn.reshape(batch, seq, -1), layer, "wo", "bo")
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    gate = jax.nn.silu(_linear(h, layer, "w_gate", "b_gate"))
    return x + _linear(gate * _linear(h, layer, "w_up", "b_up"), layer, "w_down", "b_down")


def final_logits(config: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """Final norm and LM head: ``float32[batch, seq, vocab]``."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("btd,vd->btv", x, head, preferred_element_type=jnp.float32)


def forward(config: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array,
            cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder on a block of tokens.

    Args:
      config: the model's shape and behaviour.
      params: the parameter pytree (see the module docstring).
      tokens: ``int32[batch, seq]``.
      positions: ``int32[batch, seq]``, each token's position in its sequence; ``-1``
        marks padding (after the real tokens of a row).
      cache: a ``KVCache`` to write the new keys/values into and attend over, or
        ``None`` to attend within ``tokens`` only (the recompute baseline).

    Returns:
      ``(logits float32[batch, seq, vocab], cache)``, the cache with the block written
      and its lengths advanced.
    """
    x = params["embed"][tokens]  # [batch, seq, hidden]
    cos, sin = rope_tables(config, positions)
    for index, layer in enumerate(params["layers"]):
        q, k, v = qkv_projection(config, layer, x, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
        if cache is None:  # recompute mode: attend within the given tokens
            keys, values, key_positions = k, v, positions
        else:
            cache = cache.update(index, k, v, positions)
            keys, values = cache.keys[index], cache.values[index]  # [batch, kv_heads, capacity, head_dim]
            key_positions = cache.slot_positions
        attn = attend(q, keys, values, positions, key_positions, config.sliding_window)
        x = finish_layer(config, layer, x, attn)
    if cache is not None:
        cache = cache.advance(positions)
    return final_logits(config, params, x), cache


def step_fn(config: ModelConfig):
    """``forward`` bound to a config: the ``step_fn(params, tokens, positions, cache)``
    that ``kvjax.decode`` drives."""
    return functools.partial(forward, config)


def recompute_forward(config: ModelConfig, params: dict, tokens: jax.Array,
                      positions: jax.Array, history: TokenHistory):
    """The no-cache baseline as a step function: appends ``tokens`` to the history and
    reruns the whole ``[batch, capacity]`` sequence, returning the logits of ``tokens``."""
    history = history.update(tokens, positions)
    slots = jnp.arange(history.tokens.shape[1], dtype=jnp.int32)[None, :]
    all_positions = jnp.where(slots < history.lengths[:, None], slots, -1)  # [batch, capacity]
    logits, _ = forward(config, params, history.tokens, all_positions, None)
    picked = jnp.take_along_axis(logits, jnp.maximum(positions, 0)[:, :, None], axis=1)
    return picked, history  # [batch, seq, vocab]


def recompute_step_fn(config: ModelConfig):
    """``recompute_forward`` bound to a config (the ``use_cache=False`` step)."""
    return functools.partial(recompute_forward, config)
