"""The public entry points: ``load`` a checkpoint, ``generate`` from prompts."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCache, TokenHistory
from kvjax.checkpoint import DTYPES, load_params
from kvjax.config import ModelConfig
from kvjax.decode import jit_decode
from kvjax.model import recompute_step_fn, step_fn
from kvjax.sampling import SamplingParams, check_sampling_values
from kvjax.tokenizer import Tokenizer

MAX_STOP_TOKENS = 16  # stop ids are a fixed-size array so their number never recompiles
MIN_PROMPT_BUCKET = 16
MIN_STEPS_BUCKET = 16
MIN_CAPACITY = 64


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: config, parameter pytree, tokenizer (or None) and default stop ids."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer | None = None
    stop_tokens: tuple[int, ...] = ()

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embed"].dtype


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of ``generate``.

    Attributes:
      tokens: new token ids per prompt, each ending at (and including) its first stop token.
      texts: the decoded new text per prompt, or None without a tokenizer.
      stats: ``compile_s``, ``prefill_s``, ``decode_s``, ``decode_steps``, ``new_tokens``,
        ``tokens_per_s`` (new tokens over prefill + decode time), ``decode_tokens_per_s``
        (batch x decode steps over decode time), ``cache_bytes``, ``batch``,
        ``prompt_bucket``, ``capacity``.
      logits: per prompt, ``float32[len(tokens), vocab]`` logits each new token was
        chosen from (only with ``return_logits=True``).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    stats: dict[str, Any]
    logits: list[np.ndarray] | None = None


def load(path_or_hub_id: str, dtype: str = "bfloat16") -> Model:
    """Loads a Hugging Face-format checkpoint (a local directory or a Hub id).

    Reads ``config.json``, the safetensors weights (single file or sharded index),
    ``tokenizer.json`` when present and the stop tokens of ``generation_config.json``
    (falling back to ``eos_token_id`` of ``config.json``).

    Args:
      path_or_hub_id: a checkpoint directory, or ``org/name`` on the Hugging Face Hub
        (downloaded with ``huggingface_hub.snapshot_download``, honouring ``HF_HOME``
        and ``HF_HUB_OFFLINE``).
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    directory = _resolve(path_or_hub_id)
    config = ModelConfig.from_json(directory)
    params = load_params(directory, config, dtype)
    return Model(config=config, params=params, tokenizer=Tokenizer.from_directory(directory),
                 stop_tokens=_default_stop_tokens(directory, config))


def _resolve(path_or_hub_id: str) -> str:
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"no config.json in {path}: point kvjax at a Hugging Face checkpoint directory "
                "(one holding config.json and model.safetensors)")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise FileNotFoundError(f"{path} is neither a directory nor a Hugging Face Hub id (org/name)")
    import huggingface_hub  # only needed for Hub ids

    try:
        return huggingface_hub.snapshot_download(
            path, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:
        raise FileNotFoundError(
            f"could not get {path} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"Without network, download it elsewhere with `hf download {path}` "
            "and copy the directory (or HF_HOME cache) here, then pass its path") from e


def _default_stop_tokens(directory: str, config: ModelConfig) -> tuple[int, ...]:
    path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return config.eos_token_ids


def _bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _encode_prompts(model: Model, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (tokenizer.json in the checkpoint); "
                                 "pass token-id lists instead")
            ids = model.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)] if len(prompt) else []
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"[0, {model.config.vocab_size})")
        encoded.append(ids)
    return encoded


