"""``kvjax-generate`` / ``python scripts/generate.py``: generate text, stream it, or chat."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading

import kvjax
from kvjax import memory
from kvjax.requests import make_request
from kvjax.tokenizer import Tokenizer

DEFAULT_PROMPT = "The Python interpreter"

EXAMPLES = """examples:
  python scripts/generate.py                       # the bundled model, a default prompt, streaming
  python scripts/generate.py --prompt "The list type" --max-new-tokens 100 --stream
  python scripts/generate.py --model ./my-llama --prompt "Hi" --prompt "Once upon a time" \\
      --temperature 0.8 --top-p 0.95 --seed 1 --json
  echo "Tell me about tuples" | python scripts/generate.py --quiet
  python scripts/generate.py --model Qwen/Qwen2.5-0.5B-Instruct --chat
  python scripts/generate.py --no-cache --max-new-tokens 64   # the recompute baseline
  python scripts/generate.py --model ./my-llama --prompt-file long.txt --kv-dtype int8 \
      --dry-run --memory-budget 24GiB    # memory per device, nothing loaded or compiled

output: one prompt: the prompt and its continuation. Several prompts: each row after a line
  "--- row N ---"; with --stream, one line "[N] text" per piece of row N, its newlines
  written \\n, carriage returns \\r and backslashes \\\\. --quiet leaves out the prompts
  and the stats line (stderr).

exit codes: 0 ok, 1 bad input or model (--dry-run: the run does not fit), 2 bad flags,
  130 interrupted (Ctrl-C stops a run at once)
