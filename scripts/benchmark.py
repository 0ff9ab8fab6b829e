#!/usr/bin/env python
"""kvjax benchmarks: streaming vs one-shot decode, chat turn cost, cache vs recompute.

Every figure is measured in the run that prints it, on one device, with random weights
of a model shape (speed does not depend on the values) and the bundled model's tokenizer
where text is needed. Results: a table on stdout and one JSON record per case
(``--json``, default ``benchmarks/results/<device>-<date>.json``).

Cases (``--cases``, default all):

* ``stream``: decode ms/step of ``kvjax.generate`` (one compiled program) against
  ``kvjax.generate_stream`` with chunks of 1, 4, 16 and 64 steps; streaming's cost is the
  ratio.
* ``chat``: a ``ChatSession`` whose history grows turn by turn; the prefill of each
  turn's new tokens at the end of the cache (what the session runs) against a
  from-scratch prefill of the whole history, both timed as the prefill program alone.
* ``nocache``: ms per token with the cache against ``use_cache=False`` (recompute the
  sequence every step) at total lengths 128 ... 1024: what the cache buys.

Usage::

    python scripts/benchmark.py --shape tiny            # CPU, seconds
    python scripts/benchmark.py --shape llama-1b        # GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

import kvjax
from kvjax import BUNDLED_MODEL
from kvjax.decode import prefill
from kvjax.model import step_fn

SHAPES = {  # vocab comes from the tokenizer; speed hardly depends on it here
    "tiny": dict(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=32),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                     num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5),
}


def random_model(shape: str, dtype: str) -> kvjax.Model:
    bundled = kvjax.load(BUNDLED_MODEL, dtype="float32")
    config = kvjax.ModelConfig(model_type="llama", vocab_size=bundled.config.vocab_size,
                               max_position_embeddings=32768, tie_word_embeddings=True,
                               **SHAPES[shape])
    params = kvjax.init_params(config, jax.random.key(0), jax.numpy.dtype(dtype))
    return kvjax.Model(config=config, params=params, tokenizer=bundled.tokenizer,
                       stop_tokens=bundled.stop_tokens)


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompt_ids(model: kvjax.Model, length: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, model.config.vocab_size, size=length).tolist()


def case_stream(model, args):
    prompt = [prompt_ids(model, args.prompt)] * args.batch
    opts = dict(max_new_tokens=args.new, stop_tokens=[])
    short = dict(max_new_tokens=1, stop_tokens=[])
    base = (timed(lambda: kvjax.generate(model, prompt, **opts), args.reps)
            - timed(lambda: kvjax.generate(model, prompt, **short), args.reps)) / (args.new - 1)
    rows = [dict(case="stream", mode="one program", chunk=None, ms_per_step=base * 1e3, ratio=1.0)]
    for chunk in (1, 4, 16, 64):
        run = lambda n: list(kvjax.generate_stream(model, prompt, chunk_size=chunk,
                                                   max_new_tokens=n, stop_tokens=[]))
        step = (timed(lambda: run(args.new), args.reps) - timed(lambda: run(1), args.reps)) / (args.new - 1)
        rows.append(dict(case="stream", mode="stream", chunk=chunk, ms_per_step=step * 1e3,
                         ratio=step / base))
    return rows


def prefill_timer(model):
    """``time(tokens, start, capacity)``: median seconds of prefilling ``tokens`` (one row)
    at positions ``start...`` into a cache of ``capacity`` slots, the prefill program
    alone (``kvjax.decode.prefill`` jitted with the cache donated, a fresh cache per call)."""
    step = step_fn(model.config)

    def run(params, cache, tokens, lengths, start):
        state, _ = prefill(step, params, cache, tokens, lengths, start=start, greedy=True,
                           max_new_tokens=np.int32(1), sampling=kvjax.SamplingParams.create(1),
                           seed=np.uint32(0), stop_tokens=np.full((1,), -1, np.int32))
        return state

    program = jax.jit(run, donate_argnums=1)

    def time_prefill(tokens: list[int], start: int, capacity: int) -> float:
        width = max(16, 1 << (len(tokens) - 1).bit_length())  # generate's prompt bucket
        block = np.zeros((1, width), np.int32)
        block[0, :len(tokens)] = tokens
        times = []
        for _ in range(4):  # the first call compiles and warms up
            cache = kvjax.KVCache.create(model.config, 1, capacity, model.dtype)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            jax.block_until_ready(program(model.params, cache, block,
                                          np.array([len(tokens)], np.int32),
                                          np.array([start], np.int32)))
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    return time_prefill


def case_chat(model, args):
    """Each turn of a growing conversation: the prefill of its new tokens at the end of
    the cache (what ChatSession runs) against a from-scratch prefill of the history."""
    session = kvjax.ChatSession(model, capacity=args.chat_capacity, max_new_tokens=args.new,
                                stop_tokens=[])
    time_prefill = prefill_timer(model)
    words = "the module defines a function that returns the value of the object".split()
    rows = []
    for turn in range(args.turns):
        message = " ".join(words[(turn + i) % len(words)] for i in range(args.turn_words))
        if session.cache_fill + 2 * args.turn_words + args.new + 64 > session.capacity:
            break
        start = session.cache_fill
        session.send(message)
        new = session.last_stats["prefill_tokens"]
        history = session.history[:start + new]  # what the turn's prefill made the cache hold
        turn_ms = time_prefill(history[start:], start, session.capacity) * 1e3
        scratch_ms = time_prefill(history, 0, session.capacity) * 1e3
        rows.append(dict(case="chat", turn=turn + 1, history_tokens=len(history),
                         prefill_tokens=new, turn_prefill_ms=turn_ms,
                         scratch_prefill_ms=scratch_ms, scratch_over_turn=scratch_ms / turn_ms))
    return rows


def case_nocache(model, args):
    rows = []
    for total in (128, 256, 512, 1024):
        prompt = [prompt_ids(model, total // 2)]
        n = total - total // 2
        per_token = {}
        for use_cache in (True, False):
            full = timed(lambda: kvjax.generate(model, prompt, max_new_tokens=n, stop_tokens=[],
                                                use_cache=use_cache, capacity=total), args.reps)
            one = timed(lambda: kvjax.generate(model, prompt, max_new_tokens=1, stop_tokens=[],
                                               use_cache=use_cache, capacity=total), args.reps)
            per_token[use_cache] = (full - one) / (n - 1)
        rows.append(dict(case="nocache", total_tokens=total, cache_ms_per_token=per_token[True] * 1e3,
                         recompute_ms_per_token=per_token[False] * 1e3,
                         speedup=per_token[False] / per_token[True]))
    return rows


CASES = {"stream": case_stream, "chat": case_chat, "nocache": case_nocache}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-words", type=int, default=40)
    parser.add_argument("--chat-capacity", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    meta = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                kvjax_shape=args.shape, dtype=args.dtype, batch=args.batch,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"# {meta}", flush=True)
    model = random_model(args.shape, args.dtype)
    records = []
    for name in args.cases:
        try:
            rows = CASES[name](model, args)
        except Exception as e:  # a failed case is recorded and the run goes on
            rows = [dict(case=name, failed=f"{type(e).__name__}: {e}")]
        for row in rows:
            records.append(meta | row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
    path = args.json or os.path.join("benchmarks", "results",
                                     f"{device.device_kind.replace(' ', '_')}-{meta['date'][:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
