"""The "cache" of the recompute baseline (``use_cache=False``): token ids only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.base import advanced_lengths, tree_nbytes, write_rows


@struct.dataclass
class TokenHistory:
    """Every token so far, rerun whole at each step.

    Attributes:
      tokens: ``int32[batch, capacity]``, slot ``j`` holds the token at position ``j``.
      lengths: ``int32[batch]``, filled slots per row.
    """

    tokens: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, batch: int, capacity: int) -> "TokenHistory":
        return cls(tokens=jnp.zeros((batch, capacity), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)

    def logical_axes(self) -> "TokenHistory":
        return TokenHistory(tokens=("batch", "cache_seq"), lengths=("batch",))

    def update(self, tokens: jax.Array, positions: jax.Array) -> "TokenHistory":
        """Writes ``int32[batch, new]`` tokens at their positions (as ``KVCache.update``)."""
        return self.replace(tokens=write_rows(self.tokens, tokens, positions, seq_axis=1),
                            lengths=advanced_lengths(self.lengths, positions))
