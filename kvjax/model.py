"""The functional decoder: ``forward(params, tokens, positions, cache) -> (logits, cache)``.

One parameterised block covers Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 (text),
Phi-3, GPT-2 and OLMo-2 (MHA, GQA and MQA); the families differ only by ``ModelConfig``
fields (docs/models.md). Layers are a Python loop over a tuple of per-layer parameter
dicts, each with its own cache buffer (measured faster than scanning over stacked
layers: docs/architecture.md).

The parameter pytree and each parameter's shape, axes and checkpoint names are declared
once, in ``kvjax.params``. Which attention each layer runs is chosen once per program
(``kvjax.attention.choose``) and passed to ``forward`` as one static value.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import (AttentionPlan, LayerAttention, attend_layer, attend_pool_blocks,
                             choose, soft_cap)
from kvjax.cache import KVCache, LayerSlots, TokenHistory
from kvjax.cache.base import advanced_lengths
from kvjax.cache.paged import PagedKVCache
from kvjax.cache.quantized import layer_kv_dtype
from kvjax.config import ModelConfig
from kvjax.kernels.decode_attention import MeshSplit
from kvjax.params import init_params  # noqa: F401  (kvjax.model.init_params, its old home)
from kvjax.rope import apply_rope, layer_rope_tables

_ACTIVATIONS = {"silu": jax.nn.silu,
                "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
                "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0,
             scale_float32: bool = False) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, scaled by ``offset + weight``.

    Llama rounds to ``x``'s dtype, then scales by ``weight``; with ``scale_float32`` or an
    ``offset`` the scaling is done in float32 and the result rounded (OLMo-2; Gemma's
    ``(1 + w)``). Both as in HF transformers.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if not (scale_float32 or offset):
        return weight * normed.astype(x.dtype)
    scale = weight.astype(jnp.float32)
    if offset:
        scale = offset + scale
    return (scale * normed).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with a bias, computed in float32 (GPT-2)."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def norm(config: ModelConfig, params: dict, name: str, x: jax.Array) -> jax.Array:
    """The config's norm of ``x`` with the weight ``params[name]`` (and its bias)."""
    if config.norm == "layer":
        return layer_norm(x, params[name], params[name + "_bias"], config.rms_norm_eps)
    return rms_norm(x, params[name], config.rms_norm_eps, config.norm_offset,
                    config.norm_scale_float32)


def _linear(x: jax.Array, layer: dict, weight: str, bias: str) -> jax.Array:
    """``x [batch, seq, in] @ layer[weight] [in, out]`` (+ bias)."""
    y = jnp.einsum("btd,df->btf", x, layer[weight])
    return y + layer[bias] if bias in layer else y


def _add_spare_row(x: jax.Array) -> jax.Array:
    """``x [1, ...]`` with an all-zero second batch row: ``[2, ...]``."""
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=0)


def _inputs_of_separate_products(x: jax.Array, count: int) -> tuple[jax.Array, ...]:
    """``count`` names for the input of ``count`` products (q/k/v, gate/up).

    XLA:GPU merges products of one input into one GEMM; for a block (seq > 1) it first
    copies their weights into one array, on every call (wq|wk|wv: 48 MiB a layer of the
    Llama-3.1-8B shape). Distinct names (an ``optimization_barrier``, no work at run
    time) keep separate GEMMs over the weights as stored: an 8B-shaped prefill is 1.5-3%
    faster and needs less scratch (docs/architecture.md §6). A decode step's merged GEMM
    reads the weights in place, so there they stay merged.
    """
    if x.shape[1] == 1:
        return (x,) * count
    return jax.lax.optimization_barrier((x,) * count)


