"""The decode kernel alone: one layer's decode step over contiguous and paged caches of
every KV dtype, at launch settings (``kvjax.kernels.decode_attention.Tuning``) to
choose from.

A point times one layer's step (``attend_and_write``, ``attend_and_write_quantized`` or
``attend_and_write_paged``) on Llama-3.1-8B's attention shape (32 query heads, 8 KV
heads, head_dim 128; ``--shape`` for another config), the cache donated and carried
through a ``fori_loop`` inside one program: per step = (t(n) - t(2)) / (n - 2), the
median of ``--reps``. Bytes read per step are the filled slots' keys and values (codes
and float32 scales for int8/fp8) of every row; ``of_bound`` divides the bandwidth they
give by the HBM bound measured in the same run (``bench_lib.measure_hbm_bandwidth``).

    python benchmarks/decode_kernel_sweep.py --json benchmarks/results/kernel_sweep_h200.json
    python benchmarks/decode_kernel_sweep.py --interpret --points 'B2 F100 C128'   # CPU check

``--sweep`` times every tuning of ``--block-slots`` x ``--warps`` x ``--stages`` x
``--programs`` for int8 at the first point, then the best ``--keep`` of them at every
point and kind beside the default (``default_tuning``); without it each point and kind
runs at its default tuning. ``--codes-as-float16`` times each tuning of an int8/fp8 kind
a second time with ``codes_as_float16`` flipped (the dots in float16 or not).

    python benchmarks/decode_kernel_sweep.py --codes-as-float16 --kinds int8 fp8 paged-int8

``--block-tokens N`` times a block of N tokens a row instead (a chat turn: positions
``filled - N`` to ``filled - 1``, already in the cache) through ``attend_cached_block``
(``attend_cached_block_paged`` for paged kinds), each tuning also at every
``--query-rows``, and with ``--portable`` through the portable path too
(``kvjax.attention.quantized.attend_cache``, ``kvjax.attention.plain.attend_cache`` or
``kvjax.attention.paged.attend_cache``; records say which in ``path``). Bytes read
are counted once per step, as if every tile shared one read of the cache.

    python benchmarks/decode_kernel_sweep.py --block-tokens 16 64 --query-rows 64 128 \
        --portable --kinds bfloat16 int8 fp8 --points "B8 F16384 C16448"
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_lib as lib  # noqa: E402
from kvjax.attention import paged, plain, quantized  # noqa: E402
from kvjax.cache.quantized import quantize  # noqa: E402
from kvjax.kernels import decode_attention as kernel  # noqa: E402

KINDS = ("bfloat16", "int8", "fp8", "paged-bfloat16", "paged-int8", "paged-fp8")


def parse_point(text: str) -> tuple[int, int, int]:
    """``"B8 F16384 C16448"`` -> (batch, filled, capacity)."""
    fields = dict((part[0], int(part[1:])) for part in text.split())
    return fields["B"], fields["F"], fields["C"]


def operands(config, batch: int, capacity: int, kind: str, block_size: int, tokens: int = 1):
    """``(q, k, v, buffers, tables)`` of a step: random bf16 queries and new K/V of
    ``tokens`` a row, the cache's buffers (quantized for int8/fp8; pools of
    ``block_size`` blocks, each row's table a shuffled run of them, for paged kinds)."""
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    key = iter(jax.random.split(jax.random.key(0), 5))
    normal = lambda shape: jax.random.normal(next(key), shape, jnp.bfloat16)
    q, k, v = (normal((batch, tokens, n, head_dim)) for n in (heads, kv_heads, kv_heads))
    paged, dtype = kind.startswith("paged-"), kind.removeprefix("paged-")
    if paged:
        per_row = -(-capacity // block_size)
        shape = (kv_heads, batch * per_row, block_size, head_dim)
        order = np.random.default_rng(0).permutation(batch * per_row).reshape(batch, per_row)
        tables = jnp.asarray(order, jnp.int32)
    else:
        shape, tables = (batch, kv_heads, capacity, head_dim), None
    buffers = [normal(shape), normal(shape)]
    if dtype != "bfloat16":
        (kc, ks), (vc, vs) = (quantize(x, dtype) for x in buffers)
        buffers = [kc, vc, ks, vs]
    return q, k, v, tuple(buffers), tables


def decode_step(q, k, v, buffers: tuple, tables, positions, **options) -> tuple:
    """One layer's decode step by the kernel over ``operands``' buffers (a paged pool's
    through ``tables``): ``(out, *buffers)``."""
    if tables is not None:
        return kernel.attend_and_write_paged(q, k, v, buffers, tables, positions, **options)
    if len(buffers) == 4:
        return kernel.attend_and_write_quantized(q, k, v, *buffers, positions, **options)
    return kernel.attend_and_write(q, k, v, *buffers, positions, **options)


def step_bytes(config, batch: int, filled: int, kind: str) -> int:
    """Bytes a step reads from the cache: every row's filled keys and values."""
    per_slot = config.head_dim * (2 if kind.endswith("bfloat16") else 1) + (
        0 if kind.endswith("bfloat16") else 4)
    return 2 * batch * config.num_kv_heads * filled * per_slot


def time_point(config, batch: int, filled: int, capacity: int, kind: str,
               tuning: kernel.Tuning, interpret: bool, reps: int, steps: int,
               block_size: int, block_tokens: int = 0, path: str = "kernel") -> float:
    """Seconds per step (see the module docstring): a decode step, or with
    ``block_tokens`` a block's attention on ``path`` (``"kernel"`` or ``"portable"``)."""
    tokens = block_tokens or 1
    q, k, v, buffers, tables = operands(config, batch, capacity, kind, block_size, tokens)
    positions = jnp.broadcast_to(jnp.arange(filled - tokens, filled, dtype=jnp.int32)
                                 if block_tokens else jnp.int32(filled), (batch, tokens))

    def step(buffers):
        options = dict(interpret=interpret, tuning=tuning)
        if block_tokens and path == "portable" and tables is not None:
            return paged.attend_cache(q, (*buffers, tables), positions), *buffers
        if block_tokens and path == "portable":
            read = quantized.attend_cache if len(buffers) == 4 else plain.attend_cache
            return read(q, *buffers, positions), *buffers
        if block_tokens and tables is not None:
            return kernel.attend_cached_block_paged(q, buffers, tables, positions,
                                                    **options), *buffers
        if block_tokens:
            return kernel.attend_cached_block(q, buffers, positions, **options), *buffers
        return decode_step(q, k, v, buffers, tables, positions, **options)

    def loop(n, buffers):
        def body(_, carry):
            out, buffers = carry
            new_out, *buffers = step(buffers)
            return out + new_out, tuple(buffers)
        return jax.lax.fori_loop(0, n, body, (jnp.zeros_like(q), buffers))

    program = jax.jit(loop, donate_argnums=1)
    state = {"buffers": buffers}

    def run(n):
        out, state["buffers"] = program(jnp.int32(n), state["buffers"])
        return out

    jax.block_until_ready(run(2))  # compiles
    times = []
    for _ in range(reps):
        per_n = []
        for n in (2, steps):
            t0 = time.perf_counter()
            jax.block_until_ready(run(n))
            per_n.append(time.perf_counter() - t0)
        times.append((per_n[1] - per_n[0]) / (steps - 2))
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", help="a configs/ name")
    parser.add_argument("--points", nargs="+",
                        default=["B8 F16384 C16448", "B8 F32704 C32768", "B1 F2048 C2112",
                                 "B32 F2048 C2112"])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--block-size", type=int, default=16, help="paged kinds' blocks")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--block-slots", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--programs", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--codes-as-float16", action="store_true",
                        help="int8/fp8 kinds: each tuning also with codes_as_float16 flipped")
    parser.add_argument("--block-tokens", type=int, nargs="+", default=[0],
                        help="time blocks of these many tokens a row (0: decode steps)")
    parser.add_argument("--query-rows", type=int, nargs="+", default=[],
                        help="blocks: each tuning also with these Tuning.query_rows")
    parser.add_argument("--portable", action="store_true",
                        help="blocks: also time the portable path")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--hbm-gib", type=float, default=4.0)
    parser.add_argument("--interpret", action="store_true", help="any backend, slowly")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    config = lib.model_config(args.shape)
    points = [parse_point(p) for p in args.points]
    device = jax.devices()[0]
    bound = None if args.interpret else lib.measure_hbm_bandwidth(args.hbm_gib)
    records = [{"case": "bounds", "device": device.device_kind, "bound_GBps": bound and bound / 1e9,
                "versions": lib.versions(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shape": args.shape}]
    print("#", records[0], flush=True)

    def measure(point, kind, tuning, block_tokens=0, path="kernel"):
        batch, filled, capacity = point
        try:
            seconds = time_point(config, batch, filled, capacity, kind, tuning, args.interpret,
                                 args.reps, args.steps, args.block_size, block_tokens, path)
        except Exception as error:  # a tuning Triton cannot compile: recorded, the run goes on
            record = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            seconds = None
        else:
            gbps = step_bytes(config, batch, filled, kind) / seconds / 1e9
            record = {"us": seconds * 1e6, "GBps": gbps,
                      "of_bound": bound and gbps * 1e9 / bound}
        record = {"case": "kernel", "kind": kind, "batch": batch, "filled": filled,
                  "capacity": capacity, "block_tokens": block_tokens, "path": path,
                  **vars(tuning), **record}
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.json:
            lib.save_json(records, args.json)
        return seconds

    defaults = lambda kind, capacity: kernel.default_tuning(kind.removeprefix("paged-"),
                                                            capacity, config.head_dim)
    tunings = {kind: [] for kind in args.kinds}
    if args.sweep:
        grid = [kernel.Tuning(*values) for values in itertools.product(
            args.block_slots, args.warps, args.stages, args.programs)]
        timed = [(measure(points[0], "int8", tuning), tuning) for tuning in grid]
        best = [t for s, t in sorted((p for p in timed if p[0] is not None),
                                     key=lambda p: p[0])][:args.keep]
        tunings = {kind: best for kind in args.kinds}
    for point, block_tokens, kind in itertools.product(points, args.block_tokens, args.kinds):
        chosen = [defaults(kind, point[2]), *tunings[kind]]
        if args.codes_as_float16 and not kind.endswith("bfloat16"):
            chosen += [dataclasses.replace(t, codes_as_float16=not t.codes_as_float16)
                       for t in chosen]
        if block_tokens:
            chosen += [dataclasses.replace(t, query_rows=rows)
                       for t in chosen for rows in args.query_rows]
        for tuning in dict.fromkeys(chosen):
            if args.sweep and kind == "int8" and point == points[0] and tuning in best \
                    and not block_tokens:
                continue  # timed in the sweep
            measure(point, kind, tuning, block_tokens)
        if block_tokens and args.portable:
            measure(point, kind, chosen[0], block_tokens, "portable")


if __name__ == "__main__":
    main()
