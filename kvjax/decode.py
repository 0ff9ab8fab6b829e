"""The decode loop: prefill plus a loop over decode steps, model-agnostic.

``decode`` drives any ``step_fn(params, tokens, positions, cache) -> (logits, cache)``:

* ``tokens``: ``int32[batch, seq]``; ``positions``: ``int32[batch, seq]``, the position of
  each token in its row, ``-1`` for padding (which always follows a row's real tokens);
* ``logits``: ``float32[batch, seq, vocab]``, or ``float32[batch, 1, vocab]`` holding only
  each row's last real token (all the loop reads of a prompt block; kvjax's model does
  this for prefills); ``cache``: any pytree the step function owns (the loop only
  carries it).

It is called once with the (padded) prompt block and then once per step with one token
per row. Wrap ``decode`` in ``jax.jit`` with the cache donated, and the whole generation
is one compiled program; ``max_new_tokens``, seeds, sampling values and prompt lengths
are arrays, so changing them does not recompile.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.config import is_count
from kvjax.sampling import SamplingParams, sample

StepFn = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

# Filler for output slots after a row has stopped.
PAD_TOKEN = -1


@struct.dataclass
class DecodeState:
    """What the decode loop carries from one step to the next."""

    cache: Any
    tokens: jax.Array  # int32[batch], the token just sampled
    positions: jax.Array  # int32[batch], its position (where it will be written)
    done: jax.Array  # bool[batch], row has emitted a stop token or max_new_tokens
    num_generated: jax.Array  # int32[batch]
    steps_run: jax.Array  # int32[], decode steps that ran the model


@struct.dataclass
class DecodeResult:
    """Output of ``decode``.

    Attributes:
      tokens: ``int32[batch, num_steps]`` new tokens, ``PAD_TOKEN`` after a row stopped;
        a row's stop token is included.
      num_generated: ``int32[batch]``, new tokens per row (stop token included).
      cache: the cache after the last step that ran.
      steps_run: ``int32[]``, decode steps (after prefill) that ran the model.
      logits: ``float32[batch, num_steps, vocab]`` logits each token was chosen from, or
        ``None`` unless requested.
    """

    tokens: jax.Array
    num_generated: jax.Array
    cache: Any
    steps_run: jax.Array
    logits: jax.Array | None = None


def prompt_positions(prompt_lengths: jax.Array, seq: int, start: jax.Array) -> jax.Array:
    """``int32[batch, seq]``: ``start + i`` for the real tokens of each row, ``-1`` after."""
    i = jnp.arange(seq, dtype=jnp.int32)[None, :]
    return jnp.where(i < prompt_lengths[:, None], start[:, None] + i, -1)


def row_keys(seed: jax.Array, batch: int, step: jax.Array) -> jax.Array:
    """The PRNG keys of rows ``0 ... batch - 1`` at decode step ``step``: row ``r``
    always draws from ``fold_in(fold_in(key(seed), r), step)``, so a row's randomness does
    not depend on the other rows (and the serving engine gives a request the key of row
    0 of a lone prompt)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(
        jnp.arange(batch))


def _is_stop(tokens: jax.Array, stop_tokens: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == stop_tokens[None, :], axis=-1)


def prefill(step_fn: StepFn, params: Any, cache: Any, prompt_tokens: jax.Array,
            prompt_lengths: jax.Array, *, start: jax.Array, max_new_tokens: jax.Array,
            sampling: SamplingParams, seed: jax.Array, stop_tokens: jax.Array,
            greedy: bool, chunk: int | None = None, whole_block_fn: StepFn | None = None
            ) -> tuple[DecodeState, jax.Array]:
    """Runs the prompt block through ``step_fn`` and samples each row's first new token.

    Args:
      prompt_tokens: ``int32[batch, seq]``, right-padded prompts.
      prompt_lengths: ``int32[batch]``, real tokens per row (>= 1).
      start: ``int32[batch]``, position of each prompt's first token (0 for an empty
        cache; the cache's length to continue a conversation).
      chunk: static; a block longer than this is fed to ``step_fn`` in pieces of
        ``chunk`` tokens, one after another (a ``lax.scan``), so the attention scores
        and activations of a long prompt never exist for all of it at once. None: the
        whole block in one call.
      whole_block_fn: the step function for a block fed whole (not in pieces); default
        ``step_fn``. kvjax's model passes one that attends within the block when the
        cache starts empty (``kvjax.model.step_fn(config, fresh=True)``).
      Others as in ``decode``.

    Returns:
      ``(state, logits)``: the loop state holding the first tokens, and
      ``float32[batch, vocab]`` the logits they were chosen from.
    """
    batch = prompt_tokens.shape[0]
    last, cache = prefill_logits(step_fn, params, cache, prompt_tokens, prompt_lengths,
                                 start=start, chunk=chunk, whole_block_fn=whole_block_fn)
    first = sample(last, row_keys(seed, batch, jnp.int32(0)), sampling, greedy)  # [batch]
    one = jnp.ones((batch,), jnp.int32)
    state = DecodeState(cache=cache, tokens=first, positions=start + prompt_lengths,
                        done=_is_stop(first, stop_tokens) | (one >= max_new_tokens),
                        num_generated=one, steps_run=jnp.int32(0))
    return state, last


