"""What the devices are: the one place that says "this is a CUDA GPU of compute
capability X" (the fused attention and the Pallas kernels need one)."""

from __future__ import annotations

import jax


def cuda_capability() -> tuple[int, int] | None:
    """The compute capability of JAX's default GPU when it is an NVIDIA (CUDA) device,
    e.g. ``(9, 0)`` for an H100/H200; None on CPU, TPU and ROCm GPUs."""
    if jax.default_backend() != "gpu":
        return None
    device = jax.devices()[0]
    if "cuda" not in device.client.platform_version:
        return None
    major, minor = device.compute_capability.split(".")[:2]
    return int(major), int(minor)


def is_cuda_gpu(min_capability: tuple[int, int] = (8, 0)) -> bool:
    """Whether JAX's default device is a CUDA GPU of at least ``min_capability``
    (8.0, Ampere, by default: what Triton and cuDNN's flash attention need)."""
    capability = cuda_capability()
    return capability is not None and capability >= min_capability
