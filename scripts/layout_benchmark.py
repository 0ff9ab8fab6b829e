#!/usr/bin/env python
"""Decode speed (ms per decode step) of alternative KV-cache layouts and layer loops.

Every variant runs the same ``kvjax.decode.decode`` loop (prefill, then a
``lax.while_loop`` of one-token steps, greedy), jitted with the cache donated as
``kvjax.api._jitted_decode`` does. Only the step function's cache layout and its loop
over layers differ; the maths reuse kvjax's building blocks (``rms_norm``,
``rope_tables``/``apply_rope``, ``attend``/``attention_mask``, ``write_rows``).

Variants (kvjax's own cache is per layer and heads-major, ``[batch, kv_heads,
capacity, head_dim]``; see kvjax/cache.py):

  A  kvjax           the library as is: ``kvjax.api._jitted_decode`` (``model.step_fn``,
                     ``KVCache``: a tuple of per-layer heads-major buffers, Python loop
                     over layers, i.e. layers unrolled in the program).
  B  stacked-scan    one stacked buffer ``[layers, batch, kv_heads, capacity, head_dim]``
                     each for keys and values, parameters stacked over layers and a
                     ``lax.scan`` over layers. The stacked cache is carried through the
                     scan and the new rows are scattered into ``[layer, row, :, slot, :]``
                     in place (``write_rows`` cannot address one layer of a stacked
                     buffer; the scatter writes the same slots). Attention reads the
                     layer with ``lax.dynamic_index_in_dim``.
  C  seq-major       per-layer buffers (Python loop, as A) laid out
                     ``[batch, capacity, kv_heads, head_dim]``: keys/values are written
                     untransposed and the attention einsums contract ``bskd``.

B and C differ from A in one respect each (loop/stacking; within-layer layout), so
together they are the measurements behind kvjax's two layout choices.

Timing: each variant's program is compiled once for ``num_steps = N`` (the ``--new``
value); run (a) passes ``max_new_tokens = 1`` (prefill + first token, no decode step)
and run (b) ``max_new_tokens = N`` (prefill + N - 1 decode steps) to the same compiled
program; ms/step = (median(b) - median(a)) / (N - 1). Each program is warmed up once
per run kind, then timed ``--reps`` times (default 3), with ``jax.block_until_ready``.
No stop tokens are set, so every row runs all N - 1 steps (checked).

MBU (model bandwidth utilisation) = bytes read per decode step / step time / HBM
bandwidth. Bytes per step: all parameter bytes (a tied embedding counted once, as the
LM head reads it; an untied embedding counts only the ``batch`` rows looked up) plus
the filled KV bytes at the average fill ``2 * layers * batch * (prompt + new / 2) *
kv_heads * head_dim * itemsize``. HBM bandwidth is measured in the same run: a jitted
``jnp.sum`` over a bf16 array of ``--hbm-gib`` GiB (default 4 on GPU, 0.25 on CPU),
median of 5. (kvjax's attention reads all ``capacity`` slots, masked, so the JSON also
holds ``kv_bytes_capacity`` and ``mbu_full_capacity``.)

Parameters and cache are bfloat16 unless ``--dtype float32``.

Before timing, a correctness check runs every selected variant on a tiny float32 model
(ragged prompts, a cache larger than needed, matmul precision "highest") and asserts
that all produce identical greedy tokens.

Usage::

    python scripts/layout_benchmark.py --config tiny --batch 1 2 --prompt 16 --new 8
    python scripts/layout_benchmark.py --config llama-1b --batch 1 16 --json out/1b.json
    python scripts/layout_benchmark.py --config llama-8b --batch 1 --json out/8b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import struct  # noqa: E402

import kvjax  # noqa: E402
from kvjax.api import MAX_STOP_TOKENS, _PREFILL_CLOCK, _jitted_decode  # noqa: E402
from kvjax.attention import attend, attention_mask  # noqa: E402
from kvjax.cache import KVCache, advanced_lengths, write_rows  # noqa: E402
from kvjax.config import ModelConfig  # noqa: E402
from kvjax.decode import jit_decode  # noqa: E402
from kvjax.model import final_logits, finish_layer, qkv_projection  # noqa: E402
from kvjax.rope import rope_tables  # noqa: E402
from kvjax.sampling import SamplingParams  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as lib  # noqa: E402  (scripts/, next to this file)

# CPU has no buffer donation; the warning would repeat on every call.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

_MASKED = -1e30  # as kvjax.attention

# A test-sized shape; "llama-1b" and "llama-8b" are the Llama shapes of configs/
# (bench_lib.LLAMA_SHAPES).
TINY = ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=4096)


def _key_positions(batch: int, capacity: int):
    return jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))


# ----------------------------------------------------------------------------------------
# B / D: stacked cache, scan over layers
# ----------------------------------------------------------------------------------------

@struct.dataclass
class StackedCache:
    keys: jax.Array  # [layers, batch, kv_heads, capacity, head_dim]
    values: jax.Array
    lengths: jax.Array  # int32[batch]

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int, dtype) -> "StackedCache":
        shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))


def stack_params(params: dict) -> dict:
    """Parameters with ``layers`` one dict of ``[layers, ...]`` arrays."""
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = jax.tree.map(lambda *x: jnp.stack(x), *params["layers"])
    return out


def _scatter_layer_rows(buffer, layer, block, positions):
    """Writes ``block`` ``[batch, kv_heads, new, head_dim]`` into ``buffer[layer]``
    (``[layers, batch, kv_heads, capacity, head_dim]``) from slot ``positions[b, 0]``
    on, per row: the slots ``write_rows`` would write, without touching the rest."""
    batch, _, new, _ = block.shape
    start = jnp.maximum(positions[:, 0], 0)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]  # [batch, 1]
    slots = start[:, None] + jnp.arange(new, dtype=jnp.int32)[None, :]  # [batch, new]
    # Advanced indices split by a slice: the indexed shape is [batch, new, kv_heads, head_dim].
    return buffer.at[layer, rows, :, slots, :].set(
        block.transpose(0, 2, 1, 3).astype(buffer.dtype),
        indices_are_sorted=True, unique_indices=True)


def stacked_scan_forward(config: ModelConfig, params: dict, tokens, positions,
                         cache: StackedCache):
    """B: stacked cache carried through a ``lax.scan`` over layers, written in place."""
    batch = tokens.shape[0]
    capacity = cache.keys.shape[3]
    x = params["embed"][tokens]
    cos, sin = rope_tables(config, positions)
    key_positions = _key_positions(batch, capacity)

    def body(carry, xs):
        x, keys, values = carry
        layer, index = xs
        q, k, v = qkv_projection(config, layer, x, cos, sin)
        keys = _scatter_layer_rows(keys, index, k.transpose(0, 2, 1, 3), positions)
        values = _scatter_layer_rows(values, index, v.transpose(0, 2, 1, 3), positions)
        layer_keys = jax.lax.dynamic_index_in_dim(keys, index, 0, keepdims=False)
        layer_values = jax.lax.dynamic_index_in_dim(values, index, 0, keepdims=False)
        attn = attend(q, layer_keys, layer_values, positions, key_positions,
                      config.sliding_window)
        return (finish_layer(config, layer, x, attn), keys, values), None

    indices = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x, keys, values), _ = jax.lax.scan(body, (x, cache.keys, cache.values),
                                        (params["layers"], indices))
    cache = StackedCache(keys=keys, values=values,
                         lengths=advanced_lengths(cache.lengths, positions))
    return final_logits(config, params, x), cache


# ----------------------------------------------------------------------------------------
# C: per-layer, seq-major buffers
# ----------------------------------------------------------------------------------------

@struct.dataclass
class SeqMajorCache:
    keys: tuple  # per layer [batch, capacity, kv_heads, head_dim]
    values: tuple
    lengths: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int, dtype) -> "SeqMajorCache":
        shape = (batch, capacity, config.num_kv_heads, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(keys=zeros(), values=zeros(), lengths=jnp.zeros((batch,), jnp.int32))


def attend_seq_major(queries, keys, values, query_positions, key_positions,
                     sliding_window=None):
    """``kvjax.attention.attend`` for keys/values ``[batch, keys, kv_heads, head_dim]``."""
    batch, num_queries, heads, head_dim = queries.shape
    kv_heads = keys.shape[2]
    grouped = queries.reshape(batch, num_queries, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", grouped, keys,
                        preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    mask = attention_mask(query_positions, key_positions, sliding_window)[:, None, None]
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_queries, heads, head_dim).astype(queries.dtype)


def seq_major_forward(config: ModelConfig, params: dict, tokens, positions,
                      cache: SeqMajorCache):
    """C: Python loop over layers, per-layer ``[batch, capacity, kv_heads, head_dim]``."""
    batch = tokens.shape[0]
    capacity = cache.keys[0].shape[1]
    x = params["embed"][tokens]
    cos, sin = rope_tables(config, positions)
    key_positions = _key_positions(batch, capacity)
    keys, values = list(cache.keys), list(cache.values)
    for i, layer in enumerate(params["layers"]):
        q, k, v = qkv_projection(config, layer, x, cos, sin)
        keys[i] = write_rows(keys[i], k, positions, seq_axis=1)
        values[i] = write_rows(values[i], v, positions, seq_axis=1)
        attn = attend_seq_major(q, keys[i], values[i], positions, key_positions,
                                config.sliding_window)
        x = finish_layer(config, layer, x, attn)
    cache = SeqMajorCache(keys=tuple(keys), values=tuple(values),
                          lengths=advanced_lengths(cache.lengths, positions))
    return final_logits(config, params, x), cache


# ----------------------------------------------------------------------------------------
# Variants and their decode programs
# ----------------------------------------------------------------------------------------

def make_program(step, num_steps: int, return_logits: bool):
    """A decode program built as ``kvjax.api._jitted_decode`` builds kvjax's own."""
    return jit_decode(step, num_steps=num_steps, greedy=True, return_logits=return_logits,
                      on_prefill=_PREFILL_CLOCK)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    prepare_params: Callable[[dict], dict]
    create_cache: Callable[[ModelConfig, int, int, Any], Any]
    program: Callable[[ModelConfig, int, bool], Any]  # (config, num_steps, return_logits)


