#!/usr/bin/env python
"""Prefix-cache eviction policies on synthetic traces (issue 28, docs/prefix_policies.md).

Each workload is a seeded generator of requests (prompt tokens, output tokens) of a kind
real deployments see; every run replays one through the real ``kvjax.paged.BlockManager``
(nothing here decides a hit or a victim) and reads its ``stats()``:

* ``chat``: 8 system prompts (256-1536 tokens) picked with Zipf popularity (s = 1), each
  followed by a fresh user message (16-256) and a reply (32-256);
* ``multiturn``: 150 sessions of 2-6 turns after a common 200-token system prompt; a
  turn's prompt is the previous turns (prompts and replies) plus a new message, and a
  session returns after a pause (exponential, mean a tenth of the trace) while others run;
* ``fewshot``: 4 long templates (1500-3000 tokens, Zipf s = 0.8) + a short question
  (16-64), short answers (8-64);
* ``scan``: a popular 2048-token prefix + a question (16-64) and an answer (32-128);
  before one request in ten, a burst of 1-8 one-off documents (2048-4096 tokens) that are
  read once (LRU lets them push the prefix out; LFU and LRU-K see they were used once).

Requests run one at a time: allocate, then release with the prompt and all its outputs
(no concurrency, so no block is held by another row; a real server holds its running
rows' blocks, which lowers every hit rate a little at the same budget).

For each workload: the hit rate (cached / prompt tokens) of lru, lfu and lru-k (K = 2) at
six device budgets, with no host tier and with a host tier as large as the device pool;
block sizes 16 and 64 at the same bytes. The estimate the docs compare with is ``P_hit =
N_hit / N`` with ``N`` the prompt tokens and ``N_hit`` from an infinite cache (a pool that
never evicts, run through the same ``BlockManager``): all of it for C = infinity, and for a
budget C the tokens its ``C - fresh`` most-hit blocks served there (``fresh``: the blocks
a request adds to the pool while it runs, its mean there): the best fixed set of blocks
(the optimum under the independent reference model), had the budget held no others.

    python benchmarks/prefix_policy.py   # under a minute on 2 cores: the JSON, the tables
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import dataclasses
import functools
import json
import os
import platform
import random
import time

from kvjax.paged import BlockManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "prefix_policy_cpu.json")
VOCAB = 32000
POLICIES = (("lru", 2), ("lfu", 2), ("lru-k", 2))  # (policy, K)
REUSED_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2)  # device budget = row + f x reused
BLOCK_SIZE = 16
OTHER_BLOCK_SIZE = 64
BLOCK_SIZE_FRACTION = 1 / 4  # the budget (in bytes) both block sizes are compared at


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]
    output: list[int]


def _tokens(rng: random.Random, low: int, high: int) -> list[int]:
    return rng.choices(range(VOCAB), k=rng.randint(low, high))


def _zipf(n: int, s: float) -> list[float]:
    return [1 / (rank + 1) ** s for rank in range(n)]


def _popular_prefixes(rng: random.Random, prefixes: int, prefix_length: tuple[int, int],
                      zipf_s: float, question: tuple[int, int], output: tuple[int, int],
                      requests: int) -> list[Request]:
    """Requests that each start with one of ``prefixes`` shared prefixes (picked with
    Zipf popularity ``zipf_s``) and end with a question of their own."""
    shared = [_tokens(rng, *prefix_length) for _ in range(prefixes)]
    weights = _zipf(prefixes, zipf_s)
    return [Request(rng.choices(shared, weights)[0] + _tokens(rng, *question),
                    _tokens(rng, *output)) for _ in range(requests)]


def chat(rng: random.Random) -> list[Request]:
    return _popular_prefixes(rng, 8, (256, 1536), 1.0, (16, 256), (32, 256), 1200)


def multiturn(rng: random.Random) -> list[Request]:
    system = _tokens(rng, 200, 200)
    turns = []  # (time, session, turn, request)
    for session in range(150):
        clock, history = rng.random(), system
        for turn in range(rng.randint(2, 6)):
            request = Request(history + _tokens(rng, 32, 256), _tokens(rng, 64, 256))
            turns.append((clock, session, turn, request))
            history = request.prompt + request.output
            clock += rng.expovariate(10.0)  # the pause before the next turn
    return [request for *_, request in sorted(turns, key=lambda t: t[:3])]


def fewshot(rng: random.Random) -> list[Request]:
    return _popular_prefixes(rng, 4, (1500, 3000), 0.8, (16, 64), (8, 64), 800)


def scan(rng: random.Random) -> list[Request]:
    prefix = _tokens(rng, 2048, 2048)
    requests = []
    while len(requests) < 900:
        if rng.random() < 0.1:
            requests += [Request(_tokens(rng, 2048, 4096), _tokens(rng, 64, 128))
                         for _ in range(rng.randint(1, 8))]
        else:
            requests.append(Request(prefix + _tokens(rng, 16, 64), _tokens(rng, 32, 128)))
    return requests


WORKLOADS = {"chat": chat, "multiturn": multiturn, "fewshot": fewshot, "scan": scan}


@functools.cache
def requests_of(workload: str) -> list[Request]:
    return WORKLOADS[workload](random.Random(f"prefix_policy/{workload}"))


def shared_prefixes(requests: list[Request]) -> list[int]:
    """For each request, the longest prefix of its prompt that an earlier request's prompt
    and output began with (in tokens): what a token-level cache could serve it. Earlier
    sequences are kept sorted: the longest common prefix is with a neighbour of the
    insertion point."""
    def common(a: tuple, b: tuple) -> int:
        low, high = 0, min(len(a), len(b))
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if a[:middle] == b[:middle] else (low, middle - 1)
        return low

    earlier: list[tuple] = []
    lengths = []
    for request in requests:
        prompt = tuple(request.prompt)
        at = bisect.bisect(earlier, prompt)
        lengths.append(max([common(prompt, earlier[i]) for i in (at - 1, at)
                            if 0 <= i < len(earlier)], default=0))
        bisect.insort(earlier, prompt + tuple(request.output))
    return lengths


def ideal_hit_rate(requests: list[Request], prefixes: list[int], block_size: int) -> float:
    """The hit rate of a cache that never evicts, from ``shared_prefixes`` alone: a prefix
    of L tokens serves floor(L / B) * B of them, less one when that is the whole prompt
    (the row computes its last token)."""
    served = 0
    for request, shared in zip(requests, prefixes):
        full = min(shared, len(request.prompt)) // block_size * block_size
        served += full - (full == len(request.prompt))
    return served / sum(len(r.prompt) for r in requests)


def row_blocks(requests: list[Request], block_size: int) -> int:
    """The most blocks one request holds while it runs: its table and a copy-on-write
    source it keeps referenced."""
    return max(-(-(len(r.prompt) + len(r.output)) // block_size) + 1 for r in requests)


def replay(workload: str, block_size: int, budget: int | None, policy: str = "lru", k: int = 2,
           host_blocks: int = 0) -> dict:
    """``workload`` through a ``BlockManager`` of ``budget`` device blocks (None: enough
    that nothing is ever evicted), one request at a time. With ``budget=None`` the result
    also holds ``served`` (the tokens each block served, most first) and ``mean_fresh``
    (blocks a request added beside the cached ones it shared)."""
    requests = requests_of(workload)
    infinite = budget is None
    if infinite:
        budget = sum(-(-(len(r.prompt) + len(r.output)) // block_size) + 1 for r in requests)
    manager = BlockManager(budget, block_size, policy=policy, lru_k=k, host_blocks=host_blocks,
                           host_policy=policy)
    served: dict[int, int] = {}
    fragmentation, fresh = 0.0, 0
    start = time.perf_counter()
    for request in requests:
        allocation = manager.allocate(request.prompt, len(request.output))
        fragmentation += manager.stats()["fragmentation"]
        if infinite:  # a block id is one cached block for good: nothing is evicted
            shared = allocation.cached_tokens // block_size
            fresh += len(allocation.blocks) - shared
            for block in allocation.blocks[:shared]:
                served[block] = served.get(block, 0) + block_size
            for block, _ in allocation.copies:
                served[block] = served.get(block, 0) + block_size - 1
        manager.release(allocation, request.prompt + request.output)
    seconds = time.perf_counter() - start
    stats = manager.stats()
    result = {"workload": workload, "block_size": block_size,
              "budget": None if infinite else budget, "policy": policy, "k": k,
              "host_blocks": host_blocks, "hit_rate": stats["hit_rate"],
              "prompt_tokens": stats["prompt_tokens"], "cached_tokens": stats["cached_tokens"],
              "block_hits": stats["block_hits"], "block_misses": stats["block_misses"],
              "restored_blocks": stats["restored_blocks"], "evictions": stats["evictions"],
              "cached_blocks_at_end": (stats["blocks"]["device"]["cached"]
                                       + stats["blocks"]["host"]["cached"]),
              "mean_fragmentation": fragmentation / len(requests), "seconds": seconds}
    if infinite:
        result["served"] = sorted(served.values(), reverse=True)
        result["mean_fresh"] = fresh / len(requests)
    return result


def static_estimate(infinite: dict, budget: int) -> float:
    """``N_hit(C) / N``: the tokens the ``budget - fresh`` blocks that served most in an
    infinite cache served there, over the prompt tokens."""
    keep = max(budget - round(infinite["mean_fresh"]), 0)
    return sum(infinite["served"][:keep]) / infinite["prompt_tokens"]


def _run(job: tuple) -> dict:
    return replay(*job)


def _find(runs: list[dict], **match) -> dict:
    return next(r for r in runs if all(r[key] == value for key, value in match.items()))


def study(jobs: int) -> dict:
    """Every run of every workload, in ``jobs`` processes, then the timing runs alone."""
    start = time.perf_counter()
    sizes = (BLOCK_SIZE, OTHER_BLOCK_SIZE)
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        infinite = {(r["workload"], r["block_size"]): r
                    for r in pool.map(_run, [(w, b, None) for w in WORKLOADS for b in sizes])}
        plans, runs = {}, []
        for workload in WORKLOADS:
            requests = requests_of(workload)
            reused = len(infinite[workload, BLOCK_SIZE]["served"])
            row = row_blocks(requests, BLOCK_SIZE)
            budgets = [row + round(f * reused) for f in REUSED_FRACTIONS]
            same_bytes = row + round(BLOCK_SIZE_FRACTION * reused)
            other = max(same_bytes * BLOCK_SIZE // OTHER_BLOCK_SIZE,
                        row_blocks(requests, OTHER_BLOCK_SIZE))
            prefixes = shared_prefixes(requests)
            plans[workload] = dict(reused=reused, row=row, budgets=budgets,
                                   size_budgets={str(BLOCK_SIZE): same_bytes,
                                                 str(OTHER_BLOCK_SIZE): other},
                                   ideal={str(b): ideal_hit_rate(requests, prefixes, b)
                                          for b in (1, *sizes)})
            for policy, k in POLICIES:
                runs += [(workload, BLOCK_SIZE, budget, policy, k, host)
                         for budget in budgets for host in (0, budget)]
                runs.append((workload, OTHER_BLOCK_SIZE, other, policy, k, 0))
        results = list(pool.map(_run, runs))
    record = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count(), "jobs": jobs,
              "workloads": {}}
    for workload, plan in plans.items():
        base = infinite[workload, BLOCK_SIZE]
        alone = {str(b): replay(workload, b, plan["size_budgets"][str(b)]) for b in sizes}
        record["workloads"][workload] = {
            "requests": len(requests_of(workload)), **plan,
            "infinite": {str(b): {key: value for key, value in infinite[workload, b].items()
                                  if key != "served"} for b in sizes},
            "static_estimate": {str(b): static_estimate(base, b) for b in plan["budgets"]},
            "us_per_request": {b: 1e6 * r["seconds"] / len(requests_of(workload))
                               for b, r in alone.items()},
            "runs": [r for r in results if r["workload"] == workload]}
    record["seconds"] = time.perf_counter() - start
    return record


def _name(policy: str, k: int) -> str:
    return f"lru-{k}" if policy == "lru-k" else policy


def tables(record: dict) -> str:
    """The markdown tables of docs/prefix_policies.md."""
    names = [_name(p, k) for p, k in POLICIES]
    lines = []
    for workload, data in record["workloads"].items():
        inf = data["infinite"][str(BLOCK_SIZE)]
        lines += [f"**{workload}**: {data['requests']} requests, {inf['prompt_tokens']} prompt "
                  f"tokens; B = {BLOCK_SIZE}: reused blocks {data['reused']}, largest row "
                  f"{data['row']} blocks, mean fresh blocks a request {inf['mean_fresh']:.1f}; "
                  f"infinite cache {inf['hit_rate']:.3f}", "",
                  "| budget (blocks) | " + " | ".join(names) + " | " +
                  " | ".join(f"{n} + host" for n in names) + " | N_hit(C)/N |",
                  "|---" * (2 * len(names) + 2) + "|"]
        for budget in data["budgets"]:
            cells = [_find(data["runs"], block_size=BLOCK_SIZE, budget=budget, policy=p, k=k,
                           host_blocks=host)["hit_rate"]
                     for host in (0, budget) for p, k in POLICIES]
            lines.append(f"| {budget} | " + " | ".join(f"{c:.3f}" for c in cells) +
                         f" | {data['static_estimate'][str(budget)]:.3f} |")
        lines.append("")
    lines += [f"Block size {BLOCK_SIZE} vs {OTHER_BLOCK_SIZE} at the same bytes (the B = "
              f"{BLOCK_SIZE} budget of row + {BLOCK_SIZE_FRACTION} x reused), no host tier:", "",
              "| workload | B | budget (blocks) | infinite, B = 1 | infinite, floor(L/B)B "
              "| infinite, BlockManager | " + " | ".join(names) + " | full blocks / prompt "
              "| cached blocks (infinite) | fragmentation | us / request (lru) |",
              "|---" * (len(names) + 10) + "|"]
    for workload, data in record["workloads"].items():
        for size in (BLOCK_SIZE, OTHER_BLOCK_SIZE):
            budget = data["size_budgets"][str(size)]
            runs = [_find(data["runs"], block_size=size, budget=budget, policy=p, k=k,
                          host_blocks=0) for p, k in POLICIES]
            inf, ideal = data["infinite"][str(size)], data["ideal"]
            lookups = (inf["block_hits"] + inf["block_misses"]) / data["requests"]
            lines.append(
                f"| {workload} | {size} | {budget} | {ideal['1']:.4f} | {ideal[str(size)]:.4f} "
                f"| {inf['hit_rate']:.4f} | " + " | ".join(f"{r['hit_rate']:.3f}" for r in runs)
                + f" | {lookups:.1f} | {inf['cached_blocks_at_end']} | "
                f"{runs[0]['mean_fragmentation']:.3f} | {data['us_per_request'][str(size)]:.0f} |")
    lines += ["", "Largest shortfall of each policy against the best one at the same workload, "
              f"budget and tier (B = {BLOCK_SIZE}):"]
    for policy, k in POLICIES:
        gaps = []
        for workload, data in record["workloads"].items():
            for budget in data["budgets"]:
                for host in (0, budget):
                    same = [r for r in data["runs"] if r["block_size"] == BLOCK_SIZE
                            and r["budget"] == budget and r["host_blocks"] == host]
                    own = _find(same, policy=policy, k=k)["hit_rate"]
                    gaps.append((max(r["hit_rate"] for r in same) - own, workload, budget,
                                 "host" if host else "no host"))
        gap, workload, budget, tier = max(gaps)
        lines.append(f"* {_name(policy, k)}: {gap:.3f} ({workload}, {budget} blocks, {tier})")
    return "\n".join(lines)


def plot(record: dict, path: str) -> None:
    """Hit rate against the budget, one panel per workload (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written; the "
              "tables above are the result")
        return
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(record["workloads"]), figsize=(16, 4))
    for ax, (workload, data) in zip(axes, record["workloads"].items()):
        for policy, k in POLICIES:
            for host, style in ((0, "-"), (1, "--")):
                runs = sorted((r for r in data["runs"] if r["block_size"] == BLOCK_SIZE
                               and r["policy"] == policy and r["k"] == k
                               and bool(r["host_blocks"]) == bool(host)),
                              key=lambda r: r["budget"])
                ax.plot([r["budget"] for r in runs], [r["hit_rate"] for r in runs], style,
                        marker="o", label=_name(policy, k) + (" + host" if host else ""))
        ax.plot(data["budgets"], [data["static_estimate"][str(b)] for b in data["budgets"]],
                ":", color="black", label="N_hit(C)/N")
        ax.axhline(data["infinite"][str(BLOCK_SIZE)]["hit_rate"], color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="device budget (blocks)", ylabel="hit rate", title=workload)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--out", default=OUT, help="the JSON record (default %(default)s)")
    args = parser.parse_args(argv)
    record = study(args.jobs)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(tables(record))
    print(f"\n{record['seconds']:.1f} s; wrote {args.out}")
    plot(record, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
