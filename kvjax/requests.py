"""A generation request: prompts encoded and checked, lengths bucketed and padded, the
loop's controls (sampling values, seeds, stop tokens, per-row limits) as arrays.

Everything here runs on the host before anything compiles, so a bad request fails
fast with a message that names the problem; ``kvjax.generate``, ``generate_stream``,
``ChatSession`` (and, later, a serving engine) share it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from kvjax import sharding
from kvjax.cache import cache_layout, check_kv_dtype
from kvjax.cache.quantized import check_storable
from kvjax.config import ModelConfig, is_count
from kvjax.decode import PAD_TOKEN
from kvjax.loading import Model
from kvjax.sampling import SamplingParams, check_sampling_values

MAX_STOP_TOKENS = 16  # stop ids are a fixed-size array so their number never recompiles
MIN_PROMPT_BUCKET = 16
MIN_STEPS_BUCKET = 16
MIN_CAPACITY = 64
# What generate takes as prompts: texts, token-id lists, or a 2-D integer array of ids.
Prompts = Sequence[str] | Sequence[Sequence[int]] | np.ndarray | jax.Array


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def encode_prompts(model: Model, prompts: Prompts) -> list[list[int]]:
    """Token ids of each prompt: a list of strings or of token-id lists, or a 2-D integer
    array (one row per prompt), checked against the vocabulary."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:
            raise ValueError("an array of prompts must be 2-D [batch, tokens], got shape "
                             f"{tuple(prompts.shape)}")
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists, "
                         "or a 2-D integer array")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (tokenizer.json in the checkpoint); "
                                 "pass token-id lists instead")
            ids = model.tokenizer.encode(prompt)
        else:
            array = np.asarray(prompt)
            if array.size and (array.ndim != 1 or array.dtype.kind not in "iu"):
                raise ValueError(f"prompt {i} must be a flat list of integer token ids, got "
                                 f"{array.dtype} of shape {array.shape}")
            ids = array.tolist() if array.size else []
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"[0, {model.config.vocab_size})")
        encoded.append(ids)
    return encoded


