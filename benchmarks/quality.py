#!/usr/bin/env python
"""Quality of a KV cache through the cache, per ``kv_dtype`` (docs/memory.md).

A single forward pass over a text never reads the cache, so it cannot tell a quantized
cache from a full one. Every mode here reads it as a generation does: a prefix is
prefilled into an empty cache, then every later token is fed by a decode step that
attends over the cache so far (as ``kvjax.generate``'s steps do).

Modes (``--mode``):

* ``perplexity`` (the default): each window of ``--context`` tokens of a text has its
  first ``--prefix`` tokens prefilled, and the log-probability of every later true token
  is summed. All windows are rows of one batch, one compiled program per ``kv_dtype``.
* ``greedy``: greedy continuations of 16 prompts (``GREEDY_PROMPTS``), the first 64 new
  tokens compared position by position with those of a reference cache (bfloat16 and
  float32 by default).
* ``families``: a tiny random Hugging Face checkpoint of each family
  (``tests/hf_fixtures.py``; needs torch and transformers, test-only dependencies) is
  saved, loaded with ``kvjax.load`` and teacher-forced through the cache over random
  tokens; per family and ``kv_dtype``: how often the next-token argmax equals the
  bfloat16 cache's, mean KL(bfloat16 || kv_dtype) and the largest logit difference.
* ``streaming``: rows of ``--context`` tokens streamed through caches of ``--capacity``
  slots (``--sink-tokens`` sinks and a window of the rest, or a window alone) against
  the perplexity of windows that fit the capacity (``streaming``).
* ``build-text``: writes ``benchmarks/data/quality_text.json`` (``build_text``).

Texts (``--text``): ``held-out+numpy`` (the default; ``benchmarks/data/quality_text.json``:
150 of the bundled model's 154 held-out documents then 94 numpy docstrings, 45,559
tokens, none of them trained on; ``build_text`` says how it was made), ``held-out`` (the
154 held-out documents alone, 12,844 tokens, taken from this Python's stdlib as
``scripts/train_tiny.py`` splits it: the default before 2026-12-04), or a UTF-8 file.
Usage::

    python benchmarks/quality.py --context 512 --prefix 128 --json out.json   # ~2 min, CPU
    python benchmarks/quality.py --mode greedy --kv-dtypes float32 int8 fp8
    python benchmarks/quality.py --mode families --kv-dtypes float32 int8 fp8
    python benchmarks/quality.py --mode streaming --capacity 256 --context 1024 --prefix 64
    python benchmarks/quality.py --mode build-text      # rewrites the committed text
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_FILE = os.path.join(ROOT, "benchmarks", "data", "quality_text.json")
NUMPY_EVERY = 20  # build_text takes every 20th numpy docstring (94 of 1,876)
# The greedy prompts (tests/test_quantized_cache.py's too).
GREEDY_PROMPTS = ["The Python interpreter", "A list is a mutable sequence", "The for statement",
                  "Exceptions are raised when", "A dictionary maps", "The import system",
                  "Strings are immutable", "A generator function", "The with statement",
                  "Classes provide a means", "The built-in function len", "A module is a file",
                  "Integers in Python", "The while loop", "Keyword arguments", "A tuple is"]


# ----------------------------------------------------------------------------- texts

def _train_tiny():
    scripts = os.path.join(ROOT, "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import train_tiny

    return train_tiny


def held_out_documents() -> list[str]:
    """The bundled model's held-out documents (every 50th of its corpus,
    ``scripts/train_tiny.py``), from this Python's stdlib."""
    train_tiny = _train_tiny()
    return train_tiny.split(train_tiny.documents())[1]


def held_out_text() -> str:
    """The bundled model's held-out documents, joined as the training recipe joins them."""
    return "\n\n".join(held_out_documents())


def numpy_docstrings(exclude: set[str]) -> list[tuple[str, str]]:
    """``(file, docstring)`` of numpy's pure-Python sources, found as
    ``train_tiny.stdlib_docstrings`` finds the stdlib's (sorted walk, ``ast``, tests
    skipped, >= 20 characters), each distinct docstring once, none in ``exclude``."""
    train_tiny = _train_tiny()
    root = os.path.dirname(np.__file__)
    found, seen = [], set(exclude)
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in train_tiny.SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= train_tiny.MIN_DOCSTRING and doc.strip() not in seen:
                        seen.add(doc.strip())
                        found.append((os.path.relpath(path, os.path.dirname(root)), doc.strip()))
    return found


