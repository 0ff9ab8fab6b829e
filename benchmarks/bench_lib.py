"""Helpers of ``benchmarks/benchmark.py`` (issue 13's suite) and
``benchmarks/sharding_benchmark.py``: the hardware bounds, model shapes with random
weights, FLOP and byte counts, memory checks, the timed decode program, Hugging Face
peers, profiler traces split by kernel kind, and the plots. Public kvjax API only
(``kvjax.programs``, ``kvjax.params``, ``kvjax.requests``).

Definitions (docs/benchmarks.md, "What the suite measures"):

* model FLOPs of a prompt block of ``P`` tokens per row written after ``S`` cached
  tokens: ``2 x matmul params x P`` (every layer projection and the LM head; the
  embedding lookup is no matmul) plus causal attention counted once,
  ``2 x 2 x layers x heads x head_dim x (P x S + P^2 / 2)``, times the batch;
  MFU = FLOPs / (prefill time x bf16 dense peak of the spec sheet).
* bytes read per decode step: every weight once (an untied embedding only for the
  ``batch`` rows looked up) + the filled K/V at the average fill of the run; MBU =
  bytes / (step time x HBM read bandwidth measured in the same run).
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
import kvjax.params
import kvjax.programs
import kvjax.requests
import kvjax.tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
GIB = 2 ** 30

# bf16 dense tensor-core / MXU peak, TFLOP/s, without sparsity, from the vendors' spec
# sheets: NVIDIA H100 (SXM5 and PCIe), H200, A100 and L4 datasheets; Google Cloud TPU
# v4, v5e, v5p and v6e system-architecture pages. Matched in order against jax's
# ``device_kind`` ("NVIDIA H100 80GB HBM3" is the SXM part; jax names v5e "TPU v5 lite",
# v5p "TPU v5", v6e "TPU v6 lite"). Unknown devices: None, and MFU stays null.
PEAK_BF16_TFLOPS = (
    (r"H100.*PCIe", "NVIDIA H100 PCIe", 756.0),
    (r"H100 (SXM|80GB HBM3)", "NVIDIA H100 SXM", 989.0),
    (r"H200(?! NVL)", "NVIDIA H200 SXM", 989.0),
    (r"A100", "NVIDIA A100", 312.0),
    (r"\bL4\b", "NVIDIA L4", 121.0),
    (r"TPU v4", "Google TPU v4", 275.0),
    (r"TPU v5 ?(lite|e)", "Google TPU v5e", 197.0),
    (r"TPU v5p?$", "Google TPU v5p", 459.0),
    (r"TPU v6 ?(lite|e)", "Google TPU v6e", 918.0),
)


class Skipped(Exception):
    """A case point that is not run (does not fit, out of time, no peer): recorded as skipped."""


def timed(fn, reps: int, setup=None, warmup: int = 1) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` calls. With ``setup``, each call
    is ``fn(setup())`` and only ``fn`` is timed (e.g. a fresh cache to donate)."""
    times = []
    for i in range(warmup + reps):
        args = () if setup is None else (setup(),)
        t0 = time.perf_counter()
        fn(*args)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----- bounds -----------------------------------------------------------------------

def versions() -> dict:
    """jax, jaxlib, kvjax and Python versions, and the checkout's commit: ``$KVJAX_COMMIT``
    where set (for a copy of the tree whose git metadata is not the tree's own, as on a
    machine that receives a working tree), else git's."""
    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    v = dict(jax=jax.__version__, jaxlib=dist("jaxlib"), kvjax=dist("kvjax"),
             python=platform.python_version())
    if os.environ.get("KVJAX_COMMIT"):
        v["kvjax_commit"] = os.environ["KVJAX_COMMIT"]
        return v
    try:  # the checkout's commit, "+" when the tree has changes
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10, check=True).stdout.strip()
        v["kvjax_commit"] = git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def save_json(records, path: str) -> None:
    """Writes ``records`` as JSON to ``path`` through a temporary file (never half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)


def spec_peak(device_kind: str) -> tuple[float | None, str | None]:
    """(bf16 dense TFLOP/s, the spec sheet it is from) for a jax ``device_kind``."""
    for pattern, source, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind):
            return tflops, source
    return None, None


def measure_gemm_tflops(size: int, chain: int = 8, reps: int = 5) -> float:
    """bf16 TFLOP/s of a jitted chain of ``chain`` ``[size, size] @ [size, size]``
    matmuls (float32 accumulation), median of ``reps``."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16) * size ** -0.5

    @jax.jit
    def run(x, w):
        return jax.lax.fori_loop(0, chain, lambda _, y: (y @ w).astype(jnp.bfloat16), x)

    seconds = timed(lambda: jax.block_until_ready(run(a, b)), reps)
    return 2 * chain * size ** 3 / seconds / 1e12


