"""The decode kernel's machine code, without a GPU: instructions per loop iteration.

The int8/fp8 decode kernel's warps contend for issue slots (docs/experiments.md), so
what one cache block costs in instructions bears on its speed, though a loop with 30%
fewer waited on memory instead and was no faster (2026-12-07); GPU time is scarce. This
script cross-lowers one layer's decode step (``decode_kernel_sweep.decode_step`` on
``operands``' shapes) for CUDA on any machine, takes the kernel's Triton IR from JAX's
Pallas lowering (a JAX internal:
``pallas_call_registration.lowering.lower_jaxpr_to_triton_module``), compiles it for
``--arch`` with the ``triton`` package (``pip install triton``: its ptxas and cuobjdump)
at the tuning's warps and stages, and counts the SASS instructions inside each loop (a
backward branch's range), the main loop being the one over cache blocks.

The ``triton`` package is not the Triton built into jaxlib, so its code is a guide to
what a change does to the loop, not jaxlib's code (on an H100 its counts were within 10%
of the kernel jaxlib compiled: docs/benchmarks.md); time changes on a GPU with whole
steps (``benchmark.py``) or the kernel under ncu.

    pip install triton
    python benchmarks/kernel_sass.py --kinds bfloat16 int8 fp8 paged-int8 \\
        --json benchmarks/results/kernel_sass.json

``--ncu-csv`` counts the loops of the kernel that ran instead, as ncu lists it on the
GPU (no triton package needed):

    ncu -k regex:kvjax --launch-count 1 --page source --print-source sass --csv \\
        python benchmarks/decode_kernel_sweep.py --kinds int8 --points "B8 F16384 C16448" \\
        > int8.csv
    python benchmarks/kernel_sass.py --ncu-csv int8.csv
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_lib as lib  # noqa: E402
import decode_kernel_sweep as sweep  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration  # noqa: E402
from kvjax.kernels import decode_attention as kernel  # noqa: E402

# "/*0a30*/  @!P0 BRA 0x1f00 ;": address, opcode (predicate skipped) and operands.
SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);")


def triton_ir(config, point: tuple[int, int, int], kind: str, block_size: int
              ) -> tuple[str, kernel.Tuning]:
    """The Triton IR (text) of the decode kernel at ``point`` over a ``kind`` cache,
    and the default tuning it was lowered with."""
    batch, filled, capacity = point
    q, k, v, buffers, tables = jax.eval_shape(
        lambda: sweep.operands(config, batch, capacity, kind, block_size))
    positions = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    dtype = kind.removeprefix("paged-")
    tuning = kernel.default_tuning(dtype, capacity, config.head_dim)
    modules = []
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        step = lambda *a: sweep.decode_step(*a, tuning=tuning)
        jax.jit(step).trace(q, k, v, buffers, tables, positions).lower(
            lowering_platforms=("cuda",))
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower
    return modules[0], tuning


def sass(ir: str, tuning: kernel.Tuning, arch: int) -> str:
    """``ir`` compiled by the triton package for compute capability ``arch``, as
    cuobjdump lists it."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ttir")
        with open(source, "w") as f:
            f.write(ir)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": tuning.num_warps,
                                           "num_stages": tuning.num_stages})
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        return subprocess.run([tool, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout


def loops(listing: str) -> list[dict]:
    """Each loop of a SASS listing (the range a backward branch jumps over), in address
    order: its instruction count and opcodes (modifiers dropped) by count."""
    instructions = [(int(m.group(1), 16), m.group(2), m.group(3))
                    for m in map(SASS_LINE.match, listing.splitlines()) if m]
    found = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [op.split(".")[0] for at, op, _ in instructions if start <= at <= address]
            found.append({"start": hex(start), "instructions": len(body),
                          "opcodes": dict(collections.Counter(body).most_common())})
    return sorted(found, key=lambda loop: int(loop["start"], 16))


def ncu_listing(path: str) -> str:
    """The SASS of the kernel ncu profiled, from ``ncu --page source --print-source sass
    --csv`` (rows of absolute address and instruction), in cuobjdump's form for
    ``loops``: addresses and branch targets counted from the kernel's first
    instruction."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if len(row) == 2 and row[0].startswith("0x")]
    if not rows:
        raise ValueError(f"{path} holds no SASS rows: write it with ncu's --page source "
                         "--print-source sass --csv")
    base = int(rows[0][0], 16)

    def relative(match):  # an address inside the kernel, as an offset from its start
        address = int(match.group(0), 16)
        return hex(address - base) if address >= base else match.group(0)

    return "\n".join(f"/*{int(address, 16) - base:04x}*/ "
                     f"{re.sub(r'0x[0-9a-f]{8,}', relative, text.strip())} ;"
                     for address, text in rows)


def report(name: str, found: list[dict]) -> None:
    """Prints the instruction count of each loop ``loops`` found."""
    summary = ", ".join(f"{loop['instructions']}" for loop in found)
    print(f"{name}: instructions a loop iteration: {summary}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", help="a configs/ name")
    parser.add_argument("--point", default="B8 F16384 C16448")
    parser.add_argument("--kinds", nargs="+", choices=sweep.KINDS,
                        default=["bfloat16", "int8", "fp8"])
    parser.add_argument("--block-size", type=int, default=16, help="paged kinds' blocks")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--ncu-csv", nargs="+", default=[],
                        help="count the loops of these ncu source listings instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.ncu_csv:
        records = [{"ncu_csv": path, "loops": loops(ncu_listing(path))} for path in args.ncu_csv]
        for record in records:
            report(record["ncu_csv"], record["loops"])
        if args.json:
            lib.save_json(records, args.json)
        return

    import triton

    config = lib.model_config(args.shape)
    point = sweep.parse_point(args.point)
    records = []
    for kind in args.kinds:
        ir, tuning = triton_ir(config, point, kind, args.block_size)
        found = loops(sass(ir, tuning, args.arch))
        records.append({"kind": kind, "point": args.point, "shape": args.shape,
                        "arch": args.arch, "tuning": tuning.__dict__, "loops": found,
                        "triton": triton.__version__, "versions": lib.versions(),
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        report(kind, found)
    if args.json:
        lib.save_json(records, args.json)


if __name__ == "__main__":
    main()