"""

# JAX's backends to start for each --platform, tried in turn: the accelerator (a GPU is CUDA
# or ROCm) and the CPU, where kvjax's host callbacks run; and the package to install
_BACKENDS = {"cpu": ("cpu",), "gpu": ("cuda,cpu", "rocm,cpu"), "tpu": ("tpu,cpu",)}
_INSTALL = {"cpu": "jax", "gpu": "jax[cuda13]", "tpu": "jax[tpu]"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kvjax-generate", description="Generate text with a KV-cached JAX decoder.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(parser)
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text; repeat for a batch (one row each)")
    parser.add_argument("--prompt-file", action="append", default=[],
                        help="a file whose whole text is one prompt (repeatable)")
    sampling = parser.add_argument_group(
        "sampling", "unset values come from the model's generation_config.json when it "
        "samples (do_sample: true); otherwise decoding is greedy without filters")
    sampling.add_argument("--max-new-tokens", type=int, default=64)
    sampling.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=None, help="0 = off")
    sampling.add_argument("--top-p", type=float, default=None, help="1 = off")
    sampling.add_argument("--min-p", type=float, default=None, help="0 = off")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--stop", type=int, action="append", default=None, metavar="ID",
                          help="stop token id (repeatable); default from generation_config.json")
    run = parser.add_argument_group("run")
    run.add_argument("--capacity", type=int, default=None, help="KV cache slots per row")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: bfloat16 on GPU/TPU, float32 on CPU")
    run.add_argument("--kv-dtype", default=None, choices=list(kvjax.cache.KV_DTYPES),
                     help="what the KV cache stores (default: --dtype); int8 and fp8 hold "
                          "about half the bytes of bfloat16 (codes and a float32 scale per "
                          "token and KV head)")
    run.add_argument("--window", type=int, default=None, metavar="W",
                     help="streaming: each token sees the first --sink-tokens and its last W "
                          "positions; generation and chat go on past the cache with memory "
                          "that never grows (default with --sink-tokens: --capacity minus the "
                          "sinks)")
    run.add_argument("--sink-tokens", type=int, default=None, metavar="S",
                     help="streaming: keep the first S positions (attention sinks; 4 is "
                          "StreamingLLM's choice) besides the --window")
    run.add_argument("--no-cache", action="store_true",
                     help="recompute the whole sequence every step (the baseline)")
    add_runtime_flags(run)
    add_mesh_flags(run)
    paged = parser.add_argument_group(
        "prefix cache", "--paged runs rows in a pool of KV blocks that keeps the prefixes they "
        "computed, for later requests and chat turns (docs/paged.md)")
    paged.add_argument("--paged", action="store_true",
                       help="use a prefix cache (kvjax.PrefixCache); with --chat, a /reset "
                            "then a repeated system prompt is served from it")
    paged.add_argument("--block-size", type=int, default=None, metavar="N",
                       help="slots per block, a power of two (default 16)")
    paged.add_argument("--prefix-cache-mb", type=int, default=None, metavar="M",
                       help="MiB of device memory for the pool (default 1024)")
    paged.add_argument("--host-cache-mb", type=int, default=None, metavar="M",
                       help="MiB of host memory for blocks evicted from the device "
                            "(default 0: dropped)")
    paged.add_argument("--eviction", choices=["lru", "lfu", "lru-k"], default=None,
                       help="which unused cached block gives way first (default lru)")
    paged.add_argument("--stats", action="store_true",
                       help="print the prefix cache's statistics (hit rate, blocks, "
                            "evictions) as JSON on stderr after the run")
    plan = parser.add_argument_group(
        "memory planning", "--dry-run reads only config.json and the tokenizer: no weights "
        "loaded, nothing compiled")
    plan.add_argument("--dry-run", action="store_true",
                      help="print the weights, KV cache and scratch bytes per device this run "
                           "would need, the device's memory and whether it fits (exit 0) or not "
                           "(exit 1, with the largest batch and capacity that fit)")
    plan.add_argument("--memory-budget", type=_bytes_flag, default=None, metavar="BYTES",
                      help="the memory of a device for --dry-run (default: the device's, or "
                           "on CPU the host's RAM shared by its devices); a number of bytes or "
                           "with a unit: 512MiB, 8GiB, 8G (= GiB), 8GB (10^9)")
    dist = parser.add_argument_group("several processes (run the same command in each)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    dist.add_argument("--num-processes", type=int, default=None)
    dist.add_argument("--process-id", type=int, default=None)
    output = parser.add_argument_group("output")
    output.add_argument("--stream", action="store_true",
                        help="print text as it is generated (several prompts: one line "
                             "\"[N] text\" per piece, newlines escaped as \\n)")
    output.add_argument("--chunk-size", type=int, default=16,
                        help="decode steps per compiled chunk when streaming")
    output.add_argument("--json", action="store_true",
                        help="one JSON object with tokens, texts and stats (JSON lines with --stream)")
    output.add_argument("--quiet", action="store_true", help="only the generated text")
    output.add_argument("--chat", action="store_true",
                        help="interactive multi-turn chat (/reset, /stats, /quit)")
    output.add_argument("--system", default=None, help="system message for --chat")
    output.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.chat and (args.json or args.prompt or args.prompt_file):
        parser.error("--chat is interactive: it takes no --prompt, --prompt-file or --json")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--capacity", args.capacity),
                        ("--chunk-size", args.chunk_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be an integer >= 1")
    if args.dry_run and (args.chat or args.no_cache):
        parser.error("--dry-run plans a generation's KV cache: it takes no --chat or --no-cache")
    if args.memory_budget is not None and not args.dry_run:
        parser.error("--memory-budget is the device memory a --dry-run plans for: pass --dry-run")
    if args.kv_dtype is not None and args.no_cache:
        parser.error("--kv-dtype sets what the KV cache stores; --no-cache keeps none")
    paged_flags = [flag for flag, value in (
        ("--block-size", args.block_size), ("--prefix-cache-mb", args.prefix_cache_mb),
        ("--host-cache-mb", args.host_cache_mb), ("--eviction", args.eviction),
        ("--stats", args.stats or None)) if value is not None]
    if paged_flags and not args.paged:
        parser.error(f"{paged_flags[0]} sets up the prefix cache: pass --paged too")
    conflicts = [flag for flag, value in (
        ("--no-cache", args.no_cache), ("--window", args.window is not None),
        ("--sink-tokens", args.sink_tokens is not None), ("--dry-run", args.dry_run)) if value]
    if args.paged and conflicts:
        parser.error(f"--paged runs rows in one pool of blocks that keeps whole prefixes: it "
                     f"takes no {conflicts[0]}")
    if (args.window is not None or args.sink_tokens is not None) and args.no_cache:
        parser.error("--window and --sink-tokens say what the KV cache keeps; --no-cache keeps "
                     "none")
    check_runtime_flags(parser, args)
    if len({args.coordinator is None, args.num_processes is None, args.process_id is None}) > 1:
        parser.error("--coordinator, --num-processes and --process-id go together")
    return args


def _mesh_flag(text: str) -> dict[str, int]:
    """``data=2,model=4`` -> ``{"data": 2, "model": 4}`` (either may be left out)."""
    sizes = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name not in ("data", "model") or name in sizes or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected data=D,model=M (e.g. data=2,model=4), got {text!r}")
        sizes[name] = int(value)
    return sizes


# --memory-budget units: binary for KiB/MiB/GiB/TiB and the bare letters, decimal for kB/MB/GB/TB
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kib": 2 ** 10, "kb": 10 ** 3, "m": 2 ** 20,
          "mib": 2 ** 20, "mb": 10 ** 6, "g": 2 ** 30, "gib": 2 ** 30, "gb": 10 ** 9,
          "t": 2 ** 40, "tib": 2 ** 40, "tb": 10 ** 12}


def _bytes_flag(text: str) -> int:
    """``8GiB`` -> 8589934592 (``_UNITS``; a number alone is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected bytes, a number with an optional unit (e.g. 8GiB, 512MiB), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _prompts(args: argparse.Namespace) -> tuple[list[str], bool]:
    """The prompts, and whether none was given (then: the default prompt, streamed)."""
    prompts = list(args.prompt)
    for path in args.prompt_file:
        try:
            with open(path, encoding="utf-8") as f:
                prompts.append(f.read())
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ValueError(f"cannot read --prompt-file {path}: {reason}") from e
    if not prompts and not sys.stdin.isatty():
        text = sys.stdin.read()
        if text.strip():
            prompts.append(text)
    if prompts:
        return prompts, False
    return [DEFAULT_PROMPT], True


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit code (0 ok, 1 bad input or model, 2 bad flags;
    Ctrl-C ends the process with 130)."""
    args = parse_args(argv)
    try:
        return _interruptible(_run, args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _interruptible(work, *args):
    """``work(*args)`` in a daemon thread while this (main) thread waits in short joins.

    Python raises ``KeyboardInterrupt`` only in the main thread and only between bytecodes,
    so Ctrl-C during one long compiled call (a whole non-streamed generation) would wait
    for the call to end. Waiting here instead, Ctrl-C ends the process within 0.1 s:
    ``os._exit`` does not wait for the worker or its XLA computation. Returns what
    ``work`` returned and raises what it raised.
    """
    outcome = {}

    def target():
        try:
            outcome["value"] = work(*args)
        except BaseException as e:  # handed to the main thread, raised there
            outcome["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        sys.stdout.flush()  # what was printed: whole rows, or whole stream pieces
        print(file=sys.stderr, flush=True)  # ends the terminal's "^C" line
        os._exit(130)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _run(args: argparse.Namespace) -> int:
    """The whole command after parsing its flags; returns the exit code."""
    if args.dry_run:
        return _dry_run(args)
    model = load_model(args)
    if args.chat:
        return _chat(model, args)
    prompts, defaulted = _prompts(args)
    prefix_cache = _prefix_cache(model, args)
    out = _generate(model, prompts, defaulted, args, prefix_cache)
    if args.stats:
        print(json.dumps(prefix_cache.stats()), file=sys.stderr)
    if out is None:  # printed already, as JSON lines
        return 0
    if args.json:
        print(json.dumps({"tokens": out.tokens, "texts": out.texts, "stats": out.stats}))
        return 0
    if not (args.stream or defaulted):
        _print_rows(prompts, out.texts or [" ".join(map(str, t)) for t in out.tokens], args.quiet)
    if not args.quiet:
        _print_stats(out.stats)
    return 0


def add_model_flag(parser) -> None:
    """Adds ``--model`` (``load_model`` reads it), shared by ``kvjax-generate`` and
    ``kvjax-serve``."""
    parser.add_argument("--model", default=kvjax.BUNDLED_MODEL,
                        help="Hugging Face checkpoint directory or Hub id (org/name); "
                             "default: the bundled kvjax-tiny model")


def add_runtime_flags(group) -> None:
    """Adds the flags that set up JAX, shared by ``kvjax-generate`` and ``kvjax-serve``
    (``_setup`` reads them): ``--platform``, ``--compile-cache``, ``--no-compile-cache``."""
    group.add_argument("--platform", choices=["cpu", "gpu", "tpu"], default=None,
                       help="JAX backend (default: the best present)")
    group.add_argument("--compile-cache", default=None, metavar="DIR",
                       help="keep compiled programs in DIR and load them in later runs "
                            "instead of compiling (default: $KVJAX_CACHE_DIR or "
                            "~/.cache/kvjax/compiled)")
    group.add_argument("--no-compile-cache", action="store_true",
                       help="compile every run anew (generate's stats then time prefill and "
                            "decode apart)")


def add_mesh_flags(group) -> None:
    """Adds ``--mesh`` and ``--rules`` (``load_model`` reads them), shared by
    ``kvjax-generate`` and ``kvjax-serve``."""
    group.add_argument("--mesh", type=_mesh_flag, default=None, metavar="data=D,model=M",
                       help="spread the model over D x M devices: batch rows over data, "
                            "weights and KV heads over model (e.g. data=2,model=4; "
                            "docs/sharding.md)")
    group.add_argument("--rules", default=None, metavar="FIELD=VALUE,...",
                       help="how --mesh splits the model (kvjax.sharding.ShardingRules fields, "
                            "none = replicated); heads=none,kv_heads=none keeps attention whole "
                            "on every model device: one all-reduce a layer, faster at batch 1")


def check_runtime_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through ``parser.error`` for runtime and mesh flags that do not go together."""
    if args.compile_cache is not None and args.no_compile_cache:
        parser.error("--compile-cache and --no-compile-cache exclude each other")
    if args.rules is not None and args.mesh is None and args.coordinator is None:
        parser.error("--rules says how --mesh splits the model: pass --mesh too")


def load_model(args: argparse.Namespace):
    """Sets up JAX (compile cache, processes, platform, mesh) and loads the model."""
    mesh, rules = _setup(args)
    return kvjax.load(args.model, dtype=args.dtype, mesh=mesh, rules=rules)


def _setup(args: argparse.Namespace, compile_cache: bool = True):
    """Sets up JAX (compile cache, processes, platform); returns the mesh (or None) and the
    sharding rules."""
    if args.model == kvjax.BUNDLED_MODEL and not os.path.isdir(kvjax.BUNDLED_MODEL):
        raise FileNotFoundError(f"the bundled model is missing from {kvjax.BUNDLED_MODEL}; "
                                "reinstall kvjax or pass --model")
    rules = kvjax.sharding.parse_rules(args.rules or "")  # bad text: an error before any work
    if compile_cache and not args.no_compile_cache:  # before anything compiles
        try:
            kvjax.compilation_cache.enable(args.compile_cache)
        except ValueError as e:
            if args.compile_cache is not None:  # asked for: an error
                raise
            print(f"warning: {e} (--compile-cache DIR); compiling without a cache",
                  file=sys.stderr)
    if args.coordinator is not None:  # before anything touches a device
        kvjax.sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        if args.process_id > 0:  # every process computes the same tokens; process 0 prints them
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.platform is not None:  # after initialize_distributed, which must come first
        _use_platform(args.platform)
    mesh = None
    if args.mesh is not None or args.coordinator is not None:
        mesh = kvjax.sharding.make_mesh(**(args.mesh or {}))
    return mesh, rules


def _use_platform(platform: str) -> None:
    """Starts JAX with ``platform`` (``cpu``, ``gpu`` or ``tpu``) as its default backend and
    no other accelerator; raises ValueError, naming the backends JAX does find, when this
    machine has none of that kind."""
    from jax.extend import backend

    for platforms in _BACKENDS[platform]:
        if _start_jax(platforms) == platform:  # "cuda,cpu" without a CUDA GPU starts the CPU
            return
    _start_jax(None)  # whatever JAX finds by itself, to name it
    found = ", ".join(sorted(backend.backends()))
    raise ValueError(f"--platform {platform}: no {platform.upper()} backend is available here "
                     f"(JAX found: {found}); install {_INSTALL[platform]} or drop --platform")


def _start_jax(platforms: str | None) -> str | None:
    """(Re)starts JAX's backends with ``jax_platforms = platforms`` (None: all it finds);
    returns the default backend's platform, or None when one of them fails to start."""
    import jax
    from jax.extend import backend

    backend.clear_backends()  # nothing runs on them yet
    jax.config.update("jax_platforms", platforms)
    try:
        return jax.default_backend()
    except RuntimeError:
        return None


def _generate(model, prompts: list[str], defaulted: bool, args: argparse.Namespace,
              prefix_cache=None):
    """Generates (streaming when asked, with a progress bar on a terminal for long runs;
    in ``prefix_cache``'s pool when given); returns the Generation, or None when the
    stream printed it as JSON lines."""
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                   stop_tokens=args.stop, capacity=args.capacity, use_cache=not args.no_cache,
                   kv_dtype=args.kv_dtype, window=args.window, sink_tokens=args.sink_tokens,
                   prefix_cache=prefix_cache)
    show_progress = (not (args.stream or defaulted or args.quiet or args.json)
                     and sys.stderr.isatty() and args.max_new_tokens >= 128)
    if not (args.stream or defaulted or show_progress):
        return kvjax.generate(model, prompts, **options)
    stream = kvjax.generate_stream(model, prompts, chunk_size=args.chunk_size, **options)
    if show_progress:
        return _with_progress(stream, len(prompts) * args.max_new_tokens)
    return _print_stream(model, prompts, stream, args)


