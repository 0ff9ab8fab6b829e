"""A decode step's cache write and attention as one Pallas kernel (NVIDIA GPUs).

A decode step writes each row's new key and value into its layer's cache buffers and
attends its queries over the row's filled slots. Done by XLA and cuDNN, that is two
dynamic-update-slice kernels, cuDNN's attention, cuDNN's reduction of its splits and a
select; here it is one Pallas (Triton) kernel, and one XLA fusion that merges its parts
where a row's fill is split into several.

The kernel's grid is ``(batch, kv_heads, parts)``: each program takes the queries of
one KV head's group and one of ``parts`` equal parts of the row's filled slots (before
its position; a part is a whole number of ``BLOCK_SLOTS``, so at short fills the last
parts are empty), and computes flash-attention partials (a running maximum, sum and
weighted values, in float32) over it. The parts follow the fill, not the capacity: a
large cache that is little filled costs what its fill costs. The program of part 0
also adds the new token itself, from registers, and writes its key and value into the
cache (aliased in place: the buffers are the kernel's outputs). Rows whose position is
``-1`` (finished rows) read and write nothing and return zeros. With a single part a
row (large batches) the kernel normalises and writes the output itself.

``supported`` says where it runs; ``kvjax.attention.choose`` picks it there for decode
steps and the XLA/cuDNN path everywhere else (CPU, TPU, sliding windows, soft-capped
logits). With ``interpret=True`` the same kernel runs on any backend, slowly: that is
how the tests check it against the plain path on CPU.

The kernel is written with Pallas Triton, which JAX deprecated in 0.11 (to be
removed; JAX points to Mosaic GPU or jax_triton). Where it is gone, this module still
imports, ``available()`` is False and the portable path runs. A move to another
backend is this module alone: ``attend_and_write`` and ``supported`` are its interface,
and tests/test_decode_kernel.py checks it against the plain path.

XLA cannot split a custom call over a mesh (it would gather the whole cache to every
device first), so on a mesh the kernel runs under ``jax.shard_map``: each device
attends its own rows and heads over its own cache shard (``MeshSplit``). That needs
each device's query heads to read only KV heads the device holds, which
``kvjax.sharding.kernel_split`` checks.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import Mesh, PartitionSpec

from kvjax.attention.plain import MASKED, default_scale
from kvjax import platform

try:  # deprecated since JAX 0.11 and to be removed: kvjax must import without it
    from jax.experimental.pallas import triton as plgpu
except ImportError:
    plgpu = None
# Cache slots a program reads per loop iteration (H100, head_dim <= 128: 64 beat 32 at
# every measured shape). head_dim 256 reads half as many: two pipeline stages of 64-slot
# K and V blocks would need 128 KiB of shared memory, more than GPUs of compute
# capability 8.6/8.9 have (about 100 KiB); 32-slot blocks need 64 KiB.
BLOCK_SLOTS = 64
# Triton launch settings of each program (H100: measured against 8 warps and 3 stages).
NUM_WARPS, NUM_STAGES = 4, 2
# Programs the grid aims at: about two per SM of an H100 (132). 512 was slower at 2k
# fills, parts of at least two blocks slower at short fills (docs/experiments.md).
TARGET_PROGRAMS = 256


def available() -> bool:
    """Whether this JAX still has the Pallas Triton backend the kernel is written in
    (compiled on GPUs or interpreted anywhere)."""
    return plgpu is not None


def fits(head_dim: int, dtype, sliding_window: int | None = None,
         logit_softcap: float | None = None) -> bool:
    """Whether the compiled kernel handles these shapes: a 16-bit float cache, a
    power-of-two head dimension from 16 to 256, no sliding window and no logit soft-cap
    (interpreted, it takes any dtype and head dimension)."""
    if sliding_window is not None or logit_softcap is not None:
        return False
    if np.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    return 16 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def supported(head_dim: int, dtype, sliding_window: int | None = None,
              logit_softcap: float | None = None) -> bool:
    """Whether the kernel runs compiled here: ``fits`` these shapes, a CUDA GPU of
    compute capability 8.0 or newer, and a JAX with Pallas Triton (on such a GPU
    without it, one warning says the portable path runs instead)."""
    if not (fits(head_dim, dtype, sliding_window, logit_softcap) and platform.is_cuda_gpu((8, 0))):
        return False
    if not available():
        _warn_missing_triton()
        return False
    return True


@functools.cache
def _warn_missing_triton() -> None:
    warnings.warn("this JAX has no Pallas Triton backend (jax.experimental.pallas.triton), "
                  "so kvjax's decode kernel is off: decode steps run XLA/cuDNN attention, "
                  "a few percent slower on GPUs", RuntimeWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class MeshSplit:
    """How a mesh splits the kernel's operands, each field a ``PartitionSpec`` entry (a
    mesh axis, a tuple of them, or None): ``rows`` the batch, ``heads`` the query heads,
    ``kv_heads`` the new keys/values and the cache buffers. ``attend_and_write`` then runs
    the kernel on each device's shard (``kvjax.sharding.kernel_split`` makes one)."""

    mesh: Mesh
    rows: str | tuple[str, ...] | None
    heads: str | tuple[str, ...] | None
    kv_heads: str | tuple[str, ...] | None


