#!/usr/bin/env python
"""Where the time of a prefill and of a decode step goes: a profiler trace, summed by kind.

Runs ``kvjax.generate``'s program (``bench_lib.decode_program``) on a model shape from
``configs/`` with random weights, traces a run of ``max_new_tokens`` 1 (the prefill
and its first token) and one of ``--new`` tokens with ``jax.profiler`` (one trace, after
a throwaway run, the runs split at the pauses between them: ``traced_runs``), and sums the
device's kernel time by kind: matrix multiplies, fused attention (cuDNN, or
``kvjax.decode_kernel``), other fused kernels (norms, RoPE, sampling, cache writes),
copies, collectives (a sharded program:
``scripts/sharding_benchmark.py --profile``), and idle time (the span of the
device's work less its busy time). A decode step is (``--new`` run - 1-token run) /
(``--new`` - 1); every kernel a step launches is listed with its time and launches per
step (``decode_step_kernels`` in the JSON). The kinds are read from the kernels' names
(XLA:GPU and cuDNN's); a CPU trace has no device planes, so there it stops with a
message.

Usage::

    python scripts/profile_step.py --model llama-3.1-8b --batch 1 --prompt 2048 --new 64
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as lib  # noqa: E402
import kvjax  # noqa: E402

# Kernel name fragments by kind, checked in this order (XLA:GPU, cuDNN and NCCL names).
KINDS = (("collective", ("all_reduce", "all_gather", "reduce_scatter", "nccl")),
         ("attention", ("fmha", "cudnn", "flash", "decode_attention")),
         ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "dot")),
         ("copy", ("memcpy", "memset", "copy")))


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def traced_runs(once, tokens: tuple[int, ...], pause_s: float = 0.3) -> list[list[tuple]]:
    """Kernel events ``(start_ns, end_ns, name)`` on the first device of one
    ``jax.profiler`` trace of ``once(n)`` for each ``n`` in ``tokens``, ``pause_s`` apart,
    one list per run (``split_runs``). A trace can miss the first kernels after it
    starts, so callers make their first run a throwaway. Raises RuntimeError when the
    trace has no device kernels (CPU)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for n in tokens:
                once(n)
                time.sleep(pause_s)
        path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[-1]
        data = jax.profiler.ProfileData.from_file(path)
    planes = sorted((p for p in data.planes if p.name.startswith("/device:")), key=lambda p: p.name)
    events = [(e.start_ns, e.start_ns + e.duration_ns, e.name) for p in planes[:1]
              for line in p.lines if line.name.lower().startswith("stream")  # a line per stream
              for e in line.events]
    if not events:
        raise RuntimeError("the trace has no device kernels (a CPU run?): profile on a GPU")
    return split_runs(events, len(tokens))


def split_runs(events: list[tuple[int, int, str]], count: int) -> list[list]:
    """Kernel events ``(start_ns, end_ns, name)`` of ``count`` runs separated by pauses,
    split at the ``count - 1`` longest gaps between one kernel's end and the next's start."""
    events = sorted(events)
    gaps, last_end = [], events[0][1]  # (the gap before event i, i)
    for i, (start, end, _) in enumerate(events[1:], 1):
        gaps.append((start - last_end, i))
        last_end = max(last_end, end)
    cuts = [0, *sorted(i for _, i in sorted(gaps)[len(gaps) - count + 1:]), len(events)]
    return [events[a:b] for a, b in zip(cuts, cuts[1:])]


def kernel_ms_by_kind(run: list[tuple[int, int, str]]) -> dict[str, float]:
    """Milliseconds of kernel time by kind in one run, plus ``busy`` (their sum), ``span``
    (first start to last end) and ``idle`` (span less busy, at least 0)."""
    by_kind = dict.fromkeys([k for k, _ in KINDS] + ["other"], 0.0)
    for start, end, name in run:
        by_kind[kind_of(name)] += (end - start) / 1e6
    busy, span = sum(by_kind.values()), (max(end for _, end, _ in run) - run[0][0]) / 1e6
    return by_kind | dict(busy=busy, span=span, idle=max(span - busy, 0.0))