def measure_bounds(device, hbm_gib: float, gemm_size: int) -> dict:
    peak, source = spec_peak(device.device_kind)
    return dict(bound_GBps=measure_hbm_bandwidth(hbm_gib) / 1e9, hbm_probe_gib=hbm_gib,
                peak_tflops=peak, peak_source=source and f"{source} spec sheet, bf16 dense",
                gemm_tflops=measure_gemm_tflops(gemm_size), gemm_size=gemm_size)


# ----- models -------------------------------------------------------------------------

def config_path(name: str) -> str:
    """``bundled`` (the bundled model's shape), a name in configs/, or a config.json path."""
    if name == "bundled":
        return os.path.join(kvjax.BUNDLED_MODEL, "config.json")
    candidates = [os.path.join(CONFIG_DIR, name + ".json"), name,
                  os.path.join(name, "config.json")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
    raise FileNotFoundError(f"no model config {name!r}: use 'bundled', one of {known} "
                            "or a config.json path")


# Short names the benchmarks' ``--shape`` flags give the Llama shapes of configs/.
LLAMA_SHAPES = {"llama-1b": "llama-3.2-1b", "llama-8b": "llama-3.1-8b"}


def model_config(name: str) -> kvjax.ModelConfig:
    """The config of ``name``: as ``config_path`` takes it, or a short name of
    ``LLAMA_SHAPES``."""
    return kvjax.ModelConfig.from_json(config_path(LLAMA_SHAPES.get(name, name)))


def random_kvjax_model(name: str, dtype=jnp.bfloat16) -> kvjax.Model:
    """The shape of config ``name`` with random weights (speed does not depend on them)."""
    config = model_config(name)
    params = jax.block_until_ready(kvjax.params.init_params(config, jax.random.key(0), dtype))
    return kvjax.Model(config=config, params=params)


def numbered_tokenizer(vocab_size: int) -> kvjax.tokenizer.Tokenizer:
    """A word-level tokenizer whose token ``i`` is the word ``t<i>``: text for every id of
    a random-weight model (which has no tokenizer of its own), so that a server streams
    one non-empty text delta per token as it does for a real checkpoint."""
    import tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return kvjax.tokenizer.Tokenizer(words)


class OneModel:
    """Holds one model at a time (the previous one is dropped before the next is built)."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build):
        if key != self.key:
            self.key = self.value = None
            gc.collect()
            self.value, self.key = build(), key
        return self.value


# ----- counts -------------------------------------------------------------------------

def matmul_params(config: kvjax.ModelConfig) -> int:
    """Weights used in matmuls per token: layer projections (the layers' ``w*`` params of
    ``kvjax.params.specs``) and the LM head."""
    layers = sum(int(np.prod(spec.shape)) for layer in kvjax.params.specs(config)["layers"]
                 for name, spec in layer.items() if name.startswith("w"))
    return layers + config.vocab_size * config.hidden_size


def prefill_flops(config: kvjax.ModelConfig, batch: int, tokens: int, start: int = 0) -> float:
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * (
        tokens * start + tokens ** 2 / 2)
    return batch * (2 * matmul_params(config) * tokens + attention)


def param_shapes(config: kvjax.ModelConfig, dtype=jnp.bfloat16):
    return kvjax.params.abstract_params(config, dtype)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def chained_sums(n: int):
    """A jitted ``f(a) -> float32`` that sums the bf16 array ``a`` ``n`` times in a loop,
    each sum depending on the last (``a`` times 1 made from the running total), so that
    the compiler cannot hoist it out of the loop and ``a`` is read ``n`` times."""
    def add_sum(a, total):
        one = (total * 0 + 1).astype(jnp.bfloat16)
        return total + jnp.sum(a * one, dtype=jnp.float32)
    return jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda _, t: add_sum(a, t), jnp.float32(0)))


def measure_hbm_bandwidth(gib: float, reps: int = 5, chain: int = 8, warmup: int = 10) -> float:
    """Bytes/second that the device reads in a jitted ``jnp.sum`` over a flat bf16 array of
    ``gib`` GiB: (time of ``1 + chain`` sums in one program - time of 1) / ``chain``,
    each the best of ``reps`` runs (a bound is what the device can reach).

    The difference cancels what a call costs besides the reads (dispatch, the host's
    wait), as a decode step's time is a difference of two runs. Timing one sum from the
    host counted ~0.13 ms of those on a 1.34 ms read of 4 GiB: 2.79-2.94 TB/s between
    runs on one H100, against 3.13-3.17 TB/s this way and 3.20 TB/s for the kernel
    alone in a trace (docs/experiments.md, 2026-11-26).

    The long program runs ``warmup`` times before anything is timed, and the timed runs
    of the two alternate. Timing all one-sum runs first, on a GPU just started, once
    gave 3425 GB/s, above the H100's 3.35 TB/s spec (docs/experiments.md)."""
    count = max(1, int(gib * 2 ** 30) // 2)
    x = jax.jit(lambda: jnp.ones((count,), jnp.bfloat16))()
    one_sum, many_sums = chained_sums(1), chained_sums(1 + chain)
    run = lambda sums: jax.block_until_ready(sums(x))
    run(one_sum)  # compiles
    for _ in range(warmup):
        run(many_sums)
    one, many = [], []
    for _ in range(reps):
        one.append(timed(lambda: run(one_sum), 1, warmup=0))
        many.append(timed(lambda: run(many_sums), 1, warmup=0))
    del x
    gc.collect()
    return chain * count * 2 / max(min(many) - min(one), 1e-9)


def bytes_per_step(config: kvjax.ModelConfig, params: dict, batch: int, prompt: int, new: int,
                   capacity: int, kv_dtype: str) -> dict:
    """What a decode step reads: all weights (``param_bytes``), the weights a step reads
    (``param_bytes_read``: only the batch's rows of the input embedding when the LM head
    is a matrix of its own), and the K/V (``kv_dtype``, scales included) at the average
    fill ``prompt + new / 2`` and at ``capacity``."""
    total = nbytes(params)
    embed = params["embed"]
    if config.tie_word_embeddings:
        param_read = total  # the LM head reads the whole embedding (counted once)
    else:
        param_read = total - nbytes(embed) + batch * embed.shape[1] * embed.dtype.itemsize
    return {"param_bytes": total, "param_bytes_read": param_read,
            "kv_bytes_avg_fill": kv_bytes_read(config, batch, prompt, new, kv_dtype),
            "kv_bytes_capacity": kv_slot_bytes(config, batch, kv_dtype) * capacity}


def kv_slot_bytes(config: kvjax.ModelConfig, batch: int, kv_dtype: str) -> int:
    """Bytes of one cache slot over the batch's rows, the layers and KV heads: keys and
    values, and an int8/fp8 cache's scales."""
    return (kvjax.cache.estimate_bytes(config, batch, 2, kv_dtype)
            - kvjax.cache.estimate_bytes(config, batch, 1, kv_dtype))


def kv_bytes_read(config: kvjax.ModelConfig, batch: int, filled: int, new: int,
                  kv_dtype: str) -> int:
    """Cache bytes a decode step reads on average over ``new`` steps from ``filled``
    slots: every slot up to the average fill ``filled + new / 2``."""
    return int(kv_slot_bytes(config, batch, kv_dtype) * (filled + new / 2))


def step_bytes(config: kvjax.ModelConfig, batch: int, filled: int, new: int,
               capacity: int, dtype=jnp.bfloat16, kv_dtype: str | None = None) -> int:
    """Bytes read per decode step: weights + K/V at the average fill ``filled + new / 2``
    (as ``bytes_per_step`` counts them; ``kv_dtype`` None: ``dtype``)."""
    b = bytes_per_step(config, param_shapes(config, dtype), batch, filled, new, capacity,
                       kv_dtype or jnp.dtype(dtype).name)
    return b["param_bytes_read"] + b["kv_bytes_avg_fill"]


def cache_bytes(config: kvjax.ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16,
                kv_dtype: str | None = None) -> int:
    return kvjax.cache.estimate_bytes(config, batch, capacity, kv_dtype, dtype=jnp.dtype(dtype).name)


# ----- memory -------------------------------------------------------------------------

def parse_bytes(text: str) -> int:
    """``"80GB"``, ``"12MiB"``, ``"1.5GiB"`` or a plain number of bytes."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2 ** 10, "MIB": 2 ** 20,
             "GIB": 2 ** 30}
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise ValueError(f"not a size: {text!r} (e.g. 80GB, 512MiB, 1000000)")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def device_memory(device, override: int | None) -> int | None:
    """Bytes this process may use on ``device``: ``override``, else the allocator's
    limit (GPU/TPU), else the host's available memory (CPU)."""
    if override:
        return override
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def peak_bytes(device) -> int | None:
    """The device allocator's peak bytes in use so far in this process (None on CPU)."""
    return (device.memory_stats() or {}).get("peak_bytes_in_use")


def program_bytes(compiled) -> int | None:
    """Device bytes a compiled program needs: arguments + outputs + scratch - donated."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def check_fits(what: str, need: int | None, limit: int | None) -> None:
    if need is not None and limit is not None and need > limit:
        raise Skipped(f"{what} needs {need / GIB:.2f} GiB > {limit / GIB:.2f} GiB of device memory")


# ----- the kvjax decode program -----------------------------------------------------

def continued_program(model: kvjax.Model, num_steps: int, decode_kernel: bool | None = None,
                      kv_dtype: str | None = None):
    """``kvjax.generate``'s loop (greedy, cache donated, ``kvjax.programs``' prefill
    chunk, groups of steps and compiler options) on a cache that is continued, as a
    chat turn does: a prompt block at each row's ``start`` (``kvjax.decode``'s), its
    attention over every slot. Called as ``program(params, cache, tokens, lengths,
    start, max_new_tokens, sampling, seed, stop_tokens)``."""
    step, _ = kvjax.programs.step_functions(model, fresh=False, decode_kernel=decode_kernel,
                                            kv_dtype=kv_dtype)

    def run(params, cache, tokens, lengths, start, max_new_tokens, sampling, seed, stops):
        return kvjax.decode(step, params, cache, tokens, lengths, num_steps=num_steps,
                            max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                            stop_tokens=stops, greedy=True, start=start,
                            prefill_chunk=kvjax.programs.PREFILL_CHUNK,
                            sync_every=kvjax.programs.SYNC_EVERY)

    return jax.jit(run, donate_argnums=1, compiler_options=kvjax.programs.compiler_options())


def decode_program(model: kvjax.Model, num_steps: int, prompt_len: int, capacity: int,
                   start: int = 0, decode_kernel: bool | None = None,
                   kv_dtype: str | None = None):
    """``(program, takes_start)``: with ``start`` 0, the program ``kvjax.generate``
    compiles for a fresh cache of ``capacity`` slots, a ``prompt_len``-token block and
    ``num_steps`` loop steps (``kvjax.programs.generation_program``, greedy, its
    ``key_limit``: the prompt attends within itself and decode steps read only the
    slots the generation can fill); otherwise ``continued_program``, which also takes
    ``start``. ``decode_kernel``, ``kv_dtype`` as in ``kvjax.programs.step_functions``."""
    if start:
        return continued_program(model, num_steps, decode_kernel, kv_dtype), True
    key_limit = kvjax.requests.fresh_key_limit(prompt_len, num_steps, capacity)
    return kvjax.programs.generation_program(model, num_steps=num_steps, greedy=True,
                                             key_limit=key_limit, decode_kernel=decode_kernel,
                                             kv_dtype=kv_dtype), False


def decode_inputs(config: kvjax.ModelConfig, batch: int, prompt_len: int, seed: int = 0):
    """The prompt block a decode point runs: random tokens (ids 3 ... vocab - 1, numpy's
    generator seeded ``seed``) and each row's length, as ``kvjax.generate`` would pad
    them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    return tokens, np.full((batch,), prompt_len, np.int32)


