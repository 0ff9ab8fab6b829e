#!/usr/bin/env python
"""kvjax benchmarks: the issue-13 suite (bounds, decode, long context, long prompt,
cache vs recompute, Hugging Face peers) and the streaming and chat cases.

Every figure is measured in the run that records it, on one device, with random weights
(speed does not depend on the values). A run first measures the device's bounds: HBM
read bandwidth (jitted ``jnp.sum``s over ``--hbm-gib`` GiB of bf16, 4 on GPU/TPU: the
time of 9 in one program less that of 1, so per-call costs cancel as in ms/step),
the best throughput of a chain of ``--gemm-size``^3 bf16 matmuls, and the spec-sheet
bf16 dense peak (``bench_lib.PEAK_BF16_TFLOPS``); then the cases, one record per point.

Suite cases (model shapes from ``configs/``, ``--models``, random bf16 weights):

* ``decode``: ``--batches`` x ``--decode-shapes`` (prompt+new), capacity prompt + new;
  one compiled program (``kvjax.programs.generation_program``: the one ``kvjax.generate``
  compiles, greedy, cache donated) timed with ``max_new_tokens`` 1 (= prefill_ms) and
  N: ms/step = (t(N) - t(1)) / (N - 1), medians of ``--reps`` after a warm-up, a fresh
  cache per call outside the timed region. The record keeps the first row's greedy
  tokens (``tokens``): ``kvjax.generate``'s for the same model, prompt and capacity.
* ``longctx``: batch 1, capacity ``--longctx-capacity``, decode of ``--longctx-new``
  steps after ``--longctx-fills`` tokens, plus the smallest fill in a cache of
  capacity fill + new (the reference the issue's targets compare with). Fills up to
  ``--longctx-prefill`` are a real prefill of that many tokens. Larger fills are NOT
  prefilled: a block of ``--longctx-block`` random tokens is prefilled at positions
  fill - block ... fill - 1 (``kvjax.decode``'s ``start``, as a chat turn continues a
  cache); the slots before it keep the empty cache's zeros but count as filled (the
  row's length becomes ``fill``), so decode attends over ``fill`` real-looking slots.
  prefill_ms / mfu of such a record are those of the block.
* ``prefill32k``: one ``--long-prompt``-token prompt (32768) + 16 new, prefilled in
  ``kvjax.programs.PREFILL_CHUNK``-token pieces as ``kvjax.generate`` does.
* ``hf``: transformers ``generate`` with the dynamic cache, the static cache and the
  static cache with transformers' torch.compile (``hf-static-compile``), same shapes
  (``--hf-shapes``, ``--hf-batches``), same GPU; only where torch has CUDA (on CPU
  skipped with the reason unless ``--hf-on-cpu``). Errors are recorded.
* ``nocache``: ms per token with the cache against ``use_cache=False`` (recompute the
  sequence every step) at total lengths ``--nocache-totals`` (default 128 ... 1024;
  issue 13: up to 4096), prompt = total - new, new = half the total unless
  ``--nocache-new`` caps it (the CPU preset: 16; both modes cost the same per step at
  any fill of a given capacity today, so a cap only shortens the run). On the
  ``--shape`` model.

Issue-5 cases, on ``--shape`` (bundled tokenizer's vocabulary), unchanged:

* ``stream``: decode ms/step of ``kvjax.generate`` (one compiled program) against
  ``kvjax.generate_stream`` with chunks of 1, 4, 16 and 64 steps; streaming's cost is the
  ratio.
* ``chat``: a ``ChatSession`` whose history grows turn by turn; the prefill of each
  turn's new tokens at the end of the cache (what the session runs) against a
  from-scratch prefill of the whole history, both timed as the prefill program alone.
* ``sharedprefix``: ``--shared-batch`` prompts beginning with one ``--shared-prefix``-token
  prefix, one new token each: ``generate`` with a fresh ``PrefixCache`` (the rows compute
  the prefix once) against ``generate`` without one.

Decode over several devices (issue 12's meshes) is ``benchmarks/sharding_benchmark.py``'s
(docs/sharding.md; a summary in docs/benchmarks.md).

A point that cannot fit (weights + cache, then the compiled program's
``memory_analysis``, against the device memory or ``--memory-limit``) or that starts
after ``--time-budget`` seconds is recorded with ``skipped``; one that raises, with
``failed: "Type: message"``; the run goes on. Records (fields: docs/benchmarks.md)
are rewritten after every point to ``--json`` (default
``benchmarks/results/<device>-<date>.json`` in the repository, temp file + rename), a progress line per
point goes to stdout, and with matplotlib (``pip install -e ".[bench]"``) PNG plots
are written next to the JSON. jax does not preallocate GPU memory here
(``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set) so the torch peers share the GPU.

Usage::

    python benchmarks/benchmark.py --shape tiny            # CPU preset, about a minute
    python benchmarks/benchmark.py --cases decode longctx --models llama-3.1-8b  # GPU
    python benchmarks/benchmark.py --shape llama-1b --cases stream chat nocache  # issue 5
    python benchmarks/benchmark.py --plot benchmarks/results/a.json b.json --json out.json
    (docs/benchmarks.md lists the GPU commands that split the suite into <9-min runs)
"""

