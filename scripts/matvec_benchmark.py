#!/usr/bin/env python
"""Batch-1 products on a GPU: the bandwidth a decoder layer's matrix-vector products reach.

XLA:GPU rewrites a vector x matrix product whose weight has under 10M elements into
multiply + reduce (its dot strength reduction). For kvjax's ``[in, out]`` weights that
read the weight far slower than a GEMM does, so ``kvjax.model._linear`` pads a single
row with a zero second row. This script measures a chain of Llama-shaped layers
(q, k, v, o projections and a gated MLP; random bf16 weights) three ways, per batch:

* ``in_out``: ``x @ w`` with ``w [in, out]`` (kvjax's layout), plain;
* ``out_in``: the same product with ``w [out, in]`` (Hugging Face's layout);
* ``pad2``: ``[in, out]`` with the zero second row (what kvjax does at batch 1).

Each figure is bytes of weights read per pass / time per pass (the difference of a
22-pass and a 2-pass loop, best of 5), printed with the device. Usage::

    python scripts/matvec_benchmark.py --hidden 2048 --mlp 8192 --kv 512 --layers 16
    python scripts/matvec_benchmark.py --hidden 4096 --mlp 14336 --kv 1024 --layers 8
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def layer_weights(hidden: int, mlp: int, kv: int, key) -> dict:
    shapes = dict(wq=(hidden, hidden), wk=(hidden, kv), wv=(hidden, kv), wo=(hidden, hidden),
                  w_gate=(hidden, mlp), w_up=(hidden, mlp), w_down=(mlp, hidden))
    keys = jax.random.split(key, len(shapes))
    return {name: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16)
            for (name, shape), k in zip(shapes.items(), keys)}


def layer(x, w, matmul):
    """q/k/v/o and a gated MLP on ``x [batch, rows, hidden]`` with ``matmul(x, weight)``."""
    q, k, v = matmul(x, w["wq"]), matmul(x, w["wk"]), matmul(x, w["wv"])
    repeat = q.shape[-1] // (2 * k.shape[-1])
    x = x + matmul(q * 0.5 + jnp.concatenate([k, v] * repeat, axis=-1), w["wo"])
    return x + matmul(jax.nn.silu(matmul(x, w["w_gate"])) * matmul(x, w["w_up"]), w["w_down"])


def in_out(x, weight):
    return jnp.einsum("btd,df->btf", x, weight)


def out_in(x, weight):
    return jnp.einsum("btd,fd->btf", x, weight)


def pad2(x, weight):
    padded = jnp.concatenate([x, jnp.zeros_like(x)], axis=1)
    return jnp.einsum("btd,df->btf", padded, weight)[:, :x.shape[1]]


def seconds_per_pass(matmul, weights, x) -> float:
    def passes(n):
        def run(weights, x):
            def body(_, x):
                for w in weights:
                    x = layer(x, w, matmul)
                return x / (1 + jnp.abs(x).max())
            return jax.lax.fori_loop(0, n, body, x)
        program = jax.jit(run)
        program(weights, x).block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            program(weights, x).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    return (passes(22) - passes(2)) / 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--kv", type=int, default=512, help="KV heads x head_dim")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), args.layers)
    weights = [layer_weights(args.hidden, args.mlp, args.kv, k) for k in keys]
    transposed = [{name: w.T.copy() for name, w in layer_w.items()} for layer_w in weights]
    nbytes = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves(weights))
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {nbytes / 2**30:.2f} GiB of weights")
    for batch in args.batch:
        x = jnp.ones((batch, 1, args.hidden), jnp.bfloat16)
        for name, matmul, ws in (("in_out", in_out, weights), ("out_in", out_in, transposed),
                                 ("pad2", pad2, weights)):
            per = seconds_per_pass(matmul, ws, x)
            print(f"hidden={args.hidden} batch={batch} {name}: {per * 1e3:.3f} ms/pass "
                  f"{nbytes / per / 1e9:.0f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