def empty_cache(config: kvjax.ModelConfig, batch: int, capacity: int, dtype,
              kv_dtype: str | None = None, block_size: int | None = None):
    """An empty cache: ``kvjax.cache.create``'s, or with ``block_size`` a
    ``PagedKVCache`` of ``batch`` rows' blocks, each row's table a shuffled choice of
    them (as a pool that served other requests hands them out)."""
    if block_size is None:
        return kvjax.cache.create(config, batch, capacity, kv_dtype, dtype)
    pool = kvjax.cache.PagedKVCache.create(config, batch, capacity,
                                           kv_dtype or jnp.dtype(dtype).name,
                                           block_size=block_size)
    tables = np.random.default_rng(0).permutation(pool.num_blocks).reshape(batch, -1)
    return pool.with_tables(tables, np.zeros((batch,), np.int32))


@dataclasses.dataclass
class DecodeTiming:
    compile_s: float
    program_bytes: int | None
    prefill_s: float  # the 1-token run: prefill + first token
    step_s: float | None  # (N-token run - 1-token run) / (N - 1)
    tokens: list[int]  # the first row's new tokens of the N-token run (greedy)


def time_decode(model: kvjax.Model, batch: int, prompt_len: int, new: int, capacity: int,
                reps: int, memory: int | None, start: int = 0,
                decode_kernel: bool | None = None, kv_dtype: str | None = None,
                block_size: int | None = None) -> DecodeTiming:
    """Times one compiled program (``num_steps = new``) run with ``max_new_tokens`` 1 and
    ``new``, a fresh cache for every call (outside the timed region), no stop tokens.

    A ``prompt_len`` block of random tokens (``decode_inputs``) is prefilled at
    positions ``start ...`` of every row. With ``start`` 0 the program is
    ``kvjax.generate``'s for a fresh cache, called with the inputs ``generate`` gives it
    (per-row ``max_new_tokens``, ``MAX_STOP_TOKENS`` stop slots, all unused), so its
    greedy tokens are ``generate``'s for the same model, prompt and capacity. With
    ``start`` > 0 the slots before ``start`` are left as the empty cache has them
    (zeros) but count as filled: the prefill sets each row's length to ``start +
    prompt_len``, exactly as a chat turn continues a cache (``continued_program``).
    With ``block_size`` the cache is a paged pool of such blocks (``empty_cache``)."""
    config, dtype = model.config, model.dtype
    if start + prompt_len + new - 1 > capacity:
        raise ValueError(f"{start} + {prompt_len} + {new} - 1 tokens exceed capacity {capacity}")
    check_fits("weights + cache",
               nbytes(model.params) + cache_bytes(config, batch, capacity, dtype, kv_dtype), memory)
    tokens, lengths = decode_inputs(config, batch, prompt_len)
    starts = np.full((batch,), start, np.int32)
    stops = np.full((kvjax.requests.MAX_STOP_TOKENS,), -1, np.int32)
    sampling = kvjax.SamplingParams.create(batch)
    create = lambda: empty_cache(config, batch, capacity, dtype, kv_dtype, block_size)
    new_cache = lambda: jax.block_until_ready(create())
    program, takes_start = decode_program(model, new, prompt_len, capacity, start, decode_kernel,
                                          kv_dtype)

    def args(cache, n):
        block = (tokens, lengths, starts) if takes_start else (tokens, lengths)
        return (model.params, cache, *block, np.full((batch,), n, np.int32), sampling,
                np.uint32(0), stops)

    t0 = time.perf_counter()
    cache_shape = jax.eval_shape(create)
    compiled = program.lower(*args(cache_shape, new)).compile()
    compile_s = time.perf_counter() - t0
    need = program_bytes(compiled)
    check_fits("the compiled program", need, memory)
    first_row: list[int] = []

    def run(n):
        def call(cache):
            out = jax.block_until_ready(compiled(*args(cache, n)))
            if int(out.steps_run) != n - 1:
                raise RuntimeError(f"expected {n - 1} decode steps, ran {int(out.steps_run)}")
            if n == new and not first_row:
                first_row.extend(np.asarray(out.tokens)[0, :n].tolist())
        return call

    first = timed(run(1), reps, setup=new_cache)
    step = (timed(run(new), reps, setup=new_cache) - first) / (new - 1) if new > 1 else None
    return DecodeTiming(compile_s=compile_s, program_bytes=need, prefill_s=first, step_s=step,
                        tokens=first_row)