def block_slots(head_dim: int) -> int:
    """Cache slots a program reads per loop iteration: ``BLOCK_SLOTS``, half as many for
    head_dim 256 (shared memory; see ``BLOCK_SLOTS``)."""
    return BLOCK_SLOTS if head_dim <= 128 else BLOCK_SLOTS // 2


def part_count(batch: int, kv_heads: int, capacity: int, head_dim: int) -> int:
    """Parts each row's filled slots are split into: about ``TARGET_PROGRAMS`` programs
    in all, at least one part, at most one per block of the capacity."""
    most = -(-capacity // block_slots(head_dim))
    return max(1, min(TARGET_PROGRAMS // (batch * kv_heads), most))


def _kernel(positions_ref, queries_ref, new_key_ref, new_value_ref, keys_ref, values_ref,
            *out_refs, scale: float, parts: int, group: int, slots: int):
    """One (row, KV head, part) program; refs as laid out by ``attend_and_write``. The
    outputs are ``(out, max, sum, keys, values)``: a part's flash partials, or, with a
    single part, ``(out, keys, values)``: the attention output itself. ``slots``: cache
    slots per loop iteration (``block_slots``)."""
    if parts == 1:
        out_ref, keys_out_ref, values_out_ref = out_refs
    else:
        out_ref, max_ref, sum_ref, keys_out_ref, values_out_ref = out_refs
    row, head, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    padded_group, head_dim = queries_ref.shape
    position = positions_ref[row]
    real = jnp.arange(padded_group) < group  # the group's heads; the rest is padding
    queries = plgpu.load(queries_ref, mask=real[:, None], other=0.)  # [padded_group, head_dim]
    per_part = pl.cdiv(pl.cdiv(position, parts), slots) * slots
    first = part * per_part
    end = jnp.minimum(first + per_part, position)  # this part's slots before the new one
    slot = jnp.arange(slots)

    def block(i, carry):
        out, top, total = carry
        start = first + i * slots
        filled = (start + slot) < end  # [slots]
        window = (row, head, pl.ds(start, slots), slice(None))
        keys = plgpu.load(keys_ref.at[window], mask=filled[:, None], other=0.)
        scores = plgpu.dot(queries, keys.T) * scale  # [padded_group, slots] float32
        scores = jnp.where(filled[None, :], scores, MASKED)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(scores - new_top[:, None])
        values = plgpu.load(values_ref.at[window], mask=filled[:, None], other=0.)
        out = out * rescale[:, None] + plgpu.dot(weights.astype(values.dtype), values)
        return out, new_top, total * rescale + weights.sum(axis=-1)

    carry = (jnp.zeros((padded_group, head_dim), jnp.float32),
             jnp.full((padded_group,), MASKED, jnp.float32),
             jnp.zeros((padded_group,), jnp.float32))
    blocks = jnp.maximum(pl.cdiv(end - first, slots), 0)
    out, top, total = jax.lax.fori_loop(0, blocks, block, carry)

    # The new token: added (and written to the cache) by part 0 of an active row.
    owner = (part == 0) & (position >= 0)
    new_key = new_key_ref[...].astype(jnp.float32)  # [head_dim]
    new_value = new_value_ref[...].astype(jnp.float32)
    score = jnp.sum(queries.astype(jnp.float32) * new_key[None, :], axis=-1) * scale
    score = jnp.where(owner, score, MASKED)  # [padded_group]
    new_top = jnp.maximum(top, score)
    rescale = jnp.exp(top - new_top)
    weight = jnp.where(owner, jnp.exp(score - new_top), 0.)
    out = out * rescale[:, None] + weight[:, None] * new_value[None, :]
    total = total * rescale + weight
    # Only the group's rows are stored: the outputs hold no padding.
    if parts == 1:  # normalised here: no merge after the kernel
        out = out / jnp.maximum(total, 1e-30)[:, None]  # 0 for a row that takes no part
        plgpu.store(out_ref, out.astype(out_ref.dtype), mask=real[:, None])
    else:
        plgpu.store(out_ref, out, mask=real[:, None])
        plgpu.store(max_ref, new_top, mask=real)
        plgpu.store(sum_ref, total, mask=real)

    @pl.when(owner)
    def _write():
        at = (row, head, pl.ds(position, 1), slice(None))
        keys_out_ref[at] = new_key_ref[...][None, :].astype(keys_out_ref.dtype)
        values_out_ref[at] = new_value_ref[...][None, :].astype(values_out_ref.dtype)


def attend_and_write(queries: jax.Array, keys: jax.Array, values: jax.Array,
                     cache_keys: jax.Array, cache_values: jax.Array, positions: jax.Array,
                     scale: float | None = None, interpret: bool = False,
                     split: MeshSplit | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step of one layer: writes each row's new key/value at its position and
    attends its queries over the row's slots up to and including it.

    Args:
      queries: ``[batch, 1, heads, head_dim]``.
      keys, values: the new token's ``[batch, 1, kv_heads, head_dim]``.
      cache_keys, cache_values: ``[batch, kv_heads, capacity, head_dim]`` (consumed:
        updated in place where the caller donates them).
      positions: ``int32[batch, 1]``; ``-1``: the row takes no part (zeros out, no write).
      scale: multiplies the scores (default ``head_dim ** -0.5``).
      interpret: run the kernel in Pallas interpret mode (any backend; for tests).
      split: the operands' split over a mesh: each device runs the kernel on its shard.

    Returns:
      ``(out [batch, 1, heads, head_dim], cache_keys, cache_values)``, as
      ``kvjax.attention.attend_cache`` after ``KVCache.update`` would give them.
    """
    if not available():
        raise RuntimeError("kvjax's decode kernel needs JAX's Pallas Triton backend, which this "
                           "JAX lacks; run the XLA path (kvjax.attention.choose(..., "
                           "decode_kernel=False))")
    step = functools.partial(_attend_and_write, scale=scale, interpret=interpret)
    if split is None:
        return step(queries, keys, values, cache_keys, cache_values, positions)
    token = PartitionSpec(split.rows, None, split.heads, None)  # [batch, 1, heads, head_dim]
    new = PartitionSpec(split.rows, None, split.kv_heads, None)
    buffer = PartitionSpec(split.rows, split.kv_heads, None, None)
    return jax.shard_map(step, mesh=split.mesh,
                         in_specs=(token, new, new, buffer, buffer, PartitionSpec(split.rows)),
                         out_specs=(token, buffer, buffer), check_vma=False,
                         )(queries, keys, values, cache_keys, cache_values, positions)


def _attend_and_write(queries, keys, values, cache_keys, cache_values, positions, *,
                      scale: float | None, interpret: bool):
    """``attend_and_write`` on one device's operands."""
    batch, _, heads, head_dim = queries.shape
    _, kv_heads, capacity, _ = cache_keys.shape
    group = heads // kv_heads
    padded_group = max(16, 1 << (group - 1).bit_length())  # Triton's dot needs 16 rows
    parts = part_count(batch, kv_heads, capacity, head_dim)
    scale = default_scale(head_dim) if scale is None else scale
    kernel = functools.partial(_kernel, scale=scale, parts=parts, group=group,
                               slots=block_slots(head_dim))
    whole = pl.BlockSpec()  # the kernel indexes these itself
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda b, h, s: (b, h, 0))
    each_part = lambda *block: pl.BlockSpec((None, None, None, *block),
                                            lambda b, h, s: (b, h, s) + (0,) * len(block))
    partial_shape = lambda *shape: jax.ShapeDtypeStruct((batch, kv_heads, parts, *shape),
                                                        jnp.float32)
    caches = [jax.ShapeDtypeStruct(cache_keys.shape, cache_keys.dtype),
              jax.ShapeDtypeStruct(cache_values.shape, cache_values.dtype)]
    if parts == 1:  # the output itself, [batch, kv_heads, group, head_dim]
        out_specs = [pl.BlockSpec((None, None, padded_group, head_dim),
                                  lambda b, h, s: (b, h, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), queries.dtype)]
    else:  # flash partials of each part, merged below
        out_specs = [each_part(padded_group, head_dim), each_part(padded_group),
                     each_part(padded_group)]
        out_shape = [partial_shape(group, head_dim), partial_shape(group), partial_shape(group)]
    outputs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, parts),
        in_specs=[whole,
                  pl.BlockSpec((None, None, padded_group, head_dim), lambda b, h, s: (b, h, 0, 0)),
                  per_head(head_dim), per_head(head_dim), whole, whole],
        out_specs=out_specs + [whole, whole],
        out_shape=out_shape + caches,
        input_output_aliases={4: len(out_shape), 5: len(out_shape) + 1},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="kvjax_decode_attention",
    )(positions[:, 0], queries.reshape(batch, kv_heads, group, head_dim), keys[:, 0],
      values[:, 0], cache_keys, cache_values)
    *partials, cache_keys, cache_values = outputs
    if parts == 1:
        return partials[0].reshape(batch, 1, heads, head_dim), cache_keys, cache_values
    # Merge the parts: [batch, kv_heads, parts, group(, head_dim)] -> per head.
    out, top, total = partials
    weight = jnp.exp(top - top.max(axis=2, keepdims=True))
    total = (total * weight).sum(axis=2)  # 0 for a row that takes no part
    out = (out * weight[..., None]).sum(axis=2) / jnp.maximum(total, 1e-30)[..., None]
    return out.reshape(batch, 1, heads, head_dim).astype(queries.dtype), cache_keys, cache_values
