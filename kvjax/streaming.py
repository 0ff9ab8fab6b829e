"""Streaming: a prefill program, then compiled chunks of decode steps, tokens handed to
the caller as each chunk is read back (``generate_stream``; ``ChatSession`` runs the
same chunks over a cache it keeps)."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np

from kvjax import programs, sharding
from kvjax.config import is_count
from kvjax.decode import PAD_TOKEN
from kvjax.generation import Generation, generation_stats, texts
from kvjax.loading import Model
from kvjax.requests import MIN_PROMPT_BUCKET, Prompts, Request, bucket, make_request, pad_block
from kvjax.sampling import SamplingParams


def tokens_of_chunk(block: np.ndarray, stops: set[int], finished: bool,
               room: int | None = None) -> tuple[list[int], bool]:
    """A row's new tokens from one chunk (``int32[n]``, ``PAD_TOKEN`` after it stopped):
    none once ``finished``, at most ``room``, cut after the first stop token. Returns
    them and whether the row is finished now."""
    if finished:
        return [], True
    tokens = [int(t) for t in block if t != PAD_TOKEN][:room]
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1], True
    return tokens, False


class DecodeChunks:
    """Runs prefill then decode chunks, yielding ``int32[batch, n]`` host token blocks.

    A chunk is a loop of known length that the device runs without consulting the host
    (``decode_steps`` with ``sync_every = chunk_size``), so calling it only queues it:
    the next chunk is queued before the current one is read back, and the device never
    waits for detokenizing or printing. The host stops queueing once the chunks queued
    reach ``max_new_tokens``; a row that ends on a stop token ends the loop after the
    chunk that reported it, and the chunk queued behind that one runs its steps to no
    effect. ``state`` holds the newest loop state (and its cache; not waited for): the
    final one after iteration, else the one the last queued program returns (its
    cache's lengths count positions whose tokens may not be read back yet);
    ``compile_s``, ``prefill_s`` and ``decode_s`` the seconds spent.
    """

    def __init__(self, model: Model, use_cache: bool, chunk_size: int, cache, block: np.ndarray,
                 lengths: np.ndarray, start: np.ndarray, controls: dict,
                 key_limit: int | None = None, fresh: bool = False,
                 kv_dtype: str | None = None):
        prefill_program, chunk_program = programs.stream_programs(
            model, greedy=controls["sampling"].is_greedy, chunk_size=chunk_size,
            state_shardings=programs.state_shardings(model, cache), use_cache=use_cache,
            key_limit=key_limit, fresh=fresh, kv_dtype=kv_dtype)
        self._params, self._controls, self._chunk_size = model.params, controls, chunk_size
        self._prefill_args = (model.params, cache, block, lengths, start, *controls.values())
        t0 = time.perf_counter()
        self._prefill = programs.PROGRAMS.compiled(prefill_program, self._prefill_args)
        # The chunk program is compiled for the state exactly as prefill leaves it
        # (shapes, dtypes and shardings of the compiled prefill's outputs).
        self._chunk = programs.PROGRAMS.compiled(chunk_program, (model.params, self._prefill.out_info,
                                                                 *controls.values()))
        self.compile_s = time.perf_counter() - t0
        self.state = None
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = 0

    def _run_chunk(self, state):
        return self._chunk(self._params, state, *self._controls.values())

    def __iter__(self):
        t0 = time.perf_counter()
        state = self.state = self._prefill(*self._prefill_args)
        first = sharding.to_host(state.tokens)[:, None]  # [batch, 1]
        finished = bool(np.all(sharding.to_host(state.done)))
        self.prefill_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        steps_left = int(np.max(self._controls["max_new_tokens"])) - 1  # steps a row may need
        pending = None
        if not finished:
            pending, steps_left = self._run_chunk(state), steps_left - self._chunk_size
            self.state = pending[0]
        yield first
        while pending is not None:
            state, tokens, done = pending
            pending = None
            if steps_left > 0:  # queued before this chunk is read back
                pending, steps_left = self._run_chunk(state), steps_left - self._chunk_size
                self.state = pending[0]
            tokens = sharding.to_host(tokens)
            self.decode_steps += int(np.sum(np.any(tokens != PAD_TOKEN, axis=0)))
            yield tokens
            if pending is not None and bool(done):
                state, pending = pending[0], None  # every row stopped: a spare, not read
        self.decode_s = time.perf_counter() - t1
        self.state = state


class TokenStream:
    """Iterating yields, per chunk, each row's new tokens (a list per row, empty once the
    row has stopped); afterwards ``generation`` holds the whole ``Generation``.
    ``on_end(state, tokens)`` is called once the iteration ends, also when the caller
    stops early, with the newest loop state and each row's tokens so far (a prefix
    cache takes its pool back there)."""

    def __init__(self, model: Model, req: Request, chunks: DecodeChunks, cache_bytes: int,
                 on_end=None):
        self._model, self._req, self._chunks, self._cache_bytes = model, req, chunks, cache_bytes
        self._on_end = on_end
        self.generation: Generation | None = None

    def __iter__(self):
        batch = self._req.batch
        tokens: list[list[int]] = [[] for _ in range(batch)]
        finished = [False] * batch
        stops = set(self._req.controls["stop_tokens"].tolist()) - {PAD_TOKEN}
        limits = self._req.controls["max_new_tokens"]  # [rows]
        try:
            for block in self._chunks:
                delta: list[list[int]] = []
                for row in range(batch):
                    new, finished[row] = tokens_of_chunk(block[row], stops, finished[row],
                                                         int(limits[row]) - len(tokens[row]))
                    tokens[row].extend(new)
                    delta.append(new)
                yield delta
        finally:
            if self._on_end is not None:
                self._on_end(self._chunks.state, tokens)
        c = self._chunks
        stats = generation_stats(self._req, tokens, c.compile_s, c.prefill_s + c.decode_s,
                                 c.prefill_s, c.decode_steps, self._cache_bytes)
        self.generation = Generation(tokens=tokens, texts=texts(self._model, tokens), stats=stats)


def generate_stream(model: Model, prompts: Prompts, *,
                    chunk_size: int = 16, max_new_tokens: int = 64,
                    temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None,
                    min_p: float | None = None, seed: int = 0,
                    stop_tokens: Sequence[int] | None = None, capacity: int | None = None,
                    use_cache: bool = True, kv_dtype: str | None = None,
                    window: int | None = None, sink_tokens: int | None = None,
                    prefix_cache=None) -> TokenStream:
    """Like ``generate`` but yields new tokens as they are made, ``chunk_size`` steps at a time.

    Two compiled programs (the prefill and a chunk of ``chunk_size`` decode steps) serve
    the whole run, so nothing recompiles per token; the tokens are exactly those of
    ``generate`` with the same arguments. Validation happens here, before compiling.
    """
    if not is_count(chunk_size):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    req = make_request(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, stop_tokens=stop_tokens,
                   capacity=capacity, kv_dtype=kv_dtype, use_cache=use_cache, window=window,
                   sink_tokens=sink_tokens)
    if prefix_cache is not None:
        return prefix_cached_stream(model, req, prefix_cache, chunk_size)
    cache = programs.new_cache(model, req.rows, req.capacity, use_cache, req.kv_dtype,
                               window=req.window, sink_tokens=req.sink_tokens)
    cache_bytes = cache.nbytes
    chunks = DecodeChunks(model, use_cache, chunk_size, cache, req.prompt_tokens, req.prompt_lengths,
                     np.zeros((req.rows,), np.int32), req.controls, key_limit=req.key_limit,
                     fresh=True, kv_dtype=req.kv_dtype)
    return TokenStream(model, req, chunks, cache_bytes)


def prefix_cached_stream(model: Model, req: Request, prefix_cache, chunk_size: int) -> TokenStream:
    """``generate_stream`` over a ``kvjax.PrefixCache``'s pool: each row's table starts
    with the blocks of its longest cached prefix and the row prefills only the rest;
    when the stream ends (or is left early) the pool goes back to ``prefix_cache`` and
    the rows' full blocks stay cached."""
    check_prefix_cache_request(model, req, prefix_cache)
    chunks, on_end, cache_bytes = prefix_cached_chunks(model, prefix_cache, req.encoded,
                                                       req.controls, chunk_size)
    return TokenStream(model, req, chunks, cache_bytes, on_end)


