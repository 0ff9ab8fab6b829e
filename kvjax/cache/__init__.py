"""KV caches: immutable pytrees of fixed-capacity buffers, one module per kind.

* ``base``: the ``Cache`` interface every kind implements, and shared writes.
* ``contiguous``: ``KVCache``, per-layer ``[batch, kv_heads, capacity, head_dim]`` K/V
  buffers (the default).
* ``history``: ``TokenHistory``, the token ids of the recompute baseline.
"""

from kvjax.cache.base import Cache, LogicalAxes, advanced_lengths, is_axes, tree_nbytes, write_rows
from kvjax.cache.contiguous import BUFFER_AXES, CACHE_DTYPES, KVCache, write_block
from kvjax.cache.history import TokenHistory

__all__ = ["BUFFER_AXES", "CACHE_DTYPES", "Cache", "KVCache", "LogicalAxes", "TokenHistory",
           "advanced_lengths", "is_axes", "tree_nbytes", "write_block", "write_rows"]