from __future__ import annotations

import os
import time

STARTED = time.perf_counter()  # --time-budget counts from here

# Before jax starts: the transformers peers need GPU memory that jax would otherwise hold.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
import kvjax.params  # noqa: E402
import kvjax.programs  # noqa: E402
import kvjax.requests  # noqa: E402
from kvjax import BUNDLED_MODEL  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as lib  # noqa: E402  (benchmarks/, next to this file)
from bench_lib import Skipped, timed  # noqa: E402

# CPU cannot donate buffers; the warning would repeat on every call.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

# The issue-5 cases' smallest shape; the others are lib.LLAMA_SHAPES, from configs/.
TINY_SHAPE = dict(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=32)
SHAPES = ("tiny", *lib.LLAMA_SHAPES)

# Defaults of the suite's sizes, by platform ("gpu" also serves TPUs); flags override.
PRESETS = {
    "gpu": dict(models=["llama-3.2-1b", "llama-3.1-8b"], batches=[1, 8, 32, 64],
                decode_shapes=["512+256", "2048+64"], longctx_capacity=32768,
                longctx_fills=[2048, 8192, 16384, 32768], longctx_new=64, longctx_prefill=2048,
                long_prompt=32768, hf_batches=[1], hbm_gib=4.0, gemm_size=8192, nocache_new=0),
    "cpu": dict(models=["bundled"], batches=[1, 4], decode_shapes=["64+16"],
                longctx_capacity=1024, longctx_fills=[128, 512, 1024], longctx_new=16,
                longctx_prefill=128, long_prompt=1008, hf_batches=[1], hbm_gib=0.25,
                gemm_size=512, nocache_new=16),
}
LONG_PROMPT_NEW = 16

# Every suite record has these keys (None where not measured); docs/benchmarks.md.
FIELDS = ("case", "implementation", "model", "device", "batch", "prompt_len", "new_tokens",
          "capacity", "filled", "kv_dtype", "block_size", "prefill_ms", "mfu", "decode_ms_per_step",
          "tokens_per_s", "mbu", "bound_GBps", "compile_s", "peak_bytes", "versions", "date")


def random_model(shape: str, dtype: str) -> kvjax.Model:
    """A model of ``shape`` with random weights and the bundled model's tokenizer (and
    its vocabulary, so that text can be streamed and chats templated)."""
    bundled = kvjax.load(BUNDLED_MODEL, dtype="float32")
    common = dict(vocab_size=bundled.config.vocab_size, bos_token_id=bundled.config.bos_token_id,
                  eos_token_ids=bundled.config.eos_token_ids, max_position_embeddings=32768,
                  tie_word_embeddings=True)
    if shape == "tiny":
        config = kvjax.ModelConfig(model_type="llama", **TINY_SHAPE, **common)
    else:
        config = dataclasses.replace(lib.model_config(shape), **common)
    params = kvjax.params.init_params(config, jax.random.key(0), jax.numpy.dtype(dtype))
    return kvjax.Model(config=config, params=params, tokenizer=bundled.tokenizer,
                       stop_tokens=bundled.stop_tokens)


def prompt_ids(model: kvjax.Model, length: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, model.config.vocab_size, size=length).tolist()


