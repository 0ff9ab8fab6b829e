"""kvjax: fast, memory-aware autoregressive decoding with a KV cache in JAX.

Public API::

    model = kvjax.load("path/or/org-name", dtype="bfloat16")  # or kvjax.BUNDLED_MODEL
    out = kvjax.generate(model, ["Hello"], max_new_tokens=32)
    out.tokens, out.texts, out.stats

and, for your own model, ``kvjax.jit_decode(step_fn, num_steps=..., greedy=...)``.
``kvjax.sharding`` spreads a generation over a device mesh; ``kvjax.compilation_cache``
keeps compiled programs on disk for later processes.
"""

from kvjax import compilation_cache, sharding
from kvjax.api import BUNDLED_MODEL, Generation, Model, TokenStream, generate, generate_stream, load
from kvjax.chat import ChatSession
from kvjax.cache import KVCache, TokenHistory
from kvjax.checkpoint import CheckpointError
from kvjax.config import ConfigError, ModelConfig, RopeScaling
from kvjax.decode import PAD_TOKEN, DecodeResult, decode, jit_decode
from kvjax.model import forward, init_params
from kvjax.sampling import SamplingParams, sample

__all__ = [
    "BUNDLED_MODEL", "ChatSession", "CheckpointError", "ConfigError", "DecodeResult", "Generation", "KVCache", "Model",
    "ModelConfig", "PAD_TOKEN", "RopeScaling", "SamplingParams", "TokenHistory", "decode",
    "TokenStream", "forward", "generate", "generate_stream", "init_params", "jit_decode", "load",
    "sample",
]
