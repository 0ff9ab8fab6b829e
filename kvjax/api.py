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
from jax.sharding import NamedSharding, PartitionSpec

from kvjax.checkpoint import DTYPES, load_params
from kvjax.config import ConfigError, ModelConfig, is_count
from kvjax.decode_kernel import MeshSplit
from kvjax.decode import PAD_TOKEN, DecodeState, decode_steps, jit_decode, prefill
from kvjax.model import compiler_options, recompute_step_fn, step_fn
from kvjax.sampling import SamplingParams, check_sampling_values
from kvjax import compilation_cache, orbax_store, sharding
from kvjax.tokenizer import Tokenizer

# The small English model shipped inside the package (docs/bundled_model.md).
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "kvjax-tiny")
MAX_STOP_TOKENS = 16  # stop ids are a fixed-size array so their number never recompiles
MIN_PROMPT_BUCKET = 16
MIN_STEPS_BUCKET = 16
MIN_CAPACITY = 64
# Prompt blocks longer than this are prefilled in pieces of this many tokens (one after
# another, each attending to the cache so far): a long prompt's attention scores and
# activations then never exist for the whole of it at once.
PREFILL_CHUNK = 2048
# generate's decode steps run in groups of this many between checks that every row is
# done (kvjax.decode's sync_every): on GPUs a check is a read-back the host waits for,
# and a group runs at most this many - 1 steps past the last row's stop token.
SYNC_EVERY = 8
# What generate takes as prompts: texts, token-id lists, or a 2-D integer array of ids.
Prompts = Sequence[str] | Sequence[Sequence[int]] | np.ndarray | jax.Array


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: config, parameter pytree, tokenizer (or None) and default stop ids."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer | None = None
    stop_tokens: tuple[int, ...] = ()
    mesh: Any = None  # the jax.sharding.Mesh the params live on (kvjax.sharding), or None
    # How the params are placed on ``mesh``: generate creates the cache and splits the
    # batch and the decode kernel by the same rules.
    rules: sharding.ShardingRules = sharding.DEFAULT_RULES
    # Sampling values used where a call passes None: temperature, top_k, top_p, min_p
    # (from generation_config.json when it samples; empty: greedy, no filters).
    generation_defaults: dict = dataclasses.field(default_factory=dict)

    def sampling_values(self, temperature: float | None, top_k: int | None,
                        top_p: float | None, min_p: float | None) -> dict[str, Any]:
        """The sampling values of a call: each given value, else the model's default."""
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        fallback = dict(temperature=0.0, top_k=None, top_p=None, min_p=None)
        return {name: value if value is not None else self.generation_defaults.get(name, fallback[name])
                for name, value in given.items()}

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embed"].dtype


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


