"""``Engine``: requests served at once from one paged KV pool, in a background thread.

Final API (the FastAPI server builds on exactly this)::

    engine = kvjax.serve.Engine(model, *, max_rows=8, max_len=None, block_size=None,
                                pool_blocks=None, prefix_cache=None, max_prefill_tokens=256,
                                max_waiting=256, kv_dtype=None, prefix_caching=True,
                                mixed_steps=True)
                                # block_size None: 16
    engine.warmup() -> int            # compiles and loads every program now (else on first use)
    engine.start() -> Engine          # the loop in a daemon thread; also `with Engine(...) as e`
    engine.step() -> bool             # one step, synchronously (tests); True if it did work
    engine.shutdown(drain=True, timeout=None) -> None
    engine.stats() -> dict
    engine.max_len, engine.max_rows, engine.prefix_cache

    handle = engine.submit(prompt, *, max_tokens=16, temperature=0.0, top_p=None, top_k=None,
                           min_p=None, seed=None, stop_tokens=None, stop=None)
        # prompt: str | list[int] | list[{"role", "content"}] (chat template)
        # max_tokens None: to the end of the context (max_len less the prompt)
        # raises ValueError (bad values, too long: names the limit), EngineOverloaded
        # (queue full), RuntimeError (engine shut down or failed)
    handle.id: int; handle.prompt_tokens: int; handle.cached_tokens: int | None (None until
    admitted); handle.completion_tokens: int; handle.done: bool
    handle.finish_reason: "stop" | "length" | "cancelled" | None
    handle.submitted_at / admitted_at / first_token_at / finished_at: float | None
        # time.perf_counter()
    handle.cancel() -> None
    for delta in handle: ...                  # Delta(token_ids: list[int], text: str)
    async for delta in handle.stream(): ...   # same, for asyncio
    handle.result(timeout=None) -> Completion(text, token_ids, finish_reason, prompt_tokens,
                                              completion_tokens, cached_tokens)
    EngineOverloaded(RuntimeError)

How it runs. The engine holds ``max_rows`` rows (the static batch of its decode step)
and one paged KV pool, owned by a ``kvjax.PrefixCache`` (automatic prefix caching is
always on). A request waits in a FIFO queue (at most ``max_waiting``) until a row is
free and the pool can hold its prompt and ``max_tokens``: its blocks are all allocated
on admission (the longest cached prefix shared, host-tier blocks restored; with
``prefix_caching=False`` nothing is cached, so nothing is shared), so a running
request never runs out of memory, and a request the pool cannot hold yet waits at the
head of the queue, never dropped. Each step then

1. retires cancelled requests and admits waiting ones (a request whose prompt continues
   with blocks a row still prefilling is about to cache waits for them, letting those
   behind it go first: requests arriving together with one system prompt prefill it
   once);
2. prefills up to ``max_prefill_tokens`` prompt tokens, padding included, the rows in
   admission order, each row's chunk from the first position its cached prefix does not
   hold, in calls compiled per power-of-two chunk width (chunks run several to a call,
   a short one in a wider call, where that is faster, so short prompts do not each
   read all the weights, and chunks of ``PACK_TOKENS`` or more are cut to a power of
   two, so none computes much padding); a long prompt is spread over steps. The full
   blocks a chunk completes are cached at once, so a request admitted later shares them
   even while this one runs. A row whose prompt is done samples its first token from
   the chunk's last logits;
3. starts one decode step (``kvjax.programs.serve_decode_program``) over all rows: the
   decoding ones at their positions, the others at position -1 (they write nothing and
   their tokens are discarded), each row sampled with its own values and its own key
   (its seed and token index, the key ``kvjax.generate`` gives a lone prompt, so a
   request's tokens do not depend on its neighbours). It does not wait for it: a row
   still owed the last step's token is fed it on the device. With ``mixed_steps``
   (default) the step's first prefill call runs in the same program
   (``serve_mixed_program``), so the decoding rows and the chunks read the weights
   once;
4. while that step runs, hands the last decode step's tokens and the first tokens of
   the prompts just prefilled to their requests (text decoded incrementally, stop
   tokens and strings checked on the host) and retires the finished ones at once:
   their blocks are released, their full blocks cached for later requests. A row that
   stopped at the last step's token has taken part in the step running (its token is
   discarded; the position it wrote was its own).

So no request waits for another to finish, decoding rows get a token every step while
long prompts prefill, and the host's work of a step overlaps the device's. The programs
are a fixed set (``warmup()`` compiles them: greedy and sampling decode steps, and per
chunk shape greedy and sampling mixed programs, or the prefill program without
``mixed_steps``); the pool is
donated to each, and every argument has a static shape (tables ``[rows, ceil(max_len /
block_size)]``), so requests of any length compile nothing new.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from typing import Sequence

import jax
import numpy as np

from kvjax import programs
from kvjax.config import ModelConfig, is_count
from kvjax.decode import PAD_TOKEN
from kvjax.loading import Model
from kvjax.paged.blocks import PoolExhausted, chain_keys, check_block_size
from kvjax.paged.prefix import PrefixCache
from kvjax.requests import MIN_PROMPT_BUCKET, bucket, encode_prompts, pad_block, stop_array
from kvjax.sampling import SamplingParams
from kvjax.serve.handles import Completion, Delta, RequestHandle, TextDeltas
from kvjax.serve.scheduler import EngineOverloaded, Job, Scheduler

__all__ = ["Completion", "Delta", "Engine", "EngineOverloaded", "RequestHandle", "TextDeltas"]

DEFAULT_MAX_LEN = 4096  # max_len's default, where the model allows it


def pool_sizes(config: ModelConfig, max_rows: int, max_len: int | None, block_size: int,
               pool_blocks: int | None) -> tuple[int, int]:
    """``(max_len, pool_blocks)`` of an engine, defaults resolved and sizes checked.

    ``max_len`` defaults to the model's max positions (at most ``DEFAULT_MAX_LEN``) or,
    given ``pool_blocks``, what they hold; ``pool_blocks`` to ``max_rows`` rows of
    ``max_len``. The pool holds one block more than a row of ``max_len``: a request whose
    whole prompt is cached holds the cached last block and its copy (copy-on-write), so
    any request an engine accepts fits once the others are done.
    """
    limit = config.max_position_embeddings
    if max_len is not None:
        if not is_count(max_len):
            raise ValueError(f"max_len must be an integer >= 1 (prompt + generated tokens a "
                             f"request may hold), got {max_len!r}")
        if max_len > limit:
            raise ValueError(f"max_len ({max_len}) exceeds the model's max_position_embeddings "
                             f"({limit}); pass max_len <= {limit}")
    if pool_blocks is not None and not is_count(pool_blocks, 2):
        raise ValueError(f"pool_blocks must be an integer >= 2 (blocks of the KV pool), got "
                         f"{pool_blocks!r}")
    if max_len is None:
        max_len = min(limit, DEFAULT_MAX_LEN)
        if pool_blocks is not None:
            max_len = min(max_len, (pool_blocks - 1) * block_size)
    check_block_size(block_size, max_len)
    per_row = -(-max_len // block_size)
    if pool_blocks is None:
        return max_len, max_rows * per_row + 1
    if per_row + 1 > pool_blocks:
        raise ValueError(f"a pool of {pool_blocks} blocks of {block_size} slots cannot hold a "
                         f"request of max_len ({max_len}) tokens: it needs {per_row + 1} blocks "
                         f"({per_row} and a copy-on-write block); pass pool_blocks >= "
                         f"{per_row + 1} or a smaller max_len")
    return max_len, pool_blocks


# A prefill call costs about as much as computing PACK_TOKENS tokens before it computes
# any (it reads every weight, launches every kernel), so a call's time is modelled as
# PACK_TOKENS + its rows * width tokens: chunks run together in calls of several rows,
# of PACK_TOKENS or of the step's whole budget, a chunk in a call of its width or wider
# (whichever packing the model finds cheaper, `pack_chunks`), and a chunk of PACK_TOKENS
# or more is cut to a power of two (the rest prefilled at the next step), so none
# computes PACK_TOKENS padding tokens or more. 256 is about where a chunk's matmuls take
# as long as reading the weights: 2 FLOPs per weight per token against 2 bytes per bf16
# weight, i.e. peak FLOP/s over HBM bytes/s, 206 tokens on an H200 (989 TFLOP/s, 4.8
# TB/s), 240 on a TPU v5e (197 TFLOP/s, 819 GB/s). On an H100 (Llama-3.1-8B shape, rows idle) a call of
# 4 x 64 tokens took 11.5 ms and one of 1 x 1024 tokens 25.7 ms (docs/serving.md).
PACK_TOKENS = 256


def prefill_shapes(max_prefill_tokens: int, max_len: int, max_rows: int
                   ) -> list[tuple[int, int]]:
    """The ``(rows, width)`` shapes the prefill program is compiled for: widths the powers
    of two from ``MIN_PROMPT_BUCKET`` to the bucket of the longest chunk, each for one
    row and, where more fit, for as many rows (at most ``max_rows``) as ``PACK_TOKENS``
    and as the budget's bucket hold."""
    top = bucket(min(max_prefill_tokens, max_len), MIN_PROMPT_BUCKET)
    shapes = []
    for width in (MIN_PROMPT_BUCKET << i for i in range((top // MIN_PROMPT_BUCKET).bit_length())):
        shapes.append((1, width))
        for pack in (min(PACK_TOKENS, top), top):
            rows = min(pack // width, max_rows)
            if rows > 1 and (rows, width) not in shapes:
                shapes.append((rows, width))
    return shapes


def pack_chunks(widths: Sequence[int], shapes: Sequence[tuple[int, int]]
                ) -> list[tuple[tuple[int, int], list[int]]]:
    """The calls that prefill chunks of bucket ``widths`` at the least modelled time,
    ``PACK_TOKENS + rows * width`` tokens a call of ``shapes`` (padding rows and columns
    compute too): ``(shape, the chunks' indices)``, widest first. A call takes chunks of
    its width or narrower, so a short chunk rides in a wider call rather than read the
    weights in a call of its own. A small dynamic programme over the chunks, widest first
    (admission order within a width): the cheapest calls for the last ``i`` of them."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    best = [(0, ())]  # best[i]: (cost, shapes) of the calls for the last i chunks of order
    for count in range(1, len(order) + 1):
        widest = widths[order[-count]]
        best.append(min((PACK_TOKENS + rows * width + cost, ((rows, width),) + calls)
                        for rows, width in shapes if width >= widest
                        for cost, calls in [best[max(count - rows, 0)]]))
    calls, taken = [], 0
    for rows, width in best[-1][1]:
        calls.append(((rows, width), order[taken:taken + rows]))
        taken += rows
    return calls


class Engine:
    """Serves many requests at once from one paged KV pool: continuous batching over a
    fixed number of rows, chunked prefill interleaved with decoding, automatic prefix
    caching. The module docstring lists the API and describes a step.

    Args:
      model: a ``kvjax.Model``, on one device or on a mesh that keeps rows whole
        (``kvjax.cache.paged.check_mesh_rows``: the heads split, tensor parallelism).
      max_rows: requests running at once (rows of the compiled decode step).
      max_len: most tokens (prompt + generated) a request may hold; default the model's
        max positions, at most 4096 (or what ``pool_blocks`` hold).
      block_size: slots a block of the pool (default 16, or the prefix cache's).
      pool_blocks: blocks of the pool; default ``max_rows`` rows of ``max_len`` and one
        more (``pool_sizes``).
      prefix_cache: a ``kvjax.PrefixCache`` for ``model`` to serve from (its pool and
        budget); default one of ``pool_blocks`` blocks. Give it to this engine alone
        while the engine runs.
      max_prefill_tokens: prompt tokens prefilled per step, over all rows, counted as
        computed (each chunk padded to a power of two, at least 16): a longer prompt is
        prefilled over several steps, each also running a decode step.
      max_waiting: requests the queue holds; ``submit`` raises ``EngineOverloaded``
        beyond.
      kv_dtype: what the pool stores (as in ``kvjax.generate``; None: the model's dtype).
      prefix_caching: cache the full blocks requests write, for later requests to share
        (default). False caches nothing (every prompt is prefilled whole, as vLLM's
        ``--no-enable-prefix-caching``): the baseline that measures what caching saves.
        Blocks a given ``prefix_cache`` held before still serve.
      mixed_steps: prefill calls run in ``kvjax.programs.serve_mixed_program``, a step's
        first one with its decode step, one pass over the weights for both (default;
        the others with every row idle). False: prefill calls in programs of their own
        (``serve_prefill_program``), each reading the weights again (the baseline that
        measures what mixing saves).

    Raises:
      ValueError: bad sizes (naming the fix), a mesh that splits rows, a prefix cache built
        for another model, block size or ``kv_dtype``; before anything compiles.
    """

    def __init__(self, model: Model, *, max_rows: int = 8, max_len: int | None = None,
                 block_size: int | None = None, pool_blocks: int | None = None,
                 prefix_cache: PrefixCache | None = None, max_prefill_tokens: int = 256,
                 max_waiting: int = 256, kv_dtype: str | None = None,
                 prefix_caching: bool = True, mixed_steps: bool = True):
        for name, value in (("max_rows", max_rows), ("max_prefill_tokens", max_prefill_tokens),
                            ("max_waiting", max_waiting)):
            if not is_count(value):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_prefill_tokens < MIN_PROMPT_BUCKET:
            raise ValueError(f"max_prefill_tokens must be >= {MIN_PROMPT_BUCKET} (a prefill call "
                             f"computes at least {MIN_PROMPT_BUCKET} tokens), got "
                             f"{max_prefill_tokens}")
        if prefix_cache is not None:
            block_size, pool_blocks = _prefix_cache_sizes(model, prefix_cache, block_size,
                                                          pool_blocks, kv_dtype)
        block_size = 16 if block_size is None else block_size
        check_block_size(block_size)
        max_len, pool_blocks = pool_sizes(model.config, max_rows, max_len, block_size,
                                          pool_blocks)
        self.model = model
        self.max_rows, self.max_len = max_rows, max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = bool(prefix_caching)
        self.mixed_steps = bool(mixed_steps)
        self.prefix_cache = prefix_cache or PrefixCache(
            model, block_size=block_size, budget_blocks=pool_blocks, kv_dtype=kv_dtype)
        self._blocks_per_row = -(-max_len // block_size)
        self._prefill_shapes = prefill_shapes(max_prefill_tokens, max_len, max_rows)
        self._scheduler = Scheduler(max_rows, max_waiting)
        self._cond = threading.Condition()  # guards the scheduler, the counts, the blocks
        self._running_programs = threading.Lock()  # a step's, or warmup's: one at a time
        # ("decode", greedy) | ("prefill", (rows, width)) | ("mixed", ((rows, width), greedy))
        self._compiled: dict[tuple, object] = {}
        self._in_flight: tuple[list[Job], jax.Array] | None = None  # the decode step not read yet
        self._seated: tuple | None = None  # the rows' jobs _seated_values were built for
        self._seated_values: tuple = ()
        self._ids = itertools.count()
        self._idle_sampling = SamplingParams.create(1)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._error: BaseException | None = None
        self._counts = dict.fromkeys(("requests_refused", "requests_finished",
                                      "requests_cancelled", "prompt_tokens",
                                      "generation_tokens", "cached_prompt_tokens", "steps",
                                      "decode_steps", "prefill_calls", "prefill_tokens"), 0)
        self._counts["step_seconds"] = 0.0

    # ----- requests -----

    def submit(self, prompt: str | Sequence[int] | Sequence[dict], *,
               max_tokens: int | None = 16,
               temperature: float | None = 0.0, top_p: float | None = None,
               top_k: int | None = None, min_p: float | None = None, seed: int | None = None,
               stop_tokens: Sequence[int] | None = None,
               stop: str | Sequence[str] | None = None) -> RequestHandle:
        """Queues a request; returns its ``RequestHandle`` at once.

        Args:
          prompt: text, token ids, or chat messages (``[{"role": ..., "content": ...}]``,
            rendered with the checkpoint's chat template, the assistant's turn opened).
          max_tokens: new tokens at most (stop token included); None: to the end of the
            context, ``max_len`` less the prompt (OpenAI's chat default; the request then
            holds blocks for all of it while it runs).
          temperature, top_p, top_k, min_p: as in ``kvjax.generate`` (None: the model's
            default).
          seed: the request's randomness (its tokens do not depend on what else runs);
            None: a random one.
          stop_tokens: ids that end it (included in ``token_ids``, not in the text);
            default the model's.
          stop: strings that end it; the text is cut before the first (as OpenAI's).

        Raises:
          ValueError: a bad value (the message names it), or a prompt + ``max_tokens``
            longer than ``max_len``; checked before the request is queued.
          EngineOverloaded: ``max_waiting`` requests are waiting.
          RuntimeError: the engine is shut down or failed.
        """
        self._check_open()
        ids = self._encode(prompt)
        if max_tokens is None:  # a prompt that fills max_len is refused below
            max_tokens = max(self.max_len - len(ids), 1)
        if not is_count(max_tokens):
            raise ValueError(f"max_tokens must be an integer >= 1 (None: to the end of the "
                             f"context), got {max_tokens!r}")
        if len(ids) + max_tokens > self.max_len:
            raise ValueError(self._too_long(len(ids), max_tokens))
        sampling = SamplingParams.create(
            1, **self.model.sampling_values(temperature, top_k, top_p, min_p))
        if seed is None:
            seed = secrets.randbits(32)
        elif not (is_count(seed, 0) and seed < 2 ** 32):
            raise ValueError(f"seed must be an integer in [0, 2**32) (None: a random one), "
                             f"got {seed!r}")
        stops = frozenset(stop_array(self.model, stop_tokens).tolist()) - {PAD_TOKEN}
        text = TextDeltas(self.model.tokenizer, self._stop_strings(stop))
        handle = RequestHandle(next(self._ids), len(ids), lambda: self._cancel(job))
        job = Job(handle=handle, prompt=ids, max_tokens=max_tokens, sampling=sampling,
                  seed=int(seed), stops=stops, text=text, greedy=sampling.is_greedy)
        with self._cond:
            self._check_open()
            try:
                self._scheduler.enqueue(job)
            except EngineOverloaded:
                self._counts["requests_refused"] += 1
                raise
            self._cond.notify_all()
        return handle

    def _encode(self, prompt) -> list[int]:
        """The prompt's token ids, checked (``kvjax.requests.encode_prompts``)."""
        if (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt)
                and isinstance(prompt[0], dict)):
            tokenizer = self.model.tokenizer
            if tokenizer is None:
                raise ValueError("chat messages need a tokenizer with a chat template "
                                 "(tokenizer.json in the checkpoint); pass token ids instead")
            rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            prompt = tokenizer.encode(rendered, add_special_tokens=False)
        return encode_prompts(self.model, [prompt])[0]

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> str:
        limit = self.model.config.max_position_embeddings
        fix = ("" if self.max_len == limit else
               f", or build the Engine with a larger max_len (at most {limit})")
        return (f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_tokens + max_tokens} exceeds the engine's max_len ({self.max_len}); "
                f"shorten the prompt or lower max_tokens{fix}")

    def _stop_strings(self, stop) -> tuple[str, ...]:
        stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
        if not isinstance(stops, Sequence) or any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if stops and self.model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (tokenizer.json in the checkpoint); "
                             "pass stop_tokens instead")
        return tuple(stops)

    def _cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self._error!r}") \
                from self._error
        if self._closing:
            raise RuntimeError("the engine is shut down: build a new Engine")

    # ----- running -----

    def start(self) -> "Engine":
        """Runs the loop in a daemon thread (it sleeps while there is no request);
        returns the engine. Calling it again does nothing."""
        with self._cond:
            self._check_open()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvjax-engine",
                                                daemon=True)
                self._thread.start()
        return self

    def step(self) -> bool:
        """Runs one step now, in this thread (for an engine not ``start``ed): retires
        cancelled requests, admits waiting ones, prefills up to ``max_prefill_tokens``
        prompt tokens and runs one decode step. Returns whether it did anything.

        Raises:
          RuntimeError: the engine runs in its thread, or failed before.
        """
        if self._thread is not None:
            raise RuntimeError("the engine runs in its own thread (start()); step() is for an "
                               "engine that was not started")
        if self._error is not None:
            self._check_open()
        return self._guarded_step()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests and ends the loop: ``drain`` lets the queued and running
        requests finish (at most ``timeout`` seconds, then the rest is cancelled), else
        every one is cancelled (its handle ends with ``"cancelled"``)."""
        with self._cond:
            self._closing = True
            if not drain:
                self._cancel_all()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cond:
                    self._cancel_all()
                    self._cond.notify_all()
                self._thread.join()
            return
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self._scheduler.idle and self._error is None:
            if deadline is not None and time.perf_counter() > deadline:
                with self._cond:
                    self._cancel_all()
            self._guarded_step()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.shutdown(drain=exc_type is None)

    def _cancel_all(self) -> None:
        for job in (*self._scheduler.running(), *self._scheduler.waiting):
            job.cancelled = True

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or not self._scheduler.idle)
                if self._scheduler.idle:  # closing, nothing left
                    return
            try:
                self._guarded_step()
            except BaseException:  # the handles have it (_fail)
                return

    def _guarded_step(self) -> bool:
        try:
            with self._running_programs:
                return self._step()
        except BaseException as error:
            self._fail(error)
            raise

    def _fail(self, error: BaseException) -> None:
        """Ends every request with ``error`` (raised from their handles) and stops the
        engine: a failed program may have consumed the pool it was donated. Blocks are
        released with only what they held before (nothing new is cached)."""
        with self._cond:
            self._error = error
            for job in (*self._scheduler.running(), *self._scheduler.waiting):
                if job.allocation is not None:
                    self.prefix_cache.manager.release(
                        job.allocation, job.prompt[:job.allocation.cached_tokens])
                self._scheduler.vacate(job)
                job.handle._fail(error)
            self._cond.notify_all()

    def _step(self) -> bool:
        start = time.perf_counter()
        with self._cond:
            cancelled = self._scheduler.cancelled()
            for job in cancelled:
                self._retire(job, "cancelled")
        admitted = self._admit()
        calls = self._prefill_calls()
        with self._cond:
            jobs = [job for job in self._scheduler.decoding()
                    if len(job.generated) + job.in_flight < job.max_tokens]
        if self.mixed_steps:  # each call in a mixed program; the first one's decodes
            firsts = [first for call in calls[1:] for first in self._run([], call)[1]]
            in_flight, _ = self._run(jobs, calls[0] if calls else None, hold_firsts=True)
        else:
            firsts = [first for call in calls for first in self._prefill(*call)]
            in_flight, _ = self._run(jobs, None)
        # this step runs on the device while the host hands out the last one's tokens
        # (with the first tokens of the prompts it finished) and the first tokens of
        # prompts finished in calls of their own (read now: the step waits for them)
        previous, self._in_flight = self._in_flight, in_flight
        if previous is not None:
            self._take_tokens(*previous)
        for job, first, row in firsts:
            self._take_token(job, int(np.asarray(first)[row]))
        worked = bool(cancelled or admitted or calls or previous or self._in_flight)
        if worked:
            with self._cond:
                self._counts["steps"] += 1
                self._counts["decode_steps"] += bool(jobs)  # rows decoded
                self._counts["step_seconds"] += time.perf_counter() - start
        return worked

    def _admit(self) -> int:
        """Seats waiting requests, first come first served, while a row is free and the
        pool holds the next one's prompt and ``max_tokens`` (else it waits, first).
        A request whose prompt continues, past what is cached, with a block a row still
        prefilling will cache waits for it (``_waits_for_a_prefill``), and those behind it
        go first: requests that arrive together with one system prompt prefill it once."""
        admitted = 0
        with self._cond:
            pending = self._prefilling_keys()
            deferred = lambda job: self._waits_for_a_prefill(job, pending)
            while (taken := self._scheduler.next_admission(deferred)) is not None:
                job, row = taken
                try:
                    # the last token is never fed back: max_tokens - 1 positions after the prompt
                    job.allocation = self.prefix_cache.allocate([job.prompt], job.max_tokens - 1)[0]
                except PoolExhausted as error:
                    if self._scheduler.running():  # blocks come back as rows finish
                        break
                    self._scheduler.vacate(job)  # only when the prefix cache serves others too
                    job.handle._fail(error)
                    continue
                job.written = job.allocation.cached_tokens
                self._scheduler.seat(job, row)
                self._counts["prompt_tokens"] += len(job.prompt)
                self._counts["cached_prompt_tokens"] += job.written
                job.handle._admitted(job.written)
                if self.prefix_caching:
                    pending.update(self._prompt_keys(job))
                admitted += 1
        return admitted

    def _prefilling_keys(self) -> set[bytes]:
        """The keys of the prompt blocks of the rows still prefilling (none with
        ``prefix_caching`` off: nothing is shared)."""
        pending = set()
        if self.prefix_caching:
            for job in self._scheduler.running():
                if job.prompt_left:
                    pending.update(self._prompt_keys(job))
        return pending

    def _waits_for_a_prefill(self, job: Job, pending: set[bytes]) -> bool:
        """Whether ``_admit`` defers ``job``: its prompt's first block that is not cached
        is in ``pending``, a block a prefilling row has not written yet (its chunks publish
        their full blocks, so ``job`` shares it once that row is past it)."""
        if pending:
            manager = self.prefix_cache.manager
            for key in self._prompt_keys(job):
                if not manager.is_cached(key):
                    return key in pending
        return False

    def _prompt_keys(self, job: Job) -> list[bytes]:
        if job.prompt_keys is None:
            job.prompt_keys = list(chain_keys(job.prompt, self.prefix_cache.block_size))
        return job.prompt_keys

    def _prefill_calls(self) -> list[tuple[tuple[int, int], list[tuple[Job, int]]]]:
        """This step's prefill calls: ``(shape, [(job, tokens), ...])``, the chunks of
        ``Scheduler.prefill_plan`` packed by ``pack_chunks``."""
        with self._cond:
            plan = self._scheduler.prefill_plan(self.max_prefill_tokens, PACK_TOKENS,
                                                MIN_PROMPT_BUCKET)
        widths = [bucket(count, MIN_PROMPT_BUCKET) for _, count in plan]
        return [(shape, [plan[i] for i in group])
                for shape, group in pack_chunks(widths, self._prefill_shapes)]

    def _prefill(self, shape: tuple[int, int], chunks: Sequence[tuple[Job, int]]) -> list:
        """Runs one prefill call (``_prefill_calls``) in a program of its own; returns
        ``(job, first tokens, row)`` of the rows whose prompt is done (``first
        tokens[row]`` is the job's, still on the device)."""
        args = self._args(self._prefill_inputs(chunks, *shape))
        pool, first = self._program(("prefill", shape), args)(*args)
        return self._prefilled(pool, chunks, first)

    def _prefilled(self, pool, chunks: Sequence[tuple[Job, int]], first: jax.Array) -> list:
        """Takes the pool back from a call that prefilled ``chunks`` and caches the full
        blocks they complete at once (``BlockManager.publish``: requests admitted from now
        on share them); returns ``(job, first, row)`` of the rows whose prompt is done."""
        self.prefix_cache.pool = pool
        with self._cond:
            self._counts["prefill_calls"] += 1
            self._counts["prefill_tokens"] += sum(count for _, count in chunks)
        finished = []
        for row, (job, count) in enumerate(chunks):
            job.written += count
            if self.prefix_caching:
                with self._cond:  # later programs read the pool this returns: written by then
                    self.prefix_cache.manager.publish(job.allocation, job.written_tokens())
            if job.prompt_left == 0:
                finished.append((job, first, row))
        return finished

    def _run(self, jobs: list[Job], call, hold_firsts: bool = False
             ) -> tuple[tuple[list[Job], jax.Array] | None, list]:
        """Starts one decode step over ``jobs``, the rows that have a token to feed and
        may take another (idle, prefilling and finished rows at position -1; none: every
        row idle), and with ``call`` (a prefill call: ``(shape, chunks)``) those chunks in
        the same program (``serve_mixed_program``). Returns ``(jobs, tokens)``
        (``int32[rows]``, on the device: not waited for; None if no row decodes) and the
        prefill's finished rows (as ``_prefill``). A row still waiting for the last step's
        token (``in_flight``) is fed it on the device; a row that stops at that token has
        written one position more, which its blocks hold (its release passes the tokens
        whose K/V they hold). ``hold_firsts``: the prompts ``call`` finishes get their
        first token as a decode step's, in ``tokens`` at their rows (``in_flight``,
        among the returned jobs; no finished rows returned), so that no one waits for
        this program to end before the next step starts."""
        finished = []
        if call is None:
            if not jobs:
                return None, []
            args = self._args(self._decode_inputs(jobs))
            pool, tokens = self._program(("decode", all(job.greedy for job in jobs)), args)(*args)
            self.prefix_cache.pool = pool
        else:
            shape, chunks = call
            first_rows = self._first_rows(chunks if hold_firsts else [], shape[0])
            args = (*self._args(self._decode_inputs(jobs), self._prefill_inputs(chunks, *shape)),
                    first_rows)
            greedy = all(job.greedy for job in jobs + [job for job, _ in chunks])
            pool, tokens, first = self._program(("mixed", (shape, greedy)), args)(*args)
            finished = self._prefilled(pool, chunks, first)
        for job in jobs:
            job.written += 1
            job.in_flight += 1
        if hold_firsts:
            for job, _, _ in finished:
                job.in_flight += 1
            jobs, finished = jobs + [job for job, _, _ in finished], []
        return ((jobs, tokens) if jobs else None), finished

    def _first_rows(self, chunks: Sequence[tuple[Job, int]], rows: int) -> np.ndarray:
        """``serve_mixed_program``'s ``first_rows`` for ``rows`` chunk rows: the engine
        row of each chunk that ends its prompt, ``max_rows`` (nowhere) for the others."""
        first_rows = np.full((rows,), self.max_rows, np.int32)
        for index, (job, count) in enumerate(chunks):
            if count == job.prompt_left:
                first_rows[index] = job.row
        return first_rows

    def _take_tokens(self, jobs: list[Job], tokens: jax.Array) -> None:
        """Hands a decode step's tokens to its jobs (waiting for the step), but to those
        retired since (cancelled, or stopped at the step before)."""
        tokens = np.asarray(tokens)  # [rows]
        for job in jobs:
            job.in_flight -= 1
            if self._scheduler.rows[job.row] is job:
                self._take_token(job, int(tokens[job.row]))

    def _take_token(self, job: Job, token: int) -> None:
        """Hands a new token to the request; retires it at a stop token or string or at
        ``max_tokens``."""
        job.generated.append(token)
        is_stop = token in job.stops
        text = job.text.add([] if is_stop else [token])
        reason = ("stop" if is_stop or job.text.stopped else
                  "length" if len(job.generated) >= job.max_tokens else None)
        if reason is not None:
            text += job.text.flush()
        job.handle._push(Delta([token], text))
        with self._cond:
            self._counts["generation_tokens"] += 1
            if reason is not None:
                self._retire(job, reason)

    def _retire(self, job: Job, reason: str) -> None:
        """Ends a request (under the lock): its blocks released (their full blocks stay
        cached) and its row or queue place freed."""
        if job.allocation is not None:
            self.prefix_cache.manager.release(job.allocation, self._cached_tokens(job))
        self._scheduler.vacate(job)
        self._counts["requests_cancelled" if reason == "cancelled" else "requests_finished"] += 1
        job.handle._finish(reason)

    def _cached_tokens(self, job: Job) -> list[int]:
        """What a retiring row's blocks hold for the cache to keep: its written tokens, or
        with ``prefix_caching`` off the prefix it shared (its own blocks are freed)."""
        tokens = job.written_tokens()
        return tokens if self.prefix_caching else tokens[:job.allocation.cached_tokens]

    # ----- programs -----

    def warmup(self) -> int:
        """Compiles every program the engine runs (the decode step, greedy and sampling,
        and for the prefill chunks of each shape, ``prefill_shapes``, the mixed programs,
        greedy and sampling, or the prefill program without ``mixed_steps``) and runs each
        once over idle rows, which write nothing, so that no request waits for a compile
        or for a program's first run (on two CPU cores a first run took 70-100 ms more
        than the next ones; a GPU loads the program's kernels then). Returns how many
        programs the engine holds. Without it each compiles and loads on first use. On a
        started engine it runs between two steps (requests wait meanwhile).

        Raises:
          RuntimeError: the engine is shut down or failed.
        """
        self._check_open()
        with self._running_programs:  # every row idle: position -1, chunks of length 0
            for greedy in (True, False):
                self._run_idle(("decode", greedy), self._decode_inputs([]))
            for shape in self._prefill_shapes:
                if self.mixed_steps:
                    for greedy in (True, False):
                        self._run_idle(("mixed", (shape, greedy)), self._decode_inputs([]),
                                       self._prefill_inputs([], *shape),
                                       extra=(self._first_rows([], shape[0]),))
                else:
                    self._run_idle(("prefill", shape), self._prefill_inputs([], *shape))
            jax.block_until_ready(self.prefix_cache.pool)
        return len(self._compiled)

    def _run_idle(self, key: tuple, *parts: tuple, extra: tuple = ()) -> None:
        """Runs program ``key`` (compiled first if need be) on ``parts``' idle inputs, then
        ``extra`` arguments."""
        args = (*self._args(*parts), *extra)
        self.prefix_cache.pool = self._program(key, args)(*args)[0]

    def _program(self, key: tuple, args: tuple):
        """The compiled program ``key`` names, compiled for ``args`` on first use."""
        program = self._compiled.get(key)
        if program is None:
            kind, variant = key
            kv_dtype = self.prefix_cache.kv_dtype
            jitted = (programs.serve_prefill_program(self.model, kv_dtype=kv_dtype)
                      if kind == "prefill" else
                      programs.serve_mixed_program(self.model, greedy=variant[1],
                                                   kv_dtype=kv_dtype)
                      if kind == "mixed" else
                      programs.serve_decode_program(self.model, greedy=variant, kv_dtype=kv_dtype))
            program = self._compiled[key] = programs.PROGRAMS.compiled(jitted, args)
        return program

    def _args(self, *parts: tuple) -> tuple:
        """A program's arguments from its parts' inputs (``_decode_inputs``,
        ``_prefill_inputs``: ``(blocks, lengths, inputs)``): the params, the prefix
        cache's pool with the parts' rows in order (tables ``int32[rows,
        blocks_per_row]``, zeros past a row's blocks: never read; lengths), then each
        part's inputs."""
        blocks = [ids for part in parts for ids in part[0]]
        tables = np.zeros((len(blocks), self._blocks_per_row), np.int32)  # [rows, blocks_per_row]
        for row, ids in enumerate(blocks):
            tables[row, :len(ids)] = ids
        pool = self.prefix_cache.pool.with_tables(tables, np.concatenate([p[1] for p in parts]))
        return (self.model.params, pool, *(value for part in parts for value in part[2]))

    def _prefill_inputs(self, chunks: Sequence[tuple[Job, int]], rows: int, width: int) -> tuple:
        """``serve_prefill_program``'s rows and inputs (as ``_args`` takes them) for ``(job,
        tokens)`` chunks, each the job's next prompt tokens from the first position its
        blocks do not hold, in a ``[rows, width]`` block (rows past the chunks: length 0,
        writing nothing)."""
        pieces = [job.prompt[job.written:job.written + count] for job, count in chunks]
        tokens, lengths = pad_block(pieces + [[]] * (rows - len(chunks)), width)  # [rows, width]
        starts = np.zeros((rows,), np.int32)
        seeds = np.zeros((rows,), np.uint32)
        for row, (job, _) in enumerate(chunks):
            starts[row], seeds[row] = job.written, job.seed
        blocks, sampling = self._row_values([job for job, _ in chunks]
                                            + [None] * (rows - len(chunks)))
        return blocks, starts, (tokens, lengths, starts, sampling, seeds)

    def _decode_inputs(self, jobs: Sequence[Job]) -> tuple:
        """``serve_decode_program``'s rows and inputs (as ``_args`` takes them): each
        job's last token at its row (on the device, from the step in flight, for a job
        that waits for it), position -1 for the other rows (they write nothing)."""
        rows = self.max_rows  # every array [rows]
        tokens = np.zeros((rows,), np.int32)
        use_previous = np.zeros((rows,), bool)
        positions = np.full((rows,), -1, np.int32)
        seeds = np.zeros((rows,), np.uint32)
        steps = np.zeros((rows,), np.int32)
        for job in jobs:
            row = job.row
            if job.in_flight:
                use_previous[row] = True
            else:
                tokens[row] = job.generated[-1]
            positions[row] = job.written
            seeds[row], steps[row] = job.seed, len(job.generated) + job.in_flight
        previous = tokens if self._in_flight is None else self._in_flight[1]
        seated = tuple(self._scheduler.rows)
        if seated != self._seated:  # rebuilt only when a row changes hands
            self._seated, self._seated_values = seated, self._row_values(seated)
        blocks, sampling = self._seated_values
        return blocks, np.maximum(positions, 0), (tokens, previous, use_previous, positions,
                                                  sampling, seeds, steps)

    def _row_values(self, jobs: Sequence[Job | None]) -> tuple[list, SamplingParams]:
        """Each row's block list and sampling values, ``jobs[row]``'s (None: an idle row,
        no blocks, greedy). In a decode step a seated row that does not decode runs at
        position -1: its table is read, nothing written."""
        blocks = [() if job is None else job.allocation.blocks for job in jobs]
        sampling = [self._idle_sampling if job is None else job.sampling for job in jobs]
        return blocks, jax.tree.map(lambda *values: np.concatenate(values), *sampling)

    # ----- statistics -----

    def stats(self) -> dict:
        """The engine's state and counters, and its prefix cache's.

        * ``rows_running``, ``rows_prefilling`` (of those, still in their prompt),
          ``rows_total``, ``requests_waiting``;
        * since the start: ``requests_refused`` (queue full), ``requests_finished``
          (stop or length), ``requests_cancelled``, ``prompt_tokens`` and
          ``cached_prompt_tokens`` (of admitted requests), ``generation_tokens``;
          ``steps`` (that did work) and ``step_seconds`` (their wall time: its rate over
          ``steps``' is the mean step), ``decode_steps``, ``prefill_calls`` and
          ``prefill_tokens`` (prompt tokens they computed);
        * the pool: ``pool_blocks_used`` (held by running requests),
          ``pool_blocks_cached`` (cached prefixes no request holds), ``pool_blocks_free``,
          ``pool_blocks_total``, ``pool_bytes_used``, ``pool_bytes_total``;
        * ``max_len``, ``block_size``, ``programs_compiled``;
        * ``prefix_cache``: ``PrefixCache.stats()`` (hit rate, evictions by tier, ...).
        """
        with self._cond:
            cache = self.prefix_cache.stats()
            running = self._scheduler.running()
            waiting = len(self._scheduler.waiting)
            counts = dict(self._counts)
        device, size = cache["blocks"]["device"], cache["block_bytes"]
        return {"rows_running": len(running),
                "rows_prefilling": sum(not job.decoding for job in running),
                "rows_total": self.max_rows, "requests_waiting": waiting, **counts,
                "pool_blocks_used": device["in_use"], "pool_blocks_cached": device["cached"],
                "pool_blocks_free": device["free"], "pool_blocks_total": device["total"],
                "pool_bytes_used": device["in_use"] * size,
                "pool_bytes_total": device["total"] * size,
                "max_len": self.max_len, "block_size": cache["block_size"],
                "programs_compiled": len(self._compiled), "prefix_cache": cache}


def _prefix_cache_sizes(model: Model, prefix_cache: PrefixCache, block_size: int | None,
                        pool_blocks: int | None, kv_dtype: str | None) -> tuple[int, int]:
    """``(block_size, pool_blocks)`` of a given prefix cache, checked against the
    engine's other arguments and ``model``."""
    prefix_cache.check_model(model)
    if pool_blocks is not None:
        raise ValueError("pass pool_blocks or prefix_cache, not both: the prefix cache's "
                         "budget is the pool")
    if block_size is not None and block_size != prefix_cache.block_size:
        raise ValueError(f"block_size={block_size}, but the prefix cache has blocks of "
                         f"{prefix_cache.block_size}: pass block_size=None")
    if kv_dtype is not None and kv_dtype != prefix_cache.kv_dtype:
        raise ValueError(f"kv_dtype={kv_dtype!r}, but the prefix cache stores "
                         f"{prefix_cache.kv_dtype}: pass kv_dtype=None or build the "
                         f"PrefixCache with kv_dtype={kv_dtype!r}")
    return prefix_cache.block_size, prefix_cache.manager.num_blocks
