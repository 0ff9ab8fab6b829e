"""Multi-turn chat that keeps its KV cache: each turn prefills only its own new tokens."""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from kvjax import programs, sharding
from kvjax.decode import PAD_TOKEN
from kvjax.loading import Model
from kvjax.requests import (MIN_PROMPT_BUCKET, bucket, new_token_limits, pad_block, pad_rows,
                            stop_array, streaming_capacity)
from kvjax.cache import check_kv_dtype
from kvjax.cache.quantized import check_storable
from kvjax.config import is_count
from kvjax.sampling import SamplingParams, check_sampling_values
from kvjax.streaming import DecodeChunks, prefix_cached_chunks, tokens_of_chunk
from kvjax.tokenizer import StreamDecoder


class CapacityError(ValueError):
    """The conversation no longer fits in the session's cache."""


class ChatSession:
    """A conversation with a model: the messages, their tokens and the KV cache holding them.

    ``send(message)`` renders the conversation with the checkpoint's chat template, takes
    the text the new turn adds after what is already cached, prefills just those tokens at
    the end of the cache and decodes the reply. Greedy replies equal what ``generate``
    gives for the whole token history from scratch (``history`` is exactly what the cache
    holds, plus the last reply token, which the next turn feeds first). A reply that ends
    in a stop token the template writes otherwise (an EOS where it writes its end-of-turn
    text) leaves that token out of the history once the next turn is rendered, so that
    turn still prefills only its own tokens.

    Args:
      model: a model whose tokenizer has a chat template.
      capacity: cache slots for the whole conversation (default: max positions, at most 4096).
      system: an optional system message.
      max_new_tokens: the longest reply.
      temperature, top_k, top_p, min_p: as in ``generate`` (None: the model's default).
      seed: turn ``i`` samples with seed ``seed + i``.
      stop_tokens: default the model's.
      chunk_size: decode steps per compiled chunk while streaming.
      kv_dtype: what the KV cache stores (as in ``generate``; None: the model's dtype).
      window, sink_tokens: streaming, as in ``generate``: the conversation goes on past
        the capacity, each token seeing the first ``sink_tokens`` and its last
        ``window`` positions, and never raises ``CapacityError``.
      prefix_cache: a ``kvjax.PrefixCache``: each turn runs the whole conversation as a
        row of its pool, prefilling only what follows the longest cached prefix (the
        turns before, or another chat's equal system prompt), instead of a cache of the
        session's own.
    """

    def __init__(self, model: Model, *, capacity: int | None = None, system: str | None = None,
                 max_new_tokens: int = 256, temperature: float | None = None,
                 top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, seed: int = 0,
                 stop_tokens: Sequence[int] | None = None, chunk_size: int = 16,
                 kv_dtype: str | None = None, window: int | None = None,
                 sink_tokens: int | None = None, prefix_cache=None):
        if model.tokenizer is None:
            raise ValueError("chat needs a tokenizer (tokenizer.json in the checkpoint)")
        if model.tokenizer.chat_template is None:
            raise ValueError("this checkpoint has no chat_template in tokenizer_config.json; "
                             "use generate() with plain prompts")
        for name, value in (("capacity", capacity), ("max_new_tokens", max_new_tokens),
                             ("chunk_size", chunk_size)):
            if value is not None and not is_count(value):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        check_kv_dtype(kv_dtype)
        check_storable(kv_dtype)
        self.kv_dtype = kv_dtype
        self.model = model
        self.streaming = window is not None or sink_tokens is not None
        self.prefix_cache = prefix_cache
        if prefix_cache is not None:
            prefix_cache.check_model(model)
            if self.streaming or (kv_dtype is not None and kv_dtype != prefix_cache.kv_dtype):
                raise ValueError("a chat with a prefix_cache takes neither window nor "
                                 "sink_tokens, and its kv_dtype is the prefix cache's "
                                 f"({prefix_cache.kv_dtype})")
        self.window, self.sink_tokens = window, sink_tokens
        if self.streaming:
            capacity = streaming_capacity(model.config, capacity, window, sink_tokens)
        self.capacity = capacity or min(model.config.max_position_embeddings, 4096)
        self.max_new_tokens = max_new_tokens
        # one conversation, copied to fill the rows a mesh's `data` axis splits (pad_rows)
        self._rows = sharding.batch_ways(model.mesh, model.rules)
        values = model.sampling_values(temperature, top_k, top_p, min_p)
        check_sampling_values(**values)
        self.sampling = SamplingParams.create(self._rows, **values)
        self.seed = seed
        self.stops = stop_array(model, stop_tokens)
        self.chunk_size = chunk_size
        self.system = system
        self.last_stats: dict = {}
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (the cache is reused, its contents overwritten)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.history: list[int] = []  # the cache holds history[:-1]
        self._rendered = ""  # the text that `history` encodes
        self._rendered_before_stop = None  # the same without the last reply's stop token
        self._turn = 0
        self._cache = None if self.prefix_cache is not None else programs.new_cache(
            self.model, self._rows, self.capacity, kv_dtype=self.kv_dtype, window=self.window,
            sink_tokens=self.sink_tokens)

    @property
    def cache_fill(self) -> int:
        """Tokens in the cache."""
        return max(len(self.history) - 1, 0)

    def send(self, message: str) -> str:
        """The model's whole reply to ``message``."""
        return "".join(self.stream(message))

    def stream(self, message: str) -> Iterator[str]:
        """Yields the reply to ``message`` as text pieces, as they are generated."""
        tokenizer = self.model.tokenizer
        messages = self.messages + [{"role": "user", "content": message}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if (not rendered.startswith(self._rendered) and self._rendered_before_stop is not None
                and rendered.startswith(self._rendered_before_stop)):
            # The last reply ended in a stop token the template writes otherwise (e.g. EOS
            # where it writes its end-of-turn text): drop it. The cache holds all of the
            # history now, so the block below re-feeds its last token at the position it
            # holds already (the same K/V written again), then the turn.
            self.history, self._rendered = self.history[:-1], self._rendered_before_stop
        if not rendered.startswith(self._rendered):
            # The template rewrites earlier turns (some drop old reasoning text): the cache
            # no longer matches the conversation, so start it again from the top.
            self.history, self._rendered = [], ""
        new_tokens = tokenizer.encode(rendered[len(self._rendered):], add_special_tokens=False)
        block_tokens = self.history[-1:] + new_tokens
        start = self.cache_fill
        needed = start + len(block_tokens) + self.max_new_tokens
        if needed > self.capacity and not self.streaming:
            raise CapacityError(
                f"the conversation has reached the cache capacity: {start} cached tokens + "
                f"{len(block_tokens)} new + up to {self.max_new_tokens} for the reply = {needed} "
                f"> {self.capacity}; reset the conversation (ChatSession.reset(), /reset in the CLI "
                "chat) or use a larger capacity")
        controls = dict(max_new_tokens=new_token_limits(1, self._rows, self.max_new_tokens),
                        sampling=self.sampling, seed=np.uint32(self.seed + self._turn),
                        stop_tokens=self.stops)
        on_end = None
        if self.prefix_cache is not None:  # the whole conversation, its cached prefix reused
            chunks, on_end, _ = prefix_cached_chunks(self.model, self.prefix_cache,
                                                     [self.history + new_tokens], controls,
                                                     self.chunk_size)
        else:
            width = bucket(len(block_tokens), MIN_PROMPT_BUCKET)
            if not self.streaming:
                width = min(width, self.capacity - start)
            block, lengths = pad_block(pad_rows([block_tokens], self._rows), width)
            chunks = DecodeChunks(self.model, True, self.chunk_size, self._cache, block, lengths,
                                  np.full((self._rows,), start, np.int32), controls,
                                  kv_dtype=self.kv_dtype)
            self._cache = None  # donated to the prefill program
        stops = set(self.stops.tolist()) - {PAD_TOKEN}
        decoder = StreamDecoder(tokenizer)
        reply: list[int] = []
        finished = False
        t0 = time.perf_counter()
        try:
            for block_out in chunks:
                new, finished = tokens_of_chunk(block_out[0], stops, finished)
                reply.extend(new)
                text = decoder.add(new)
                if text:
                    yield text
        finally:
            if on_end is not None:  # the pool back to the prefix cache, even if left early
                on_end(chunks.state, [reply])
        text = decoder.flush()
        if text:
            yield text
        if self.prefix_cache is None:
            self._cache = chunks.state.cache
        self.history = self.history + new_tokens + reply
        self._rendered = rendered + tokenizer.decode(reply, skip_special_tokens=False)
        self._rendered_before_stop = (
            rendered + tokenizer.decode(reply[:-1], skip_special_tokens=False)
            if reply and reply[-1] in stops else None)
        self.messages = messages + [{"role": "assistant", "content": tokenizer.decode(reply)}]
        self._turn += 1
        self.last_stats = {
            "prefill_tokens": len(block_tokens), "prefill_s": chunks.prefill_s,
            "reply_tokens": len(reply), "decode_s": chunks.decode_s,
            "decode_tokens_per_s": max(len(reply) - 1, 0) / max(chunks.decode_s, 1e-9),
            "compile_s": chunks.compile_s, "cache_fill": self.cache_fill,
            "capacity": self.capacity, "turn_s": time.perf_counter() - t0,
        }