def _print_rows(prompts: list[str], texts: list[str], quiet: bool) -> None:
    """Each prompt and its text (the text alone with ``quiet``); several rows each after a
    ``--- row N ---`` line. All at once, so that Ctrl-C leaves no row half printed."""
    rows = [text if quiet else prompt + text for prompt, text in zip(prompts, texts)]
    if len(rows) > 1:
        rows = [f"--- row {i} ---\n{row}" for i, row in enumerate(rows)]
    print("\n".join(rows), flush=True)


def _escape(text: str) -> str:
    r"""``text`` on one line: ``\\`` for a backslash, ``\n`` a newline, ``\r`` a return."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _print_stats(s: dict) -> None:
    """The stats line on stderr: compile time, timing, new tokens, cache size."""
    if s["prefill_s"] is None:  # the program was stored on disk: timed as a whole
        timing = f"prefill + decode {s['generate_s'] * 1e3:.1f} ms, {s['tokens_per_s']:.1f} tok/s"
    else:
        timing = (f"prefill {s['prefill_s'] * 1e3:.1f} ms | decode "
                  f"{s['decode_tokens_per_s']:.1f} tok/s")
    print(f"[compile {s['compile_s']:.2f} s | {timing} | {s['new_tokens']} new tokens | cache "
          f"{s['cache_bytes'] / 2 ** 20:.1f} MiB]", file=sys.stderr)


def _with_progress(stream, total: int):
    """Runs ``stream`` under a progress bar on stderr; returns its Generation."""
    from tqdm import tqdm  # a dependency of huggingface_hub

    with tqdm(total=total, unit="tok", file=sys.stderr, leave=False) as bar:
        for delta in stream:
            bar.update(sum(len(d) for d in delta))
    return stream.generation


def _print_stream(model, prompts: list[str], stream, args):
    """Prints a stream: one prompt's text as it comes, several prompts' pieces one line
    ``[N] text`` each (escaped onto that line), or JSON lines with ``--json``. Returns the
    Generation, or None when it printed the final JSON object itself."""
    from kvjax.tokenizer import StreamDecoder

    decoders = [StreamDecoder(model.tokenizer) if model.tokenizer else None for _ in prompts]

    def text_of(row: int, tokens: list[int], final: bool = False) -> str:
        if decoders[row] is None:
            return "".join(f" {t}" for t in tokens)
        return decoders[row].add(tokens) + (decoders[row].flush() if final else "")

    def show(row: int, text: str) -> None:
        if single:
            print(text, end="", flush=True)
        elif text:
            print(f"[{row}] {_escape(text)}", flush=True)

    single = len(prompts) == 1 and not args.json
    if single and not args.quiet:
        print(prompts[0], end="", flush=True)
    for delta in stream:
        for row, tokens in enumerate(delta):
            text = text_of(row, tokens)
            if args.json:
                if tokens:
                    print(json.dumps({"row": row, "tokens": tokens, "text": text}), flush=True)
            else:
                show(row, text)
    for row in range(len(prompts)):  # whatever an unfinished character held back
        text = text_of(row, [], final=True)
        if not args.json:
            show(row, text)
    if single:
        print()
    out = stream.generation
    if args.json:
        print(json.dumps({"tokens": out.tokens, "texts": out.texts, "stats": out.stats}))
        return None
    return out


# ----- --dry-run -----

def _dry_run(args: argparse.Namespace) -> int:
    """``--dry-run``: prints what this run would hold per device and whether that fits in
    a device's memory; returns 0 when it fits, 1 when not (then also the largest batch and
    capacity that fit, and what ``--kv-dtype int8`` would need). Reads ``config.json`` and
    the tokenizer only: no weights are loaded and nothing is compiled.

    Per device: the weights (``kvjax.params.abstract_params``, split by
    ``kvjax.sharding.param_shardings``), the KV cache (``kvjax.cache.estimate_bytes``,
    the bytes ``kvjax.generate`` creates) and an estimate of XLA's scratch
    (``kvjax.memory.scratch_bytes``). The memory is ``--memory-budget``, else the
    device's ``bytes_limit``, else (CPU) the host's RAM divided among this process's
    devices in the run.
    """
    mesh, rules = _setup(args, compile_cache=False)
    directory = kvjax.loading.resolve_checkpoint(args.model, weights=False)
    config = kvjax.ModelConfig.from_json(directory)
    dtype = (args.dtype or kvjax.orbax_store.stored_dtype(directory)
             or kvjax.loading.default_dtype(mesh))
    # What a request is checked and shaped against: the model without its weights.
    shell = kvjax.Model(config=config, params=None, mesh=mesh, rules=rules,
                        tokenizer=Tokenizer.from_directory(directory))
    request = make_request(shell, _prompts(args)[0], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           min_p=args.min_p, seed=args.seed, stop_tokens=args.stop,
                           capacity=args.capacity, kv_dtype=args.kv_dtype, window=args.window,
                           sink_tokens=args.sink_tokens)
    report = {"model": args.model, **memory.plan(
        config, request, dtype, kv_dtype=args.kv_dtype, mesh=mesh, rules=rules,
        memory=args.memory_budget)}
    if args.json:
        print(json.dumps(report))
    else:
        _print_plan(report)
    return 0 if report["fits"] else 1


def _size(n: int) -> str:
    """``n`` bytes, exactly and in the largest binary unit that keeps it >= 1."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n:>16,} bytes  {n / scale:8.1f} {unit}"
    return f"{n:>16,} bytes"