def stop_array(model: Model, stop_tokens: Sequence[int] | None) -> np.ndarray:
    """``int32[MAX_STOP_TOKENS]``: the stop ids (default the model's), padded with
    ``PAD_TOKEN``, checked against the vocabulary."""
    stops = list(model.stop_tokens if stop_tokens is None else stop_tokens)
    if len(stops) > MAX_STOP_TOKENS:
        raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens are supported, got {len(stops)}")
    bad = [t for t in stops if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ValueError(f"stop token {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    return np.array(stops + [PAD_TOKEN] * (MAX_STOP_TOKENS - len(stops)), np.int32)


def check_lengths(config: ModelConfig, longest: int, max_new_tokens: int,
                   capacity: int | None) -> int:
    """Validates lengths and returns the cache capacity to use."""
    if not is_count(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    needed = longest + max_new_tokens
    if needed > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds the "
            f"model's max_position_embeddings ({config.max_position_embeddings}); shorten the "
            "prompt or lower max_new_tokens")
    if capacity is None:
        return min(bucket(needed, MIN_CAPACITY), config.max_position_embeddings)
    if not is_count(capacity):
        raise ValueError(f"capacity must be an integer >= 1 (cache slots per row), got {capacity!r}")
    if needed > capacity:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds the "
            f"cache capacity ({capacity}); pass capacity >= {needed}")
    return capacity


def streaming_capacity(config: ModelConfig, capacity: int | None, window: int | None,
                       sink_tokens: int | None) -> int:
    """The slots a row of a streaming cache holds (``sink_tokens + window``), its sizes
    checked (``kvjax.cache.cache_layout``). ``window`` defaults to the capacity after the
    sinks; one of the two must be given."""
    if capacity is None:
        if window is None:
            raise ValueError("streaming needs its window: pass window (positions each query sees "
                             "after the sinks) or capacity (sink_tokens + window)")
        if not is_count(window):
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        capacity = window + (sink_tokens if is_count(sink_tokens, 0) else 0)
    return cache_layout(config, capacity, window=window, sink_tokens=sink_tokens).capacity


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request, padded to the shapes of its compiled programs."""

    encoded: list[list[int]]  # the prompts' token ids, one list per prompt
    prompt_tokens: np.ndarray  # int32[rows, prompt_bucket], right-padded
    prompt_lengths: np.ndarray  # int32[rows]
    capacity: int
    kv_dtype: str | None  # what the cache stores (kvjax.cache.KV_DTYPES; None: the model's dtype)
    window: int | None  # streaming (kvjax.cache.layout): positions each query sees after the sinks
    sink_tokens: int | None  # streaming: the first positions every query sees
    num_steps: int  # power-of-two bound on new tokens
    controls: dict  # max_new_tokens, sampling, seed, stop_tokens: the dynamic loop inputs
    sampling_values: dict  # temperature, top_k, top_p, min_p as used (defaults resolved)

    @property
    def batch(self) -> int:
        """Prompts asked for."""
        return len(self.encoded)

    @property
    def rows(self) -> int:
        """Rows of the programs: ``batch`` padded to a multiple of the mesh's ``data``."""
        return self.prompt_tokens.shape[0]

    @property
    def greedy(self) -> bool:
        return self.controls["sampling"].is_greedy

    @property
    def key_limit(self) -> int | None:
        return fresh_key_limit(self.prompt_tokens.shape[1], self.num_steps, self.capacity)


def fresh_key_limit(prompt_width: int, num_steps: int, capacity: int) -> int | None:
    """Slots a generation into a fresh cache can fill (its prompt block + its loop
    bound), None when that is the whole cache: its attention reads no slot past it."""
    limit = prompt_width + num_steps
    return limit if limit < capacity else None


def make_request(model: Model, prompts: Prompts, *, max_new_tokens: int,
                 temperature: float | None, top_k: int | None, top_p: float | None,
                 min_p: float | None, seed: int, stop_tokens: Sequence[int] | None,
                 capacity: int | None, kv_dtype: str | None = None,
                 use_cache: bool = True, window: int | None = None,
                 sink_tokens: int | None = None) -> Request:
    """Validates a generation request (arguments as in ``kvjax.generate``) and pads it
    to the shapes of its programs; raises ``ValueError`` naming the first problem."""
    check_kv_dtype(kv_dtype)
    check_storable(kv_dtype)
    if kv_dtype is not None and not use_cache:
        raise ValueError("kv_dtype sets what the KV cache stores; use_cache=False keeps none")
    streaming = window is not None or sink_tokens is not None
    if streaming and not use_cache:
        raise ValueError("window and sink_tokens say what the KV cache keeps; use_cache=False "
                         "keeps none")
    values = model.sampling_values(temperature, top_k, top_p, min_p)
    check_sampling_values(**values)
    if not (is_count(seed, 0) and seed < 2 ** 32):
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    encoded = encode_prompts(model, prompts)
    stops = stop_array(model, stop_tokens)
    longest = max(len(ids) for ids in encoded)
    if streaming:  # rows run past the cache's slots: no length is too long
        if not is_count(max_new_tokens):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        capacity = streaming_capacity(model.config, capacity, window, sink_tokens)
    else:
        capacity = check_lengths(model.config, longest, max_new_tokens, capacity)
    rows = pad_rows(encoded, sharding.batch_ways(model.mesh, model.rules))
    width = bucket(longest, MIN_PROMPT_BUCKET)
    prompt_tokens, prompt_lengths = pad_block(rows, width if streaming else min(width, capacity))
    sampling = SamplingParams.create(len(rows), **values)
    controls = dict(max_new_tokens=new_token_limits(len(encoded), len(rows), max_new_tokens),
                    sampling=sampling, seed=np.uint32(seed), stop_tokens=stops)
    return Request(encoded=encoded, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
                    capacity=capacity, kv_dtype=kv_dtype, window=window, sink_tokens=sink_tokens,
                    num_steps=bucket(max_new_tokens, MIN_STEPS_BUCKET),
                    controls=controls, sampling_values=values)


def pad_rows(rows: list[list[int]], ways: int) -> list[list[int]]:
    """``rows`` and copies of its last row up to a multiple of ``ways``: a mesh's ``data``
    axis splits a batch only evenly. The copies' results are dropped."""
    return rows + rows[-1:] * (-len(rows) % ways)


def new_token_limits(batch: int, rows: int, max_new_tokens: int) -> np.ndarray:
    """``int32[rows]``, the loop's ``max_new_tokens``: as asked for the first ``batch``
    rows, 1 for the padding rows after them (``pad_rows``), which are then done after
    their prefill token and never keep the loop running."""
    limits = np.full((rows,), max_new_tokens, np.int32)
    limits[batch:] = 1
    return limits


def pad_block(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token rows to ``int32[batch, width]``; returns it and the row lengths."""
    block = np.zeros((len(rows), width), np.int32)
    for row, ids in enumerate(rows):
        block[row, :len(ids)] = ids
    return block, np.array([len(ids) for ids in rows], np.int32)