def prefix_cached_chunks(model: Model, prefix_cache, rows: list[list[int]], controls: dict,
                         chunk_size: int):
    """``(chunks, on_end, cache_bytes)``: ``DecodeChunks`` of ``rows`` (prompts' token
    ids) in ``prefix_cache``'s pool, each prefilling from its cached prefix on, and
    ``on_end(state, new_tokens)`` that hands the pool back and keeps the rows' blocks."""
    shared = SharedPrefill(model, prefix_cache.kv_dtype, controls["stop_tokens"])
    allocations, starts = prefix_cache.allocate_sharing(
        rows, int(np.max(controls["max_new_tokens"])), shared)
    rests = [ids[start:] for ids, start in zip(rows, starts)]
    block, lengths = pad_block(rests, bucket(max(map(len, rests)), MIN_PROMPT_BUCKET))
    cache = prefix_cache.cache_for(allocations, starts)
    chunks = DecodeChunks(model, True, chunk_size, cache, block, lengths,
                          np.array(starts, np.int32), controls, kv_dtype=prefix_cache.kv_dtype)
    chunks.compile_s += shared.compile_s
    chunks.prefill_s += shared.prefill_s

    def on_end(state, new_tokens):
        prefix_cache.release(allocations, state.cache if state is not None else cache,
                             [ids + new for ids, new in zip(rows, new_tokens)])

    return chunks, on_end, cache.nbytes


