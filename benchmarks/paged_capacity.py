#!/usr/bin/env python
"""Rows a fixed KV budget holds at once, paged against contiguous (issue 28, docs/paged.md).

A contiguous cache gives every row ``max_len`` slots, whatever the row needs: a budget of
``B`` slots holds ``B // max_len`` rows. A paged pool gives a row the blocks its prompt
and output need. Both are run as the serving engine admits requests (``kvjax.serve``:
first come, first served, every block of a request's prompt and ``max_tokens`` taken on
admission): requests are drawn and allocated through the real
``kvjax.paged.BlockManager`` until the first one the pool cannot hold. Prompts are random
tokens, so no prefix is shared (sharing would only fit more rows).

Request lengths are log-normal (a realistic spread: many short requests, a long tail),
clipped to ``[1, max_len]`` together: prompts of median ``--prompt-median`` tokens and
outputs of median ``--output-median``, both with ``sigma`` ``--sigma``; each output runs
to its ``max_tokens`` (as with ``ignore_eos``), so a row's blocks hold exactly its tokens
but for its last, partial block. Reported per block size, over ``--trials`` draws: rows
at once (paged, contiguous and their ratio) and internal fragmentation, the unused slots
of the allocated blocks as a share of the pool's slots.

    python benchmarks/paged_capacity.py --json benchmarks/results/paged_capacity.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_lib as lib  # noqa: E402
from kvjax.paged import BlockManager, PoolExhausted  # noqa: E402


def request_lengths(rng: np.random.Generator, args) -> tuple[int, int]:
    """``(prompt, output)`` tokens of one request, together at most ``max_len``."""
    while True:
        prompt, output = (int(round(rng.lognormal(np.log(median), args.sigma)))
                          for median in (args.prompt_median, args.output_median))
        if prompt >= 1 and output >= 1 and prompt + output <= args.max_len:
            return prompt, output


def fill(rng: np.random.Generator, block_size: int, args) -> dict:
    """Admits requests into a pool of ``args.budget_slots`` until one does not fit."""
    manager = BlockManager(args.budget_slots // block_size, block_size)
    rows = tokens = blocks = 0
    while True:
        prompt, output = request_lengths(rng, args)
        try:  # random ids: no block of one prompt equals another's
            allocation = manager.allocate(rng.integers(0, 2 ** 31, prompt).tolist(), output)
        except PoolExhausted:
            break
        rows, tokens, blocks = rows + 1, tokens + prompt + output, blocks + len(allocation.blocks)
    pool_slots = manager.num_blocks * block_size
    return {"rows": rows, "fragmentation": (blocks * block_size - tokens) / pool_slots,
            "used": blocks * block_size / pool_slots}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=4096, help="a row's most tokens")
    parser.add_argument("--budget-rows", type=int, default=16,
                        help="the budget, in contiguous rows of --max-len slots")
    parser.add_argument("--prompt-median", type=float, default=512)
    parser.add_argument("--output-median", type=float, default=192)
    parser.add_argument("--sigma", type=float, default=0.9)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.budget_slots = args.budget_rows * args.max_len

    records = [{"case": "settings", **vars(args), "versions": lib.versions()}]
    for block_size in args.block_sizes:
        rng = np.random.default_rng(0)
        trials = [fill(rng, block_size, args) for _ in range(args.trials)]
        rows = [t["rows"] for t in trials]
        record = {"case": "paged", "block_size": block_size,
                  "rows_mean": statistics.mean(rows), "rows_min": min(rows),
                  "contiguous_rows": args.budget_rows,
                  "ratio_mean": statistics.mean(rows) / args.budget_rows,
                  "ratio_min": min(rows) / args.budget_rows,
                  "fragmentation_mean": statistics.mean(t["fragmentation"] for t in trials),
                  "fragmentation_max": max(t["fragmentation"] for t in trials),
                  "used_mean": statistics.mean(t["used"] for t in trials)}
        records.append(record)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                          for k, v in record.items()}), flush=True)
    if args.json:
        lib.save_json(records, args.json)


if __name__ == "__main__":
    main()
