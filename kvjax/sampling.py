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


def filtered_logits(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Applies temperature, top-k, top-p and min-p.

    Args:
      logits: ``float32[batch, vocab]``.

    Returns:
      ``(sorted_logits, order)``: ``float32[batch, vocab]`` logits in descending order
      with filtered-out entries at ``-inf``, and ``int32[batch, vocab]`` the token id
      of each sorted entry.
    """
    vocab = logits.shape[-1]
    temperature = jnp.maximum(params.temperature, 1e-6)[:, None]
    order = jnp.argsort(-logits, axis=-1).astype(jnp.int32)  # [batch, vocab]
    ranked = jnp.take_along_axis(logits, order, axis=-1) / temperature
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
    top_k = jnp.where(params.top_k > 0, params.top_k, vocab)[:, None]
    ranked = jnp.where(rank < top_k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always stays (mass_before == 0 < top_p).
    ranked = jnp.where(mass_before < params.top_p[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    ranked = jnp.where(probs >= params.min_p[:, None] * probs[:, :1], ranked, -jnp.inf)
    return ranked, order


def sample(logits: jax.Array, keys: jax.Array, params: SamplingParams,
           greedy: bool) -> jax.Array:
    """Next token of each row.

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
    ranked, order = filtered_logits(logits, params)
    choice = jax.vmap(jax.random.categorical)(keys, ranked)  # [batch], index into `order`
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(params.temperature > 0, sampled, argmax)
