"""The host side of the paged KV cache: which pool blocks each row's table lists, which
cached prefixes rows share, and which cached blocks give way under the budget
(``blocks``: ``BlockManager``)."""

from kvjax.paged.blocks import POLICIES, Allocation, BlockManager, PoolExhausted, check_block_size

__all__ = ["Allocation", "BlockManager", "POLICIES", "PoolExhausted", "check_block_size"]