def _print_plan(r: dict) -> None:
    """The text form of a ``--dry-run`` report."""
    mesh = (f"mesh {' x '.join(f'{k}={v}' for k, v in r['mesh'].items())}, " if r["mesh"]
            else "")
    rows = f" ({r['rows']} rows)" if r["rows"] != r["batch"] else ""
    print(f"dry run of {os.path.basename(os.path.normpath(r['model']))}: batch {r['batch']}{rows}, "
          f"capacity {r['capacity']}, prompt block {r['prompt_block']}, dtype {r['dtype']}, "
          f"kv_dtype {r['kv_dtype']}, {mesh}{r['devices']} {r['platform']} "
          f"device{'s' if r['devices'] > 1 else ''}; no weights loaded, nothing compiled")
    print("per device:")
    for name, key in (("weights", "weights_bytes"), ("KV cache", "cache_bytes"),
                      ("scratch", "scratch_bytes"), ("total", "total_bytes"),
                      ("memory", "memory_bytes")):
        note = f"  ({r['memory_source']})" if key == "memory_bytes" else ""
        print(f"  {name:<9}{_size(r[key])}{note}")
    terms = " + ".join(f"{name.replace('_', ' ')} {value:,}"
                       for name, value in r["scratch_estimate"].items() if value)
    print(f"  scratch, estimated as a prefill piece's largest temporaries: {terms} bytes")
    share = r["total_bytes"] / r["memory_bytes"] if r["memory_bytes"] else float("inf")
    if r["fits"]:
        print(f"fits: {share:.1%} of the memory")
        return
    print(f"does not fit: needs {r['total_bytes']:,} bytes of {r['memory_bytes']:,} "
          f"({share:.0%})")
    fitting = r["fitting"]
    current = fitting[r["kv_dtype"]]
    if current["max_batch"] == 0 and current["max_capacity"] == 0:
        print(f"  not even one row of one slot fits: the weights and the scratch alone need "
              f"{r['weights_bytes'] + r['scratch_bytes']:,} bytes; use a smaller --dtype, more "
              "model devices (--mesh) or shorter prompts")
    else:
        _print_largest(r, current, fitting["capacity_needed"], "")
    if r["kv_dtype"] != "int8" and "int8" in fitting:  # an alternative to the cache asked for
        int8 = fitting["int8"]
        verdict = "fits" if int8["total_bytes"] <= r["memory_bytes"] else "does not fit"
        print(f"with --kv-dtype int8: KV cache {int8['cache_bytes']:,} bytes, total "
              f"{int8['total_bytes']:,}: {verdict}")
        if verdict != "fits" and (int8["max_batch"] or int8["max_capacity"]):
            _print_largest(r, int8, fitting["capacity_needed"], " with --kv-dtype int8")


