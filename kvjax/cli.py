"""``kvjax-generate`` / ``python scripts/generate.py``: generate text from a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  python scripts/generate.py --model ./my-llama --prompt "The capital of France is"
  python scripts/generate.py --model ./my-llama --prompt "Hi" --prompt "Once upon a time" \\
      --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1
  python scripts/generate.py --model ./my-llama --prompt "Hi" --json
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kvjax-generate", description="Generate text with a KV-cached JAX decoder.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Hugging Face checkpoint directory or Hub id (org/name)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch (one row each)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", type=int, action="append", default=None,
                        help="stop token id (repeatable); default from generation_config.json")
    parser.add_argument("--capacity", type=int, default=None, help="KV cache slots per row")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole sequence every step (baseline)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with tokens, texts and stats")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import kvjax

        model = kvjax.load(args.model, dtype=args.dtype)
        out = kvjax.generate(
            model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
            stop_tokens=args.stop, capacity=args.capacity, use_cache=not args.no_cache)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"tokens": out.tokens, "texts": out.texts, "stats": out.stats}))
        return 0
    for prompt, text in zip(args.prompt, out.texts or [str(t) for t in out.tokens]):
        print(prompt + text)
    s = out.stats
    print(f"[compile {s['compile_s']:.2f}s | prefill {s['prefill_s'] * 1e3:.1f}ms | decode "
          f"{s['decode_tokens_per_s']:.1f} tok/s | cache {s['cache_bytes'] / 2**20:.1f} MiB]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
