"""Prometheus metrics of a served engine, in a registry of their own.

``ServerMetrics(engine, model_name)`` holds a ``CollectorRegistry`` per app (several apps
in one process never collide) with

* histograms the server observes as each request ends (``observe(handle)``), from the
  request handle's timestamps: time to first token, the gaps between its tokens
  (inter-token latency), time per output token after the first, end-to-end latency and
  time in the queue;
* what ``engine.stats()`` says at each scrape: requests running, waiting, refused,
  finished and cancelled, prompt, generation and cached prompt tokens, KV pool blocks
  and bytes, the prefix cache's hit rate, evictions by tier and host-tier traffic;
* ``kvjax_engine_info``: the model, device and engine settings as labels.

``render()`` is the Prometheus text format. docs/serving.md says what each one means.
"""

from __future__ import annotations

import importlib.metadata
from typing import Iterator

import jax
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

# Bucket bounds in seconds, from a millisecond (a GPU decode step) to minutes (CPU, queues)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                   60.0, 120.0, 240.0, 480.0, 960.0)

# (name, kind, help, the path of its value in engine.stats())
ENGINE_METRICS = (
    ("kvjax_requests_running", "gauge", "requests holding a row (prefilling or decoding)",
     ("rows_running",)),
    ("kvjax_requests_prefilling", "gauge", "running requests still in their prompt",
     ("rows_prefilling",)),
    ("kvjax_rows_total", "gauge", "rows the engine runs at once at most", ("rows_total",)),
    ("kvjax_requests_waiting", "gauge", "requests queued for a row and blocks",
     ("requests_waiting",)),
    ("kvjax_requests_refused", "counter", "requests refused: the queue was full",
     ("requests_refused",)),
    ("kvjax_requests_finished", "counter", "requests ended by a stop token or string, or "
     "max_tokens", ("requests_finished",)),
    ("kvjax_requests_cancelled", "counter", "requests cancelled (client gone, shutdown)",
     ("requests_cancelled",)),
    ("kvjax_prompt_tokens", "counter", "prompt tokens of admitted requests",
     ("prompt_tokens",)),
    ("kvjax_cached_prompt_tokens", "counter",
     "prompt tokens served from the prefix cache instead of computed",
     ("cached_prompt_tokens",)),
    ("kvjax_generation_tokens", "counter", "tokens generated", ("generation_tokens",)),
    ("kvjax_engine_steps", "counter", "engine steps that did work", ("steps",)),
    ("kvjax_engine_step_seconds", "counter", "wall time of those steps (over steps: the mean "
     "step)", ("step_seconds",)),
    ("kvjax_engine_decode_steps", "counter", "decode steps run over the rows",
     ("decode_steps",)),
    ("kvjax_engine_prefill_calls", "counter", "calls of the prefill program",
     ("prefill_calls",)),
    ("kvjax_engine_prefill_tokens", "counter", "prompt tokens those calls computed",
     ("prefill_tokens",)),
    ("kvjax_kv_blocks_used", "gauge", "KV pool blocks held by running requests",
     ("pool_blocks_used",)),
    ("kvjax_kv_blocks_cached", "gauge", "KV pool blocks holding cached prefixes no request "
     "holds (evictable)", ("pool_blocks_cached",)),
    ("kvjax_kv_blocks_free", "gauge", "KV pool blocks holding nothing", ("pool_blocks_free",)),
    ("kvjax_kv_blocks_total", "gauge", "KV pool blocks on the device", ("pool_blocks_total",)),
    ("kvjax_kv_pool_used_bytes", "gauge", "bytes of the KV pool held by running requests",
     ("pool_bytes_used",)),
    ("kvjax_kv_pool_bytes", "gauge", "bytes of the KV pool on the device",
     ("pool_bytes_total",)),
    ("kvjax_prefix_cache_hit_rate", "gauge",
     "prompt tokens served from the prefix cache / prompt tokens, since the start",
     ("prefix_cache", "hit_rate")),
    ("kvjax_prefix_cache_restored_blocks", "counter",
     "cached blocks copied back from the host tier", ("prefix_cache", "restored_blocks")),
    ("kvjax_prefix_cache_offloaded_blocks", "counter",
     "cached blocks moved to the host tier", ("prefix_cache", "offloaded_blocks")),
)


class ServerMetrics:
    """The metrics of one app serving ``engine``; ``registry`` is its own."""

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        histogram = lambda name, doc, buckets: Histogram(name, doc, buckets=buckets,
                                                         registry=self.registry)
        self.time_to_first_token = histogram(
            "kvjax_time_to_first_token_seconds",
            "from submission to the first generated token", TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "kvjax_inter_token_latency_seconds",
            "time between two successive generated tokens of a request", TPOT_BUCKETS)
        self.time_per_output_token = histogram(
            "kvjax_time_per_output_token_seconds",
            "mean time between a request's generated tokens after the first", TPOT_BUCKETS)
        self.e2e_latency = histogram(
            "kvjax_e2e_request_latency_seconds",
            "from submission to the last token, of requests that ended on stop or length",
            LATENCY_BUCKETS)
        self.queue_time = histogram(
            "kvjax_request_queue_time_seconds", "from submission to admission to a row",
            LATENCY_BUCKETS)
        self.registry.register(_EngineCollector(engine, model_name))

    def observe(self, handle) -> None:
        """Records an ended (or cancelled) request's latencies from its timestamps."""
        if handle.admitted_at is not None:
            self.queue_time.observe(handle.admitted_at - handle.submitted_at)
        if handle.first_token_at is None:
            return
        self.time_to_first_token.observe(handle.first_token_at - handle.submitted_at)
        times = handle.token_times
        for earlier, later in zip(times, times[1:]):
            self.inter_token_latency.observe(later - earlier)
        if handle.finish_reason in ("stop", "length"):
            self.e2e_latency.observe(handle.finished_at - handle.submitted_at)
            if handle.completion_tokens > 1:
                self.time_per_output_token.observe(
                    (handle.finished_at - handle.first_token_at) / (handle.completion_tokens - 1))

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads ``engine.stats()`` at each scrape (no copy of the engine's counters)."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        cache = engine.prefix_cache
        self.info = {"model": model_name, "device": jax.devices()[0].device_kind,
                     "kvjax_version": _version(), "max_rows": str(engine.max_rows),
                     "max_len": str(engine.max_len), "block_size": str(cache.block_size),
                     "kv_dtype": cache.kv_dtype,
                     "prefix_caching": str(engine.prefix_caching).lower(),
                     "mixed_steps": str(engine.mixed_steps).lower()}

    def collect(self) -> Iterator:
        stats = self.engine.stats()
        yield InfoMetricFamily("kvjax_engine", "the model, device and engine settings",
                               value=self.info)
        for name, kind, doc, path in ENGINE_METRICS:
            value = _get(stats, path)
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=value)
        yield GaugeMetricFamily("kvjax_kv_cache_usage_ratio",
                                "KV pool blocks held by running requests / blocks on the "
                                "device", value=stats["pool_blocks_used"]
                                / stats["pool_blocks_total"])
        evictions = CounterMetricFamily("kvjax_prefix_cache_evictions",
                                        "cached blocks evicted, by the tier they left",
                                        labels=["tier"])
        for tier, count in stats["prefix_cache"]["evictions"].items():
            evictions.add_metric([tier], count)
        yield evictions


def _get(stats: dict, path: tuple[str, ...]):
    for key in path:
        stats = stats[key]
    return stats


def _version() -> str:
    try:
        return importlib.metadata.version("kvjax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
