"""The compiled programs of a generation, built in one place.

``generation_program`` is what ``kvjax.generate`` compiles (prefill and every decode
step, one program); ``stream_programs`` the prefill and the decode chunk that
``generate_stream`` and ``ChatSession`` run; ``serve_prefill_program`` and
``serve_decode_program`` the prefill chunk and the decode step of ``kvjax.serve.Engine``
(``serve_mixed_program`` both in one);
``step_functions`` the model steps they all drive, with the attention chosen once
(``kvjax.attention.choose``) for the model's dtype, mesh and rules. Benchmarks and your
own loops use the same functions, so they measure and run exactly what ``generate`` runs.

Compiled executables are kept in ``ProgramCache``s (bounded, thread-safe); the prefill
clock that times a generation's prefill inside its program tells runs apart by a run id
passed as an argument, so threads generating at once never share a measurement.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import time
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from kvjax import sharding
from kvjax.attention import AttentionPlan, choose
from kvjax import cache as caches
from kvjax.cache import TokenHistory
from kvjax.config import ModelConfig
from kvjax.decode import (DecodeState, decode_steps, jit_decode, prefill,
                          prefill_logits, prompt_positions, row_keys)
from kvjax.loading import Model
from kvjax.model import compiler_options, forward_parts, recompute_step_fn, step_fn
from kvjax.sampling import sample

# Prompt blocks longer than this are prefilled in pieces of this many tokens (one after
# another, each attending to the cache so far): a long prompt's attention scores and
# activations then never exist for the whole of it at once.
PREFILL_CHUNK = 2048
# generate's decode steps run in groups of this many between checks that every row is
# done (kvjax.decode's sync_every): on GPUs a check is a read-back the host waits for,
# and a group runs at most this many - 1 steps past the last row's stop token.
SYNC_EVERY = 8

__all__ = ["PREFILL_CHUNK", "SYNC_EVERY", "PrefillClock", "ProgramCache", "attention_plan",
           "clear", "compiler_options", "generation_program", "new_cache", "serve_decode_program",
           "serve_mixed_program", "serve_prefill_program", "step_functions", "stream_programs"]


def new_cache(model: Model, batch: int, capacity: int, use_cache: bool = True,
              kv_dtype: str | None = None, *, window: int | None = None,
              sink_tokens: int | None = None):
    """An empty cache for ``batch`` rows of ``capacity`` slots: the kind ``kv_dtype``
    names (``kvjax.cache.create``; None: a ``KVCache`` in the model's dtype; ``window``,
    ``sink_tokens``: streaming), a ``TokenHistory`` for ``use_cache=False``; created
    already sharded on ``model.mesh`` by ``model.rules`` when the model has a mesh.

    Raises:
      ShardingError: ``model.mesh`` cannot split this model or ``batch``, before
        anything is allocated or compiled.
    """
    create, args = ((caches.create, (model.config, batch, capacity, kv_dtype, model.dtype, window,
                                     sink_tokens))
                    if use_cache else (TokenHistory.create, (batch, capacity)))
    if model.mesh is None:
        return create(*args)
    return sharding.create_sharded(model.config, model.mesh, model.rules, create, *args)


def attention_plan(model: Model, *, use_cache: bool = True, fresh: bool = False,
                   key_limit: int | None = None, decode_kernel: bool | None = None,
                   kv_dtype: str | None = None) -> AttentionPlan:
    """``kvjax.attention.choose`` for ``model``'s config, dtype, mesh and rules."""
    return choose(model.config, model.dtype, use_cache=use_cache, fresh=fresh,
                  key_limit=key_limit, mesh=model.mesh, rules=model.rules,
                  decode_kernel=decode_kernel, kv_dtype=kv_dtype)


