"""Loading a model: a checkpoint directory or Hub id -> ``Model`` (config, params,
tokenizer, stop tokens and sampling defaults)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from kvjax import orbax_store, sharding
from kvjax.checkpoint import DTYPES, load_params
from kvjax.config import ConfigError, ModelConfig, read_json
from kvjax.sampling import check_sampling_values
from kvjax.tokenizer import Tokenizer

# The small English model shipped inside the package (docs/bundled_model.md).
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "kvjax-tiny")


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


# The files of a Hub checkpoint besides its weights: config, tokenizer, generation config.
HUB_FILES = ["*.json", "tokenizer.model"]


def resolve_checkpoint(path_or_hub_id: str, weights: bool = True) -> str:
    """The local directory of a checkpoint: ``path_or_hub_id`` itself when it is a
    directory (which must hold ``config.json``), else the Hub snapshot it names,
    downloaded (or found in the ``HF_HOME`` cache) with ``huggingface_hub``; without
    ``weights``, only its small files (``HUB_FILES``: what a dry run reads)."""
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
            path, allow_patterns=HUB_FILES + (["*.safetensors"] if weights else []))
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
        generation = read_json(path)
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

