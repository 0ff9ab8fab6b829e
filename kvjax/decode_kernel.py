"""The name ``kvjax.kernels.decode_attention`` had before the kernels got their package
(kept as an alias for now; docs/architecture.md, "Renamed")."""

from kvjax.kernels.decode_attention import (BLOCK_SLOTS, NUM_STAGES, NUM_WARPS,  # noqa: F401
                                            TARGET_PROGRAMS, MeshSplit, attend_and_write,
                                            available, block_slots, fits, part_count, supported)
