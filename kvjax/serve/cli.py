"""``kvjax-serve``: an OpenAI-compatible HTTP server for one model (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import kvjax
from kvjax import cli

EXAMPLES = """examples:
  kvjax-serve                                     # the bundled model on 127.0.0.1:8000
  kvjax-serve --model Qwen/Qwen2.5-0.5B-Instruct --max-rows 32 --pool-mb 4096 \\
      --host-cache-mb 16384 --api-key "$KEY"
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "The list type", "max_tokens": 32}'

stopping: Ctrl-C or SIGTERM stops taking requests and lets those in flight finish, for at
  most --shutdown-timeout seconds (then they are cancelled); a second Ctrl-C quits at once

exit codes: 0 stopped by Ctrl-C, 1 bad model or settings, 2 bad flags (SIGTERM ends the
  process by that signal, after the same graceful shutdown)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kvjax-serve", description="Serve a model over an OpenAI-compatible HTTP API.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_flag(parser)
    parser.add_argument("--model-name", default=None,
                        help="the name requests give as \"model\" (default: the directory's "
                             "name, or the Hub id)")
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 "
                           "for every interface, then set --api-key)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=os.environ.get("KVJAX_API_KEY"),
                      help="require \"Authorization: Bearer KEY\" on every route but /health "
                           "(default: $KVJAX_API_KEY; unset: no key)")
    http.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                      help="on Ctrl-C or SIGTERM, seconds requests in flight may take to "
                           "finish before they are cancelled (default 30)")
    engine = parser.add_argument_group("engine", "kvjax.serve.Engine (docs/serving.md says "
                                                 "how to size rows and blocks)")
    engine.add_argument("--max-rows", type=int, default=8,
                        help="requests decoded at once (default 8)")
    engine.add_argument("--max-len", type=int, default=None,
                        help="prompt + output tokens of a request at most (default: the "
                             "model's max_position_embeddings, at most 4096, or what "
                             "--pool-mb / --pool-blocks hold)")
    engine.add_argument("--block-size", type=int, default=16,
                        help="slots per KV block, a power of two (default 16)")
    pool = engine.add_mutually_exclusive_group()
    pool.add_argument("--pool-mb", type=int, default=None, metavar="M",
                      help="MiB of device memory for the KV pool (default: the engine's, "
                           "room for --max-rows requests of --max-len)")
    pool.add_argument("--pool-blocks", type=int, default=None, metavar="N",
                      help="blocks in the KV pool, instead of --pool-mb")
    engine.add_argument("--host-cache-mb", type=int, default=0, metavar="M",
                        help="MiB of host memory for prefix blocks evicted from the device "
                             "(default 0: dropped)")
    engine.add_argument("--eviction", choices=["lru", "lfu", "lru-k"], default="lru",
                        help="which unused cached block gives way first (default lru)")
    engine.add_argument("--no-prefix-caching", action="store_true",
                        help="cache no prompt blocks for later requests (each prompt is "
                             "prefilled whole): the baseline that measures what caching saves")
    engine.add_argument("--no-mixed-steps", action="store_true",
                        help="run a step's prefill in programs of its own, not in its decode "
                             "step's: the baseline that measures what mixing saves")
    engine.add_argument("--max-prefill-tokens", type=int, default=256, metavar="N",
                        help="prompt tokens prefilled per engine step, across requests, "
                             "padding included (at least 16; default 256)")
    engine.add_argument("--max-waiting", type=int, default=256, metavar="N",
                        help="requests queued at most; more get 429 (default 256)")
    engine.add_argument("--kv-dtype", default=None, choices=list(kvjax.cache.KV_DTYPES),
                        help="what the KV pool stores (default: --dtype); int8 and fp8 hold "
                             "about half the bytes of bfloat16")
    run = parser.add_argument_group("run (as kvjax-generate)")
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: bfloat16 on GPU/TPU, float32 on CPU")
    cli.add_runtime_flags(run)
    cli.add_mesh_flags(run)
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    # kvjax.cli's setup reads these: one process
    parser.set_defaults(coordinator=None)
    args = parser.parse_args(argv)
    for flag in ("port", "max_rows", "max_len", "block_size", "pool_mb", "pool_blocks",
                 "max_prefill_tokens", "max_waiting"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "port" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be an integer >= "
                         f"{0 if flag == 'port' else 1}")
    if args.host_cache_mb < 0:
        parser.error("--host-cache-mb must be an integer >= 0")
    cli.check_runtime_flags(parser, args)
    return args


def model_name(args: argparse.Namespace) -> str:
    """What requests call the model: ``--model-name``, else the checkpoint directory's
    name, else the Hub id as given."""
    if args.model_name:
        return args.model_name
    if os.path.isdir(args.model):
        return os.path.basename(os.path.normpath(args.model))
    return args.model


def build_engine(args: argparse.Namespace, model=None):
    """Builds the engine of the flags over a prefix cache of their pool, host tier and
    eviction policy, for ``model`` or (None) the model the flags name, loaded as
    ``kvjax-generate`` does."""
    from kvjax.serve import Engine
    from kvjax.serve.engine import pool_sizes

    model = model or cli.load_model(args)
    if args.pool_mb is not None:
        budget = {"budget_bytes": args.pool_mb * 2 ** 20}
    else:  # --pool-blocks, else the engine's default: --max-rows requests of --max-len
        budget = {"budget_blocks": pool_sizes(model.config, args.max_rows, args.max_len,
                                              args.block_size, args.pool_blocks)[1]}
    prefix_cache = kvjax.PrefixCache(model, block_size=args.block_size, policy=args.eviction,
                                     host_budget_bytes=args.host_cache_mb * 2 ** 20,
                                     kv_dtype=args.kv_dtype, **budget)
    return Engine(model, max_rows=args.max_rows, max_len=args.max_len,
                  prefix_cache=prefix_cache, max_prefill_tokens=args.max_prefill_tokens,
                  max_waiting=args.max_waiting, prefix_caching=not args.no_prefix_caching,
                  mixed_steps=not args.no_mixed_steps)


def main(argv: list[str] | None = None) -> int:
    """Serves until Ctrl-C or SIGTERM; returns the exit code (0 stopped, 1 bad model or
    settings, 2 bad flags)."""
    args = parse_args(argv)
    try:
        return _serve(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvjax.serve.server import create_app

    engine = build_engine(args)
    start = time.perf_counter()
    programs = engine.warmup()
    name = model_name(args)
    print(f"kvjax-serve: {name}, {args.max_rows} rows of up to {engine.max_len} tokens; "
          f"{programs} programs compiled and loaded in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who reaches "
              "this address can use the model", file=sys.stderr)
    app = create_app(engine, model_name=name, api_key=args.api_key,
                     shutdown_timeout=args.shutdown_timeout)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
