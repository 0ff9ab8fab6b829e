"""The names ``kvjax.api`` held before it was split by job (kept as aliases for now):
``kvjax.loading`` (``load``, ``Model``), ``kvjax.requests`` (validation, buckets,
padding), ``kvjax.programs`` (the compiled programs), ``kvjax.generation``
(``generate``) and ``kvjax.streaming`` (``generate_stream``). Import from ``kvjax`` or
from those modules."""

from kvjax.generation import Generation, generate  # noqa: F401
from kvjax.loading import BUNDLED_MODEL, Model, default_dtype, load, resolve_checkpoint  # noqa: F401
from kvjax.programs import PREFILL_CHUNK, SYNC_EVERY  # noqa: F401
from kvjax.requests import (MAX_STOP_TOKENS, MIN_CAPACITY, MIN_PROMPT_BUCKET,  # noqa: F401
                            MIN_STEPS_BUCKET, Prompts, fresh_key_limit)
from kvjax.streaming import TokenStream, generate_stream  # noqa: F401
