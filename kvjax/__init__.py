"""kvjax: fast, memory-aware autoregressive decoding with a KV cache in JAX.

Public API::

    model = kvjax.load("path/or/org-name", dtype="bfloat16")  # or kvjax.BUNDLED_MODEL
    out = kvjax.generate(model, ["Hello"], max_new_tokens=32)
    out.tokens, out.texts, out.stats

and, for your own model, ``kvjax.jit_decode(step_fn, num_steps=..., greedy=...)``.
``kvjax.programs`` builds the compiled programs ``generate`` runs (for benchmarks and
your own loops); ``kvjax.sharding`` spreads a generation over a device mesh;
``kvjax.compilation_cache`` keeps compiled programs on disk for later processes;
``kvjax.PrefixCache`` (``kvjax.paged``) keeps computed prefixes in a paged pool for
later requests.
docs/architecture.md maps the modules.
"""

from kvjax import compilation_cache, programs, sharding
from kvjax.cache import KVCache, TokenHistory
from kvjax.chat import CapacityError, ChatSession
from kvjax.checkpoint import CheckpointError
from kvjax.config import ConfigError, ModelConfig, RopeScaling
from kvjax.decode import PAD_TOKEN, DecodeResult, decode, jit_decode
from kvjax.generation import Generation, generate
from kvjax.loading import BUNDLED_MODEL, Model, load
from kvjax.model import forward
from kvjax.paged.prefix import PrefixCache
from kvjax.params import init_params
from kvjax.sampling import SamplingParams, sample
from kvjax.streaming import TokenStream, generate_stream

__all__ = [
    "BUNDLED_MODEL", "CapacityError", "ChatSession", "CheckpointError", "ConfigError",
    "DecodeResult", "Generation", "KVCache", "Model", "ModelConfig", "PAD_TOKEN", "PrefixCache",
    "RopeScaling",
    "SamplingParams", "TokenHistory", "TokenStream", "decode", "forward", "generate",
    "generate_stream", "init_params", "jit_decode", "load", "sample",
]
