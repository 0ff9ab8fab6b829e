"""Hand-written accelerator kernels, each behind a small interface with a portable
fallback chosen by ``kvjax.attention.choose``.

``decode_attention``: a decode step's cache write and attention as one Pallas (Triton)
kernel on NVIDIA GPUs (``attend_and_write``, ``supported``, ``MeshSplit``).
"""
