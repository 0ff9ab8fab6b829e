"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p.

Sampling values are arrays (one per row), so new values reuse the compiled program; only
"greedy for every row" versus "sample" changes the program. Filters apply in the order
of Hugging Face transformers: temperature, then top-k, then top-p, then min-p, each on
the distribution the previous one left.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.config import is_count


@struct.dataclass
class SamplingParams:
    """Per-row sampling values (host numpy arrays or device arrays, one entry per row).

    Attributes:
      temperature: ``float32[batch]``; 0 means greedy for that row.
      top_k: ``int32[batch]``; 0 means no top-k filter.
      top_p: ``float32[batch]``; 1 means no top-p filter.
      min_p: ``float32[batch]``; 0 means no min-p filter.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array

    @classmethod
    def create(cls, batch: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, min_p: float | None = None) -> "SamplingParams":
        """Validates the values and broadcasts them to ``batch`` rows."""
        check_sampling_values(temperature, top_k, top_p, min_p)
        row = lambda value, dtype: np.full((batch,), value, dtype)
        return cls(temperature=row(temperature, np.float32),
                   top_k=row(0 if top_k is None else top_k, np.int32),
                   top_p=row(1.0 if top_p is None else top_p, np.float32),
                   min_p=row(0.0 if min_p is None else min_p, np.float32))

    @property
    def is_greedy(self) -> bool:
        """True when every row is greedy (host-side check, decides the compiled program)."""
        return bool(np.all(np.asarray(self.temperature) == 0))


def check_sampling_values(temperature: float, top_k: int | None, top_p: float | None,
                          min_p: float | None) -> None:
    """Raises ``ValueError`` naming the first out-of-range sampling value (NaN and
    infinity are out of every range)."""
    if not math.isfinite(temperature):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not is_count(top_k, 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None to disable), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p}")
    if min_p is not None and not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1) (or None to disable), got {min_p}")


def kept_tokens(scaled: jax.Array, params: SamplingParams) -> jax.Array:
    """The tokens top-k, top-p and min-p keep, in that order.

    Args:
      scaled: ``float32[batch, vocab]`` logits divided by the temperature.

    Returns:
      ``bool[batch, vocab]``: every token whose scaled logit reaches the smallest one a
      row keeps (tokens tied with it are kept too). The most likely token always is.
    """
    vocab = scaled.shape[-1]
    ranked = -jnp.sort(-scaled, axis=-1)  # [batch, vocab] descending
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
    top_k = jnp.where(params.top_k > 0, params.top_k, vocab)[:, None]
    ranked = jnp.where(rank < top_k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always stays (mass_before == 0 < top_p).
    ranked = jnp.where(mass_before < params.top_p[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    kept = (ranked > -jnp.inf) & (probs >= params.min_p[:, None] * probs[:, :1])  # a prefix
    smallest = jnp.take_along_axis(ranked, kept.sum(axis=-1, keepdims=True) - 1, axis=-1)
    return scaled >= smallest


def sample(logits: jax.Array, keys: jax.Array, params: SamplingParams,
           greedy: bool) -> jax.Array:
    """Next token of each row.

    A row draws from its logits over the temperature, the tokens its filters drop
    masked out, in vocabulary order: the filters' sort of the vocabulary
    (``kept_tokens``) runs only when some row filters, and a row's draw is the same
    either way, so it never depends on the other rows' values.

    Args:
      logits: ``float32[batch, vocab]``.
      keys: ``[batch]`` PRNG keys, one per row.
      params: per-row sampling values.
      greedy: static; True compiles argmax only (every row must have temperature 0).

    Returns:
      ``int32[batch]`` token ids.
    """
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]  # [batch, vocab]
    filters = (params.top_k > 0) | (params.top_p < 1) | (params.min_p > 0)  # [batch]
    masked = jax.lax.cond(jnp.any(filters),
                          lambda scaled, params: jnp.where(kept_tokens(scaled, params),
                                                           scaled, -jnp.inf),
                          lambda scaled, _: scaled, scaled, params)
    sampled = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(params.temperature > 0, sampled, argmax)