# ----- Hugging Face transformers peers ------------------------------------------------

HF_VARIANTS = {  # name -> generate() keywords
    "hf-dynamic": dict(cache_implementation="dynamic", disable_compile=True),
    "hf-static": dict(cache_implementation="static", disable_compile=True),
    # transformers' own torch.compile of the decode step (reduce-overhead) on a static cache
    "hf-static-compile": dict(cache_implementation="static", disable_compile=False),
}


def torch_device(hf_on_cpu: bool) -> str:
    """``"cuda"`` when torch with CUDA is importable, ``"cpu"`` with ``hf_on_cpu``;
    otherwise raises ``Skipped``."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise Skipped(f"torch/transformers not importable ({e})") from e
    if torch.cuda.is_available():
        return "cuda"
    if hf_on_cpu:
        return "cpu"
    raise Skipped("torch has no CUDA device (pass --hf-on-cpu to run the peers on CPU)")


def random_hf_model(name: str, device: str):
    """transformers' model of config ``name``, random bf16 weights, SDPA attention."""
    import torch
    import transformers

    with open(config_path(name)) as f:
        d = json.load(f)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def time_hf(model, variant: str, batch: int, prompt_len: int, new: int, reps: int) -> dict:
    """Prefill seconds (a 1-token ``generate``), seconds per step ((N-token - 1-token) /
    (N - 1)), for the compile variant the first N-token run's extra time (compilation),
    and the peak CUDA bytes of the point."""
    import torch

    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if variant == "hf-static-compile" and device.type != "cuda":
        raise Skipped("transformers compiles the decode step on accelerators only")
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  eos_token_id=None, **HF_VARIANTS[variant])

    def generate(n):
        def call():
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            sync()
            if out.shape[1] != prompt_len + n:
                raise RuntimeError(f"generated {out.shape[1] - prompt_len} tokens, not {n}")
        return call

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = timed(generate(1), reps)
    t0 = time.perf_counter()
    generate(new)()  # the first run of the N-token shape compiles (for the compile variant)
    first_full = time.perf_counter() - t0
    compiles = variant == "hf-static-compile"
    if compiles and not hasattr(model, "_compiled_call"):
        raise RuntimeError("transformers ran the static cache without compiling the decode step")
    full = timed(generate(new), reps, warmup=int(compiles))
    return dict(prefill_s=first, step_s=(full - first) / (new - 1),
                compile_s=first_full - full if compiles else None,
                peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")


# ----- profiler traces (sharding_benchmark.py --profile) ------------------------------

# Kernel name fragments by kind, checked in this order (XLA:GPU, cuDNN, Pallas and NCCL names).
KINDS = (("collective", ("all_reduce", "all_gather", "reduce_scatter", "nccl")),
         ("attention", ("fmha", "cudnn", "flash", "decode_attention")),
         ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "dot")),
         ("copy", ("memcpy", "memset", "copy")))


