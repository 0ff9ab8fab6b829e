#!/usr/bin/env python
"""Convert a Hugging Face checkpoint to a kvjax orbax store (``kvjax.orbax_store``).

The store holds the converted params (kvjax layout, the chosen dtype) and the small files
(config, tokenizer, generation config) needed to run the model; ``kvjax.load(STORE)``
then restores it without reading or converting the safetensors again.
"""

from __future__ import annotations

import argparse
import sys
import time

EXAMPLES = """example:
  python scripts/convert.py --model ./Llama-3.2-1B --out ./llama-1b-kvjax --dtype bfloat16
  python scripts/convert.py --model Qwen/Qwen2.5-0.5B-Instruct --out ./qwen-kvjax

An existing store at --out is replaced only once the new one is complete; any other
existing directory there is refused. Exit codes: 0 ok, 2 bad flags or bad input.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Hugging Face checkpoint directory or Hub id (org/name)")
    parser.add_argument("--out", required=True, help="the orbax store directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the stored params (default bfloat16)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import kvjax
    from kvjax import orbax_store
    from kvjax.api import resolve_checkpoint

    start = time.perf_counter()
    try:
        orbax_store.check_writable(args.out)  # before the (long) load
        source = resolve_checkpoint(args.model)  # a Hub id is downloaded first
        model = kvjax.load(source, dtype=args.dtype)
        out = orbax_store.save(model, args.out, source_dir=source)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and ConfigError included
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