# ----- issue-5 cases (one point each: a list of rows on the --shape model) -----------

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
    alone: the one ``ChatSession`` runs for a turn (``kvjax.programs.stream_programs``'
    prefill of a continued cache, greedy, the cache donated), a fresh cache per call."""
    program, _ = kvjax.programs.stream_programs(model, greedy=True, chunk_size=16,
                                                state_shardings=None, fresh=False)
    controls = (np.ones((1,), np.int32), kvjax.SamplingParams.create(1), np.uint32(0),
                np.full((kvjax.requests.MAX_STOP_TOKENS,), -1, np.int32))

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
                                          np.array([start], np.int32), *controls))
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
    for total in args.nocache_totals:
        n = min(args.nocache_new or total - total // 2, total - 1)
        prompt = [prompt_ids(model, total - n)]
        per_token = {}
        for use_cache in (True, False):
            full = timed(lambda: kvjax.generate(model, prompt, max_new_tokens=n, stop_tokens=[],
                                                use_cache=use_cache, capacity=total), args.reps)
            one = timed(lambda: kvjax.generate(model, prompt, max_new_tokens=1, stop_tokens=[],
                                               use_cache=use_cache, capacity=total), args.reps)
            per_token[use_cache] = (full - one) / (n - 1)
        rows.append(dict(case="nocache", total_tokens=total, cache_ms_per_token=per_token[True] * 1e3,
                         recompute_ms_per_token=per_token[False] * 1e3,
                         speedup=per_token[False] / per_token[True], prompt_len=total - n,
                         new_tokens=n))
    return rows


def case_sharedprefix(model, args):
    """``--shared-batch`` prompts of a ``--shared-prefix``-token prefix and 16 tokens of
    their own, one new token each (the time to the first tokens): ``generate`` with a
    fresh ``PrefixCache`` per call (its rows compute the shared prefix once) against
    ``generate`` without one (each row computes it)."""
    prefix = prompt_ids(model, args.shared_prefix)
    prompts = [prefix + prompt_ids(model, 16, seed=row + 1) for row in range(args.shared_batch)]
    run = lambda **kwargs: kvjax.generate(model, prompts, max_new_tokens=1, stop_tokens=[],
                                          **kwargs)
    blocks = args.shared_batch * -(-(args.shared_prefix + 17) // 16)
    fresh = lambda: kvjax.PrefixCache(model, block_size=16, budget_blocks=blocks)
    plain = timed(lambda: run(), args.reps)
    shared = timed(lambda pc: run(prefix_cache=pc), args.reps, setup=fresh)
    pc = fresh()
    run(prefix_cache=pc)
    stats = pc.stats()
    return [dict(case="sharedprefix", rows=args.shared_batch, prefix_tokens=args.shared_prefix,
                 own_tokens=16, plain_ms=plain * 1e3, prefix_cache_ms=shared * 1e3,
                 speedup=plain / shared, hit_rate=stats["hit_rate"],
                 prompt_over_computed=stats["prompt_tokens"] / (stats["prompt_tokens"]
                                                                - stats["cached_tokens"]))]


SHAPE_CASES = {"stream": case_stream, "chat": case_chat, "nocache": case_nocache,
               "sharedprefix": case_sharedprefix}


# ----- suite cases: each yields its points (dicts of record fields) for one model -------

def decode_points(args, model):
    for prompt, new in args.decode_shapes:
        for batch in args.batches:
            for kv_dtype in args.kv_dtypes:
                yield dict(model=model, batch=batch, prompt_len=prompt, start=0, new_tokens=new,
                           capacity=prompt + new, filled=prompt, kv_dtype=kv_dtype)


def longctx_points(args, model):
    new, capacity = args.longctx_new, args.longctx_capacity
    fills = [min(fill, capacity - new) for fill in args.longctx_fills]
    for batch in args.longctx_batches:
        for fill, cap in dict.fromkeys([(fills[0], fills[0] + new)]
                                       + [(fill, capacity) for fill in fills]):
            prompt = fill if fill <= args.longctx_prefill else args.longctx_block
            for kv_dtype in args.kv_dtypes:
                yield dict(model=model, batch=batch, prompt_len=prompt, start=fill - prompt,
                           new_tokens=new, capacity=cap, filled=fill, kv_dtype=kv_dtype)


def prefill32k_points(args, model):
    for kv_dtype in args.kv_dtypes:
        yield dict(model=model, batch=1, prompt_len=args.long_prompt, start=0,
                   new_tokens=LONG_PROMPT_NEW, capacity=args.long_prompt + LONG_PROMPT_NEW,
                   filled=args.long_prompt, kv_dtype=kv_dtype)


def hf_points(args, model):
    for prompt, new in args.hf_shapes:
        for batch in args.hf_batches:
            for variant in lib.HF_VARIANTS:
                yield dict(model=model, implementation=variant, batch=batch, prompt_len=prompt,
                           start=0, new_tokens=new, capacity=prompt + new, filled=prompt)


SUITE_CASES = {"decode": decode_points, "longctx": longctx_points,
               "prefill32k": prefill32k_points, "hf": hf_points}
CASES = [*SUITE_CASES, *SHAPE_CASES]


class Run:
    """What every point of a run shares: arguments, device, bounds, memory, the model held."""

    def __init__(self, args, device, bounds: dict, versions: dict, date: str):
        self.args, self.device, self.bounds, self.versions, self.date = args, device, bounds, versions, date
        self.memory = lib.device_memory(device, args.memory_limit)
        self.models = lib.OneModel()

    def metrics(self, config: kvjax.ModelConfig, p: dict, prefill_s: float,
                step_s: float | None) -> dict:
        """prefill_ms, prefill_tflops, mfu and, with a step time, decode_ms_per_step,
        tokens_per_s and mbu (bench_lib's definitions)."""
        flops = lib.prefill_flops(config, p["batch"], p["prompt_len"], p["start"])
        peak = self.bounds["peak_tflops"]
        out = dict(prefill_ms=prefill_s * 1e3, prefill_tflops=flops / prefill_s / 1e12,
                   mfu=flops / (prefill_s * peak * 1e12) if peak else None)
        if step_s:
            read = lib.step_bytes(config, p["batch"], p["filled"], p["new_tokens"], p["capacity"],
                                  kv_dtype=p.get("kv_dtype"))
            out |= dict(decode_ms_per_step=step_s * 1e3, tokens_per_s=p["batch"] / step_s,
                        mbu=read / (step_s * self.bounds["bound_GBps"] * 1e9))
        return out

    def kvjax_point(self, p: dict) -> dict:
        model = self.models.get(("kvjax", p["model"]), lambda: lib.random_kvjax_model(p["model"]))
        t = lib.time_decode(model, p["batch"], p["prompt_len"], p["new_tokens"], p["capacity"],
                            self.args.reps, self.memory, start=p["start"],
                            decode_kernel=(False if self.args.xla_decode_steps
                                           else True if self.args.decode_kernel else None),
                            kv_dtype=p.get("kv_dtype"), block_size=p.get("block_size"))
        return self.metrics(model.config, p, t.prefill_s, t.step_s) | dict(
            compile_s=t.compile_s, program_bytes=t.program_bytes,
            peak_bytes=lib.peak_bytes(self.device), tokens=t.tokens)

    def hf_point(self, p: dict) -> dict:
        torch_device = lib.torch_device(self.args.hf_on_cpu)
        import torch
        import transformers

        config = kvjax.ModelConfig.from_json(lib.config_path(p["model"]))
        key = ("hf", p["model"])
        free = torch.cuda.mem_get_info()[0] if torch_device == "cuda" else self.memory
        weights = 0 if self.models.key == key else lib.nbytes(lib.param_shapes(config))
        lib.check_fits("weights + cache", weights + lib.cache_bytes(config, p["batch"], p["capacity"]),
                       free)
        model = self.models.get(key, lambda: lib.random_hf_model(p["model"], torch_device))
        t = lib.time_hf(model, p["implementation"], p["batch"], p["prompt_len"], p["new_tokens"],
                        self.args.reps)
        return self.metrics(config, p, t["prefill_s"], t["step_s"]) | dict(
            compile_s=t["compile_s"], peak_bytes=t["peak_bytes"], device=t["device"],
            versions=self.versions | dict(torch=torch.__version__,
                                          transformers=transformers.__version__))

    def point(self, case: str, p: dict) -> dict:
        """The record of one point: measured, skipped or failed."""
        record = dict.fromkeys(FIELDS) | dict(
            case=case, implementation="kvjax-xla-steps" if self.args.xla_decode_steps else "kvjax",
            device=self.device.device_kind,
            bound_GBps=self.bounds["bound_GBps"], versions=self.versions, date=self.date) | p
        try:
            if self.args.time_budget is not None and self.elapsed() > self.args.time_budget:
                raise Skipped(f"time budget of {self.args.time_budget:g} s spent")
            record |= self.hf_point(p) if case == "hf" else self.kvjax_point(p)
        except Skipped as e:
            record["skipped"] = str(e)
        except Exception as e:  # a failed point is recorded and the run goes on
            record["failed"] = f"{type(e).__name__}: {str(e)[:1000]}"
        return record

    @staticmethod
    def elapsed() -> float:
        return time.perf_counter() - STARTED


def describe(r: dict) -> str:
    """One progress line for a suite record."""
    what = (f"{r['case']} {r['implementation']} {r['model']} B={r['batch']} "
            f"prompt {r['prompt_len']}+{r['new_tokens']} capacity {r['capacity']} filled {r['filled']}"
            + (f" kv {r['kv_dtype']}" if r.get("kv_dtype") else "")
            + (f" paged {r['block_size']}" if r.get("block_size") else ""))
    if r.get("skipped") or r.get("failed"):
        return f"{what}: {'SKIPPED' if r.get('skipped') else 'FAILED'} {r.get('skipped') or r.get('failed')}"
    pct = lambda x: "-" if x is None else f"{x:.1%}"
    step = ("" if r["decode_ms_per_step"] is None else
            f"{r['decode_ms_per_step']:.3f} ms/step, {r['tokens_per_s']:.0f} tok/s, MBU {pct(r['mbu'])}; ")
    compile_s = "" if r["compile_s"] is None else f"; compile {r['compile_s']:.1f} s"
    return f"{what}: {step}prefill {r['prefill_ms']:.2f} ms, MFU {pct(r['mfu'])}{compile_s}"


def shape_pair(text: str) -> tuple[int, int]:
    prompt, sep, new = text.partition("+")
    if not sep or not prompt.isdigit() or not new.isdigit() or int(prompt) < 1 or int(new) < 2:
        raise argparse.ArgumentTypeError(f"expected PROMPT+NEW with NEW >= 2, e.g. 512+256: {text!r}")
    return int(prompt), int(new)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="defaults of the suite's sizes (default: cpu on CPU, else gpu)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; points that would start later are recorded as skipped")
    parser.add_argument("--memory-limit", type=lib.parse_bytes, default=None,
                        help="device memory to plan with, e.g. 70GB (default: the device's)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plot", nargs="+", metavar="JSON",
                        help="only draw the plots of these result files (merged), next to the "
                             "first or at --json's stem, and exit")
    parser.add_argument("--kv-bound", nargs="+", metavar="JSON",
                        help="only print, for the int8/fp8 longctx steps of each result file, "
                             "the step their cache's bytes allow at the rate a full-precision "
                             "cache is read between two fills (kv_bound), and exit")
    suite = parser.add_argument_group("suite (decode, longctx, prefill32k, hf)")
    suite.add_argument("--models", nargs="+", help="configs/ names, 'bundled' or config.json paths")
    suite.add_argument("--batches", type=int, nargs="+")
    suite.add_argument("--decode-shapes", type=shape_pair, nargs="+", metavar="PROMPT+NEW")
    suite.add_argument("--longctx-capacity", type=int)
    suite.add_argument("--longctx-fills", type=int, nargs="+")
    suite.add_argument("--longctx-new", type=int)
    suite.add_argument("--longctx-prefill", type=int,
                       help="fills up to this are prefilled for real, larger ones constructed")
    suite.add_argument("--longctx-block", type=int, default=16)
    suite.add_argument("--longctx-batches", type=int, nargs="+", default=[1])
    suite.add_argument("--kv-dtypes", nargs="+", default=[None],
                       choices=list(kvjax.cache.KV_DTYPES),
                       help="what the KV cache stores, one point each (default: the model's "
                            "dtype; docs/memory.md)")
    suite.add_argument("--block-sizes", type=int, nargs="+", default=[0],
                       help="the cache's layout, one point each: 0 contiguous, N a paged pool "
                            "of N-slot blocks (rows' tables a shuffled choice of blocks)")
    suite.add_argument("--long-prompt", type=int)
    suite.add_argument("--hf-shapes", type=shape_pair, nargs="+", metavar="PROMPT+NEW",
                       help="default: --decode-shapes")
    suite.add_argument("--hf-batches", type=int, nargs="+")
    suite.add_argument("--hf-on-cpu", action="store_true")
    suite.add_argument("--hbm-gib", type=float)
    suite.add_argument("--xla-decode-steps", action="store_true",
                       help="decode steps on the XLA/cuDNN path, not kvjax.decode_kernel "
                            "(implementation 'kvjax-xla-steps')")
    suite.add_argument("--decode-kernel", action="store_true",
                       help="decode steps on kvjax's decode kernel wherever it runs, "
                            "interpreted where it does not compile (kvjax's default on GPUs)")
    suite.add_argument("--gemm-size", type=int)
    old = parser.add_argument_group("cases on --shape (stream, chat, nocache, sharedprefix)")
    old.add_argument("--shape", choices=SHAPES, default="tiny")
    old.add_argument("--dtype", default="bfloat16")
    old.add_argument("--batch", type=int, default=1)
    old.add_argument("--prompt", type=int, default=128)
    old.add_argument("--new", type=int, default=128)
    old.add_argument("--turns", type=int, default=6)
    old.add_argument("--turn-words", type=int, default=40)
    old.add_argument("--chat-capacity", type=int, default=4096)
    old.add_argument("--nocache-totals", type=int, nargs="+", default=[128, 256, 512, 1024])
    old.add_argument("--nocache-new", type=int, default=None,
                     help="new tokens per nocache run; 0: half the total (the gpu preset's "
                          "default; cpu: 16)")
    old.add_argument("--shared-batch", type=int, default=16,
                     help="sharedprefix: prompts that begin with one prefix")
    old.add_argument("--shared-prefix", type=int, default=512,
                     help="sharedprefix: tokens of their prefix")
    return parser.parse_args(argv)


