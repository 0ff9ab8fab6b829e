#!/usr/bin/env python
"""Where the time of a prefill and of a decode step goes: a profiler trace, summed by kind.

Runs ``kvjax.generate``'s program (``bench_lib.decode_program``) on a model shape from
``configs/`` with random weights, traces one run of ``max_new_tokens`` 1 (the prefill
and its first token) and one of ``--new`` tokens with ``jax.profiler``, and sums the
device's kernel time by kind: matrix multiplies, fused attention (cuDNN), other fused
kernels (norms, RoPE, sampling, cache writes), copies, collectives (a sharded program:
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

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as lib  # noqa: E402
import kvjax  # noqa: E402

# Kernel name fragments by kind, checked in this order (XLA:GPU, cuDNN and NCCL names).
KINDS = (("collective", ("all_reduce", "all_gather", "reduce_scatter", "nccl")),
         ("attention", ("fmha", "cudnn", "flash")),
         ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "dot")),
         ("copy", ("memcpy", "memset", "copy")))


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def device_time_by_kind(trace_dir: str) -> tuple[dict[str, float], dict[str, float],
                                                 dict[str, int]]:
    """Milliseconds of device kernels by kind in a trace, plus ``busy``, ``span`` and
    ``idle``; milliseconds by kernel name; and launches by kernel name. Device planes
    are ``/device:...``; host planes are left out."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[-1]
    data = jax.profiler.ProfileData.from_file(path)
    totals = dict.fromkeys([k for k, _ in KINDS] + ["other"], 0.0)
    by_name: dict[str, float] = {}
    launches: dict[str, int] = {}
    starts, ends = [], []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):  # one line per CUDA stream
                continue
            for event in line.events:
                totals[kind_of(event.name)] += event.duration_ns / 1e6
                by_name[event.name] = by_name.get(event.name, 0.0) + event.duration_ns / 1e6
                launches[event.name] = launches.get(event.name, 0) + 1
                starts.append(event.start_ns)
                ends.append(event.start_ns + event.duration_ns)
    if not starts:
        raise SystemExit("the trace has no device kernels (a CPU run?): profile on a GPU")
    busy = sum(totals.values())
    span = (max(ends) - min(starts)) / 1e6
    return totals | dict(busy=busy, span=span, idle=max(span - busy, 0.0)), by_name, launches


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

    breakdown, names, launches = {}, {}, {}
    for new in (1, args.new):
        run(new_cache(), new)  # compile and warm up
        cache = new_cache()  # made outside the trace
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                run(cache, new)
            breakdown[new], names[new], launches[new] = device_time_by_kind(trace_dir)
    prefill = breakdown[1]
    step = {k: (breakdown[args.new][k] - prefill[k]) / (args.new - 1) for k in prefill}
    per_step = lambda table, n: (table[args.new][n] - table[1].get(n, 0)) / (args.new - 1)
    step_names = {n: per_step(names, n) for n in names[args.new]}
    # Every kernel a decode step launches: [ms per step, launches per step, kind, name].
    step_kernels = sorted(([round(step_names[n], 5), round(per_step(launches, n), 2), kind_of(n), n]
                           for n in names[args.new] if per_step(launches, n) > 0.5), reverse=True)
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
    count = sum(per_step(launches, n) for n in names[args.new])
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