def compiler_options() -> dict[str, int]:
    """XLA options for programs that run ``forward``'s decode steps on this backend
    (``kvjax.generate`` compiles with them; ``kvjax.jit_decode(..., compiler_options=)``
    for a loop of your own); none off GPUs.

    XLA:GPU merges products that share an input into one GEMM (its DotMerger pass) only
    where they are small (``xla_gpu_dot_merger_threshold_mb``, 32 by default), so the
    Llama-3.1-8B shape's gate and up projections (117 MB each) ran as two GEMMs. Merged,
    a decode step reads both weights in one GEMM, in place: 8B-shaped steps on an H100
    1.6% (batch 1) to 5.0% (batch 32) shorter (docs/experiments.md). A block's products
    stay separate (``_inputs_of_separate_products``), so prefills copy no weights.
    """
    if jax.default_backend() != "gpu":
        return {}
    return {"xla_gpu_dot_merger_threshold_mb": 1024}


def embed(config: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings (scaled by sqrt(hidden) for Gemma, plus learned position
    embeddings for GPT-2): ``[batch, seq, hidden]``."""
    x = params["embed"][tokens]  # [batch, seq, hidden]
    if config.scale_embeddings:  # the factor rounded to the activation dtype, as in HF
        x = x * jnp.asarray(config.hidden_size ** 0.5, x.dtype)
    if config.position_embedding == "learned":  # padding (-1) reads row 0; it is never attended
        x = x + params["pos_embed"][jnp.maximum(positions, 0)]
    return x


def rotate(config: ModelConfig, x: jax.Array, cos: jax.Array | None,
           sin: jax.Array | None) -> jax.Array:
    """Queries or keys rotated by the layer's ``rope_tables`` (as they are without RoPE)."""
    return apply_rope(x, cos, sin) if config.position_embedding == "rope" else x


def unrotated_qkv(config: ModelConfig, layer: dict, x: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normed, projected (QK-normed) queries, keys and values of one layer, before
    their rotation (``rotate``): ``q [batch, seq, heads, head_dim]`` and ``k, v
    [batch, seq, kv_heads, head_dim]``."""
    batch, seq, _ = x.shape
    h = norm(config, layer, "attn_norm", x) if config.pre_norms else x
    hq, hk, hv = _inputs_of_separate_products(h, 3)
    q = _linear(hq, layer, "wq", "bq")  # [batch, seq, heads * head_dim]
    k = _linear(hk, layer, "wk", "bk")  # [batch, seq, kv_heads * head_dim]
    v = _linear(hv, layer, "wv", "bv")
    if config.qk_norm and not config.qk_norm_per_head:  # OLMo-2: over the whole projection
        q, k = norm(config, layer, "q_norm", q), norm(config, layer, "k_norm", k)
    q = q.reshape(batch, seq, config.num_heads, config.head_dim)
    k = k.reshape(batch, seq, config.num_kv_heads, config.head_dim)
    v = v.reshape(batch, seq, config.num_kv_heads, config.head_dim)
    if config.qk_norm and config.qk_norm_per_head:
        q, k = norm(config, layer, "q_norm", q), norm(config, layer, "k_norm", k)
    return q, k, v


def mlp(config: ModelConfig, layer: dict, h: jax.Array) -> jax.Array:
    """The feed-forward block of one layer on its (normed) input ``[batch, seq, hidden]``."""
    activation = _ACTIVATIONS[config.activation]
    if config.gated_mlp:
        h_gate, h_up = _inputs_of_separate_products(h, 2)
        gate = activation(_linear(h_gate, layer, "w_gate", "b_gate"))
        hidden = gate * _linear(h_up, layer, "w_up", "b_up")  # [batch, seq, intermediate]
    else:
        hidden = activation(_linear(h, layer, "w_up", "b_up"))
    return _linear(hidden, layer, "w_down", "b_down")


def finish_layer(config: ModelConfig, layer: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection and residual, then the MLP and residual (each output normed
    before its residual with ``post_norms``).

    ``x``: the layer's input ``[batch, seq, hidden]``; ``attn``: ``[batch, seq, heads, head_dim]``.
    """
    batch, seq, _ = x.shape
    out = _linear(attn.reshape(batch, seq, -1), layer, "wo", "bo")
    if config.post_norms:
        out = norm(config, layer, "attn_post_norm", out)
    x = x + out
    h = norm(config, layer, "mlp_norm", x) if config.pre_norms else x
    out = mlp(config, layer, h)
    if config.post_norms:
        out = norm(config, layer, "mlp_post_norm", out)
    return x + out


def final_logits(config: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """Final norm, LM head and optional soft-capping: ``float32[batch, seq, vocab]``."""
    x = norm(config, params, "final_norm", x)
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("btd,vd->btv", x, head, preferred_element_type=jnp.float32)
    if config.final_logit_softcap is not None:
        logits = soft_cap(logits, config.final_logit_softcap)
    return logits


def forward(config: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array,
            cache: KVCache | None = None, *, attention: AttentionPlan | None = None
            ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder on a block of tokens.

    Args:
      config: the model's shape and behaviour.
      params: the parameter pytree (``kvjax.params``).
      tokens: ``int32[batch, seq]``.
      positions: ``int32[batch, seq]``, each token's position in its sequence; ``-1``
        marks padding (after the real tokens of a row).
      cache: a ``KVCache`` to write the new keys/values into and attend over, or
        ``None`` to attend within ``tokens`` only (the recompute baseline).
      attention: static; how each layer attends (``kvjax.attention.choose``: whether the
        cache starts empty, a key limit, cuDNN or XLA, the decode kernel and its split
        over a mesh). None: ``choose``'s defaults for this dtype and cache.

    Returns:
      ``(logits, cache)``, the cache with the block written and its lengths advanced.
      ``logits``: ``float32[batch, seq, vocab]``, except for a block of several tokens
      written to a cache (a prefill), where only each row's last real token's logits
      are computed: ``float32[batch, 1, vocab]`` (the decode loop needs no others, and a
      ``[batch, seq, vocab]`` float32 array is the largest of a long prefill).
    """
    if attention is None:
        attention = choose(config, params["embed"].dtype, use_cache=cache is not None,
                           kv_dtype=cache_kv_dtype(cache))
    x = embed(config, params, tokens, positions)  # [batch, seq, hidden]
    # A batch-1 decode step runs its layers on two rows, the second all zeros at first
    # (and finite after: every op but attention is row-wise), so each product is a GEMM:
    # XLA:GPU rewrites a vector-matrix product with a weight under 10M elements into
    # multiply + reduce, which read an [in, out] weight at 60% of the bandwidth of a
    # GEMM on an H200; one concatenation a layer, before wo, keeps every product a GEMM
    # and still reads each weight once. Attention and the cache see the real row only.
    # 1B shape on an H100: 1.5-2.7% shorter steps; 8B: no change (docs/experiments.md).
    spare_row = x.shape[0] * x.shape[1] == 1
    if spare_row:
        x = _add_spare_row(x)  # [2, 1, hidden]
    max_length = tokens.shape[1] if cache is None else cache.capacity
    tables = layer_rope_tables(config, positions, max_length)
    slots = [None if cache is None else cache.layer_slots(i) for i in range(config.num_layers)]
    sink_tables = _sink_rope_tables(config, slots, positions, max_length)
    for index, layer in enumerate(params["layers"]):
        if index and tokens.shape[1] > 1:
            # Ties a layer's weights to its input: XLA:GPU then schedules a block's layers
            # in order, each reading its weights when it runs; a prefill measured 1-3%
            # slower without it (docs/architecture.md §6). No work at run time.
            x, layer = jax.lax.optimization_barrier((x, layer))
        layer_cache = None if cache is None else cache.layer(index)
        x, layer_cache = _layer(config, attention.layers[index], slots[index], spare_row, layer,
                                x, *tables[index], *sink_tables[index], layer_cache, positions)
        if cache is not None:
            cache = cache.with_layer(index, layer_cache)
    if spare_row:
        x = x[:1]
    if cache is not None:
        cache = cache.advance(positions)
        if tokens.shape[1] > 1:
            last = jnp.argmax(positions, axis=1)  # each row's last real token (padding is -1)
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [batch, 1, hidden]
    return final_logits(config, params, x), cache


def _sink_rope_tables(config: ModelConfig, slots: list, positions: jax.Array,
                      max_length: int) -> list[tuple[jax.Array | None, jax.Array | None]]:
    """Per layer, the rope tables of the queries that score streaming's sinks
    (``kvjax.attention.ring``): at ``min(position, sinks + window - 1)``; ``(None,
    None)`` for layers without sinks."""
    has_sinks = [isinstance(s, LayerSlots) and s.sinks > 0 for s in slots]
    if not any(has_sinks):
        return [(None, None)] * config.num_layers
    first = slots[has_sinks.index(True)]  # every streaming layer's sinks and window
    tables = layer_rope_tables(config, jnp.minimum(positions, first.sinks + first.window - 1),
                               max_length)
    return [table if sinks else (None, None) for table, sinks in zip(tables, has_sinks)]


def forward_parts(config: ModelConfig, params: dict, parts: Sequence[tuple[jax.Array, jax.Array]],
                  cache: PagedKVCache, *, attention: AttentionPlan
                  ) -> tuple[list[jax.Array], PagedKVCache]:
    """Several blocks of rows of one paged pool in one pass over the weights: e.g. a
    decode step of some rows (``[rows, 1]``) and prompt chunks of others (``[rows,
    width]``), whose tokens then share every product with a weight (the weights are
    read once, not once per block). Each block writes and attends as ``forward`` would
    run it alone: the blocks hold different rows, and a row reads only its own table's
    blocks (``kvjax.attention.attend_pool_blocks``).

    Args:
      parts: ``(tokens, positions)`` per block, each ``int32[rows_i, width_i]``
        (positions ``-1``: padding, which writes nothing).
      cache: the pool, its tables and lengths holding the blocks' rows in order
        (``sum(rows_i)`` rows).
      attention: static; ``choose``'s plan for a cache that is not fresh.

    Returns:
      ``(logits, cache)``: per block ``float32[rows_i, vocab]``, each row's logits at
      its last real token; the cache with the blocks written and its lengths advanced.
    """
    shapes = tuple(tokens.shape for tokens, _ in parts)
    flat = lambda arrays: jnp.concatenate([a.reshape(1, -1) for a in arrays], axis=1)
    tokens, positions = flat([t for t, _ in parts]), flat([p for _, p in parts])  # [1, all]
    block_positions = tuple(p for _, p in parts)
    x = embed(config, params, tokens, positions)  # [1, all, hidden]
    tables = layer_rope_tables(config, positions, cache.capacity)
    for index, layer in enumerate(params["layers"]):
        if index:  # as in forward: each layer reads its weights when it runs
            x, layer = jax.lax.optimization_barrier((x, layer))
        x, layer_cache = _layer(config, attention.layers[index], cache.layer_slots(index), False,
                                layer, x, *tables[index], None, None, cache.layer(index),
                                block_positions, shapes)
        cache = cache.with_layer(index, layer_cache)
    lengths, last, at, row = [], [], 0, 0
    for (rows, width), block in zip(shapes, block_positions):
        lengths.append(advanced_lengths(cache.lengths[row:row + rows], block))
        picked = jnp.argmax(block, axis=1)  # each row's last real token (padding is -1)
        last.append(x[0, at + picked + width * jnp.arange(rows)])  # [rows, hidden]
        at, row = at + rows * width, row + rows
    logits = final_logits(config, params, jnp.concatenate(last)[:, None])[:, 0]  # [all rows, vocab]
    ends = np.cumsum([rows for rows, _ in shapes])[:-1]
    return jnp.split(logits, ends), cache.replace(lengths=jnp.concatenate(lengths))


def _attend_parts(config: ModelConfig, attention: LayerAttention, q: jax.Array, k: jax.Array,
                  v: jax.Array, layer_cache: tuple, positions: tuple[jax.Array, ...],
                  shapes: tuple[tuple[int, int], ...]) -> tuple[jax.Array, tuple]:
    """The blocks of ``forward_parts`` attending over their pool
    (``kvjax.attention.attend_pool_blocks``): ``q``, ``k``, ``v`` (``[1, all, heads,
    head_dim]``) cut into the blocks' ``[rows, width, ...]``, the outputs joined again."""
    ends = np.cumsum([rows * width for rows, width in shapes])
    cut = lambda a: [part.reshape(rows, width, *a.shape[2:]) for part, (rows, width)
                     in zip(jnp.split(a[0], ends[:-1]), shapes)]
    outs, layer_cache = attend_pool_blocks(config, attention,
                                           list(zip(cut(q), cut(k), cut(v), positions)),
                                           layer_cache)
    return jnp.concatenate([out.reshape(1, -1, *out.shape[2:]) for out in outs], axis=1), layer_cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 12))
def _layer(config: ModelConfig, attention: LayerAttention, slots: LayerSlots | None,
           spare_row: bool, layer: dict, x: jax.Array, cos: jax.Array | None,
           sin: jax.Array | None, sink_cos: jax.Array | None, sink_sin: jax.Array | None,
           layer_cache: tuple | None, positions: jax.Array,
           shapes: tuple[tuple[int, int], ...] | None = None) -> tuple[jax.Array, tuple | None]:
    """One decoder layer on ``x`` (``[batch, seq, hidden]``; with ``spare_row``, a
    batch-1 step's real row and ``forward``'s spare row): attention as ``attention``
    says, written to and read from this layer's part of the cache (``Cache.layer``:
    ``(keys, values)`` buffers ``[batch, kv_heads, capacity, head_dim]``, with scales
    for a quantized cache; None without a cache; ``slots``: its ring buffer, and
    ``sink_cos``/``sink_sin`` the rope tables of its sinks' queries), then the MLP.
    With ``shapes``, ``x`` is ``[1, all, hidden]``, the blocks of ``forward_parts``
    (``(rows, width)`` each, ``positions`` theirs) one after another. Returns ``(x,
    layer_cache)``.

    A program of its own (a nested ``jit``, which XLA inlines): layers with the same
    attention and shapes are traced and lowered once, not once each. A whole
    generation of the Llama-3.1-8B shape then lowers in 0.4-0.5 s instead of 3.2-3.9 s
    on an H100's host and compiles in 10.3-10.9 s instead of 14.7-14.9 s, with the same
    step times (docs/experiments.md)."""
    unrotated, k, v = unrotated_qkv(config, layer, x)
    q, k = rotate(config, unrotated, cos, sin), rotate(config, k, cos, sin)
    sink_queries = None if sink_cos is None else rotate(config, unrotated, sink_cos, sink_sin)
    if spare_row:
        q, k, v = q[:1], k[:1], v[:1]
        sink_queries = None if sink_queries is None else sink_queries[:1]
    if shapes is not None:
        attn, layer_cache = _attend_parts(config, attention, q, k, v, layer_cache, positions,
                                          shapes)
    else:
        attn, layer_cache = attend_layer(config, attention, q, k, v, layer_cache, positions,
                                         slots, sink_queries)
    x = finish_layer(config, layer, x, _add_spare_row(attn) if spare_row else attn)
    return x, layer_cache


def cache_kv_dtype(cache) -> str | None:
    """What ``cache`` stores, as a ``kv_dtype`` (None without a cache)."""
    return None if cache is None else layer_kv_dtype(cache.keys)


def step_fn(config: ModelConfig, *, attention: AttentionPlan | None = None,
            fresh: bool = False, key_limit: int | None = None,
            decode_kernel: bool | None = None, kernel_split: MeshSplit | None = None):
    """``forward`` bound to a config and an ``AttentionPlan``: the
    ``step_fn(params, tokens, positions, cache)`` that ``kvjax.decode`` drives.

    Without ``attention`` the plan is chosen when the step is traced, from the cache's
    dtype and ``fresh``, ``key_limit``, ``decode_kernel`` and ``kernel_split``
    (``kvjax.attention.choose``'s arguments; the older spelling of the plan).
    """
    if attention is not None:
        return functools.partial(forward, config, attention=attention)

    def step(params, tokens, positions, cache):
        plan = choose(config, params["embed"].dtype, use_cache=cache is not None, fresh=fresh,
                      key_limit=key_limit, decode_kernel=decode_kernel,
                      kernel_split=kernel_split, kv_dtype=cache_kv_dtype(cache))
        return forward(config, params, tokens, positions, cache, attention=plan)

    return step


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