def plot(records: list[dict], path: str) -> None:
    try:
        for written in lib.write_plots(records, os.path.splitext(path)[0]):
            print(f"# wrote {written}")
    except ImportError:
        print('# no plots: matplotlib is not installed (pip install -e ".[bench]")')


def kv_bound(records: list[dict]) -> list[dict]:
    """How near each int8/fp8 decode step comes to what reading its cache's bytes allows.

    A ``longctx`` step reads the weights and the cache up to its fill; between two fills
    (same model, batch, capacity and layout) the full-precision cache's extra bytes over
    the extra time are the rate at which its steps read the cache (``rate_GBps``), and
    what is left of a step at no fill is its part that no cache dtype changes
    (``fixed_ms``: weights, norms, sampling, launches). A quantized step at its ``filled``
    can then take no less than ``ideal_ms``, the fixed part plus its own cache bytes at
    that rate: ``ideal_speedup`` is the most any int8/fp8 kernel can gain over the
    full-precision step of the same fill (``reference_ms``), ``speedup`` what it gained.
    Where the quantized dtype was timed at both fills too, ``rate_fraction`` is the rate
    at which its steps read their bytes as a fraction of the full-precision one's, and
    ``own_fixed_ms`` its steps' own part at no fill: what a step loses to the bound splits
    into the two. The cache bytes are ``bench_lib.kv_bytes_read``'s (the average fill of
    a record's steps, as MBU counts them).
    """
    def kv_read(r):  # bytes of the cache a step of record r reads, on average
        return lib.kv_bytes_read(lib.model_config(r["model"]), r["batch"], r["filled"],
                                 r["new_tokens"], r["kv_dtype"])

    ms = lambda r: r["decode_ms_per_step"]
    groups = {}
    for r in records:
        if r.get("case") == "longctx" and r.get("decode_ms_per_step") and r.get("kv_dtype"):
            key = (r["model"], r["batch"], r["capacity"], r.get("block_size"))
            groups.setdefault(key, {}).setdefault(r["kv_dtype"], {})[r["filled"]] = r
    rows = []
    for (model, batch, capacity, block_size), by_dtype in groups.items():
        references = [d for d in by_dtype if d not in kvjax.cache.QUANTIZED]
        if not references or len(by_dtype[references[0]]) < 2:
            continue
        reference = by_dtype[references[0]]
        low, high = reference[min(reference)], reference[max(reference)]
        rate = (kv_read(high) - kv_read(low)) / (ms(high) - ms(low))  # bytes a ms
        fixed = ms(low) - kv_read(low) / rate
        for kv_dtype in kvjax.cache.QUANTIZED:
            steps = by_dtype.get(kv_dtype, {})
            fraction = own_fixed = None
            if min(reference) in steps and max(reference) in steps:
                q_low, q_high = steps[min(reference)], steps[max(reference)]
                q_rate = (kv_read(q_high) - kv_read(q_low)) / (ms(q_high) - ms(q_low))
                fraction, own_fixed = q_rate / rate, ms(q_low) - kv_read(q_low) / q_rate
            for filled, r in sorted(steps.items()):
                if filled not in reference:
                    continue
                ideal = fixed + kv_read(r) / rate
                rows.append(dict(model=model, batch=batch, capacity=capacity,
                                 block_size=block_size, filled=filled, kv_dtype=kv_dtype,
                                 reference=references[0], reference_ms=ms(reference[filled]),
                                 ms=ms(r), speedup=ms(reference[filled]) / ms(r),
                                 rate_GBps=rate / 1e6, fixed_ms=fixed, ideal_ms=ideal,
                                 ideal_speedup=ms(reference[filled]) / ideal,
                                 rate_fraction=fraction, own_fixed_ms=own_fixed))
    return rows