def kind_of(name: str) -> str:
    """The kind of a device kernel, from its name: one of ``KINDS`` or ``"other"``."""
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


# ----- plots --------------------------------------------------------------------------

def write_plots(records: list[dict], stem: str) -> list[str]:
    """tokens/s vs batch, ms/step vs filled context, cache vs recompute speed-up, as
    ``<stem>_<name>.png`` (each written to a temporary name, then renamed). Returns the
    paths written; raises ImportError without matplotlib."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = [r for r in records if not r.get("failed") and not r.get("skipped")]

    def series(case, x, y, by):
        groups: dict = {}
        for r in ok:
            if r.get("case") == case and r.get(x) is not None and r.get(y) is not None:
                groups.setdefault(by(r), []).append((r[x], r[y]))
        return {k: sorted(v) for k, v in groups.items()}

    plots = {
        "tokens_per_s": (
            series("decode", "batch", "tokens_per_s",
                   lambda r: f"{r['implementation']} {r['model']} {r['prompt_len']}+{r['new_tokens']}")
            | series("hf", "batch", "tokens_per_s",
                     lambda r: f"{r['implementation']} {r['model']} {r['prompt_len']}+{r['new_tokens']}"),
            "batch", "decode tokens/s", True),
        "ms_per_step": (series("longctx", "filled", "decode_ms_per_step",
                               lambda r: f"{r['model']} capacity {r['capacity']}"),
                        "filled context (tokens)", "decode ms/step", False),
        "nocache_speedup": (series("nocache", "total_tokens", "speedup",
                                   lambda r: f"{r.get('kvjax_shape')} batch {r.get('batch')}"),
                            "total tokens (prompt + new)", "cache speed-up over recompute", False),
    }
    written = []
    for name, (groups, xlabel, ylabel, logy) in plots.items():
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in groups.items():
            ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        if logy:
            ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=os.path.basename(stem))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = f"{stem}_{name}.png"
        fig.savefig(path + ".tmp", format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        os.replace(path + ".tmp", path)
        written.append(path)
    return written