def step_functions(model: Model, *, use_cache: bool = True, fresh: bool = True,
                   key_limit: int | None = None, decode_kernel: bool | None = None,
                   kv_dtype: str | None = None):
    """``(step_fn, whole_block_fn)`` that ``kvjax.decode`` drives for ``model``.

    Args:
      use_cache: False: the recompute baseline (``whole_block_fn`` None).
      fresh: the cache starts empty: ``whole_block_fn`` writes a prompt block fed whole
        and attends within it (never reading empty slots); None otherwise.
      key_limit: slots the generation can fill (``kvjax.requests.fresh_key_limit``):
        attention reads none past it.
      decode_kernel, kv_dtype: as in ``kvjax.attention.choose`` (``kv_dtype``: what the
        cache stores, ``new_cache``'s).
    """
    return _step_functions(*_model_key(model), use_cache, fresh, key_limit, decode_kernel,
                           kv_dtype)


def _model_key(model: Model) -> tuple:
    """What programs depend on in a model: not the params' values, only their kind."""
    return model.config, np.dtype(model.dtype).name, model.mesh, model.rules


@functools.lru_cache(maxsize=64)
def _step_functions(config: ModelConfig, dtype: str, mesh, rules, use_cache: bool, fresh: bool,
                    key_limit: int | None, decode_kernel: bool | None, kv_dtype: str | None):
    if not use_cache:
        return recompute_step_fn(config), None
    plan = functools.partial(choose, config, dtype, mesh=mesh, rules=rules,
                             decode_kernel=decode_kernel, kv_dtype=kv_dtype)
    whole_block_fn = step_fn(config, attention=plan(fresh=True)) if fresh else None
    return step_fn(config, attention=plan(key_limit=key_limit)), whole_block_fn


class PrefillClock:
    """Host times at which generation runs finished their prefill (a ``jax.debug``
    callback inside the program), by run id: every run takes a new id
    (``start_run``), passes it to its program and reads its own time (``finish_run``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._times: dict[int, float] = {}
        self._ids = itertools.count(1)

    def start_run(self) -> np.ndarray:
        """A new run id, ``int32[]``."""
        with self._lock:
            return np.int32(next(self._ids) % 2 ** 31)

    def __call__(self, _first_tokens, run_id) -> None:
        now = time.perf_counter()
        with self._lock:  # once per device shard on a mesh: the first one counts
            self._times.setdefault(int(run_id), now)

    def finish_run(self, run_id) -> float | None:
        """The time ``run_id``'s prefill finished, None if it never reported."""
        with self._lock:
            return self._times.pop(int(run_id), None)


# One clock for the process: the programs that call it never change.
PREFILL_CLOCK = PrefillClock()


def generation_program(model: Model, *, num_steps: int, greedy: bool, use_cache: bool = True,
                       return_logits: bool = False, key_limit: int | None = None,
                       decode_kernel: bool | None = None, timed: bool = False,
                       kv_dtype: str | None = None):
    """The program ``kvjax.generate`` compiles: prefill and up to ``num_steps - 1`` decode
    steps, jitted with the cache donated, called as ``program(params, cache,
    prompt_tokens, prompt_lengths, max_new_tokens, sampling, seed, stop_tokens)`` ->
    ``kvjax.DecodeResult`` (``kvjax.jit_decode``'s signature).

    ``timed``: the program also takes a run id (``PREFILL_CLOCK.start_run()``) last and
    reports to ``PREFILL_CLOCK`` when its prefill is done (a host callback, which JAX's
    persistent compilation cache does not store). Other arguments as in
    ``step_functions`` and ``kvjax.decode.decode``.
    """
    return _generation_program(*_model_key(model), num_steps, greedy, use_cache, return_logits,
                               key_limit, decode_kernel, timed, kv_dtype)


@functools.lru_cache(maxsize=64)
def _generation_program(config, dtype, mesh, rules, num_steps, greedy, use_cache, return_logits,
                        key_limit, decode_kernel, timed, kv_dtype):
    step, whole_block_fn = _step_functions(config, dtype, mesh, rules, use_cache, True,
                                           key_limit, decode_kernel, kv_dtype)

    return jit_decode(step, num_steps=num_steps, greedy=greedy, return_logits=return_logits,
                      on_prefill=PREFILL_CLOCK if timed else None,
                      prefill_chunk=PREFILL_CHUNK if use_cache else None,
                      whole_block_fn=whole_block_fn, sync_every=SYNC_EVERY,
                      compiler_options=compiler_options())