def describe_bound(row: dict) -> str:
    """One line of ``--kv-bound``'s report."""
    paged = f" paged {row['block_size']}" if row["block_size"] else ""
    rate = ("" if row["rate_fraction"] is None
            else f"; its cache read at {row['rate_fraction']:.1%} of {row['reference']}'s rate, "
                 f"the rest of its step {row['own_fixed_ms']:.3f} ms")
    return (f"{row['model']} B={row['batch']} capacity {row['capacity']}{paged} filled "
            f"{row['filled']}, {row['kv_dtype']}: {row['ms']:.3f} ms/step against "
            f"{row['reference_ms']:.3f} ({row['reference']}), {row['speedup']:.3f}x; its bytes "
            f"allow {row['ideal_ms']:.3f} ms, {row['ideal_speedup']:.3f}x ({row['reference']} "
            f"reads its cache at {row['rate_GBps']:.0f} GB/s, the rest of a step takes "
            f"{row['fixed_ms']:.3f} ms){rate}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kv_bound:
        for name in args.kv_bound:
            with open(name) as f:
                rows = kv_bound(json.load(f))
            print(f"# {name}: {len(rows)} quantized step{'s' if len(rows) != 1 else ''} "
                  "with a full-precision step at two fills")
            for row in rows:
                print(describe_bound(row))
        return 0
    if args.plot:  # e.g. the JSON files of several GPU runs, drawn where matplotlib is
        records = []
        for name in args.plot:
            with open(name) as f:
                records += json.load(f)
        plot(records, args.json or args.plot[0])
        return 0
    device = jax.devices()[0]
    args.preset = args.preset or ("cpu" if device.platform == "cpu" else "gpu")
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.decode_shapes = [shape_pair(s) if isinstance(s, str) else s for s in args.decode_shapes]
    args.hf_shapes = args.hf_shapes or args.decode_shapes
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path = args.json or os.path.join(lib.ROOT, "benchmarks", "results",
                                     f"{device.device_kind.replace(' ', '_')}-{date[:10]}.json")

    bounds = lib.measure_bounds(device, args.hbm_gib, args.gemm_size)
    run = Run(args, device, bounds, lib.versions(), date)
    records = [dict(case="bounds", device=device.device_kind, platform=device.platform,
                    memory_bytes=run.memory, preset=args.preset, versions=run.versions,
                    date=date) | bounds]
    print(f"# {records[0]}", flush=True)

    meta = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                kvjax_shape=args.shape, dtype=args.dtype, batch=args.batch, date=date)
    shape_cases = [c for c in args.cases if c in SHAPE_CASES]
    if shape_cases:
        print(f"# {meta}", flush=True)
    for name in shape_cases:
        try:
            rows = SHAPE_CASES[name](run.models.get(("shape", args.shape, args.dtype),
                                                    lambda: random_model(args.shape, args.dtype)),
                                     args)
        except Exception as e:  # a failed case is recorded and the run goes on
            rows = [dict(case=name, failed=f"{type(e).__name__}: {e}")]
        for row in rows:
            records.append(meta | row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
        lib.save_json(records, path)

    points = [(case, p | dict(block_size=block_size or None)) for model in args.models
              for case in args.cases if case in SUITE_CASES for p in SUITE_CASES[case](args, model)
              for block_size in (args.block_sizes if case != "hf" else [0])]
    for i, (case, p) in enumerate(points):
        records.append(run.point(case, p))
        print(f"[{i + 1}/{len(points)} {run.elapsed():.0f}s] {describe(records[-1])}", flush=True)
        lib.save_json(records, path)
    print(f"# wrote {path}")

    if not args.no_plots:
        plot(records, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