VARIANTS = {
    "A": Variant("kvjax", lambda p: p,
                 lambda c, b, cap, dt: KVCache.create(c, b, cap, dt),
                 lambda c, n, rl: _jitted_decode(c, True, n, True, rl, None)),
    "B": Variant("stacked-scan", stack_params, StackedCache.create,
                 lambda c, n, rl: make_program(functools.partial(stacked_scan_forward, c), n, rl)),
    "C": Variant("seq-major", lambda p: p, SeqMajorCache.create,
                 lambda c, n, rl: make_program(functools.partial(seq_major_forward, c), n, rl)),
}


def _no_stops():
    return np.full((MAX_STOP_TOKENS,), kvjax.PAD_TOKEN, np.int32)


# ----------------------------------------------------------------------------------------
# Correctness check
# ----------------------------------------------------------------------------------------

def check_variants(variant_keys: list[str]) -> None:
    """All variants give the same greedy tokens on a tiny float32 model (asserts)."""
    config = dataclasses.replace(TINY, vocab_size=97, hidden_size=32,
                                 intermediate_size=64, num_layers=3, head_dim=8)
    # Weights scaled up from N(0, 0.02) so logits are far from ties (as tests/conftest.py).
    params = kvjax.init_params(config, jax.random.key(1), jnp.float32)
    params = jax.tree.map(lambda x: x if x.ndim == 1 else x * 5.0, params)
    batch, prompt_bucket, num_steps, capacity = 3, 12, 10, 32
    rng = np.random.default_rng(1)
    prompt_tokens = rng.integers(0, config.vocab_size, (batch, prompt_bucket)).astype(np.int32)
    prompt_lengths = np.array([12, 7, 1], np.int32)  # ragged; padding after each row
    results = {}
    with jax.default_matmul_precision("highest"):
        for key in variant_keys:
            variant = VARIANTS[key]
            program = variant.program(config, num_steps, True)
            out = program(variant.prepare_params(params),
                          variant.create_cache(config, batch, capacity, jnp.float32),
                          prompt_tokens, prompt_lengths, np.int32(num_steps),
                          SamplingParams.create(batch), np.uint32(0), _no_stops())
            results[key] = (np.asarray(out.tokens), np.asarray(out.logits),
                            np.asarray(out.cache.lengths))
            del out
    ref_key = variant_keys[0]
    ref_tokens, ref_logits, ref_lengths = results[ref_key]
    assert (ref_tokens >= 0).all(), f"reference {ref_key} stopped early: {ref_tokens}"
    for key in variant_keys[1:]:
        tokens, logits, lengths = results[key]
        diff = float(np.max(np.abs(logits - ref_logits)))
        print(f"  check {key} ({VARIANTS[key].name}) vs {ref_key}: tokens "
              f"{'equal' if np.array_equal(tokens, ref_tokens) else 'DIFFER'}, "
              f"max |logit diff| {diff:.2e}", flush=True)
        assert np.array_equal(tokens, ref_tokens), (
            f"variant {key} tokens differ from {ref_key}:\n{tokens}\nvs\n{ref_tokens}")
        assert np.array_equal(lengths, ref_lengths), (key, lengths, ref_lengths)
    print(f"check OK: variants {' '.join(variant_keys)} give identical greedy tokens "
          f"(tiny float32 model, batch {batch}, ragged prompts, {num_steps} new tokens)",
          flush=True)


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------