def prefill_logits(step_fn: StepFn, params: Any, cache: Any, prompt_tokens: jax.Array,
                   prompt_lengths: jax.Array, *, start: jax.Array, chunk: int | None = None,
                   whole_block_fn: StepFn | None = None) -> tuple[jax.Array, Any]:
    """``prefill`` without sampling: ``(logits, cache)``, each row's ``float32[batch,
    vocab]`` logits at its last prompt token and the cache holding the prompts."""
    seq = prompt_tokens.shape[1]
    positions = prompt_positions(prompt_lengths, seq, start)
    if chunk is None or seq <= chunk:
        logits, cache = (whole_block_fn or step_fn)(params, prompt_tokens, positions, cache)
        return _last_real_logits(logits, positions), cache
    return _chunked_prefill(step_fn, params, cache, prompt_tokens, positions, chunk)


def _last_real_logits(logits: jax.Array, positions: jax.Array) -> jax.Array:
    """``float32[batch, vocab]``: each row's logits at its last real token of the block
    (``logits`` ``[batch, seq, vocab]``, or ``[batch, 1, vocab]`` holding just those)."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    last = jnp.argmax(positions, axis=1)  # padding is -1, real positions increase
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def _chunked_prefill(step_fn: StepFn, params: Any, cache: Any, tokens: jax.Array,
                     positions: jax.Array, chunk: int) -> tuple[jax.Array, Any]:
    """The prompt block in pieces of ``chunk`` tokens; returns each row's last logits.

    A row whose prompt ended in an earlier piece gets an all-padding piece, which
    writes nothing to its cache; its logits are those of the piece its last token was in.
    """
    batch, seq = tokens.shape
    pad = -seq % chunk
    tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    pieces = seq // chunk + (pad > 0)
    last_position = positions.max(axis=1)  # [batch]

    def split(x):  # [batch, pieces * chunk] -> [pieces, batch, chunk]
        return x.reshape(batch, pieces, chunk).transpose(1, 0, 2)

    def piece(carry, block):
        cache, last = carry
        piece_tokens, piece_positions = block
        logits, cache = step_fn(params, piece_tokens, piece_positions, cache)
        holds_last = jnp.any(piece_positions == last_position[:, None], axis=1)  # [batch]
        last = jnp.where(holds_last[:, None], _last_real_logits(logits, piece_positions), last)
        return (cache, last), None

    vocab = jax.eval_shape(lambda: step_fn(params, tokens[:, :chunk], positions[:, :chunk],
                                           cache))[0].shape[-1]
    init = (cache, jnp.zeros((batch, vocab), jnp.float32))
    (cache, last), _ = jax.lax.scan(piece, init, (split(tokens), split(positions)))
    return last, cache


def decode_steps(step_fn: StepFn, params: Any, state: DecodeState, *, num_steps: int,
                 max_new_tokens: jax.Array, sampling: SamplingParams, seed: jax.Array,
                 stop_tokens: jax.Array, greedy: bool, return_logits: bool = False,
                 sync_every: int = 1) -> tuple[DecodeState, jax.Array, jax.Array | None]:
    """Runs up to ``num_steps`` decode steps, fewer once every row is done.

    Calling it again with the returned state continues exactly where it stopped (the
    randomness of a step depends only on the seed, the row and the step's index), so
    chunks of any size give the tokens of one long run: this is how streaming works.

    A row that is done takes no further part: its step is fed position ``-1``, so
    nothing is written to its cache and its length stays its real tokens'.

    Args:
      sync_every: static; steps run in groups of this many, a loop of known length that
        the device runs without the host, and whether every row is done is checked
        between groups. 1: after every step (no model work once all rows are done). On
        GPUs each check is a read-back the host waits for; with ``sync_every >=
        num_steps`` the call has no check at all, so the host can queue the next call
        while this one runs (streaming chunks). Steps of a group after every row is done
        (or past ``num_steps``) still run the model, to no effect.
      Others as in ``decode``.

    Returns:
      ``(state, tokens, logits)``: ``tokens`` ``int32[batch, num_steps]`` sampled by this
      call (``PAD_TOKEN`` after a row stopped or for steps not run), ``logits``
      ``float32[batch, num_steps, vocab]`` or None.
    """
    batch = state.tokens.shape[0]
    group = max(1, min(sync_every, num_steps))
    slots = -(-num_steps // group) * group  # num_steps rounded up to whole groups
    tokens = jnp.full((batch, slots), PAD_TOKEN, jnp.int32)
    all_logits = None
    if return_logits:
        vocab = jax.eval_shape(
            lambda s: step_fn(params, s.tokens[:, None], s.positions[:, None], s.cache)[0],
            state).shape[-1]
        all_logits = jnp.zeros((batch, slots, vocab), jnp.float32)
    if num_steps == 0:  # nothing to run (a generation of one token is its prefill)
        return state, tokens, all_logits

    def step(i, carry):
        state, tokens, all_logits = carry
        active = ~state.done & (i < num_steps)  # [batch]
        positions = jnp.where(active, state.positions, -1)[:, None]
        logits, cache = step_fn(params, state.tokens[:, None], positions, state.cache)
        logits = logits[:, 0]  # [batch, vocab]
        index = state.steps_run + 1
        new = sample(logits, row_keys(seed, batch, index), sampling, greedy)
        new = jnp.where(active, new, PAD_TOKEN)
        num_generated = state.num_generated + active.astype(jnp.int32)
        finished = _is_stop(new, stop_tokens) | (num_generated >= max_new_tokens)
        state = DecodeState(cache=cache, tokens=jnp.where(active, new, state.tokens),
                            positions=state.positions + active.astype(jnp.int32),
                            done=state.done | (active & finished), num_generated=num_generated,
                            steps_run=state.steps_run + jnp.any(active).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, i))
        if return_logits:
            all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None], (0, i, 0))
        return state, tokens, all_logits

    def run_group(carry):
        *carry, first = carry  # static bounds: a loop of known length (no host check)
        carry = jax.lax.fori_loop(0, group, lambda j, c: step(first + j, c), tuple(carry))
        return (*carry, first + group)

    def keep_going(carry) -> jax.Array:
        state, _, _, next_step = carry
        return (next_step < num_steps) & ~jnp.all(state.done)

    carry = (state, tokens, all_logits, jnp.int32(0))
    if slots == group:  # one group: no check, nothing for the host to wait on
        carry = run_group(carry)
    else:
        carry = jax.lax.while_loop(keep_going, run_group, carry)
    state, tokens, all_logits, _ = carry
    if return_logits:
        all_logits = all_logits[:, :num_steps]
    return state, tokens[:, :num_steps], all_logits


def _check_static_arguments(prompt_tokens, prompt_lengths, stop_tokens, num_steps: int,
                            sync_every: int) -> None:
    """What ``decode`` can check before tracing the model: counts and shapes."""
    for name, value in (("num_steps", num_steps), ("sync_every", sync_every)):
        if not is_count(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if np.ndim(prompt_tokens) != 2:
        raise ValueError("prompt_tokens must be [batch, seq] token ids, got shape "
                         f"{np.shape(prompt_tokens)}")
    batch = np.shape(prompt_tokens)[0]
    if np.shape(prompt_lengths) != (batch,):
        raise ValueError(f"prompt_lengths must be [batch] = ({batch},) for prompt_tokens of shape "
                         f"{np.shape(prompt_tokens)}, got shape {np.shape(prompt_lengths)}")
    if np.ndim(stop_tokens) != 1:
        raise ValueError("stop_tokens must be a 1-D array of token ids (pad with PAD_TOKEN), "
                         f"got shape {np.shape(stop_tokens)}")


def decode(step_fn: StepFn, params: Any, cache: Any, prompt_tokens: jax.Array,
           prompt_lengths: jax.Array, *, num_steps: int, max_new_tokens: jax.Array,
           sampling: SamplingParams, seed: jax.Array, stop_tokens: jax.Array,
           greedy: bool, start: jax.Array | None = None, return_logits: bool = False,
           on_prefill: Callable[..., None] | None = None, on_prefill_args: tuple = (),
           prefill_chunk: int | None = None, whole_block_fn: StepFn | None = None,
           sync_every: int = 1) -> DecodeResult:
    """Prefills the prompts and decodes up to ``num_steps`` new tokens per row.

    Args:
      step_fn: the model step (see the module docstring).
      params: passed to ``step_fn`` untouched.
      cache: passed to ``step_fn``; carried through the loop.
      prompt_tokens: ``int32[batch, seq]``, right-padded prompts.
      prompt_lengths: ``int32[batch]``, real tokens per row (>= 1).
      num_steps: static upper bound on new tokens (decode steps + 1).
      max_new_tokens: ``int32[]`` new tokens per row, or ``int32[batch]`` one limit per
        row (each <= num_steps); dynamic.
      sampling: per-row sampling values.
      seed: ``uint32[]`` seed of the per-row randomness.
      stop_tokens: ``int32[n]`` token ids that end a row (pad with ``PAD_TOKEN``).
      greedy: static; argmax for every row.
      start: ``int32[batch]`` position of each prompt's first token (default 0).
      return_logits: static; also return the logits each token was chosen from.
      on_prefill: optional host function called (through ``jax.debug.callback``) once
        prefill has run, with the first sampled tokens: on a mesh, once per device with
        that device's rows (``partitioned``); used for timing.
      on_prefill_args: arrays passed to ``on_prefill`` after the tokens (e.g. a run id
        that tells concurrent runs of one program apart).
      prefill_chunk: static; feed prompt blocks longer than this in pieces (``prefill``).
      whole_block_fn: the step function for a prompt block fed whole (``prefill``).
      sync_every: static; decode steps per check that every row is done (``decode_steps``).

    The steps run in a ``jax.lax.while_loop`` over groups of ``sync_every`` steps (a scan
    that can end early): once every row is done, no further group runs. A ``lax.scan``
    whose body skips finished steps with ``lax.cond`` made XLA copy the whole cache
    through the conditional (compiled temp memory of one full cache); the while loop
    updates it in place.
    """
    _check_static_arguments(prompt_tokens, prompt_lengths, stop_tokens, num_steps, sync_every)
    if start is None:
        start = jnp.zeros(prompt_lengths.shape, jnp.int32)
    controls = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                    stop_tokens=stop_tokens, greedy=greedy)
    state, last = prefill(step_fn, params, cache, prompt_tokens, prompt_lengths, start=start,
                          chunk=prefill_chunk, whole_block_fn=whole_block_fn, **controls)
    first = state.tokens  # [batch]
    if on_prefill is not None:
        # per device shard: the whole batch would be gathered to one device first
        jax.debug.callback(on_prefill, first, *on_prefill_args, partitioned=True)
    state, tokens, step_logits = decode_steps(step_fn, params, state, num_steps=num_steps - 1,
                                              return_logits=return_logits, sync_every=sync_every,
                                              **controls)
    tokens = jnp.concatenate([first[:, None], tokens], axis=1)  # [batch, num_steps]
    if return_logits:
        step_logits = jnp.concatenate([last[:, None], step_logits], axis=1)
    return DecodeResult(tokens=tokens, num_generated=state.num_generated, cache=state.cache,
                        steps_run=state.steps_run, logits=step_logits)


def jit_decode(step_fn: StepFn, *, num_steps: int, greedy: bool, return_logits: bool = False,
               on_prefill: Callable[..., None] | None = None,
               prefill_chunk: int | None = None, whole_block_fn: StepFn | None = None,
               sync_every: int = 1, compiler_options: dict | None = None):
    """``decode`` for ``step_fn`` as one jitted program with the cache donated.

    The program takes ``(params, cache, prompt_tokens, prompt_lengths, max_new_tokens,
    sampling, seed, stop_tokens, *on_prefill_args)`` and returns a ``DecodeResult``; the
    cache passed in is consumed (its buffers are updated in place). Arrays after
    ``stop_tokens`` are handed to ``on_prefill`` after the first tokens (``decode``'s
    ``on_prefill_args``, e.g. a run id). ``compiler_options``: XLA options of the compile
    (``jax.jit``'s), e.g. ``kvjax.model.compiler_options()`` for kvjax's model.
    """

    def run(params, cache, prompt_tokens, prompt_lengths, max_new_tokens, sampling, seed,
            stop_tokens, *on_prefill_args):
        return decode(step_fn, params, cache, prompt_tokens, prompt_lengths,
                      num_steps=num_steps, max_new_tokens=max_new_tokens, sampling=sampling,
                      seed=seed, stop_tokens=stop_tokens, greedy=greedy,
                      return_logits=return_logits, on_prefill=on_prefill,
                      on_prefill_args=on_prefill_args, prefill_chunk=prefill_chunk,
                      whole_block_fn=whole_block_fn, sync_every=sync_every)

    return jax.jit(run, donate_argnums=1, compiler_options=compiler_options)