def _print_largest(r: dict, largest: dict, needed: int, suffix: str) -> None:
    multiple = (f" (a multiple of data={r['mesh']['data']})"
                if r["mesh"] and r["mesh"].get("data", 1) > 1 else "")
    print(f"  largest batch that fits at capacity {r['capacity']}{suffix}: "
          f"{largest['max_batch']}{multiple}")
    print(f"  largest capacity that fits at batch {r['rows']}{suffix}: "
          f"{largest['max_capacity']} (this run needs >= {needed})")


def _prefix_cache(model, args: argparse.Namespace):
    """The ``kvjax.PrefixCache`` the flags ask for (None without ``--paged``)."""
    if not args.paged:
        return None
    return kvjax.PrefixCache(model, block_size=args.block_size or 16,
                             budget_bytes=(args.prefix_cache_mb or 1024) * 2 ** 20,
                             policy=args.eviction or "lru",
                             host_budget_bytes=(args.host_cache_mb or 0) * 2 ** 20,
                             kv_dtype=args.kv_dtype)


def _chat(model, args: argparse.Namespace) -> int:
    session = kvjax.ChatSession(
        model, capacity=args.capacity, system=args.system, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=args.seed, stop_tokens=args.stop, chunk_size=args.chunk_size,
        kv_dtype=args.kv_dtype, window=args.window, sink_tokens=args.sink_tokens,
        prefix_cache=_prefix_cache(model, args))
    print("chat with the model: /reset starts over, /stats shows the last turn, /quit ends",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if command == "/stats":
            stats = session.last_stats
            if session.prefix_cache is not None:
                stats = {**stats, "prefix_cache": session.prefix_cache.stats()}
            print(json.dumps(stats), file=sys.stderr)
            continue
        try:
            print("model> ", end="", flush=True)
            for piece in session.stream(line):
                print(piece, end="", flush=True)
            print()
        except kvjax.CapacityError as e:
            print(f"\n{e}", file=sys.stderr)
            continue


if __name__ == "__main__":
    sys.exit(main())