class SharedPrefill:
    """The ``prefill`` of ``PrefixCache.allocate_sharing``: rows' prompt segments written
    to their blocks of the pool by ``generate_stream``'s prefill program (greedy, one new
    token, discarded), blocking until done; ``compile_s`` and ``prefill_s`` add up the
    seconds spent."""

    def __init__(self, model: Model, kv_dtype: str, stop_tokens: np.ndarray):
        self._model, self._kv_dtype, self._stop_tokens = model, kv_dtype, stop_tokens
        self.compile_s = self.prefill_s = 0.0

    def __call__(self, cache, segments: list[list[int]], starts: list[int]):
        rows = len(segments)
        block, lengths = pad_block(segments, bucket(max(map(len, segments)), MIN_PROMPT_BUCKET))
        program, _ = programs.stream_programs(
            self._model, greedy=True, chunk_size=1, fresh=False, kv_dtype=self._kv_dtype,
            state_shardings=programs.state_shardings(self._model, cache))
        args = (self._model.params, cache, block, lengths, np.array(starts, np.int32),
                np.ones((rows,), np.int32), SamplingParams.create(rows), np.uint32(0),
                self._stop_tokens)
        t0 = time.perf_counter()
        compiled = programs.PROGRAMS.compiled(program, args)
        t1 = time.perf_counter()
        pool = jax.block_until_ready(compiled(*args).cache)
        self.compile_s += t1 - t0
        self.prefill_s += time.perf_counter() - t1
        return pool


def check_prefix_cache_request(model: Model, req: Request, prefix_cache) -> None:
    """Raises ``ValueError`` for a request a prefix cache cannot serve: another model,
    another ``kv_dtype``, streaming (``window``, ``sink_tokens``)."""
    prefix_cache.check_model(model)
    if req.kv_dtype is not None and req.kv_dtype != prefix_cache.kv_dtype:
        raise ValueError(f"kv_dtype={req.kv_dtype!r}, but the prefix cache stores "
                         f"{prefix_cache.kv_dtype}: pass kv_dtype=None or build the "
                         f"PrefixCache with kv_dtype={req.kv_dtype!r}")
    if req.window is not None or req.sink_tokens is not None:
        raise ValueError("a prefix cache keeps whole prefixes; streaming (window, sink_tokens) "
                         "drops them: pass one or the other")