def run_case(config: ModelConfig, params: dict, key: str, batch: int, prompt: int, new: int,
             capacity: int, reps: int, dtype, label: str) -> dict:
    variant = VARIANTS[key]
    vparams = variant.prepare_params(params)
    program = variant.program(config, new, False)
    rng = np.random.default_rng(0)
    prompt_tokens = rng.integers(0, config.vocab_size, (batch, prompt)).astype(np.int32)
    prompt_lengths = np.full((batch,), prompt, np.int32)
    sampling = SamplingParams.create(batch)
    stops = _no_stops()

    def args(max_new):
        cache = variant.create_cache(config, batch, capacity, dtype)
        jax.block_until_ready(cache)
        return [vparams, cache, prompt_tokens, prompt_lengths, np.int32(max_new), sampling,
                np.uint32(0), stops]

    print(f"{label} compiling ...", flush=True)
    a = args(new)
    start = time.perf_counter()
    compiled = program.lower(*a).compile()
    compile_s = time.perf_counter() - start
    del a
    print(f"{label} compiled in {compile_s:.1f} s", flush=True)

    def timed(max_new):
        a = args(max_new)
        start = time.perf_counter()
        out = compiled(*a)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        steps = int(out.steps_run)
        del out, a
        if steps != max_new - 1:
            raise RuntimeError(f"expected {max_new - 1} decode steps, ran {steps}")
        return elapsed

    timed(1), timed(new)  # warm-up
    first, full = [], []
    for _ in range(reps):
        first.append(timed(1))
        full.append(timed(new))
    del compiled, vparams
    t_a, t_b = statistics.median(first), statistics.median(full)
    step_s = (t_b - t_a) / (new - 1)
    print(f"{label} prefill+first {t_a * 1e3:.2f} ms, total {t_b * 1e3:.2f} ms, "
          f"{step_s * 1e3:.3f} ms/step", flush=True)
    return {"compile_s": compile_s, "t_first_s": t_a, "t_total_s": t_b,
            "t_first_runs_s": first, "t_total_runs_s": full, "step_s": step_s,
            "ms_per_step": step_s * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("tiny", *lib.LLAMA_SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=256, help="new tokens per row (>= 2)")
    parser.add_argument("--capacity", type=int, default=None,
                        help="cache slots per row (default prompt + new)")
    parser.add_argument("--variants", nargs="+", default=["A", "B", "C"],
                        choices=sorted(VARIANTS), help="A kvjax, B stacked-scan, C seq-major")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="size of the bandwidth probe (default 4 on GPU, 0.25 on CPU)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--json", default=None, help="write the records here (after each case)")
    parser.add_argument("--append", action="store_true",
                        help="add to the records already in --json instead of replacing them")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="parameters and cache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be >= 2 (ms/step needs at least one decode step)")
    capacity = args.capacity or args.prompt + args.new
    if capacity < args.prompt + args.new:
        parser.error(f"--capacity must be >= prompt + new = {args.prompt + args.new}")
    variants = list(dict.fromkeys(args.variants))

    device = jax.devices()[0]
    meta = {"device": device.device_kind, "platform": device.platform,
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "argv": sys.argv[1:]}
    print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"config {args.config}, batch {args.batch}, prompt {args.prompt}, new {args.new}, "
          f"capacity {capacity}, variants {variants}", flush=True)

    records = []
    if args.json and args.append and os.path.exists(args.json):
        with open(args.json) as f:
            records = json.load(f)

    def save():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)

    if not args.skip_check:
        check_variants(variants)

    gib = args.hbm_gib if args.hbm_gib is not None else (4.0 if device.platform == "gpu" else 0.25)
    hbm = lib.measure_hbm_bandwidth(gib)
    meta |= {"hbm_bytes_per_s": hbm, "hbm_probe_gib": gib}
    print(f"measured HBM read bandwidth: {hbm / 1e9:.1f} GB/s ({gib:g} GiB jnp.sum, median of 5)",
          flush=True)

    config = TINY if args.config == "tiny" else lib.model_config(args.config)
    dtype_name = args.dtype
    dtype = jnp.dtype(dtype_name)
    start = time.perf_counter()
    params = kvjax.init_params(config, jax.random.key(args.seed), dtype)
    jax.block_until_ready(params)
    print(f"params: {lib.nbytes(params) / 2 ** 30:.2f} GiB {dtype_name}, init {time.perf_counter() - start:.1f} s",
          flush=True)

    new_records = []
    for batch in args.batch:
        for key in variants:
            label = f"[{args.config} B={batch} {key}:{VARIANTS[key].name}]"
            record = dict(meta, config=args.config, variant=key,
                          variant_name=VARIANTS[key].name, batch=batch, prompt=args.prompt,
                          new=args.new, capacity=capacity, dtype=dtype_name, reps=args.reps)
            record |= lib.bytes_per_step(config, params, batch, args.prompt, args.new, capacity,
                                     jnp.dtype(dtype).itemsize)
            try:
                result = run_case(config, params, key, batch, args.prompt, args.new, capacity,
                                  args.reps, dtype, label)
                step_s = result["step_s"]
                read = record["param_bytes_read"]
                record |= result
                record |= {
                    "status": "ok",
                    "tokens_per_s": batch / step_s,
                    "bytes_per_step": read + record["kv_bytes_avg_fill"],
                    "mbu": (read + record["kv_bytes_avg_fill"]) / step_s / hbm,
                    "mbu_full_capacity": (read + record["kv_bytes_capacity"]) / step_s / hbm,
                }
            except Exception as e:  # noqa: BLE001 - one failing case must not stop the rest
                print(f"{label} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                traceback.print_exc()
                record |= {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            gc.collect()
            records.append(record)
            new_records.append(record)
            save()

    del params
    gc.collect()
    print()
    print(f"{args.config} ({dtype_name}) on {device.device_kind}, prompt {args.prompt}, "
          f"new {args.new}, capacity {capacity}, HBM {hbm / 1e9:.0f} GB/s measured")
    header = f"{'variant':<20} {'batch':>5} {'ms/step':>9} {'tokens/s':>10} {'MBU':>6} {'compile_s':>9}"
    print(header)
    print("-" * len(header))
    for r in new_records:
        name = f"{r['variant']} {r['variant_name']}"
        if r["status"] == "ok":
            print(f"{name:<20} {r['batch']:>5} {r['ms_per_step']:>9.3f} {r['tokens_per_s']:>10.1f} "
                  f"{r['mbu']:>6.1%} {r['compile_s']:>9.1f}")
        else:
            print(f"{name:<20} {r['batch']:>5} {'FAILED':>9}  {r['error'][:60]}")
    if args.json:
        print(f"records written to {args.json}")
    return 0 if all(r["status"] == "ok" for r in new_records) else 1


if __name__ == "__main__":
    sys.exit(main())