def load(path_or_hub_id: str, dtype: str | None = None, mesh=None,
         rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> Model:
    """Loads a Hugging Face-format checkpoint (a local directory or a Hub id).

    Reads ``config.json``, the safetensors weights (single file or sharded index; or the
    params of a kvjax orbax store made by ``scripts/convert.py``, docs/checkpoints.md),
    ``tokenizer.json`` when present and the stop tokens of ``generation_config.json``
    (falling back to ``eos_token_id`` of ``config.json``).

    Args:
      path_or_hub_id: a checkpoint directory, or ``org/name`` on the Hugging Face Hub
        (downloaded with ``huggingface_hub.snapshot_download``, honouring ``HF_HOME``
        and ``HF_HUB_OFFLINE``).
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``. None: an orbax store's own
        dtype; otherwise ``bfloat16`` on GPU and TPU and ``float32`` on CPU, where XLA
        has no bfloat16 matmul kernels and converts every weight to float32 in each
        compiled call (+0.39 s a call for a 150M-parameter model on 2 cores, and twice
        the weights' memory).
      mesh: a ``kvjax.sharding.make_mesh`` mesh: each tensor is placed straight onto its
        sharding while loading, and ``generate`` runs over the mesh (docs/sharding.md).
      rules: the ``kvjax.sharding.ShardingRules`` of that placement (recorded on the
        model: ``generate`` places its cache and batch by them too).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    directory = resolve_checkpoint(path_or_hub_id)
    config = ModelConfig.from_json(directory)
    if orbax_store.is_orbax_store(directory):  # params converted before (scripts/convert.py)
        params = orbax_store.restore_params(directory, config, dtype, mesh=mesh, rules=rules)
    else:
        params = load_params(directory, config, dtype or default_dtype(mesh), mesh=mesh,
                             rules=rules)
    stop_tokens, defaults = _generation_config(directory, config)
    return Model(config=config, params=params, tokenizer=Tokenizer.from_directory(directory),
                 stop_tokens=stop_tokens, mesh=mesh, rules=rules, generation_defaults=defaults)


def default_dtype(mesh=None) -> str:
    """``"float32"`` when the devices (``mesh``'s, else JAX's default) are CPUs, else
    ``"bfloat16"``."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "float32" if platform == "cpu" else "bfloat16"


def resolve_checkpoint(path_or_hub_id: str) -> str:
    """The local directory of a checkpoint: ``path_or_hub_id`` itself when it is a
    directory (which must hold ``config.json``), else the Hub snapshot it names,
    downloaded (or found in the ``HF_HOME`` cache) with ``huggingface_hub``."""
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


# transformers' values for sampling fields that a sampling generation_config leaves unset
# (GenerationConfig._get_default_generation_params).
_HF_SAMPLING_DEFAULTS = dict(temperature=1.0, top_k=50, top_p=1.0, min_p=None)


def _generation_config(directory: str, config: ModelConfig) -> tuple[tuple[int, ...], dict]:
    """Stop tokens and sampling defaults from ``generation_config.json``.

    Stop tokens: its ``eos_token_id``, else ``config.json``'s. Sampling defaults, as
    transformers' ``generate`` reads the file: none (greedy) unless ``do_sample`` is true;
    then ``temperature``, ``top_k``, ``top_p`` and ``min_p``, each unset one taking
    transformers' default (1.0, 50, 1.0, off), filters at their neutral value dropped.
    """
    path = os.path.join(directory, "generation_config.json")
    generation = {}
    if os.path.isfile(path):
        with open(path) as f:
            generation = json.load(f)
    eos = generation.get("eos_token_id")
    stop_tokens = config.eos_token_ids if eos is None else (
        tuple(eos) if isinstance(eos, list) else (eos,))
    if not generation.get("do_sample"):
        return stop_tokens, {}
    values = {name: generation.get(name) if generation.get(name) is not None else default
              for name, default in _HF_SAMPLING_DEFAULTS.items()}
    neutral = dict(top_k=0, top_p=1.0, min_p=0.0)
    defaults = {name: value for name, value in values.items()
                if value is not None and value != neutral.get(name)}
    try:
        check_sampling_values(defaults.get("temperature", 0.0), defaults.get("top_k"),
                              defaults.get("top_p"), defaults.get("min_p"))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    return stop_tokens, defaults


def _bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _encode_prompts(model: Model, prompts: Prompts) -> list[list[int]]:
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
    if not is_count(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
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


@dataclasses.dataclass(frozen=True)
class _Request:
    """A validated generation request, padded to the shapes of its compiled programs."""

    encoded: list[list[int]]  # the prompts' token ids, one list per prompt
    prompt_tokens: np.ndarray  # int32[rows, prompt_bucket], right-padded
    prompt_lengths: np.ndarray  # int32[rows]
    capacity: int
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


def _request(model: Model, prompts, *, max_new_tokens, temperature, top_k, top_p, min_p, seed,
             stop_tokens, capacity) -> _Request:
    values = model.sampling_values(temperature, top_k, top_p, min_p)
    check_sampling_values(**values)
    if not (is_count(seed, 0) and seed < 2 ** 32):
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    encoded = _encode_prompts(model, prompts)
    stops = _stop_array(model, stop_tokens)
    longest = max(len(ids) for ids in encoded)
    capacity = _check_lengths(model.config, longest, max_new_tokens, capacity)
    rows = _pad_rows(encoded, sharding.batch_ways(model.mesh, model.rules))
    prompt_tokens, prompt_lengths = _pad_block(rows, min(_bucket(longest, MIN_PROMPT_BUCKET),
                                                         capacity))
    sampling = SamplingParams.create(len(rows), **values)
    controls = dict(max_new_tokens=_new_token_limits(len(encoded), len(rows), max_new_tokens),
                    sampling=sampling, seed=np.uint32(seed), stop_tokens=stops)
    return _Request(encoded=encoded, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
                    capacity=capacity, num_steps=_bucket(max_new_tokens, MIN_STEPS_BUCKET),
                    controls=controls, sampling_values=values)


def _pad_rows(rows: list[list[int]], ways: int) -> list[list[int]]:
    """``rows`` and copies of its last row up to a multiple of ``ways``: a mesh's ``data``
    axis splits a batch only evenly. The copies' results are dropped."""
    return rows + rows[-1:] * (-len(rows) % ways)


def _new_token_limits(batch: int, rows: int, max_new_tokens: int) -> np.ndarray:
    """``int32[rows]``, the loop's ``max_new_tokens``: as asked for the first ``batch``
    rows, 1 for the padding rows after them (``_pad_rows``), which are then done after
    their prefill token and never keep the loop running."""
    limits = np.full((rows,), max_new_tokens, np.int32)
    limits[batch:] = 1
    return limits


def _pad_block(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token rows to ``int32[batch, width]``; returns it and the row lengths."""
    block = np.zeros((len(rows), width), np.int32)
    for row, ids in enumerate(rows):
        block[row, :len(ids)] = ids
    return block, np.array([len(ids) for ids in rows], np.int32)


def _steps(config: ModelConfig, use_cache: bool, key_limit: int | None, fresh: bool,
           decode_kernel: bool | None = None, kernel_split: MeshSplit | None = None):
    """``(step_fn, whole_block_fn)`` of a generation; ``fresh``: its cache starts empty,
    ``key_limit``: slots it can fill (``_Request.key_limit``), ``decode_kernel`` and
    ``kernel_split``: as in ``kvjax.model.forward`` (``sharding.kernel_options``)."""
    if not use_cache:
        return recompute_step_fn(config), None
    whole_block_fn = step_fn(config, fresh=True) if fresh else None
    return step_fn(config, key_limit=key_limit, decode_kernel=decode_kernel,
                   kernel_split=kernel_split), whole_block_fn


@functools.lru_cache(maxsize=64)
def _jitted_decode(config: ModelConfig, use_cache: bool, num_steps: int, greedy: bool,
                   return_logits: bool, key_limit: int | None,
                   decode_kernel: bool | None = None, kernel_split: MeshSplit | None = None,
                   timed: bool = True):
    """``generate``'s program; ``timed``: with the prefill clock (a host callback)."""
    step, whole_block_fn = _steps(config, use_cache, key_limit, True, decode_kernel,
                                  kernel_split)
    return jit_decode(step, num_steps=num_steps, greedy=greedy, return_logits=return_logits,
                      on_prefill=_PREFILL_CLOCK if timed else None,
                      whole_block_fn=whole_block_fn,
                      prefill_chunk=PREFILL_CHUNK if use_cache else None, sync_every=SYNC_EVERY,
                      compiler_options=compiler_options())


class _PrefillClock:
    """Host time at which the running generation finished its prefill (a jax callback).

    One instance for the process, so the compiled programs that call it never change."""

    def __init__(self):
        self.time: float | None = None

    def __call__(self, _first_tokens) -> None:
        if self.time is None:
            self.time = time.perf_counter()


_PREFILL_CLOCK = _PrefillClock()


def generate(model: Model, prompts: Prompts, *,
             max_new_tokens: int = 64, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, capacity: int | None = None,
             use_cache: bool = True, return_logits: bool = False) -> Generation:
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

    Prompt lengths are padded to power-of-two buckets and ``max_new_tokens`` to a
    power-of-two number of loop steps, so other prompts, lengths in the same bucket,
    seeds and sampling values reuse the compiled program. On a mesh whose ``data`` axis
    does not divide the number of prompts, copies of the last prompt fill the batch up;
    they stop after one token and their results are dropped.

    Raises:
      ValueError: bad prompts, lengths or sampling values (before any compilation).
    """
    req = _request(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, stop_tokens=stop_tokens,
                   capacity=capacity)
    # sharded on model.mesh, after checking that the mesh splits these rows and the model
    cache = sharding.new_cache(model, req.rows, req.capacity, use_cache)
    cache_bytes = cache.nbytes
    c = req.controls
    args = (model.params, cache, req.prompt_tokens, req.prompt_lengths, c["max_new_tokens"],
            c["sampling"], c["seed"], c["stop_tokens"])
    timed = not compilation_cache.in_use()  # JAX stores no program with a host callback
    jitted = _jitted_decode(model.config, use_cache, req.num_steps, req.greedy, return_logits,
                            req.key_limit, timed=timed,
                            **sharding.kernel_options(model.config, model.mesh, model.rules))
    compile_start = time.perf_counter()
    compiled = _compiled(jitted, args)
    compile_s = time.perf_counter() - compile_start

    _PREFILL_CLOCK.time = None
    start = time.perf_counter()
    result = compiled(*args)
    num_generated = sharding.to_host(result.num_generated)
    end = time.perf_counter()
    prefill_s = (_PREFILL_CLOCK.time or end) - start if timed else None
    tokens_out = sharding.to_host(result.tokens)
    tokens = [tokens_out[row, :num_generated[row]].tolist() for row in range(req.batch)]
    logits = None
    if return_logits:
        all_logits = sharding.to_host(result.logits)
        logits = [all_logits[row, :num_generated[row]] for row in range(req.batch)]
    stats = _stats(req, tokens, compile_s, end - start, prefill_s, int(result.steps_run),
                   cache_bytes)
    return Generation(tokens=tokens, texts=_texts(model, tokens), stats=stats, logits=logits)


def _texts(model: Model, tokens: list[list[int]]) -> list[str] | None:
    return [model.tokenizer.decode(t) for t in tokens] if model.tokenizer else None


def _stats(req: _Request, tokens: list[list[int]], compile_s: float, generate_s: float,
           prefill_s: float | None, decode_steps: int, cache_bytes: int) -> dict[str, Any]:
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


# ----- streaming: a prefill program, then compiled chunks of decode steps -----

@functools.lru_cache(maxsize=64)
def _stream_programs(config: ModelConfig, use_cache: bool, greedy: bool, chunk_size: int,
                     state_shardings: DecodeState | None, key_limit: int | None, fresh: bool,
                     decode_kernel: bool | None, kernel_split: MeshSplit | None):
    """(prefill program, chunk program), each jitted once with its cache/state donated.

    ``fresh``, ``key_limit``, ``decode_kernel``, ``kernel_split`` as in ``_steps`` (a chat
    continues its cache: neither ``fresh`` nor a ``key_limit``). On a mesh both programs
    return the loop state with ``state_shardings``, so the state one chunk returns is
    exactly what the next chunk (or a chat's next prefill) was compiled for."""
    step, whole_block_fn = _steps(config, use_cache, key_limit, fresh, decode_kernel,
                                  kernel_split)

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
    if state_shardings is None:
        return jax.jit(prefill_block, **options), jax.jit(chunk, **options)
    rows, scalar = state_shardings.tokens, state_shardings.steps_run
    return (jax.jit(prefill_block, out_shardings=state_shardings, **options),
            jax.jit(chunk, out_shardings=(state_shardings, rows, scalar), **options))


def _state_shardings(model: Model, cache) -> DecodeState | None:
    """Where the decode loop's state lives on ``model.mesh`` (None without a mesh): the
    cache where it was created, per-row values with the cache's rows, the step count
    replicated."""
    if model.mesh is None:
        return None
    rows = cache.lengths.sharding
    return DecodeState(cache=jax.tree.map(lambda x: x.sharding, cache), tokens=rows,
                       positions=rows, done=rows, num_generated=rows,
                       steps_run=NamedSharding(rows.mesh, PartitionSpec()))


class _Chunks:
    """Runs prefill then decode chunks, yielding ``int32[batch, n]`` host token blocks.

    A chunk is a loop of known length that the device runs without consulting the host
    (``decode_steps`` with ``sync_every = chunk_size``), so calling it only queues it:
    the next chunk is queued before the current one is read back, and the device never
    waits for detokenizing or printing. The host stops queueing once the chunks queued
    reach ``max_new_tokens``; a row that ends on a stop token ends the loop after the
    chunk that reported it, and the chunk queued behind that one runs its steps to no
    effect. ``state`` holds the final loop state (and its cache) after iteration (not
    waited for); ``times`` the compile, prefill and decode seconds.
    """

    def __init__(self, model: Model, use_cache: bool, chunk_size: int, cache, block: np.ndarray,
                 lengths: np.ndarray, start: np.ndarray, controls: dict,
                 key_limit: int | None = None, fresh: bool = False):
        prefill_program, chunk_program = _stream_programs(
            model.config, use_cache, controls["sampling"].is_greedy, chunk_size,
            _state_shardings(model, cache), key_limit, fresh,
            **sharding.kernel_options(model.config, model.mesh, model.rules))
        self._params, self._controls, self._chunk_size = model.params, controls, chunk_size
        self._prefill_args = (model.params, cache, block, lengths, start, *controls.values())
        t0 = time.perf_counter()
        self._prefill = _compiled(prefill_program, self._prefill_args)
        # The chunk program is compiled for the state exactly as prefill leaves it
        # (shapes, dtypes and shardings of the compiled prefill's outputs).
        self._chunk = _compiled(chunk_program, (model.params, self._prefill.out_info,
                                                *controls.values()))
        self.compile_s = time.perf_counter() - t0
        self.state = None
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = 0

    def _run_chunk(self, state):
        return self._chunk(self._params, state, *self._controls.values())

    def __iter__(self):
        t0 = time.perf_counter()
        state = self._prefill(*self._prefill_args)
        first = sharding.to_host(state.tokens)[:, None]  # [batch, 1]
        finished = bool(np.all(sharding.to_host(state.done)))
        self.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        steps_left = int(np.max(self._controls["max_new_tokens"])) - 1  # steps a row may need
        pending = None
        if not finished:
            pending, steps_left = self._run_chunk(state), steps_left - self._chunk_size
        yield first
        while pending is not None:
            state, tokens, done = pending
            pending = None
            if steps_left > 0:  # queued before this chunk is read back
                pending, steps_left = self._run_chunk(state), steps_left - self._chunk_size
            tokens = sharding.to_host(tokens)
            self.decode_steps += int(np.sum(np.any(tokens != PAD_TOKEN, axis=0)))
            yield tokens
            if pending is not None and bool(done):
                state, pending = pending[0], None  # every row stopped: a spare, not read
        self.decode_s = time.perf_counter() - t1
        self.state = state


class TokenStream:
    """Iterating yields, per chunk, each row's new tokens (a list per row, empty once the
    row has stopped); afterwards ``generation`` holds the whole ``Generation``."""

    def __init__(self, model: Model, req: _Request, chunks: _Chunks, cache_bytes: int):
        self._model, self._req, self._chunks, self._cache_bytes = model, req, chunks, cache_bytes
        self.generation: Generation | None = None

    def __iter__(self):
        batch = self._req.batch
        tokens: list[list[int]] = [[] for _ in range(batch)]
        finished = [False] * batch
        stops = set(self._req.controls["stop_tokens"].tolist()) - {PAD_TOKEN}
        limits = self._req.controls["max_new_tokens"]  # [rows]
        for block in self._chunks:
            delta: list[list[int]] = []
            for row in range(batch):
                new = [] if finished[row] else [int(t) for t in block[row] if t != PAD_TOKEN]
                new = new[:int(limits[row]) - len(tokens[row])]
                for i, t in enumerate(new):
                    if t in stops:
                        new, finished[row] = new[:i + 1], True
                        break
                tokens[row].extend(new)
                delta.append(new)
            yield delta
        c = self._chunks
        stats = _stats(self._req, tokens, c.compile_s, c.prefill_s + c.decode_s, c.prefill_s,
                       c.decode_steps, self._cache_bytes)
        self.generation = Generation(tokens=tokens, texts=_texts(self._model, tokens), stats=stats)


def generate_stream(model: Model, prompts: Prompts, *,
                    chunk_size: int = 16, max_new_tokens: int = 64,
                    temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None,
                    min_p: float | None = None, seed: int = 0,
                    stop_tokens: Sequence[int] | None = None, capacity: int | None = None,
                    use_cache: bool = True) -> TokenStream:
    """Like ``generate`` but yields new tokens as they are made, ``chunk_size`` steps at a time.

    Two compiled programs (the prefill and a chunk of ``chunk_size`` decode steps) serve
    the whole run, so nothing recompiles per token; the tokens are exactly those of
    ``generate`` with the same arguments. Validation happens here, before compiling.
    """
    if not is_count(chunk_size):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    req = _request(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, stop_tokens=stop_tokens,
                   capacity=capacity)
    cache = sharding.new_cache(model, req.rows, req.capacity, use_cache)
    cache_bytes = cache.nbytes
    chunks = _Chunks(model, use_cache, chunk_size, cache, req.prompt_tokens, req.prompt_lengths,
                     np.zeros((req.rows,), np.int32), req.controls, key_limit=req.key_limit,
                     fresh=True)
    return TokenStream(model, req, chunks, cache_bytes)


_COMPILED: dict = {}


def _compiled(jitted, args):
    """AOT-compiles ``jitted`` for the shapes, dtypes and shardings of ``args`` once; later
    calls only look up (the same shapes placed on another mesh compile anew)."""
    leaves, treedef = jax.tree.flatten(args)
    key = (jitted, treedef, tuple((np.shape(x), getattr(x, "dtype", None) or np.result_type(x),
                                   getattr(x, "sharding", None)) for x in leaves))
    if key not in _COMPILED:
        _COMPILED[key] = jitted.lower(*args).compile()
    return _COMPILED[key]
