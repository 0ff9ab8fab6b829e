"""``generate``: a batch of prompts continued in one compiled program."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from kvjax import compilation_cache, programs, sharding
from kvjax.loading import Model
from kvjax.requests import Prompts, Request, make_request


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of ``generate``.

    Attributes:
      tokens: new token ids per prompt, each ending at (and including) its first stop token.
      texts: the decoded new text per prompt, or None without a tokenizer.
      stats: ``compile_s``, ``generate_s`` (prefill + decode), ``prefill_s``,
        ``decode_s``, ``decode_steps``, ``new_tokens``, ``tokens_per_s`` (new tokens over
        ``generate_s``), ``decode_tokens_per_s`` (batch x decode steps over decode time),
        ``cache_bytes``, ``batch``,
        ``prompt_bucket``, ``capacity``, ``sampling`` (the temperature, top_k, top_p and
        min_p used, the model's defaults filled in). ``generate`` leaves ``prefill_s``,
        ``decode_s`` and ``decode_tokens_per_s`` None while compiled programs are kept
        on disk (``kvjax.compilation_cache``: the clock that splits them is a host
        callback, which JAX does not store).
      logits: per prompt, ``float32[len(tokens), vocab]`` logits each new token was
        chosen from (only with ``return_logits=True``).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    stats: dict[str, Any]
    logits: list[np.ndarray] | None = None


def generate(model: Model, prompts: Prompts, *,
             max_new_tokens: int = 64, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, capacity: int | None = None,
             use_cache: bool = True, return_logits: bool = False,
             kv_dtype: str | None = None, window: int | None = None,
             sink_tokens: int | None = None, prefix_cache=None) -> Generation:
    """Generates a continuation of each prompt, the whole run one compiled program.

    Args:
      model: from ``kvjax.load`` (or built by hand: ``Model(config, params)``).
      prompts: a list of strings (needs a tokenizer) or of token-id lists (rows may have
        different lengths), or a 2-D integer array ``[batch, tokens]`` of token ids.
      max_new_tokens: new tokens per prompt, stop token included.
      temperature: 0 for greedy; otherwise sample from softmax(logits / temperature).
      top_k, top_p, min_p: filters applied in that order after temperature (off: top_k 0,
        top_p 1, min_p 0).
        For each of these four, None takes the model's default (``generation_config.json``
        when its ``do_sample`` is true, else greedy without filters).
      seed: seed of the per-row randomness (row ``r`` draws the same numbers whatever
        the other rows are).
      stop_tokens: ids that end a row; default the model's (``generation_config.json``).
      capacity: cache slots per row; default: a power of two >= longest prompt +
        max_new_tokens (capped at max_position_embeddings).
      use_cache: False recomputes the whole sequence every step (the baseline).
      return_logits: also return the logits of every new token.
      kv_dtype: what the KV cache stores: ``"bfloat16"``, ``"float16"``, ``"float32"``,
        ``"int8"`` or ``"fp8"`` (quantized with a float32 scale per token and KV head:
        about half the bytes of bfloat16; ``kvjax.cache.QuantizedKVCache``). None: the
        model's dtype.
      window, sink_tokens: streaming (StreamingLLM; either turns it on): every layer
        keeps the first ``sink_tokens`` (default 0) positions and a ring of the last
        ``window`` (default ``capacity - sink_tokens``) and attends to those only, so a
        row can go on past ``capacity`` (then ``sink_tokens + window``, the slots a row
        holds) with memory that never grows. While a row fits, the tokens are those of
        the plain cache. Needs rotary position embeddings (``kvjax.cache.layout``).
      prefix_cache: a ``kvjax.PrefixCache``: the rows run in its paged pool, each
        prefilling only what follows its longest cached prefix, and leave their blocks
        cached for later requests (the run goes through ``generate_stream``'s programs,
        in chunks of ``max_new_tokens`` steps).

    Prompt lengths are padded to power-of-two buckets and ``max_new_tokens`` to a
    power-of-two number of loop steps, so other prompts, lengths in the same bucket,
    seeds and sampling values reuse the compiled program. On a mesh whose ``data`` axis
    does not divide the number of prompts, copies of the last prompt fill the batch up;
    they stop after one token and their results are dropped.

    Raises:
      ValueError: bad prompts, lengths or sampling values (before any compilation).
    """
    req = make_request(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, stop_tokens=stop_tokens,
                   capacity=capacity, kv_dtype=kv_dtype, use_cache=use_cache, window=window,
                   sink_tokens=sink_tokens)
    if prefix_cache is not None:
        from kvjax.streaming import prefix_cached_stream  # streaming imports this module

        if return_logits or not use_cache:
            raise ValueError("prefix_cache runs rows in its paged pool: it takes neither "
                             "return_logits=True nor use_cache=False")

        stream = prefix_cached_stream(model, req, prefix_cache, req.num_steps)
        for _ in stream:
            pass
        return stream.generation
    # sharded on model.mesh, after checking that the mesh splits these rows and the model
    cache = programs.new_cache(model, req.rows, req.capacity, use_cache, req.kv_dtype,
                               window=req.window, sink_tokens=req.sink_tokens)
    cache_bytes = cache.nbytes
    timed = not compilation_cache.in_use()  # JAX stores no program with a host callback
    jitted = programs.generation_program(
        model, num_steps=req.num_steps, greedy=req.greedy, use_cache=use_cache,
        return_logits=return_logits, key_limit=req.key_limit, timed=timed,
        kv_dtype=req.kv_dtype)
    run_id = (programs.PREFILL_CLOCK.start_run(),) if timed else ()
    args = (model.params, cache, req.prompt_tokens, req.prompt_lengths,
            *req.controls.values(), *run_id)
    compile_start = time.perf_counter()
    compiled = programs.PROGRAMS.compiled(jitted, args)
    compile_s = time.perf_counter() - compile_start

    start = time.perf_counter()
    result = compiled(*args)
    num_generated = sharding.to_host(result.num_generated)
    end = time.perf_counter()
    prefill_s = None
    if timed:
        prefill_s = (programs.PREFILL_CLOCK.finish_run(run_id[0]) or end) - start
    tokens_out = sharding.to_host(result.tokens)
    tokens = [tokens_out[row, :num_generated[row]].tolist() for row in range(req.batch)]
    logits = None
    if return_logits:
        all_logits = sharding.to_host(result.logits)
        logits = [all_logits[row, :num_generated[row]] for row in range(req.batch)]
    stats = generation_stats(req, tokens, compile_s, end - start, prefill_s,
                             int(result.steps_run), cache_bytes)
    return Generation(tokens=tokens, texts=texts(model, tokens), stats=stats, logits=logits)


def texts(model: Model, tokens: list[list[int]]) -> list[str] | None:
    """Each row's tokens detokenized, None without a tokenizer."""
    return [model.tokenizer.decode(t) for t in tokens] if model.tokenizer else None


def generation_stats(req: Request, tokens: list[list[int]], compile_s: float, generate_s: float,
                     prefill_s: float | None, decode_steps: int, cache_bytes: int
                     ) -> dict[str, Any]:
    """``Generation.stats``; ``prefill_s`` None where the prefill was not timed apart."""
    new_tokens = sum(len(t) for t in tokens)
    decode_s = None if prefill_s is None else generate_s - prefill_s
    return {
        "compile_s": compile_s, "generate_s": generate_s, "prefill_s": prefill_s,
        "decode_s": decode_s, "decode_steps": decode_steps, "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / max(generate_s, 1e-9),
        "decode_tokens_per_s": None if decode_s is None
        else req.batch * decode_steps / max(decode_s, 1e-9),
        "cache_bytes": cache_bytes, "batch": req.batch,
        "prompt_bucket": req.prompt_tokens.shape[1], "capacity": req.capacity,
        "sampling": req.sampling_values,
    }