def per_step(one: dict[str, float], many: dict[str, float], new: int) -> dict[str, float]:
    """A decode step's share of each figure: (``new``-token run - 1-token run) / (new - 1)."""
    return {k: (many[k] - one.get(k, 0)) / (new - 1) for k in many}


def ms_and_launches_by_name(run: list[tuple[int, int, str]]) -> tuple[dict[str, float], dict[str, int]]:
    """Milliseconds and launches of each kernel name in one run."""
    ms: dict[str, float] = {}
    launches: dict[str, int] = {}
    for start, end, name in run:
        ms[name] = ms.get(name, 0.0) + (end - start) / 1e6
        launches[name] = launches.get(name, 0) + 1
    return ms, launches


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="configs/ name or config.json")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the breakdown here too")
    args = parser.parse_args(argv)

    model = lib.random_kvjax_model(args.model)
    config, capacity = model.config, args.prompt + args.new
    program = lib.decode_program(config, args.new, None, True)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.prompt),
                                               np.int32)
    fixed = (tokens, np.full((args.batch,), args.prompt, np.int32),
             np.zeros((args.batch,), np.int32))
    controls = (kvjax.SamplingParams.create(args.batch), np.uint32(0), np.full((1,), -1, np.int32))

    def new_cache():
        return jax.block_until_ready(kvjax.KVCache.create(config, args.batch, capacity, model.dtype))

    def run(cache, new: int) -> None:
        jax.block_until_ready(program(model.params, cache, *fixed, np.int32(new), *controls))

    run(new_cache(), args.new)  # compile and warm up
    caches = iter([new_cache() for _ in range(3)])  # made outside the trace
    try:  # a throwaway 1-token run, then the 1-token and the --new run
        _, *runs = traced_runs(lambda new: run(next(caches), new), (1, 1, args.new))
    except RuntimeError as e:
        raise SystemExit(str(e))
    breakdown, names, launches = {}, {}, {}
    for new, events in zip((1, args.new), runs):
        breakdown[new] = kernel_ms_by_kind(events)
        names[new], launches[new] = ms_and_launches_by_name(events)
    prefill = breakdown[1]
    step = per_step(prefill, breakdown[args.new], args.new)
    step_names = per_step(names[1], names[args.new], args.new)
    step_launches = per_step(launches[1], launches[args.new], args.new)
    # Every kernel a decode step launches: [ms per step, launches per step, kind, name].
    step_kernels = sorted(([round(step_names[n], 5), round(step_launches[n], 2), kind_of(n), n]
                           for n in names[args.new] if step_launches[n] > 0.5), reverse=True)
    top = lambda by_name: {kind: sorted(((round(t, 4), n) for n, t in by_name.items()
                                         if kind_of(n) == kind), reverse=True)[:5]
                           for kind in prefill if kind in dict(KINDS) or kind == "other"}
    report = dict(model=args.model, batch=args.batch, prompt=args.prompt, new=args.new,
                  device=jax.devices()[0].device_kind, jax=jax.__version__,
                  prefill_ms=prefill, decode_step_ms=step, prefill_top_kernels=top(names[1]),
                  decode_step_top_kernels=top(step_names), decode_step_kernels=step_kernels)
    for name, row in (("prefill (+ first token)", prefill), ("decode step", step)):
        parts = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("span", "busy"))
        print(f"{name}: span {row['span']:.3f} ms, busy {row['busy']:.3f} ms: {parts}")
    count = sum(step_launches.values())
    print(f"decode step: {count:.1f} kernel launches; each kernel launched once or more per step:")
    for ms, n, kind, name in step_kernels:
        print(f"  {1e3 * ms:8.2f} us {n:6.2f}x  {kind:9s} {name[:90]}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    jax.numpy.zeros(())  # initialise the backend before tracing
    main()