def _stop_array(model: Model, stop_tokens: Sequence[int] | None) -> np.ndarray:
    stops = list(model.stop_tokens if stop_tokens is None else stop_tokens)
    if len(stops) > MAX_STOP_TOKENS:
        raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens are supported, got {len(stops)}")
    bad = [t for t in stops if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ValueError(f"stop token {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    return np.array(stops + [-1] * (MAX_STOP_TOKENS - len(stops)), np.int32)


def _check_lengths(config: ModelConfig, longest: int, max_new_tokens: int,
                   capacity: int | None) -> int:
    """Validates lengths and returns the cache capacity to use."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    needed = longest + max_new_tokens
    if needed > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds the "
            f"model's max_position_embeddings ({config.max_position_embeddings}); shorten the "
            "prompt or lower max_new_tokens")
    if capacity is None:
        return min(_bucket(needed, MIN_CAPACITY), config.max_position_embeddings)
    if needed > capacity:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds the "
            f"cache capacity ({capacity}); pass capacity >= {needed}")
    return capacity


@functools.lru_cache(maxsize=64)
def _jitted_decode(config: ModelConfig, use_cache: bool, num_steps: int, greedy: bool,
                   return_logits: bool):
    step = step_fn(config) if use_cache else recompute_step_fn(config)
    return jit_decode(step, num_steps=num_steps, greedy=greedy, return_logits=return_logits,
                      on_prefill=_PREFILL_CLOCK)


class _PrefillClock:
    """Host time at which the running generation finished its prefill (a jax callback).

    One instance for the process, so the compiled programs that call it never change."""

    def __init__(self):
        self.time: float | None = None

    def __call__(self, _first_tokens) -> None:
        if self.time is None:
            self.time = time.perf_counter()


_PREFILL_CLOCK = _PrefillClock()


def generate(model: Model, prompts: Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, capacity: int | None = None,
             use_cache: bool = True, return_logits: bool = False) -> Generation:
    """Generates a continuation of each prompt, the whole run one compiled program.

    Args:
      model: from ``kvjax.load`` (or built by hand: ``Model(config, params)``).
      prompts: a list of strings (needs a tokenizer) or of token-id lists; rows may have
        different lengths.
      max_new_tokens: new tokens per prompt, stop token included.
      temperature: 0 for greedy; otherwise sample from softmax(logits / temperature).
      top_k, top_p, min_p: filters (None = off), applied in that order after temperature.
      seed: seed of the per-row randomness (row ``r`` draws the same numbers whatever
        the other rows are).
      stop_tokens: ids that end a row; default the model's (``generation_config.json``).
      capacity: cache slots per row; default: a power of two >= longest prompt +
        max_new_tokens (capped at max_position_embeddings).
      use_cache: False recomputes the whole sequence every step (the baseline).
      return_logits: also return the logits of every new token.

    Prompt lengths are padded to power-of-two buckets and ``max_new_tokens`` to a
    power-of-two number of scan steps, so other prompts, lengths in the same bucket,
    seeds and sampling values reuse the compiled program.

    Raises:
      ValueError: bad prompts, lengths or sampling values (before any compilation).
    """
    check_sampling_values(temperature, top_k, top_p, min_p)
    if not 0 <= seed < 2 ** 32 or int(seed) != seed:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed}")
    encoded = _encode_prompts(model, prompts)
    stops = _stop_array(model, stop_tokens)
    longest = max(len(ids) for ids in encoded)
    capacity = _check_lengths(model.config, longest, max_new_tokens, capacity)
    batch = len(encoded)
    prompt_bucket = min(_bucket(longest, MIN_PROMPT_BUCKET), capacity)
    num_steps = _bucket(max_new_tokens, MIN_STEPS_BUCKET)

    prompt_tokens = np.zeros((batch, prompt_bucket), np.int32)  # [batch, prompt_bucket]
    for row, ids in enumerate(encoded):
        prompt_tokens[row, :len(ids)] = ids
    prompt_lengths = np.array([len(ids) for ids in encoded], np.int32)
    sampling = SamplingParams.create(batch, temperature, top_k, top_p, min_p)
    if use_cache:
        cache = KVCache.create(model.config, batch, capacity, model.dtype)
    else:
        cache = TokenHistory.create(batch, capacity)
    args = (model.params, cache, prompt_tokens, prompt_lengths, np.int32(max_new_tokens),
            sampling, np.uint32(seed), stops)

    jitted = _jitted_decode(model.config, use_cache, num_steps, sampling.is_greedy, return_logits)
    compile_start = time.perf_counter()
    compiled = _compiled(jitted, args)
    compile_s = time.perf_counter() - compile_start

    _PREFILL_CLOCK.time = None
    start = time.perf_counter()
    result = compiled(*args)
    num_generated = np.asarray(result.num_generated)
    end = time.perf_counter()
    prefill_done = _PREFILL_CLOCK.time or end
    tokens_out = np.asarray(result.tokens)
    tokens = [tokens_out[row, :num_generated[row]].tolist() for row in range(batch)]
    texts = [model.tokenizer.decode(t) for t in tokens] if model.tokenizer else None
    logits = None
    if return_logits:
        all_logits = np.asarray(result.logits)
        logits = [all_logits[row, :num_generated[row]] for row in range(batch)]
    steps_run = int(result.steps_run)
    prefill_s, decode_s = prefill_done - start, end - prefill_done
    new_tokens = int(num_generated.sum())
    stats = {
        "compile_s": compile_s, "prefill_s": prefill_s, "decode_s": decode_s,
        "decode_steps": steps_run, "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / max(end - start, 1e-9),
        "decode_tokens_per_s": batch * steps_run / max(decode_s, 1e-9),
        "cache_bytes": cache.nbytes, "batch": batch, "prompt_bucket": prompt_bucket,
        "capacity": capacity,
    }
    return Generation(tokens=tokens, texts=texts, stats=stats, logits=logits)


_COMPILED: dict = {}


def _compiled(jitted, args):
    """AOT-compiles ``jitted`` for the shapes of ``args`` once; later calls only look up."""
    leaves, treedef = jax.tree.flatten(args)
    key = (jitted, treedef, tuple((np.shape(x), getattr(x, "dtype", None) or np.result_type(x))
                                  for x in leaves))
    if key not in _COMPILED:
        _COMPILED[key] = jitted.lower(*args).compile()
    return _COMPILED[key]
