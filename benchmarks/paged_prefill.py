#!/usr/bin/env python
"""A prompt chunk's attention over a paged pool, path against path (docs/paged.md).

The serving engine prefills prompts in chunks that attend over the blocks their rows
hold (a cached system prompt, the chunks before). This times that attention alone, as
many times in one program as the model has layers (each layer's write of the chunk and
its attention, the pool donated and carried), for chunk shapes the engine runs:

* ``portable``: ``kvjax.attention.paged.attend_cache``, the blocks read a few at a time
  in a loop whose trip count follows the rows' lengths (any backend);
* ``cudnn`` (CUDA GPUs with cuDNN flash attention): ``attend_cache_cudnn``, the rows'
  blocks gathered into a contiguous copy, then cuDNN.

Random bfloat16 queries, keys and values of the model's attention shape; each row's
table names random blocks of a pool of ``--pool-rows`` rows of ``--max-len`` slots::

    python benchmarks/paged_prefill.py --shape llama-8b          # a GPU: both paths
    python benchmarks/paged_prefill.py --shape bundled --layers 1 --reps 2   # a CPU smoke run

A case ``ROWSxWIDTH@START`` is ``ROWS`` rows of ``WIDTH`` new tokens each, after
``START`` tokens their blocks already hold. The JSON (``--json``) holds the settings,
device, versions, date and per case and path the median milliseconds over ``--reps``
calls; the ratio portable / cuDNN of each case is printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib  # noqa: E402
from kvjax.attention import flash  # noqa: E402
from kvjax.attention.choice import LayerAttention, attend_pool_blocks  # noqa: E402
from kvjax.decode import prompt_positions  # noqa: E402

PATHS = {"portable": "xla", "cudnn": "cudnn"}  # LayerAttention.implementation of each
DEFAULT_CASES = ("4x64@1024", "1x512@0", "1x2048@0", "1x256@3072", "16x16@1024")


def parse_case(text: str) -> tuple[int, int, int]:
    """``ROWSxWIDTH@START`` -> ``(rows, width, start)``."""
    try:
        shape, start = text.split("@")
        rows, width = shape.split("x")
        return int(rows), int(width), int(start)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a case is ROWSxWIDTH@START, e.g. 4x64@1024; got {text!r}")


def time_case(config, paths, rows: int, width: int, start: int, args, rng) -> dict:
    """Median ms of ``args.layers`` chunk writes and attentions over the pool, per path."""
    kv_heads, head_dim, block = config.num_kv_heads, config.head_dim, args.block_size
    per_row = args.max_len // block
    num_blocks = args.pool_rows * per_row + 1
    if start + width > args.max_len:
        raise SystemExit(f"case {rows}x{width}@{start} runs past --max-len {args.max_len}")
    pools = [jnp.zeros((kv_heads, num_blocks, block, head_dim), jnp.bfloat16) for _ in range(2)]
    tables = jnp.asarray(rng.permutation(num_blocks)[:rows * per_row].reshape(rows, per_row),
                         jnp.int32)  # [rows, blocks_per_row]
    positions = prompt_positions(jnp.full((rows,), width, jnp.int32), width,
                                 jnp.full((rows,), start, jnp.int32))  # [rows, width]
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (rows, width, config.num_heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (rows, width, kv_heads, head_dim), jnp.bfloat16)
            for key in keys[1:])
    out = {}
    for path in paths:
        attention = LayerAttention(implementation=PATHS[path])

        def layers(pools, q):
            for _ in range(args.layers):
                (q,), (*pools, _) = attend_pool_blocks(config, attention, [(q, k, v, positions)],
                                                       (*pools, tables))
                q, pools = jax.lax.optimization_barrier((q, pools))
            return pools, q

        run = jax.jit(layers, donate_argnums=0)
        pools, result = run(pools, q)  # compiles, and the first run loads the program
        jax.block_until_ready(result)
        times = []
        for _ in range(args.reps):
            began = time.perf_counter()
            pools, result = run(pools, q)
            jax.block_until_ready(result)
            times.append(time.perf_counter() - began)
        out[path] = float(np.median(times) * 1e3)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-8b",
                        help="a model shape: bundled, a configs/ name or a config.json path")
    parser.add_argument("--cases", nargs="+", type=parse_case, default=None,
                        metavar="ROWSxWIDTH@START", help=f"default {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--layers", type=int, default=None, help="default: the model's")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=4096, help="slots a row's table covers")
    parser.add_argument("--pool-rows", type=int, default=64,
                        help="rows of --max-len the pool holds")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    config = bench_lib.model_config(args.shape)
    args.layers = args.layers or config.num_layers
    cases = args.cases or [parse_case(case) for case in DEFAULT_CASES]
    paths = ["portable"] + (["cudnn"] if flash.supported(config.head_dim, jnp.bfloat16) else [])
    rng = np.random.default_rng(0)
    records = []
    for rows, width, start in cases:
        ms = time_case(config, paths, rows, width, start, args, rng)
        ratio = ms["portable"] / ms["cudnn"] if "cudnn" in ms else None
        records.append(dict(rows=rows, width=width, start=start, ms=ms, portable_over_cudnn=ratio))
        print(f"{rows}x{width}@{start}: " + ", ".join(f"{p} {t:.3f} ms" for p, t in ms.items())
              + (f" ({ratio:.2f}x)" if ratio else ""), flush=True)
    device = jax.devices()[0]
    path = args.json or os.path.join(bench_lib.ROOT, "benchmarks", "results",
                                     f"paged_prefill_{device.platform}.json")
    bench_lib.save_json(dict(settings={k: v for k, v in vars(args).items() if k != "cases"},
                             device=device.device_kind, versions=bench_lib.versions(),
                             date=datetime.date.today().isoformat(), results=records), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
