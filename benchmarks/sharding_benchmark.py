#!/usr/bin/env python
"""Decode speed of one generation spread over a device mesh (kvjax.sharding).

Default: a Llama-3.1-8B-shaped model (random bf16 weights: vocab 128256, hidden 4096,
intermediate 14336, 32 layers, 32 heads over 8 KV heads, head_dim 128), prompt 512 +
128 new tokens, greedy, on two devices:

* tensor parallelism at batch 1: mesh data=1 x model=1 (one device) against model=2,
  with the default partition table and with attention whole on each device
  (``heads=none,kv_heads=none``: one all-reduce a layer);
* data parallelism at batch 32: data=1 x model=1 against data=2.

Every figure is measured in the run that prints it. Weights are drawn directly onto
each mesh (jitted random draws of ``kvjax.params.specs``' shapes with
``out_shardings=param_shardings(...)``: no device ever holds more than its shard), the
cache is created sharded, and the program is ``kvjax.generate``'s
(``kvjax.programs.generation_program`` of the model on its mesh: its fresh prefill,
groups of decode steps and the decode kernel where the mesh splits it) compiled once
per (mesh, batch). ms/step = (median time of a run
of ``--new`` tokens - median time of a 1-token run) / (new - 1): the same compiled
program, so prefill, dispatch and read-back cancel. ``prefill_ms`` is the 1-token run.
``agree`` is the fraction of greedy tokens equal to the first run of the same batch,
``agree_first`` the same for each row's first new token: with random bf16 weights the
logits have many near-ties, and sums in another order (a split contraction, or GEMM
kernels picked for another batch size) flip some, after which a row diverges; float32
with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` is the exactness check.

Usage::

    python benchmarks/sharding_benchmark.py                    # 2 GPUs, a few minutes
    python benchmarks/sharding_benchmark.py --runs 1:1x1 1:1x2 1:1x4 32:1x1 32:4x1
    python benchmarks/sharding_benchmark.py --runs 1:1x1 --profile   # one GPU's step by kernel kind
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/sharding_benchmark.py --shape tiny --prompt 32 --new 16 \\
        --runs 1:1x1 1:1x2 8:1x1 8:2x1 8:2x4      # CPU smoke test, seconds

``--profile`` also traces each run and records where a decode step's time goes on the
first device (``step_profile``: matmuls, attention, collectives, copies, other kernels,
busy, span and idle; ``bench_lib.KINDS`` sorts the kernels by name).

A run is ``BATCH:DATAxMODEL`` or ``BATCH:DATAxMODEL:RULES`` (other ``ShardingRules``
in ``kvjax.sharding.parse_rules``'s text, e.g. ``1:1x2:heads=none,kv_heads=none``).
Results: a table on stdout and a JSON list of records
(``--json``, default ``benchmarks/results/sharding-<device>-<date>.json`` in the repository).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
import kvjax.params
import kvjax.programs
import kvjax.requests
from kvjax import sharding

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as lib  # noqa: E402  (benchmarks/, next to this file)

# A test-sized shape (8 query heads over 2 KV heads, so model=4 and 8 replicate KV
# heads); "llama-8b" and "llama-1b" are the Llama shapes of configs/ (bench_lib).
TINY = kvjax.ModelConfig(model_type="llama", vocab_size=512, hidden_size=128,
                         intermediate_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                         head_dim=16, max_position_embeddings=4096)
SHAPES = ("tiny", *lib.LLAMA_SHAPES)
DEFAULT_RUNS = ["1:1x1", "1:1x2", "1:1x2:heads=none,kv_heads=none", "32:1x1", "32:2x1"]


def parse_run(text: str) -> tuple[int, int, int, str]:
    """``BATCH:DATAxMODEL[:RULES]``, RULES as ``kvjax.sharding.parse_rules`` reads them."""
    m = re.fullmatch(r"(\d+):(\d+)x(\d+)(?::(.+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"a run is BATCH:DATAxMODEL[:RULES] (e.g. 32:2x1 or 1:1x2:heads=none,kv_heads=none), "
            f"got {text!r}")
    try:
        sharding.parse_rules(m.group(4) or "")
    except sharding.ShardingError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) or ""


def sharded_params(config, mesh, dtype, rules=sharding.DEFAULT_RULES):
    """Random params of ``kvjax.params.specs(config)`` (norms the identity scale, the
    rest N(0, 0.02), as ``init_params``) drawn directly onto their shardings: no device
    holds more than its shard, and the values do not depend on the mesh (threefry is
    partitionable). One small program per distinct (kind, shape, sharding), reused for
    every layer: far faster to compile than one program for the whole 8B tree."""
    shardings = sharding.param_shardings(config, mesh, rules)
    makers: dict = {}
    counter = iter(range(1 << 30))

    def make(spec, placement):
        shape = tuple(spec.shape)
        norm = spec.init == kvjax.params.NORM
        key = (norm, shape, placement)
        if key not in makers:
            if norm:
                fn = lambda k, shape=shape: jnp.full(shape, 1.0 - config.norm_offset, dtype)
            else:
                fn = lambda k, shape=shape: (0.02 * jax.random.normal(k, shape, jnp.float32)
                                             ).astype(dtype)
            makers[key] = jax.jit(fn, out_shardings=placement)
        return makers[key](jax.random.fold_in(jax.random.key(0), next(counter)))

    params = jax.tree.map(make, kvjax.params.specs(config), shardings,
                          is_leaf=lambda x: isinstance(x, kvjax.params.ParamSpec))
    jax.block_until_ready(params)
    return params


def collectives(hlo: str) -> dict:
    """How many collectives of each kind the compiled program holds (prefill and loop)."""
    kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    return {k: len(re.findall(rf" {k}(?:-start)?\(", hlo)) for k in kinds}


def gib(n: int) -> float:
    return n / 2 ** 30


def peak_device_memory() -> float | None:
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return gib(max(peaks)) if peaks and None not in peaks else None


def step_profile(once, new: int) -> dict:
    """Where a decode step's time goes on the first device: milliseconds per step by
    kernel kind (``bench_lib.KINDS``: matmul, attention, collective, copy, other),
    busy, span and idle. One trace of a throwaway 1-token run, a 1-token run and a
    ``new``-token run (``bench_lib.traced_runs``); a step is (``new``-token run -
    1-token run) / (``new`` - 1)."""
    _, one, many = (lib.kernel_ms_by_kind(run) for run in lib.traced_runs(once, (1, 1, new)))
    return {f"{k}_ms": ms for k, ms in lib.per_step(one, many, new).items()}


def measure(config, params, mesh, rules, batch: int, args) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(batch)
    prompt = rng.integers(3, config.vocab_size, size=(batch, args.prompt)).astype(np.int32)
    lengths = np.full((batch,), args.prompt, np.int32)
    capacity = args.prompt + args.new
    controls = (kvjax.SamplingParams.create(batch), np.uint32(0),
                np.full((kvjax.requests.MAX_STOP_TOKENS,), -1, np.int32))
    limits = lambda n: np.full((batch,), n, np.int32)  # max_new_tokens of each row
    # The params are already placed by ``rules``: shard_model moves nothing, it records
    # the mesh and rules that pick generate's program and the cache's placement.
    model = sharding.shard_model(kvjax.Model(config=config, params=params), mesh, rules)

    def new_cache():
        cache = kvjax.programs.new_cache(model, batch, capacity)  # created sharded
        jax.block_until_ready(cache)
        return cache

    # kvjax.generate's program for this model on this mesh: a fresh prefill, steps in
    # groups between done-checks, the decode kernel where the mesh splits it
    run = kvjax.programs.generation_program(
        model, num_steps=args.new, greedy=True,
        key_limit=kvjax.requests.fresh_key_limit(args.prompt, args.new, capacity))
    t0 = time.perf_counter()
    compiled = run.lower(params, new_cache(), prompt, lengths, limits(args.new),
                         *controls).compile()
    compile_s = time.perf_counter() - t0

    def once(n: int):
        cache = new_cache()  # donated: each run needs its own
        t = time.perf_counter()
        result = compiled(params, cache, prompt, lengths, limits(n), *controls)
        jax.block_until_ready(result.tokens)
        return time.perf_counter() - t, result

    _, result = once(args.new)  # warm-up
    tokens = sharding.to_host(result.tokens)
    del result
    once(1)
    full = statistics.median(once(args.new)[0] for _ in range(args.reps))
    one = statistics.median(once(1)[0] for _ in range(args.reps))
    step = (full - one) / (args.new - 1)
    cache = new_cache()
    row = dict(ms_per_step=step * 1e3, tokens_per_s=batch / step, prefill_ms=one * 1e3,
               compile_s=compile_s,
               params_gib_per_device=gib(max(sharding.bytes_per_device(params).values())),
               cache_gib_per_device=gib(max(sharding.bytes_per_device(cache).values())),
               cache_spec=str(cache.keys[0].sharding.spec),
               collectives=collectives(compiled.as_text()))
    if args.profile:
        del cache
        try:
            row["profile"] = step_profile(once, args.new)
        except RuntimeError as e:  # no device kernels to read (CPU): the timings stand
            row["profile"] = dict(failed=str(e))
    return row, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama-8b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS],
                        metavar="BATCH:DATAxMODEL[:RULES]",
                        help="RULES: kvjax.sharding.ShardingRules fields, e.g. "
                             "heads=none,kv_heads=none (default: DEFAULT_RULES)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also trace each run: a decode step's kernel time by kind on the "
                             "first device (GPU)")
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be >= 2")

    start = time.perf_counter()
    device = jax.devices()[0]
    dtype = jnp.dtype(args.dtype)
    config = TINY if args.shape == "tiny" else lib.model_config(args.shape)
    meta = dict(device=device.device_kind, platform=device.platform, devices=jax.device_count(),
                jax=jax.__version__, shape=args.shape, dtype=args.dtype, prompt=args.prompt,
                new=args.new, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"))
    print(f"# {json.dumps(meta)}", flush=True)

    # Runs on the same mesh share one set of params; one set is alive at a time.
    order = sorted(range(len(args.runs)), key=lambda i: (args.runs[i][1:], i))
    rows: list[dict] = [None] * len(args.runs)  # type: ignore[list-item]
    params, params_mesh = None, None
    for i in order:
        batch, data, model, rules_text = args.runs[i]
        rules = sharding.parse_rules(rules_text)
        row = dict(batch=batch, data=data, model=model, rules=rules_text)
        try:
            if params_mesh != (data, model, rules):
                params, params_mesh = None, None
                mesh = sharding.make_mesh(data=data, model=model)
                t0 = time.perf_counter()
                params = sharded_params(config, mesh, dtype, rules)
                params_mesh, init_s = (data, model, rules), time.perf_counter() - t0
            result, tokens = measure(config, params, mesh, rules, batch, args)
            row |= result | dict(init_s=init_s)
            row["_tokens"] = tokens
        except Exception as e:  # a failed run is recorded and the others go on
            row["failed"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        rows[i] = row
        label = f"{batch}:{data}x{model}" + (f":{rules_text}" if rules_text else "")
        print(f"# {label} done ({time.perf_counter() - start:.0f} s)", flush=True)
        if "profile" in row:
            print(f"# {label} profile per step: "
                  + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row["profile"].items()), flush=True)
    params = None

    # Speed-up and token agreement against the first run of the same batch.
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"])
        if "failed" in row or "failed" in base:
            continue
        row["speedup"] = base["ms_per_step"] / row["ms_per_step"]
        row["agree"] = float(np.mean(row["_tokens"] == base["_tokens"]))
        row["agree_first"] = float(np.mean(row["_tokens"][:, 0] == base["_tokens"][:, 0]))
    for row in rows:
        row.pop("_tokens", None)
    meta["peak_gib_per_device"] = peak_device_memory()
    meta["total_s"] = time.perf_counter() - start

    header = (f"{'batch':>5} {'data':>4} {'model':>5} {'ms/step':>8} {'tok/s':>9} {'speedup':>7} "
              f"{'prefill ms':>10} {'compile s':>9} {'params GiB/dev':>14} {'cache GiB/dev':>13} "
              f"{'agree':>5} {'first':>5} rules")
    print(header)
    for r in rows:
        if "failed" in r:
            print(f"{r['batch']:>5} {r['data']:>4} {r['model']:>5}  failed: {r['failed']} {r['rules']}")
            continue
        print(f"{r['batch']:>5} {r['data']:>4} {r['model']:>5} {r['ms_per_step']:>8.3f} "
              f"{r['tokens_per_s']:>9.1f} {r.get('speedup', float('nan')):>7.2f} "
              f"{r['prefill_ms']:>10.1f} {r['compile_s']:>9.1f} {r['params_gib_per_device']:>14.3f} "
              f"{r['cache_gib_per_device']:>13.3f} {r.get('agree', float('nan')):>5.2f} "
              f"{r.get('agree_first', float('nan')):>5.2f} {r['rules']}")
    print(f"# total {meta['total_s']:.0f} s, peak device memory "
          f"{meta['peak_gib_per_device'] if meta['peak_gib_per_device'] is None else round(meta['peak_gib_per_device'], 2)} GiB")

    path = args.json or os.path.join(
        lib.ROOT, "benchmarks", "results",
        f"sharding-{device.device_kind.replace(' ', '_')}-{meta['date'][:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump([meta | r for r in rows], f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"# wrote {path}")
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