def stream_programs(model: Model, *, greedy: bool, chunk_size: int, state_shardings,
                    use_cache: bool = True, key_limit: int | None = None, fresh: bool = True,
                    kv_dtype: str | None = None):
    """``(prefill program, chunk program)`` of ``generate_stream`` and ``ChatSession``,
    each jitted once with its cache/state donated.

    The prefill program takes ``(params, cache, tokens, lengths, start, max_new_tokens,
    sampling, seed, stop_tokens)`` and returns the loop state; the chunk program
    ``(params, state, max_new_tokens, sampling, seed, stop_tokens)`` and returns ``(state,
    tokens [rows, chunk_size], all_done)``. ``fresh``: the cache starts empty (a chat
    continues its cache: neither ``fresh`` nor a ``key_limit``). On a mesh both return
    the state with ``state_shardings`` (``state_shardings``), so the state one chunk
    returns is exactly what the next chunk (or a chat's next prefill) was compiled for.
    """
    return _stream_programs(*_model_key(model), use_cache, greedy, chunk_size, state_shardings,
                            key_limit, fresh, kv_dtype)


@functools.lru_cache(maxsize=64)
def _stream_programs(config, dtype, mesh, rules, use_cache, greedy, chunk_size, shardings,
                     key_limit, fresh, kv_dtype):
    step, whole_block_fn = _step_functions(config, dtype, mesh, rules, use_cache, fresh,
                                           key_limit, None, kv_dtype)

    def prefill_block(params, cache, tokens, lengths, start, max_new_tokens, sampling, seed,
                      stop_tokens):
        return prefill(step, params, cache, tokens, lengths, start=start, greedy=greedy,
                       max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                       stop_tokens=stop_tokens, chunk=PREFILL_CHUNK if use_cache else None,
                       whole_block_fn=whole_block_fn)[0]

    def chunk(params, state, max_new_tokens, sampling, seed, stop_tokens):
        state, tokens, _ = decode_steps(step, params, state, num_steps=chunk_size, greedy=greedy,
                                        max_new_tokens=max_new_tokens, sampling=sampling,
                                        seed=seed, stop_tokens=stop_tokens,
                                        sync_every=chunk_size)
        return state, tokens, jnp.all(state.done)

    options = dict(donate_argnums=1, compiler_options=compiler_options())
    if shardings is None:
        return jax.jit(prefill_block, **options), jax.jit(chunk, **options)
    rows, scalar = shardings.tokens, shardings.steps_run
    return (jax.jit(prefill_block, out_shardings=shardings, **options),
            jax.jit(chunk, out_shardings=(shardings, rows, scalar), **options))


def serve_prefill_program(model: Model, *, kv_dtype: str | None = None):
    """The prefill chunks of ``kvjax.serve.Engine``: some rows' next prompt tokens
    written to their blocks of a paged pool (each attending to what its row already
    holds), jitted with the pool donated.

    Called as ``program(params, cache, tokens, lengths, starts, sampling, seeds)``:
    ``cache`` a ``PagedKVCache`` holding the rows' tables (``[rows, blocks_per_row]``),
    ``tokens`` ``int32[rows, bucket]`` right-padded, ``lengths`` and ``starts``
    ``int32[rows]`` (real tokens of each row's chunk, position of its first; a row of
    length 0 writes nothing), ``sampling`` the rows' values, ``seeds`` ``uint32[rows]``.
    Returns ``(cache, first)``: ``first`` ``int32[rows]``, each sampled from its chunk's
    last logits with its request's key of step 0 (row 0's of its seed: the request's first
    token when the chunk ends its prompt, as ``kvjax.generate`` samples a lone prompt's;
    discarded otherwise). Greedy rows take the argmax (``sample``'s temperature-0 rows),
    so one program serves both.
    """
    return _serve_prefill_program(*_model_key(model), kv_dtype)


