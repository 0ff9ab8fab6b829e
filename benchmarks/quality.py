#!/usr/bin/env python
"""Perplexity through the KV cache, per ``kv_dtype`` (docs/memory.md).

A single forward pass over a text never reads the cache, so it cannot tell a quantized
cache from a full one. Here each window of ``--context`` tokens is scored as a
generation reads it: its first ``--prefix`` tokens are prefilled into an empty cache,
then every later token is fed by a decode step that attends over the cache so far (as
``kvjax.generate``'s steps do), and the log-probability of the true next token is
summed. All windows are rows of one batch, one compiled program per ``kv_dtype``.

The default text is the bundled model's held-out documents (every 50th document of its
corpus, ``scripts/train_tiny.py``), concatenated. Usage::

    python benchmarks/quality.py                          # bundled model, CPU, ~1 min
    python benchmarks/quality.py --kv-dtypes float32 int8 fp8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_text() -> str:
    """The bundled model's held-out documents, joined as the training recipe joins them."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import train_tiny

    return "\n\n".join(train_tiny.split(train_tiny.documents())[1])


def windows(tokens: list[int], context: int) -> np.ndarray:
    """``int32[windows, context]``: consecutive, non-overlapping windows of the text."""
    count = len(tokens) // context
    return np.asarray(tokens[:count * context], np.int32).reshape(count, context)


def score(model: kvjax.Model, rows: np.ndarray, prefix: int, kv_dtype: str | None) -> float:
    """Mean negative log-likelihood (nats) of tokens ``prefix .. context - 1`` of each
    row, each predicted from a cache holding the row's tokens before it."""
    batch, context = rows.shape
    step, prefill_step = programs.step_functions(model, kv_dtype=kv_dtype)

    @jax.jit
    def run(params, cache, rows):
        positions = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (batch, prefix))
        logits, cache = prefill_step(params, rows[:, :prefix], positions, cache)

        def one(carry, t):  # feed token t - 1 at position t - 1, predict token t
            cache, logits = carry
            nll = -jax.nn.log_softmax(logits[:, -1])[jnp.arange(batch), rows[:, t]]
            token = jax.lax.dynamic_slice_in_dim(rows, t, 1, axis=1)
            logits, cache = step(params, token, jnp.full((batch, 1), t, jnp.int32), cache)
            return (cache, logits), nll

        _, nll = jax.lax.scan(one, (cache, logits), jnp.arange(prefix, context))
        return nll.mean()

    cache = programs.new_cache(model, batch, context, kv_dtype=kv_dtype)
    return float(run(model.params, cache, rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=kvjax.BUNDLED_MODEL)
    parser.add_argument("--text", default=None, help="a UTF-8 file (default: held-out text)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--kv-dtypes", nargs="+", default=["float32", "bfloat16", "int8", "fp8"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = kvjax.load(args.model)
    text = open(args.text, encoding="utf-8").read() if args.text else held_out_text()
    rows = windows(model.tokenizer.encode(text), args.context)
    record = {"model": args.model, "tokens_in_text": int(len(model.tokenizer.encode(text))),
              "windows": rows.shape[0], "context": args.context, "prefix": args.prefix,
              "scored_tokens": rows.shape[0] * (args.context - args.prefix),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "model_dtype": str(model.dtype), "perplexity": {}}
    for kv_dtype in args.kv_dtypes:
        start = time.perf_counter()
        nll = score(model, rows, args.prefix, kv_dtype)
        record["perplexity"][kv_dtype] = math.exp(nll)
        print(f"{kv_dtype}: perplexity {math.exp(nll):.4f} ({time.perf_counter() - start:.1f} s)",
              flush=True)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
