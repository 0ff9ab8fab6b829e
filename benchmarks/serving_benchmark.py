"""Load generator for an OpenAI-compatible server (``kvjax-serve``; vLLM's too).

Sends ``--requests`` streamed ``/v1/completions`` requests, arriving as a Poisson process
at ``--rate`` requests/s or all at once, ``--concurrency`` of them in flight at most, and
reports requests/s, output tokens/s, time to first token, inter-token latency, time per
output token, end-to-end latency (p50/p99) and the prefix cache's hit rate (from the
server's ``/metrics``). Writes the run as JSON (settings, device, versions, date, one
record per request) and, when matplotlib is installed, a plot beside it.

    python benchmarks/serving_benchmark.py --url http://127.0.0.1:8000 --rate 4
    python benchmarks/serving_benchmark.py --model ./my-llama --server-args "--max-rows 16"
    python benchmarks/serving_benchmark.py --random-shape llama-8b --server-args "--max-rows 64"
    python benchmarks/serving_benchmark.py            # the bundled model

Without ``--url`` it starts ``kvjax-serve`` in a child process (its own Python, so the
client's work does not slow the server) on a free loopback port, for ``--model`` (default
the bundled one) or for a model shape of ``configs/`` with random weights
(``--random-shape``; its text is ``bench_lib.numbered_tokenizer``'s), and stops it after
the run. With ``--in-process`` the same engine runs in this process instead and the
requests go to ``Engine.submit`` with no HTTP between (the same workload, records and
metrics): the difference between the two runs is the server's and the client's part.

    python benchmarks/serving_benchmark.py --random-shape llama-8b --in-process --requests 64

Workload (docs/serving.md, "Load generator"): prompt and output lengths are drawn from
log-normal distributions with means ``--prompt-len`` and ``--output-len`` and shape
``--len-sigma`` (the standard deviation of the length's logarithm), rounded and clipped to
[1, 4 x the mean]; prompts are random token ids in ``TOKEN_RANGE`` (ordinary tokens in
every common vocabulary), after a ``--shared-prefix`` of the same tokens for every
request (a system prompt); outputs run to their drawn length (``ignore_eos``), greedy,
or sampled at ``--temperature`` with request ``i`` seeded ``i``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import bench_lib

TOKEN_RANGE = (100, 1000)


@dataclasses.dataclass
class Record:
    """One request as the client saw it (seconds from the start of the run)."""
    prompt_len: int
    max_tokens: int
    sent: float = 0.0
    first_token: float | None = None
    done: float | None = None
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    def add_chunk(self, start: float) -> None:
        """A chunk of text arrived now (``start``: the run's start)."""
        now = time.perf_counter() - start
        self.first_token = self.first_token or now
        self.chunk_times.append(now)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="the server (e.g. http://127.0.0.1:8000)")
    target.add_argument("--model", default=None,
                        help="start kvjax-serve for this model in a child process (default "
                             "without --url: the bundled model)")
    target.add_argument("--random-shape", default=None, metavar="CONFIG",
                        help="start kvjax-serve for this model shape (a configs/ name, "
                             "llama-1b, llama-8b or bundled) with random weights, in a "
                             "child process")
    parser.add_argument("--server-args", default="",
                        help="kvjax-serve flags of the started server, one string "
                             "(e.g. \"--max-rows 16 --pool-blocks 512\")")
    parser.add_argument("--in-process", action="store_true",
                        help="run the engine in this process and submit to it directly, "
                             "no HTTP (not with --url)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--api-key", default=os.environ.get("KVJAX_API_KEY"))
    parser.add_argument("--model-name", default=None,
                        help="the request's \"model\" (default: the server's first)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rate", type=float, default=None,
                        help="Poisson arrivals, requests/s (default: all at once)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight at most (default: no limit)")
    parser.add_argument("--prompt-len", type=int, default=256, help="mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="mean output tokens")
    parser.add_argument("--len-sigma", type=float, default=0.5,
                        help="log-normal shape of both lengths (0: every length the mean)")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                        help="tokens every prompt starts with, before its own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of every request (default 0: greedy)")
    parser.add_argument("--static-baseline", action="store_true",
                        help="first time kvjax.generate over one static batch of the same "
                             "shapes (min(--requests, the server's --max-rows) prompts of "
                             "--shared-prefix + --prompt-len tokens, --output-len new), in the "
                             "server's process, and report the run's output tokens/s against it")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the run (default: "
                             "benchmarks/results/serving_<date>.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                        help="no run: plot the time to first token and inter-token gaps of "
                             "these earlier runs side by side, to --json's stem + .png")
    args = parser.parse_args(argv)
    for flag in ("requests", "prompt_len", "output_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if (args.rate is not None and args.rate <= 0) or args.len_sigma < 0 or args.shared_prefix < 0:
        parser.error("--rate must be > 0; --len-sigma and --shared-prefix >= 0")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    if args.in_process and args.url is not None:
        parser.error("--in-process runs its own engine: leave out --url")
    return args


def lengths(rng: np.random.Generator, mean: int, sigma: float, n: int) -> list[int]:
    """``n`` log-normal lengths of mean ``mean`` (before clipping), in [1, 4 x mean]."""
    mu = math.log(mean) - sigma ** 2 / 2  # E[exp(N(mu, sigma))] = mean
    drawn = np.rint(rng.lognormal(mu, sigma, n))
    return np.clip(drawn, 1, 4 * mean).astype(int).tolist()


def workload(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    """Each request's prompt token ids and output length."""
    rng = np.random.default_rng(args.seed)
    prefix = rng.integers(*TOKEN_RANGE, args.shared_prefix).tolist()
    prompts = lengths(rng, args.prompt_len, args.len_sigma, args.requests)
    outputs = lengths(rng, args.output_len, args.len_sigma, args.requests)
    return [(prefix + rng.integers(*TOKEN_RANGE, p).tolist(), o)
            for p, o in zip(prompts, outputs)]


async def send(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
               sampling: dict, start: float) -> Record:
    """One streamed completion, timed; ``sampling``: its temperature (and seed)."""
    record = Record(len(prompt), max_tokens, sent=time.perf_counter() - start)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **sampling,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"{response.status_code}: {response.text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    record.completion_tokens = chunk["usage"]["completion_tokens"]
                    record.cached_tokens = (chunk["usage"].get("prompt_tokens_details")
                                            or {}).get("cached_tokens", 0)
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    record.add_chunk(start)
        record.done = time.perf_counter() - start
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"
    return record


async def run(send_one, scrape_now, requests: list[tuple[list[int], int]],
              rate: float | None, concurrency: int | None, seed: int,
              temperature: float = 0.0) -> tuple[list[Record], float, dict, dict]:
    """Sends the requests, each through ``send_one(prompt, max_tokens, sampling,
    start)``; returns their records, the run's seconds and the metrics ``scrape_now()``
    read before and after."""
    before = await scrape_now()
    gate = asyncio.Semaphore(concurrency or len(requests))
    rng = np.random.default_rng(seed + 1)
    start = time.perf_counter()

    async def one(prompt, max_tokens, sampling):
        async with gate:
            return await send_one(prompt, max_tokens, sampling, start)

    tasks = []
    for index, (prompt, max_tokens) in enumerate(requests):
        sampling = ({"temperature": temperature, "seed": index} if temperature > 0 else
                    {"temperature": 0})
        tasks.append(asyncio.create_task(one(prompt, max_tokens, sampling)))
        if rate is not None:
            await asyncio.sleep(rng.exponential(1 / rate))
    records = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    after = await scrape_now()
    return list(records), duration, before, after


async def run_http(args: argparse.Namespace, requests: list[tuple[list[int], int]]
                   ) -> tuple[list[Record], float, dict, dict]:
    """``run`` against the server at ``--url``: streamed completions, its /metrics."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency or len(requests))
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=None,
                                 limits=limits) as client:
        model = (args.model_name
                 or (await client.get("/v1/models")).json()["data"][0]["id"])
        return await run(functools.partial(send, client, model),
                         functools.partial(scrape, client), requests, args.rate,
                         args.concurrency, args.seed, args.temperature)


async def send_in_process(engine, prompt: list[int], max_tokens: int, sampling: dict,
                          start: float) -> Record:
    """One request straight to ``engine`` (no HTTP), timed as ``send`` times a stream:
    at each delta with text."""
    record = Record(len(prompt), max_tokens, sent=time.perf_counter() - start)
    try:
        handle = engine.submit(prompt, max_tokens=max_tokens, stop_tokens=[], **sampling)
        async for delta in handle.stream():
            if delta.text:
                record.add_chunk(start)
        record.completion_tokens = handle.completion_tokens
        record.cached_tokens = handle.cached_tokens or 0
        record.done = time.perf_counter() - start
    except (RuntimeError, ValueError) as e:  # a full queue, a refused request, a failure
        record.error = f"{type(e).__name__}: {e}"
    return record


async def run_in_process(engine, model_name: str, args: argparse.Namespace,
                         requests: list[tuple[list[int], int]]
                         ) -> tuple[list[Record], float, dict, dict]:
    """``run`` against ``engine`` in this process; its metrics are those its server
    would publish (``ServerMetrics``), read the way ``scrape`` reads them."""
    from kvjax.serve.metrics import ServerMetrics

    metrics = ServerMetrics(engine, model_name)

    async def scrape_now() -> dict:
        return metric_samples(metrics.render().decode())

    return await run(functools.partial(send_in_process, engine), scrape_now, requests, args.rate,
                     args.concurrency, args.seed, args.temperature)


async def scrape(client: httpx.AsyncClient) -> dict:
    """The server's metrics (``metric_samples``); empty when it has no /metrics."""
    response = await client.get("/metrics")
    return metric_samples(response.text) if response.status_code == 200 else {}


def metric_samples(text: str) -> dict:
    """Prometheus text as ``{sample name: value}`` (labels joined into the name), the
    ``kvjax_engine_info`` labels under ``"info"``."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kvjax_engine_info":
                samples["info"] = sample.labels
            else:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def percentiles(values: list[float]) -> dict:
    """p50, p99 and the mean, in milliseconds (None without values)."""
    if not values:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    p50, p99 = np.percentile(values, [50, 99]) * 1e3
    return {"p50_ms": float(p50), "p99_ms": float(p99), "mean_ms": float(np.mean(values)) * 1e3}


def gaps(records: list[Record]) -> list[float]:
    """The inter-token gaps of the records: seconds between a request's successive chunks."""
    return [b - a for r in records for a, b in zip(r.chunk_times, r.chunk_times[1:])]


def summary(records: list[Record], duration: float, before: dict, after: dict) -> dict:
    ok = [r for r in records if r.error is None]
    output = sum(r.completion_tokens for r in ok)
    per_token = [(r.chunk_times[-1] - r.first_token) / (r.completion_tokens - 1)
                 for r in ok if r.completion_tokens > 1 and r.chunk_times]
    delta = lambda name: after.get(name, 0) - before.get(name, 0)
    prompt_tokens = delta("kvjax_prompt_tokens_total")
    return {
        "requests": len(records), "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:10],
        "duration_s": duration, "requests_per_s": len(ok) / duration,
        "output_tokens": output, "output_tokens_per_s": output / duration,
        "prompt_tokens": sum(r.prompt_len for r in ok),
        "ttft": percentiles([r.first_token - r.sent for r in ok if r.first_token is not None]),
        "itl": percentiles(gaps(ok)), "tpot": percentiles(per_token),
        "e2e": percentiles([r.done - r.sent for r in ok]),
        # over this run, from the server's counters (None without kvjax's /metrics)
        "prefix_hit_rate": (delta("kvjax_cached_prompt_tokens_total") / prompt_tokens
                            if prompt_tokens else None),
        "engine": {"steps": delta("kvjax_engine_steps_total"),
                   "mean_step_ms": (delta("kvjax_engine_step_seconds_total") * 1e3
                                    / delta("kvjax_engine_steps_total")
                                    if delta("kvjax_engine_steps_total") else None),
                   "decode_steps": delta("kvjax_engine_decode_steps_total"),
                   "prefill_calls": delta("kvjax_engine_prefill_calls_total"),
                   "prefill_tokens": delta("kvjax_engine_prefill_tokens_total")},
        "client_cached_tokens": sum(r.cached_tokens for r in ok),
    }


def report(result: dict) -> str:
    s = result["summary"]
    line = lambda name, p: (f"  {name:<28}" + ("n/a" if p["p50_ms"] is None else
                                               f"p50 {p['p50_ms']:9.1f} ms   p99 "
                                               f"{p['p99_ms']:9.1f} ms"))
    hit = "n/a" if s["prefix_hit_rate"] is None else f"{s['prefix_hit_rate']:.1%}"
    return "\n".join([
        f"{s['requests'] - s['failed']}/{s['requests']} requests in {s['duration_s']:.2f} s "
        f"on {result['device']}",
        f"  requests/s                  {s['requests_per_s']:.2f}",
        f"  output tokens/s             {s['output_tokens_per_s']:.1f}",
        line("time to first token", s["ttft"]), line("inter-token latency", s["itl"]),
        line("time per output token", s["tpot"]), line("end-to-end latency", s["e2e"]),
        f"  prefix cache hit rate       {hit}",
        *([f"  engine                      {e['steps']:.0f} steps of {e['mean_step_ms']:.2f} ms "
           f"on average, {e['prefill_calls']:.0f} prefill calls"]
          if (e := s["engine"])["mean_step_ms"] is not None else []),
        *([f"  static generate, batch {b['batch']:<4}  {b['output_tokens_per_s']:.1f} output "
           f"tokens/s: this run {s['output_tokens_per_s'] / b['output_tokens_per_s']:.1%} of it"]
          if (b := result.get("static_baseline")) else []),
        *(f"  error: {e}" for e in s["errors"])])


def pyplot():
    """matplotlib's pyplot, drawing to files."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt


def plot_cdf(ax, values: list[float], label: str) -> None:
    """The fraction of ``values`` at or below each value (nothing without values)."""
    if values:
        ax.plot(np.sort(values), np.linspace(0, 1, len(values)), label=label)


def save_figure(fig, path: str) -> None:
    """``fig`` as a PNG at ``path`` (through a temporary file), then closed."""
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    pyplot().close(fig)


def write_plot(records: list[Record], path: str) -> None:
    """Each request's time to first token and end-to-end latency against when it was sent,
    and the distributions of TTFT, inter-token gaps and end-to-end latency."""
    ok = [r for r in records if r.error is None and r.first_token is not None]
    fig, (timeline, cdf) = pyplot().subplots(1, 2, figsize=(11, 4))
    timeline.scatter([r.sent for r in ok], [r.first_token - r.sent for r in ok], s=6,
                     label="time to first token")
    timeline.scatter([r.sent for r in ok], [r.done - r.sent for r in ok], s=6,
                     label="end-to-end")
    timeline.set(xlabel="sent at (s)", ylabel="latency (s)")
    timeline.legend()
    plot_cdf(cdf, [r.first_token - r.sent for r in ok], "time to first token")
    plot_cdf(cdf, gaps(ok), "inter-token gap")
    plot_cdf(cdf, [r.done - r.sent for r in ok], "end-to-end")
    cdf.set(xscale="log", xlabel="seconds", ylabel="fraction of requests (gaps)")
    cdf.legend()
    save_figure(fig, path)


def serve(args: argparse.Namespace) -> int:
    """The child process: builds the server (``--model`` or ``--random-shape``), compiles
    its programs, prints ``serving URL WARMUP_S`` and serves until its stdin closes."""
    from kvjax.serve.server import BackgroundServer, create_app

    engine, name, warmup_s, baseline = warm_engine(args)
    app = create_app(engine, model_name=name, api_key=args.api_key)
    with BackgroundServer(app) as server:
        print(f"serving {server.url} {warmup_s:.2f} {json.dumps(baseline)}", flush=True)
        sys.stdin.read()  # until the parent closes it
    return 0


def warm_engine(args: argparse.Namespace) -> tuple:
    """The engine ``kvjax-serve`` would build from ``--server-args`` for ``--model`` or
    ``--random-shape``, its programs compiled: ``(engine, model name, warmup seconds,
    the static baseline or {})``."""
    from kvjax.serve import cli

    serve_args = cli.parse_args(shlex.split(args.server_args)
                                + (["--model", args.model] if args.model else []))
    model, name = None, cli.model_name(serve_args)
    if args.random_shape is not None:
        if not serve_args.no_compile_cache:
            import kvjax.compilation_cache
            kvjax.compilation_cache.enable(serve_args.compile_cache)
        model = bench_lib.random_kvjax_model(args.random_shape, serve_args.dtype or "bfloat16")
        model = dataclasses.replace(model, tokenizer=bench_lib.numbered_tokenizer(
            model.config.vocab_size))
        name = f"{args.random_shape}-random"
    engine = cli.build_engine(serve_args, model)
    start = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - start
    baseline = static_baseline(engine.model, args, engine.max_rows) if args.static_baseline else {}
    return engine, name, warmup_s, baseline


def static_baseline(model, args: argparse.Namespace, max_rows: int) -> dict:
    """``kvjax.generate``'s output tokens/s over one static batch of the run's mean
    shapes (its second call: the first compiles), greedy, no stop token."""
    import kvjax

    rng = np.random.default_rng(args.seed)
    batch = min(args.requests, max_rows)
    prefix = rng.integers(*TOKEN_RANGE, args.shared_prefix).tolist()
    prompts = [prefix + rng.integers(*TOKEN_RANGE, args.prompt_len).tolist()
               for _ in range(batch)]
    run = lambda: kvjax.generate(model, prompts, max_new_tokens=args.output_len, stop_tokens=[])
    run()
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    tokens = sum(len(t) for t in out.tokens)
    return {"batch": batch, "prompt_tokens": len(prompts[0]), "new_tokens": args.output_len,
            "seconds": seconds, "output_tokens_per_s": tokens / seconds}


class ServerProcess:
    """``serve`` in a child process: ``url`` and ``warmup_s`` once ``start`` returns."""

    def __init__(self, args: argparse.Namespace):
        command = [sys.executable, os.path.abspath(__file__), "--serve",
                   "--server-args", args.server_args]
        for flag in ("model", "random_shape"):
            if getattr(args, flag) is not None:
                command += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        if args.static_baseline:
            command += ["--static-baseline", "--seed", str(args.seed), "--requests",
                        str(args.requests), "--shared-prefix", str(args.shared_prefix),
                        "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
        env = os.environ | ({"KVJAX_API_KEY": args.api_key} if args.api_key else {})
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        self.url: str | None = None
        self.warmup_s: float | None = None
        self.baseline: dict = {}

    def start(self, timeout: float = 1800.0) -> "ServerProcess":
        """Waits for the child to serve; a child still compiling after ``timeout`` seconds
        is killed (``RuntimeError``)."""
        watchdog = threading.Timer(timeout, self.process.kill)
        watchdog.start()
        try:
            for line in self.process.stdout:  # its log goes to stderr, this process's
                if line.startswith("serving "):
                    _, self.url, warmup, baseline = line.split(maxsplit=3)
                    self.warmup_s, self.baseline = float(warmup), json.loads(baseline)
                    return self
        finally:
            watchdog.cancel()
        raise RuntimeError(f"the server process ended with code {self.process.wait()} "
                           "before serving (its error is above)")

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def compare_plot(paths: list[str], path: str) -> None:
    """The distributions of time to first token and of inter-token gaps of several runs
    (their JSON files), one line per run, labelled by file name."""
    import matplotlib.ticker

    fig, (ttft, itl) = pyplot().subplots(1, 2, figsize=(11, 4))
    for run_path in paths:
        with open(run_path) as f:
            records = [Record(**r) for r in json.load(f)["records"]]
        ok = [r for r in records if r.error is None and r.first_token is not None]
        label = os.path.splitext(os.path.basename(run_path))[0]
        plot_cdf(ttft, [r.first_token - r.sent for r in ok], label)
        plot_cdf(itl, gaps(ok), label)
    for ax, name in ((ttft, "time to first token"), (itl, "inter-token gap")):
        ax.set(xscale="log", xlabel=f"{name} (s)", ylabel="fraction")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    if args.compare:
        if args.json is None:
            raise SystemExit("--compare writes to --json's stem + .png: pass --json")
        path = os.path.splitext(args.json)[0] + ".png"
        compare_plot(args.compare, path)
        print(f"wrote {path}")
        return 0
    requests = workload(args)
    if args.static_baseline and args.url is not None:
        raise SystemExit("--static-baseline runs in the server's process: leave out --url")
    warmup_s, baseline = None, {}
    if args.in_process:
        engine, name, warmup_s, baseline = warm_engine(args)
        try:
            engine.start()
            records, duration, before, after = asyncio.run(run_in_process(
                engine, name, args, requests))
        finally:
            engine.shutdown()
    else:
        server = None
        if args.url is None:  # kvjax-serve in a child process, on a free loopback port
            server = ServerProcess(args).start()
            args.url, warmup_s, baseline = server.url, server.warmup_s, server.baseline
        try:
            records, duration, before, after = asyncio.run(run_http(args, requests))
        finally:
            if server is not None:
                server.stop()
    info = after.get("info", {})
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    settings = {k: v for k, v in vars(args).items() if k not in ("api_key", "serve")}
    result = {"settings": settings, "device": info.get("device", "unknown"), "server": info,
              "warmup_s": warmup_s, "static_baseline": baseline,
              "versions": bench_lib.versions() | {"httpx": httpx.__version__}, "date": date,
              "summary": summary(records, duration, before, after),
              "records": [dataclasses.asdict(r) for r in records]}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"serving_{date[:19].replace(':', '-')}.json")
    bench_lib.save_json(result, path)
    print(report(result))
    print(f"wrote {path}")
    if not args.no_plot:
        try:
            write_plot(records, os.path.splitext(path)[0] + ".png")
            print(f"wrote {os.path.splitext(path)[0]}.png")
        except ImportError:
            pass
    return 1 if result["summary"]["failed"] == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