def _numpy_licence() -> str:
    """numpy's own BSD-3-Clause notice (the first part of its LICENSE.txt)."""
    from importlib import metadata

    dist = metadata.distribution("numpy")
    for file in dist.files or []:
        if str(file).endswith(".dist-info/licenses/LICENSE.txt"):
            return file.read_text(encoding="utf-8").split("\n----")[0].strip()
    raise FileNotFoundError("numpy's LICENSE.txt is not in its distribution")


def build_text(path: str = TEXT_FILE) -> dict:
    """Writes the default held-out text: the bundled model's held-out documents (as
    ``held_out_documents``, less the 4 of 154 that equal a training document word for
    word) then every ``NUMPY_EVERY``-th distinct numpy docstring (``numpy_docstrings``;
    none equal to a training document). The bundled model trained on none of it. Run
    once (``--mode build-text``) and committed, so the text does not follow the Python
    or numpy installed; it records their versions and the licences."""
    train_tiny = _train_tiny()
    train, held = train_tiny.split(train_tiny.documents())
    held_all, held = held, [d for d in held if d not in set(train)]  # 4 are also in train
    found = numpy_docstrings(exclude=set(train))
    chosen = [(f, d) for i, (f, d) in enumerate(found) if i % NUMPY_EVERY == NUMPY_EVERY // 2]
    tokenizer = kvjax.load(kvjax.BUNDLED_MODEL).tokenizer
    count = lambda docs: len(tokenizer.encode("\n\n".join(docs)))
    documents = held + [d for _, d in chosen]
    record = {
        "description": "Held-out text for benchmarks/quality.py: documents the bundled model "
                       "(kvjax/assets/kvjax-tiny) never trained on, joined with blank lines.",
        "command": "python benchmarks/quality.py --mode build-text",
        "tokens": count(documents),  # bundled tokenizer, documents joined with "\n\n"
        "sources": [
            {"name": f"CPython {platform.python_version()} documentation: the held-out "
                     "documents of scripts/train_tiny.py (every 50th of pydoc_data.topics + "
                     f"stdlib docstrings), {len(held)} of {len(held_all)}: those equal to a "
                     "training document left out",
             "licence": "PSF License Agreement (Python Software Foundation)",
             "documents": len(held), "tokens": count(held)},
            {"name": f"numpy {np.__version__} docstrings: every {NUMPY_EVERY}th distinct "
                     f"docstring of {len(found)} (module, class, function; tests skipped; "
                     "none equal to a training document)",
             "licence": "BSD-3-Clause", "licence_text": _numpy_licence(),
             "documents": len(chosen), "tokens": count([d for _, d in chosen]),
             "files": [f for f, _ in chosen]},
        ],
        "documents": documents,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return record


def load_text(name: str) -> str:
    """``held-out+numpy`` (the committed text), ``held-out`` or a UTF-8 file's text."""
    if name == "held-out+numpy":
        with open(TEXT_FILE, encoding="utf-8") as f:
            return "\n\n".join(json.load(f)["documents"])
    if name == "held-out":
        return held_out_text()
    with open(name, encoding="utf-8") as f:
        return f.read()


def windows(tokens: list[int], context: int) -> np.ndarray:
    """``int32[windows, context]``: consecutive, non-overlapping windows of the text."""
    count = len(tokens) // context
    return np.asarray(tokens[:count * context], np.int32).reshape(count, context)


# ----------------------------------------------------------------------------- through the cache

def _through_cache(model: kvjax.Model, rows: np.ndarray, prefix: int, kv_dtype: str | None,
                   per_token, window: int | None = None, sink_tokens: int | None = None):
    """Prefills ``rows[:, :prefix]``, then feeds token ``t - 1`` by a decode step for
    ``t = prefix .. context - 1``; returns ``per_token(logits, rows, t)`` (traced;
    ``logits``: float32 ``[batch, vocab]``, those that predict token ``t`` from a cache
    holding the row's tokens before it), stacked ``[context - prefix, ...]``. With a
    ``window`` the cache streams (``sink_tokens`` sinks and a ring of ``window``): the
    rows may be longer than it."""
    batch, context = rows.shape
    step, prefill_step = programs.step_functions(model, kv_dtype=kv_dtype)

    @jax.jit
    def run(params, cache, rows):
        positions = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (batch, prefix))
        logits, cache = prefill_step(params, rows[:, :prefix], positions, cache)

        def one(carry, t):  # feed token t - 1 at position t - 1, predict token t
            cache, logits = carry
            out = per_token(logits[:, -1].astype(jnp.float32), rows, t)
            token = jax.lax.dynamic_slice_in_dim(rows, t, 1, axis=1)
            logits, cache = step(params, token, jnp.full((batch, 1), t, jnp.int32), cache)
            return (cache, logits), out

        return jax.lax.scan(one, (cache, logits), jnp.arange(prefix, context))[1]

    capacity = context if window is None else (sink_tokens or 0) + window
    cache = programs.new_cache(model, batch, capacity, kv_dtype=kv_dtype, window=window,
                               sink_tokens=sink_tokens)
    return run(model.params, cache, jnp.asarray(rows))


def score(model: kvjax.Model, rows: np.ndarray, prefix: int, kv_dtype: str | None,
          window: int | None = None, sink_tokens: int | None = None) -> float:
    """Mean negative log-likelihood (nats) of tokens ``prefix .. context - 1`` of each
    row, each predicted from a cache holding the row's tokens before it (with a
    ``window``: streaming, the sinks and the last ``window`` of them)."""
    batch = rows.shape[0]

    def nll(logits, rows, t):
        return -jax.nn.log_softmax(logits)[jnp.arange(batch), rows[:, t]]

    return float(_through_cache(model, rows, prefix, kv_dtype, nll, window, sink_tokens).mean())


def logits_through_cache(model: kvjax.Model, rows: np.ndarray, prefix: int,
                         kv_dtype: str | None) -> np.ndarray:
    """float32 ``[batch, context - prefix, vocab]``: the logits that predict tokens
    ``prefix .. context - 1`` of each row, teacher-forced through the cache."""
    logits = _through_cache(model, rows, prefix, kv_dtype, lambda logits, rows, t: logits)
    return np.asarray(logits).transpose(1, 0, 2)


def compare_logits(reference: np.ndarray, logits: np.ndarray) -> dict:
    """``top1_agreement`` (argmax equal), ``mean_kl`` (KL(reference || logits) in nats,
    mean over tokens) and ``max_abs_logit_diff`` of two ``[..., vocab]`` arrays."""
    ref, got = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return {"top1_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
            "mean_kl": float(np.mean(kl)), "max_abs_logit_diff": float(np.max(np.abs(ref - got)))}


# ----------------------------------------------------------------------------- modes

def perplexity(model: kvjax.Model, text: str, context: int, prefix: int,
               kv_dtypes: list[str]) -> dict:
    tokens = model.tokenizer.encode(text)
    rows = windows(tokens, context)
    record = {"tokens_in_text": len(tokens), "windows": rows.shape[0], "context": context,
              "prefix": prefix, "scored_tokens": rows.shape[0] * (context - prefix),
              "perplexity": {}}
    for kv_dtype in kv_dtypes:
        start = time.perf_counter()
        nll = score(model, rows, prefix, kv_dtype)
        record["perplexity"][kv_dtype] = math.exp(nll)
        print(f"{kv_dtype}: perplexity {math.exp(nll):.4f} ({time.perf_counter() - start:.1f} s)",
              flush=True)
    return record


def streaming(model: kvjax.Model, text: str, capacity: int, context: int, prefix: int,
              sink_tokens: int) -> dict:
    """Perplexity of rows of ``context`` tokens (several times ``capacity``) streamed
    through caches of ``capacity`` slots, against the perplexity while a sequence fits.

    ``in_capacity``: windows of ``capacity`` tokens, each through a plain cache (every
    token sees the window's tokens before it). ``sinks``: rows of ``context`` tokens
    through a streaming cache of ``sink_tokens`` sinks and a window of the rest;
    ``window_only``: the same without sinks; ``no_eviction``: a plain cache of
    ``context`` slots, every token seeing the whole row (past what the model was trained
    on, where the text is longer than that). Each scores tokens ``prefix ..`` of its
    rows; the streamed rows also report their tokens past the capacity alone.
    """
    tokens = model.tokenizer.encode(text)
    rows, fitting = windows(tokens, context), windows(tokens, capacity)
    runs = {"in_capacity": (fitting, {}),
            "sinks": (rows, dict(window=capacity - sink_tokens, sink_tokens=sink_tokens)),
            "window_only": (rows, dict(window=capacity, sink_tokens=0)),
            "no_eviction": (rows, {})}
    record = {"tokens_in_text": len(tokens), "capacity": capacity, "context": context,
              "prefix": prefix, "sink_tokens": sink_tokens, "rows": rows.shape[0],
              "perplexity": {}, "perplexity_past_capacity": {}}
    for name, (batch, options) in runs.items():
        start = time.perf_counter()
        batch_size = batch.shape[0]

        def nll(logits, rows, t):
            return -jax.nn.log_softmax(logits)[jnp.arange(batch_size), rows[:, t]]

        per_token = np.asarray(_through_cache(model, batch, prefix, None, nll,
                                              **options))  # [scored positions, rows]
        record["perplexity"][name] = math.exp(per_token.mean())
        if batch is rows:  # positions capacity .. context - 1: the cache has dropped tokens
            record["perplexity_past_capacity"][name] = math.exp(
                per_token[capacity - prefix:].mean())
        print(f"{name}: perplexity {record['perplexity'][name]:.4f} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return record


def greedy_tokens(model: kvjax.Model, kv_dtype: str | None, prompts=GREEDY_PROMPTS,
                  new_tokens: int = 64) -> list[list[int]]:
    """The first ``new_tokens`` greedy tokens of each prompt (no stop tokens)."""
    return kvjax.generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=[],
                          temperature=0.0, kv_dtype=kv_dtype).tokens


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """``agreement``: the fraction of positions where the tokens equal the reference's;
    ``first_difference``: per row, the index of the first differing token (the row's
    length where none differs), and their ``mean_first_difference``."""
    equal = [[a == b for a, b in zip(x, y)] for x, y in zip(tokens, reference)]
    first = [row.index(False) if False in row else len(row) for row in equal]
    return {"agreement": float(np.mean([e for row in equal for e in row])),
            "mean_first_difference": float(np.mean(first)), "first_difference": first}


def greedy(model: kvjax.Model, kv_dtypes: list[str], references: list[str],
           new_tokens: int = 64) -> dict:
    runs = {kv: greedy_tokens(model, kv, new_tokens=new_tokens)
            for kv in dict.fromkeys([*references, *kv_dtypes])}
    record = {"prompts": GREEDY_PROMPTS, "new_tokens": new_tokens, "agreement": {}}
    for ref in references:
        record["agreement"][ref] = {kv: agreement(runs[kv], runs[ref]) for kv in kv_dtypes
                                    if kv != ref}
        for kv, result in record["agreement"][ref].items():
            print(f"{kv} vs {ref} KV: {100 * result['agreement']:.1f}% of tokens equal, "
                  f"first difference at {result['mean_first_difference']:.1f} on average",
                  flush=True)
    return record


def _hf_fixtures():
    import importlib

    try:
        importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise SystemExit(f"--mode families builds Hugging Face checkpoints with torch and "
                         f"transformers (test-only dependencies): {e}") from e
    transformers.utils.logging.disable_progress_bar()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tests import hf_fixtures

    return hf_fixtures


# The families with QK-norm (each query and key head normalised before RoPE).
QK_NORM = ("qwen3", "gemma3", "olmo2")


def family_model(variant: str, positions: int = 512):
    """``(torch model, kvjax model)``: a tiny random float32 checkpoint of ``variant``
    (``tests/hf_fixtures.VARIANTS``, its max positions set to ``positions``), saved with
    ``save_pretrained`` and loaded with ``kvjax.load``."""
    hf_fixtures = _hf_fixtures()
    gpt2 = hf_fixtures.VARIANTS[variant][0] == "gpt2"
    field = "n_positions" if gpt2 else "max_position_embeddings"
    hf_model = hf_fixtures.make_hf_model(variant, **{field: positions})
    with tempfile.TemporaryDirectory() as directory:
        hf_fixtures.save_checkpoint(hf_model, directory)
        return hf_model, kvjax.load(directory, dtype="float32")


def family_quality(model: kvjax.Model, rows: np.ndarray, prefix: int, kv_dtypes: list[str],
                   reference: str = "bfloat16") -> dict:
    """Each ``kv_dtype``'s logits, teacher-forced through the cache over ``rows``
    (``prefix`` tokens prefilled), compared with ``reference``'s (``compare_logits``)."""
    logits = {kv: logits_through_cache(model, rows, prefix, kv)
              for kv in dict.fromkeys([reference, *kv_dtypes])}
    return {kv: compare_logits(logits[reference], logits[kv]) for kv in kv_dtypes
            if kv != reference}


def families(kv_dtypes: list[str], variants: list[str] | None, reference: str, length: int,
             prefix: int, batch: int, seed: int = 0) -> dict:
    """``family_quality`` of every variant over ``batch`` rows of ``length`` random
    tokens (the same rows for every variant)."""
    hf_fixtures = _hf_fixtures()
    rows = np.random.default_rng(seed).integers(3, hf_fixtures.VOCAB, (batch, length),
                                                dtype=np.int32)
    record = {"reference": reference, "length": length, "prefix": prefix, "batch": batch,
              "seed": seed, "scored_tokens": batch * (length - prefix), "families": {}}
    for variant in variants or list(hf_fixtures.VARIANTS):
        _, model = family_model(variant, max(length, 128))
        compared = family_quality(model, rows, prefix, kv_dtypes, reference)
        record["families"][variant] = {"model_type": model.config.model_type,
                                       "qk_norm": variant in QK_NORM, "compared": compared}
        for kv, c in compared.items():
            print(f"{variant:14s} {kv:8s} top-1 {100 * c['top1_agreement']:.2f}%  "
                  f"KL {c['mean_kl']:.3e}  max |logit diff| {c['max_abs_logit_diff']:.4f}",
                  flush=True)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["perplexity", "greedy", "families", "streaming",
                                           "build-text"],
                        default="perplexity")
    parser.add_argument("--model", default=kvjax.BUNDLED_MODEL)
    parser.add_argument("--text", default="held-out+numpy",
                        help="held-out+numpy (default), held-out, or a UTF-8 file")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--kv-dtypes", nargs="+", default=None,
                        help="default: float32 bfloat16 int8 fp8 (perplexity), "
                             "float32 int8 fp8 (greedy, families)")
    parser.add_argument("--references", nargs="+", default=["bfloat16", "float32"],
                        help="greedy: the caches compared against")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="families: tests/hf_fixtures.py variants (default: all)")
    parser.add_argument("--length", type=int, default=320, help="families: tokens per row")
    parser.add_argument("--family-prefix", type=int, default=32, help="families: prefilled")
    parser.add_argument("--batch", type=int, default=4, help="families: rows")
    parser.add_argument("--capacity", type=int, default=256,
                        help="streaming: the cache's slots (--context: the rows, several times it)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="streaming: sinks")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.mode == "build-text":
        record = build_text()
        print(f"wrote {TEXT_FILE}: {len(record['documents'])} documents, "
              f"{record['tokens']:,} tokens")
        return
    kv_dtypes = args.kv_dtypes or (["float32", "bfloat16", "int8", "fp8"]
                                   if args.mode == "perplexity" else ["float32", "int8", "fp8"])
    record = {"mode": args.mode, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if args.mode == "families":
        record.update(families(kv_dtypes, args.variants, "bfloat16", args.length,
                               args.family_prefix, args.batch))
    else:
        model = kvjax.load(args.model)
        record.update(model=os.path.relpath(args.model, ROOT) if args.model.startswith(ROOT)
                      else args.model, model_dtype=str(model.dtype))
        if args.mode in ("perplexity", "streaming"):
            record["text"] = args.text
        if args.mode == "perplexity":
            record.update(perplexity(model, load_text(args.text), args.context, args.prefix,
                                     kv_dtypes))
        elif args.mode == "streaming":
            record.update(streaming(model, load_text(args.text), args.capacity, args.context,
                                    args.prefix, args.sink_tokens))
        else:
            record.update(greedy(model, kv_dtypes, args.references))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