@functools.lru_cache(maxsize=64)
def _serve_prefill_program(config, dtype, mesh, rules, kv_dtype):
    step, _ = _step_functions(config, dtype, mesh, rules, True, False, None, None, kv_dtype)

    def prefill_chunks(params, cache, tokens, lengths, starts, sampling, seeds):
        last, cache = prefill_logits(step, params, cache, tokens, lengths, start=starts)
        return cache, sample(last, _own_keys(seeds, jnp.zeros_like(lengths)), sampling, False)

    return jax.jit(prefill_chunks, donate_argnums=1, compiler_options=compiler_options())


def serve_decode_program(model: Model, *, greedy: bool, kv_dtype: str | None = None):
    """The decode step of ``kvjax.serve.Engine``: one token for every row of a paged
    pool, jitted with the pool donated.

    Called as ``program(params, cache, tokens, previous, use_previous, positions,
    sampling, seeds, steps)``, all per row (``[rows]``): the last token, or where
    ``use_previous`` (bool) ``previous[row]`` (the tokens an earlier call returned, still
    on the device: the engine runs a step before it reads the last one's tokens); the
    position it is written at (``-1``: an idle or prefilling row, which writes nothing),
    sampling values, ``uint32`` seeds and ``int32`` step indices. Row ``r`` draws from
    its own seed and step only (the key ``kvjax.generate`` gives row 0 of a lone prompt),
    so its tokens do not depend on the other rows. Returns ``(cache, tokens int32[rows])``.
    ``greedy``: static; argmax for every row.
    """
    return _serve_decode_program(*_model_key(model), greedy, kv_dtype)


@functools.lru_cache(maxsize=64)
def _serve_decode_program(config, dtype, mesh, rules, greedy, kv_dtype):
    step, _ = _step_functions(config, dtype, mesh, rules, True, False, None, None, kv_dtype)

    def decode_step(params, cache, tokens, previous, use_previous, positions, sampling, seeds,
                    steps):
        tokens = jnp.where(use_previous, previous, tokens)  # [rows]
        logits, cache = step(params, tokens[:, None], positions[:, None], cache)
        return cache, sample(logits[:, 0], _own_keys(seeds, steps), sampling, greedy)

    return jax.jit(decode_step, donate_argnums=1, compiler_options=compiler_options())


def serve_mixed_program(model: Model, *, greedy: bool, kv_dtype: str | None = None):
    """``serve_decode_program`` and ``serve_prefill_program`` in one program, one pass
    over the weights (``kvjax.model.forward_parts``): the decode step of every row, then
    some rows' prompt chunks, jitted with the pool donated.

    Called as ``program(params, cache, tokens, previous, use_previous, positions,
    sampling, seeds, steps, chunk_tokens, chunk_lengths, chunk_starts, chunk_sampling,
    chunk_seeds, first_rows)``: the decode step's arguments, then the prefill's
    (``cache``'s tables and lengths hold the decode step's rows, then the chunks'), then
    ``first_rows`` (``int32[chunk_rows]``): the decode row each chunk's first token is
    also placed at in ``tokens`` (``rows`` or more: nowhere), so that the next step can
    feed it as ``previous`` before the host reads it. Returns ``(cache, tokens
    int32[rows], first int32[chunk_rows])``, each as the two programs return them (every
    row sampled as ``sample`` does, greedy rows by argmax). ``greedy``: static; argmax for
    every row of both (a sampled step draws from every row's logits, and sorts
    them where a row uses top-k, top-p or min-p: a greedy step skips both).
    """
    return _serve_mixed_program(*_model_key(model), greedy, kv_dtype)


