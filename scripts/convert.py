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
existing directory there is refused.

exit codes (as scripts/generate.py): 0 ok, 1 bad input or model, 2 bad flags,
  130 interrupted
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
    """Converts; returns the exit code (argparse exits with 2 itself for bad flags)."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(args.model, args.out, args.dtype)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, FileNotFoundError too
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def convert(model: str, out: str, dtype: str) -> str:
    """Loads ``model`` (a directory or Hub id) in ``dtype`` and saves it as a store at
    ``out``; returns the store's path."""
    import kvjax
    from kvjax import orbax_store
    from kvjax.loading import resolve_checkpoint

    orbax_store.check_writable(out)  # before the (long) load
    source = resolve_checkpoint(model)  # a Hub id is downloaded first
    return orbax_store.save(kvjax.load(source, dtype=dtype), out, source_dir=source)


if __name__ == "__main__":
    sys.exit(main())