@functools.lru_cache(maxsize=64)
def _serve_mixed_program(config, dtype, mesh, rules, greedy, kv_dtype):
    plan = choose(config, dtype, mesh=mesh, rules=rules, kv_dtype=kv_dtype)

    def mixed_step(params, cache, tokens, previous, use_previous, positions, sampling, seeds,
                   steps, chunk_tokens, chunk_lengths, chunk_starts, chunk_sampling, chunk_seeds,
                   first_rows):
        tokens = jnp.where(use_previous, previous, tokens)  # [rows]
        chunk_positions = prompt_positions(chunk_lengths, chunk_tokens.shape[1], chunk_starts)
        (logits, last), cache = forward_parts(
            config, params, [(tokens[:, None], positions[:, None]),
                             (chunk_tokens, chunk_positions)], cache, attention=plan)
        first_keys = _own_keys(chunk_seeds, jnp.zeros_like(chunk_lengths))
        first = sample(last, first_keys, chunk_sampling, greedy)  # [chunk_rows]
        tokens = sample(logits, _own_keys(seeds, steps), sampling, greedy)  # [rows]
        return cache, tokens.at[first_rows].set(first, mode="drop"), first

    return jax.jit(mixed_step, donate_argnums=1, compiler_options=compiler_options())


def _own_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Each serving row's key for its token ``steps[row]`` from its own ``seeds[row]``:
    the key ``kvjax.generate`` gives row 0 of a lone prompt, so a request's tokens do not
    depend on the rows beside it."""
    return jax.vmap(lambda seed, index: row_keys(seed, 1, index)[0])(seeds, steps)


def state_shardings(model: Model, cache) -> DecodeState | None:
    """Where the decode loop's state lives on ``model.mesh`` (None without a mesh): the
    cache where it was created, per-row values with the cache's rows, the step count
    replicated."""
    if model.mesh is None:
        return None
    rows = cache.lengths.sharding
    return DecodeState(cache=jax.tree.map(lambda x: x.sharding, cache), tokens=rows,
                       positions=rows, done=rows, num_generated=rows,
                       steps_run=NamedSharding(rows.mesh, PartitionSpec()))


# JAX settings that change what a traced program computes: a program compiled under
# other values is another program (as jit's own cache keys them).
TRACE_SETTINGS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_default_prng_impl",
                  "jax_numpy_rank_promotion", "jax_numpy_dtype_promotion",
                  "jax_threefry_partitionable")


class ProgramCache:
    """Compiled executables by (jitted function, shapes, dtypes and shardings of the
    arguments, ``TRACE_SETTINGS``' values), at most ``maxsize``, the least recently used
    dropped first; safe to use from several threads (a program two threads ask for at
    once may compile twice)."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._programs: collections.OrderedDict = collections.OrderedDict()

    def compiled(self, jitted, args: tuple):
        """``jitted`` AOT-compiled for ``args`` (the same shapes placed on another mesh
        compile anew); later calls with such arguments only look it up."""
        leaves, treedef = jax.tree.flatten(args)
        key = (jitted, treedef, tuple((np.shape(x), getattr(x, "dtype", None) or np.result_type(x),
                                       getattr(x, "sharding", None)) for x in leaves),
               tuple(getattr(jax.config, name) for name in TRACE_SETTINGS))
        with self._lock:
            if key in self._programs:
                self._programs.move_to_end(key)
                return self._programs[key]
        program = jitted.lower(*args).compile()
        with self._lock:
            self._programs[key] = program
            while len(self._programs) > self.maxsize:
                self._programs.popitem(last=False)
        return program

    def __len__(self) -> int:
        return len(self._programs)

    def clear(self) -> None:
        """Drops every compiled program."""
        with self._lock:
            self._programs.clear()


# The process's compiled programs (kvjax.generate, streams and chats).
PROGRAMS = ProgramCache()


def clear() -> None:
    """Forgets every program built and compiled so far: the next generation chooses its
    attention and compiles anew (after a change of what ``kvjax.attention.choose``
    sees, e.g. in tests)."""
    PROGRAMS.clear()
    for built in (_step_functions, _generation_program, _stream_programs, _serve_prefill_program,
                  _serve_decode_program):
        built.cache_clear()
