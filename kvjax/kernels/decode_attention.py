"""A decode step's cache write and attention as one Pallas kernel (NVIDIA GPUs).

A decode step writes each row's new key and value into its layer's cache buffers and
attends its queries over the row's filled slots. Done by XLA and cuDNN, that is two
dynamic-update-slice kernels, cuDNN's attention, cuDNN's reduction of its splits and a
select; here it is one Pallas (Triton) kernel, and one XLA fusion that merges its parts
where a row's fill is split into several.

The kernel's grid is ``(batch, kv_heads, parts)``: each program takes the queries of one
KV head's group and one of ``parts`` equal parts of the row's filled slots (before its
position; a part is a whole number of ``BLOCK_SLOTS``, so at short fills the last parts
are empty), and computes flash-attention partials (a running maximum, sum and weighted
values, in float32) over it. The parts follow the fill, not the capacity: a large cache
that is little filled costs what its fill costs. Over a paged pool a part's blocks that
lie wholly before its end are read without masks (their table entries too), and only its
last, partly filled block with them: on an H100 that made int8 decode steps at batch 8
and 16k 4% faster and left bf16's unchanged, while over a contiguous cache it was no
faster (docs/experiments.md, 2026-12-07). The program of part 0 also adds the new token
itself, from registers, and writes its key and value into the cache (aliased in place:
the buffers are the kernel's outputs). Rows whose position is ``-1`` (finished rows)
read and write nothing and return zeros. With a single part a row (large batches) the
kernel normalises and writes the output itself.

The same kernel reads an int8 or fp8 cache (``kvjax.cache.QuantizedKVCache``;
``attend_and_write_quantized``), a static flag: a decode step is bound by reading the
cache, and codes are half the bytes of bf16. int8 key codes enter the scores as they
are: each query row is quantized once, as a key is (int8 codes and a float32 scale), and
the scores are int8 products summed in int32 on the tensor cores
(``kvjax.attention.blockwise.int8_scores``), so no key code takes a conversion. Value
codes, and e4m3 keys, are converted to the queries' dtype in registers, e4m3 codes to
float16 (the GPU converts those in one instruction for two; int8's -127..127 and every
e4m3 value are exact in bf16 and f16). The float32 scales of a block's tokens multiply
the scores and the probabilities (a token's scale factors out of its dot products, as
in ``kvjax.attention.quantized``). Part 0 quantizes the new token itself, by
``kvjax.cache.quantize``: its ``1 / scale`` is the GPU division XLA's is, and it rounds
half to even by ``cvt.rni``, so it writes the codes and scales XLA would (done by XLA
before the kernel, those few elements took small fusions: an H100's step at batch 8
over 16k tokens is 1.4-1.7% faster without them); the token attends as its codes will
be read back and part 0 writes its codes and scales in place, so the step equals
``write_quantized_block`` followed by ``kvjax.attention.quantized.attend_cache``.

``attend_cached_block`` (``attend_cached_block_paged`` over a paged layer) runs the same
loop for a block of several tokens a row already in the cache (a chat turn over
int8/fp8 codes, which cuDNN cannot read): 64 query rows (tokens times a KV head's group)
a program, each seeing the slots up to its own position, no writes.

``supported`` says where it runs; ``kvjax.attention.choose`` picks it there for decode
steps (and blocks over codes that ``block_takes``) and the XLA/cuDNN path everywhere
else (CPU, TPU, sliding windows, soft-capped logits). With ``interpret=True`` the same
kernel runs on any backend, slowly: that is how the tests check it against the plain
path on CPU.

The kernel is written with Pallas Triton, which JAX deprecated in 0.11 (to be
removed; JAX points to Mosaic GPU or jax_triton). Where it is gone, this module still
imports, ``available()`` is False and the portable path runs. A move to another
backend is this module alone: ``attend_and_write``, ``attend_and_write_quantized``,
``attend_and_write_paged``, ``attend_cached_block``, ``attend_cached_block_paged`` and
``supported`` are its interface, and
tests/test_decode_kernel.py checks it against the plain path.

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
from kvjax.cache.quantized import QUANTIZED, layer_kv_dtype, quantize, quantize_block
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
# Query rows (a block's tokens times a KV head's group) one program of
# ``attend_cached_block`` takes; a block with more takes several programs a head, each
# reading the cache up to its tile's last position. ``block_takes`` leaves blocks of
# more than BLOCK_TILES tiles to the portable path. On an H100 the block's attention
# over int8/fp8 codes took 2.0-4.3x less time than the portable path's at every size
# measured, up to 128 tokens (8 tiles at group 4; batches 1, 8 and 32 over 2k-32k), and
# tiles of 128 rows were slower from 32 tokens on. docs/benchmarks.md.
BLOCK_ROWS, BLOCK_TILES = 64, 8
# The cache's buffers the kernel reads and writes, by whether the cache is quantized
# (in the order of ``Cache.layer``).
CACHE_BUFFERS = {False: ("keys", "values"),
                 True: ("keys", "values", "key_scales", "value_scales")}
# Triton converts float8_e4m3fn natively from compute capability 8.9 (Ada, Hopper) on.
FP8_CAPABILITY = (8, 9)


def available() -> bool:
    """Whether this JAX still has the Pallas Triton backend the kernel is written in
    (compiled on GPUs or interpreted anywhere)."""
    return plgpu is not None


def fits(head_dim: int, dtype, sliding_window: int | None = None,
         logit_softcap: float | None = None, kv_dtype: str | None = None) -> bool:
    """Whether the compiled kernel handles these shapes: 16-bit float queries (``dtype``)
    over a cache of the same dtype or of int8/fp8 codes (``kv_dtype``, as in
    ``kvjax.cache.KV_DTYPES``; None: ``dtype``), a power-of-two head dimension from 16
    to 256, no sliding window and no logit soft-cap (interpreted, it takes any float
    dtype and head dimension)."""
    if sliding_window is not None or logit_softcap is not None:
        return False
    if np.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    if kv_dtype not in (None, *QUANTIZED) and np.dtype(kv_dtype) != np.dtype(dtype):
        return False
    return 16 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def supported(head_dim: int, dtype, sliding_window: int | None = None,
              logit_softcap: float | None = None, kv_dtype: str | None = None) -> bool:
    """Whether the kernel runs compiled here: ``fits`` these shapes, a CUDA GPU of
    compute capability 8.0 or newer (8.9 for an fp8 cache: ``FP8_CAPABILITY``), and a
    JAX with Pallas Triton (on such a GPU without it, one warning says the portable path
    runs instead)."""
    capability = FP8_CAPABILITY if kv_dtype == "fp8" else (8, 0)
    if not (fits(head_dim, dtype, sliding_window, logit_softcap, kv_dtype)
            and platform.is_cuda_gpu(capability)):
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
    ``kv_heads`` the new keys/values and the cache buffers (a quantized cache's scales
    too). ``attend_and_write`` then runs the kernel on each device's shard
    (``kvjax.sharding.kernel_split`` makes one)."""

    mesh: Mesh
    rows: str | tuple[str, ...] | None
    heads: str | tuple[str, ...] | None
    kv_heads: str | tuple[str, ...] | None

    def splits_rows(self) -> bool:
        """Whether the rows are split over more than one device."""
        axes = self.rows if isinstance(self.rows, tuple) else (self.rows,)
        return int(np.prod([self.mesh.shape[a] for a in axes if a is not None])) > 1


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The kernel's launch settings: cache slots a program reads per loop iteration (halved
    for head_dim 256: ``block_slots``), Triton's warps and pipeline stages per program,
    the programs the grid aims at (``part_count``), and, for int8/fp8 codes,
    ``codes_as_float16``: run the dots over converted codes in float16 (16-bit queries
    converted once; int8 keys are never converted: their scores are int8 products), int8
    codes turned into float16 by integer arithmetic (``_int8_as_float16``, four codes a
    register in PTX) and e4m3 codes by the GPU's fp8-to-f16 conversion, instead of
    converting every code to the queries' dtype (e4m3 to bf16: through float32). float16
    holds every int8 and e4m3 code exactly, and the probabilities enter the second dot
    as fractions of their block's largest value scale; queries beyond float16's range
    (65504) would overflow. ``default_tuning`` sets it for fp8 (``FLOAT16_CODES``).
    ``query_rows``: the query rows (tokens times a KV head's group) a program of
    ``attend_cached_block`` takes at most, a power of two from 16.
    """

    block_slots: int = BLOCK_SLOTS
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    target_programs: int = TARGET_PROGRAMS
    codes_as_float16: bool = False
    query_rows: int = BLOCK_ROWS


# Rows of at least LONG_ROWS slots (head_dim <= 128) read 128-slot blocks through three
# pipeline stages, with twice the programs. On an H200 (one layer of Llama-3.1-8B, batch 8
# at 16k and 32k filled) that read a bf16 cache 9% faster, a paged one 23% and 20%,
# int8 codes 22% and 26%; at batch 32 and 2k filled it was 18% slower over bf16, but 16%
# (int8) and 6% (fp8) faster over codes, so int8/fp8 caches take it at every length (at
# batch 1 and 2k both settings were within the noise of a 20-30 us kernel).
# benchmarks/results/kernel_sweep_h200.json, docs/benchmarks.md.
LONG_ROWS = 8192
DEEP_TUNING = Tuning(block_slots=128, num_warps=4, num_stages=3, target_programs=512)
# Codes whose dots run in float16 by default (``Tuning.codes_as_float16``). Triton
# converts e4m3 to bf16 through float32, but to float16 in one instruction for two codes:
# on an H100 (one layer of Llama-3.1-8B, batch 8) that took fp8's kernel from 150.2 to
# 134.2 us at 16k filled and from 264.9 to 227.1 us at 32k, near int8's 129.1 and 229.4.
# int8 codes lost by it (149.2 and 241.7 us) while converted by integer arithmetic in
# JAX. Converted in PTX (``INT8_AS_FLOAT16_PTX``), on an H200: 106.1 against 134.4 us at
# batch 8 and 16k (whole steps 7.309 and 7.289 ms against 7.396 and 7.391, alternated),
# but 82.3 against 77.7 us at batch 32 and 2k, and over a paged pool 118.9 against 107.5
# there and 162.9 against 156.9 at batch 8 and 16k: int8 keeps its bf16 products.
# benchmarks/results/kernel_int8_ptx_h200_points.json, docs/experiments.md. Since int8
# keys are scored by int8 products, float16 covers int8's values only; on an H100 that
# was slower (129.9 against 121.7 us at batch 8 and 16k; int8_scores_h100_kernel.json).
FLOAT16_CODES = ("fp8",)


def default_tuning(kv_dtype: str, capacity: int, head_dim: int) -> Tuning:
    """The measured settings for a cache of ``capacity`` slots a row holding
    ``kv_dtype`` (``layer_kv_dtype``'s name: ``"int8"``, ``"fp8"`` or a float dtype's):
    ``DEEP_TUNING`` or ``Tuning()``, with ``codes_as_float16`` for fp8. Three stages of
    128-slot blocks at head_dim 256 would take more shared memory than GPUs before
    Hopper have: those keep the defaults."""
    quantized = kv_dtype in QUANTIZED
    deep = head_dim <= 128 and (quantized or capacity >= LONG_ROWS)
    return dataclasses.replace(DEEP_TUNING if deep else Tuning(),
                               codes_as_float16=kv_dtype in FLOAT16_CODES)


def block_slots(head_dim: int, tuning: Tuning | None = None) -> int:
    """Cache slots a program reads per loop iteration: ``tuning.block_slots``, half as
    many for head_dim 256 (shared memory; see ``BLOCK_SLOTS``)."""
    slots = (tuning or Tuning()).block_slots
    return slots if head_dim <= 128 else slots // 2


def part_count(batch: int, kv_heads: int, capacity: int, head_dim: int,
               tuning: Tuning | None = None) -> int:
    """Parts each row's filled slots are split into: about ``tuning.target_programs``
    programs in all, at least one part, at most one per block of the capacity."""
    tuning = tuning or Tuning()
    most = -(-capacity // block_slots(head_dim, tuning))
    return max(1, min(tuning.target_programs // (batch * kv_heads), most))


# int8 codes to float16, four a 32-bit register (Triton packs four int8 into ``$2`` and
# takes two float16 pairs back in ``$0``, ``$1``): XOR 0x80 makes each byte ``x + 128``
# unsigned, ``prmt`` sets it under the high byte 0x64 (float16 ``1024 + x + 128``: 1024's
# last mantissa bit is worth 1) and one ``sub.f16x2`` a pair takes 1152 (0x6480) off,
# leaving ``x`` exactly: five integer and half-precision instructions for four codes
# (besides the two constants' moves). (Triton's own int8-to-bf16 conversion is integer
# and bf16 arithmetic too, as the triton package compiles it: docs/experiments.md.)
INT8_AS_FLOAT16_PTX = """{
.reg .b32 biased, high, offset;
xor.b32 biased, $2, 0x80808080;
mov.b32 high, 0x64646464;
mov.b32 offset, 0x64806480;
prmt.b32 $0, biased, high, 0x5140;
prmt.b32 $1, biased, high, 0x5342;
sub.f16x2 $0, $0, offset;
sub.f16x2 $1, $1, offset;
}"""


def _int8_as_float16(codes: jax.Array, interpret: bool) -> jax.Array:
    """int8 codes as float16, exactly, without int-to-float conversions: ``x + 128`` in
    [0, 255] put into the bits of 1024.0 (``0x6400``, whose last mantissa bit is worth 1)
    is the float16 ``1024 + x + 128``; subtracting 1152 leaves ``x``. Compiled, four codes
    at a time in PTX (``INT8_AS_FLOAT16_PTX``); interpreted, the same arithmetic in JAX."""
    if interpret:
        bits = (codes.astype(jnp.int16) + 128) | 0x6400
        return jax.lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1152)
    return plgpu.elementwise_inline_asm(
        INT8_AS_FLOAT16_PTX, args=[codes], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.float16)])[0]


def _kernel(positions_ref, *refs, scale: float, parts: int, group: int, slots: int,
            quantized: bool, block_size: int | None, codes_as_float16: bool,
            interpret: bool, tiles: int | None = None):
    """One (row, KV head, part) program; refs as laid out by ``_attend_and_write``. After
    the positions come a paged cache's block tables (``block_size`` not None), the
    queries, the new token's key and value (full precision), then the cache's buffers,
    then the outputs: a part's flash partials ``(out, max, sum)`` or, with a single part,
    ``(out,)``: the attention output itself, and the cache's buffers again (aliased).
    The buffers are ``(key, value)``, and for a ``quantized`` cache
    ``(key codes, value codes, key scale, value scale)``: int8 keys are scored by int8
    products with the queries quantized a row, other codes converted to the queries'
    dtype in registers (exact for int8 and e4m3 in bf16/f16), and the float32 scales
    multiply the scores and the probabilities, so no dequantized block is ever stored
    (with ``codes_as_float16`` the converted codes' dots run in float16: ``Tuning``).
    ``slots``:
    cache slots per loop iteration (``block_slots``). A contiguous
    cache's buffers are ``[batch, kv_heads, capacity(, head_dim)]``; a paged one's
    ``[kv_heads, num_blocks, block_size(, head_dim)]``, position ``p`` of a row in its
    table's block ``p // block_size``, slot ``p % block_size``.

    With ``tiles`` (``attend_cached_block``) the program attends a tile of a block of tokens
    already in the cache instead (no new entries among the refs): its second grid index is
    ``head * tiles + tile``, ``positions_ref`` holds the positions of every tile's query
    rows (``[batch, tiles * rows]``, -1: padding), the parts split the slots up to the
    tile's last position, each query row sees the slots up to its own, and nothing is
    written."""
    tables_ref = refs[0] if block_size else None
    queries_ref, *refs = refs[1:] if block_size else refs
    count = len(CACHE_BUFFERS[quantized])
    if tiles is None:
        new_refs, cache_refs, out_refs = refs[:2], refs[2:2 + count], refs[2 + count:]
        partial_refs, written_refs = out_refs[:-count], out_refs[-count:]
    else:
        cache_refs, partial_refs = refs[:count], refs[count:]
    keys_ref, values_ref = cache_refs[:2]
    row, head, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    padded_group, head_dim = queries_ref.shape
    real = jnp.arange(padded_group) < group  # the group's heads; the rest is padding
    if tiles is None:
        position = positions_ref[row]
    else:  # [rows] positions of this tile's query rows; its slots: up to the last one
        head, tile = head // tiles, head % tiles
        query_positions = positions_ref[row, pl.ds(tile * padded_group, padded_group)]
        position = query_positions.max() + 1
    queries = plgpu.load(queries_ref, mask=real[:, None], other=0.)  # [padded_group, head_dim]
    if not quantized:  # the dtype of the two dots
        operands = keys_ref.dtype
    elif codes_as_float16 and queries.dtype.itemsize == 2:  # float32 queries keep theirs
        operands = jnp.float16
    else:
        operands = queries.dtype
    dot_queries = queries.astype(operands)
    arithmetic = {} if interpret else dict(round_even=_round_even)
    int8_keys = quantized and keys_ref.dtype == jnp.int8
    if int8_keys:  # the scores are int8 products (kvjax.attention.blockwise.int8_scores):
        # codes [padded_group, head_dim], scales [padded_group]
        query_codes, query_scales = quantize(queries, "int8", **arithmetic)

    def as_operands(codes):  # a block of the cache, [slots, head_dim]
        if codes.dtype == jnp.int8 and operands == jnp.float16:
            return _int8_as_float16(codes, interpret)
        return codes.astype(operands)

    per_part = pl.cdiv(pl.cdiv(position, parts), slots) * slots
    first = part * per_part
    end = jnp.minimum(first + per_part, position)  # this part's slots before the new one
    slot = jnp.arange(slots)

    def where(start, filled):  # the buffers' index of slots start ... start + slots
        if block_size is None:
            return row, head, pl.ds(start, slots)
        held = start + slot  # [slots] positions
        blocks = plgpu.load(tables_ref.at[row, held // block_size], mask=filled,
                            other=None if filled is None else 0)
        return head, blocks, held % block_size

    def block(i, carry, masked: bool):  # unmasked: every slot of the block is filled
        out, top, total = carry
        start = first + i * slots
        filled = (start + slot) < end if masked else None  # [slots]
        index = where(start, filled)

        def load(ref):  # the block of a buffer: [slots(, head_dim)], 0 past the fill
            zero = 0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.
            other = None if filled is None else zero
            if ref.ndim == 3:  # scales
                return plgpu.load(ref.at[index], mask=filled, other=other)
            if block_size is None:
                at = index + (slice(None),)
            else:  # gathered slots: every index an array, [slots, head_dim] together
                at = (index[0], index[1][:, None], index[2][:, None],
                      jnp.arange(head_dim)[None, :])
            return plgpu.load(ref.at[at], mask=None if filled is None else filled[:, None],
                              other=other)

        if int8_keys:  # [padded_group, slots] float32
            scores = plgpu.dot(query_codes, load(keys_ref).T).astype(jnp.float32)
            scores = scores * query_scales[:, None]
        else:
            scores = plgpu.dot(dot_queries, as_operands(load(keys_ref)).T)
        if quantized:  # a key's scale factors out of its dot product
            scores = scores * (load(cache_refs[2]) * scale)[None, :]
        else:
            scores = scores * scale
        if masked:
            seen = filled[None, :]  # [padded_group or rows, slots]
            if tiles is not None:  # each query row up to its own position
                seen = seen & ((start + slot)[None, :] <= query_positions[:, None])
            scores = jnp.where(seen, scores, MASKED)
        new_top = jnp.maximum(top, scores.max(axis=-1))
        rescale = jnp.exp(top - new_top)
        weights = jnp.exp(scores - new_top[:, None])
        if tiles is not None:  # a row may see none of a block: nothing, not exp(0)
            weights = jnp.where(seen, weights, 0.)
        values = as_operands(load(values_ref))
        if not quantized:
            block_out = plgpu.dot(weights.astype(operands), values)
        elif operands != jnp.float16:
            # so does a value's: weighted by p * scale, its codes enter the dot as stored
            value_scales = load(cache_refs[3])  # [slots]
            block_out = plgpu.dot((weights * value_scales[None, :]).astype(operands), values)
        else:  # float16: p * scale can fall below its normal range (6.1e-5) and lose
            # digits, so each scale enters as a fraction of the block's largest
            value_scales = load(cache_refs[3])
            largest = jnp.maximum(value_scales.max(), jnp.finfo(jnp.float32).tiny)
            weighted = weights * (value_scales / largest)[None, :]
            block_out = plgpu.dot(weighted.astype(operands), values) * largest
        out = out * rescale[:, None] + block_out
        return out, new_top, total * rescale + weights.sum(axis=-1)

    carry = (jnp.zeros((padded_group, head_dim), jnp.float32),
             jnp.full((padded_group,), MASKED, jnp.float32),
             jnp.zeros((padded_group,), jnp.float32))
    blocks = jnp.maximum(pl.cdiv(end - first, slots), 0)
    full = 0  # over a pool: blocks wholly before ``end`` first, with no masks (module doc)
    if block_size is not None and tiles is None:
        full = jnp.maximum((end - first) // slots, 0)
        carry = jax.lax.fori_loop(0, full, functools.partial(block, masked=False), carry)
    out, top, total = jax.lax.fori_loop(full, blocks, functools.partial(block, masked=True),
                                        carry)
    if tiles is not None:
        _store_partials(partial_refs, out, top, total, parts, real)
        return

    # The new token: added (and written to the cache) by part 0 of an active row. A
    # quantized one is quantized here, exactly as ``kvjax.cache.quantize`` does, and
    # attends as its codes will be read back (dequantized), as the portable path does
    # after writing it.
    owner = (part == 0) & (position >= 0)
    entries = tuple(ref[...][None] for ref in new_refs)  # key, value: [1, head_dim]
    if quantized:  # codes [1, head_dim] and scales [1]
        entries = quantize_block(*entries, layer_kv_dtype(cache_refs), **arithmetic)
        new_key, new_value = (codes.astype(jnp.float32) * scales[:, None]
                              for codes, scales in (entries[::2], entries[1::2]))
    else:
        new_key, new_value = (entry.astype(jnp.float32) for entry in entries)
    if int8_keys:  # as the loop's scores: an exact integer sum, times both scales
        key_codes, key_scale = entries[0].astype(jnp.float32), entries[2]
        score = jnp.sum(query_codes.astype(jnp.float32) * key_codes, axis=-1) * query_scales
        score = score * (key_scale * scale)
    else:
        score = jnp.sum(queries.astype(jnp.float32) * new_key, axis=-1) * scale
    score = jnp.where(owner, score, MASKED)  # [padded_group]
    new_top = jnp.maximum(top, score)
    rescale = jnp.exp(top - new_top)
    weight = jnp.where(owner, jnp.exp(score - new_top), 0.)
    out = out * rescale[:, None] + weight[:, None] * new_value
    total = total * rescale + weight
    _store_partials(partial_refs, out, new_top, total, parts, real)

    @pl.when(owner)
    def _write():
        if block_size is None:
            at = (row, head, pl.ds(position, 1))
        else:
            at = (head, tables_ref[row, position // block_size], pl.ds(position % block_size, 1))
        for entry, written_ref in zip(entries, written_refs):
            _write_slot(written_ref, entry, at)


def _store_partials(refs, out, top, total, parts: int, real) -> None:
    """Stores a program's flash partials, or with a single ``parts`` its normalised
    output (no merge after the kernel), for the query rows ``real`` (the outputs hold no
    padding)."""
    if parts == 1:
        out_ref, = refs
        out = out / jnp.maximum(total, 1e-30)[:, None]  # 0 for a row that takes no part
        plgpu.store(out_ref, out.astype(out_ref.dtype), mask=real[:, None])
    else:
        out_ref, max_ref, sum_ref = refs
        plgpu.store(out_ref, out, mask=real[:, None])
        plgpu.store(max_ref, top, mask=real)
        plgpu.store(sum_ref, total, mask=real)


def _write_slot(buffer_ref, entry: jax.Array, at: tuple) -> None:
    """Stores one token's ``entry`` (a key/value ``[1, head_dim]`` or a scale ``[1]``) in
    its slot of a cache buffer, ``at`` the slot's index (a one-slot ``pl.ds`` last)."""
    buffer_ref[at + (slice(None),) * (entry.ndim - 1)] = entry.astype(buffer_ref.dtype)


def _round_even(x: jax.Array) -> jax.Array:
    """float32 ``x`` rounded to the nearest integer, half to even (``jnp.round``, which
    Pallas Triton does not lower)."""
    return plgpu.elementwise_inline_asm(
        "cvt.rni.f32.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def attend_and_write(queries: jax.Array, keys: jax.Array, values: jax.Array,
                     cache_keys: jax.Array, cache_values: jax.Array, positions: jax.Array,
                     scale: float | None = None, interpret: bool = False,
                     split: MeshSplit | None = None, tuning: Tuning | None = None
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
      tuning: launch settings (default: ``default_tuning``'s for the cache).

    Returns:
      ``(out [batch, 1, heads, head_dim], cache_keys, cache_values)``, as
      ``kvjax.attention.attend_cache`` after ``KVCache.update`` would give them.
    """
    return _run(queries, keys, values, positions, (cache_keys, cache_values), None, scale,
                interpret, split, tuning)


def attend_and_write_quantized(queries: jax.Array, keys: jax.Array, values: jax.Array,
                               cache_keys: jax.Array, cache_values: jax.Array,
                               key_scales: jax.Array, value_scales: jax.Array,
                               positions: jax.Array, scale: float | None = None,
                               interpret: bool = False, split: MeshSplit | None = None,
                               tuning: Tuning | None = None) -> tuple[jax.Array, ...]:
    """``attend_and_write`` over a quantized cache (``kvjax.cache.QuantizedKVCache``; the
    cache arguments in the order of its ``layer``): the new key/value is quantized
    (``kvjax.cache.quantize``) and its codes and scales written; the kernel reads the
    codes, half the bytes of a 16-bit cache.

    Args:
      cache_keys, cache_values: codes ``[batch, kv_heads, capacity, head_dim]``, int8 or
        float8_e4m3fn (consumed, like the scales).
      key_scales, value_scales: ``float32[batch, kv_heads, capacity]``.
      Others as in ``attend_and_write``; ``keys``, ``values`` in full precision.

    Returns:
      ``(out, cache_keys, cache_values, key_scales, value_scales)``, as
      ``kvjax.attention.quantized.attend_cache`` after ``write_quantized_block`` would
      give them (zeros out for a row at position ``-1``).
    """
    return _run(queries, keys, values, positions,
                (cache_keys, cache_values, key_scales, value_scales), None, scale, interpret,
                split, tuning)


def attend_and_write_paged(queries: jax.Array, keys: jax.Array, values: jax.Array,
                           pools: tuple, block_tables: jax.Array, positions: jax.Array,
                           scale: float | None = None, interpret: bool = False,
                           split: MeshSplit | None = None, tuning: Tuning | None = None
                           ) -> tuple[jax.Array, ...]:
    """``attend_and_write`` over a paged layer (``kvjax.cache.PagedKVCache``): each row
    reads its blocks through its table and writes its new key/value (codes and scales
    for an int8/fp8 pool) into slot ``p % block_size`` of its block ``p // block_size``.

    Args:
      pools: the layer's ``(keys, values)`` pools ``[kv_heads, num_blocks, block_size,
        head_dim]``, and ``(key_scales, value_scales)`` ``float32[kv_heads, num_blocks,
        block_size]`` after them for codes (consumed).
      block_tables: ``int32[batch, blocks_per_row]``; entries past a row's position are
        never read.
      split: over a mesh, rows whole on every device (a pool is every row's): only the
        heads split.
      Others as in ``attend_and_write``.

    Returns:
      ``(out, *pools)``, as ``kvjax.attention.paged.attend_cache`` after
      ``kvjax.attention.paged.write`` would give them.
    """
    return _run(queries, keys, values, positions, tuple(pools), block_tables, scale,
                interpret, split, tuning)


def _require_triton() -> None:
    if not available():
        raise RuntimeError("kvjax's decode kernel needs JAX's Pallas Triton backend, which this "
                           "JAX lacks; run the XLA path (kvjax.attention.choose(..., "
                           "decode_kernel=False))")


def _run(queries, keys, values, positions, buffers: tuple, tables: jax.Array | None,
         scale: float | None, interpret: bool, split: MeshSplit | None,
         tuning: Tuning | None) -> tuple:
    """The kernel over the cache's ``buffers`` (``CACHE_BUFFERS``; paged pools when
    ``tables`` are given), on each device's shard under a ``split``; returns
    ``(out, *buffers)``."""
    _require_triton()
    step = functools.partial(_attend_and_write, scale=scale, interpret=interpret, tuning=tuning)
    if split is None:
        return step(queries, keys, values, positions, *buffers, tables=tables)
    token = PartitionSpec(split.rows, None, split.heads, None)  # [batch, 1, heads, head_dim]
    new = PartitionSpec(split.rows, None, split.kv_heads, None)
    return _per_device(step, split, (queries, keys, values, positions),
                       (token, new, new, PartitionSpec(split.rows)), buffers, tables,
                       writes=True)


def _per_device(function, split: MeshSplit, leading: tuple, leading_specs: tuple,
                buffers: tuple, tables: jax.Array | None, writes: bool):
    """``function(*leading, *buffers, tables=tables)`` under shard_map, on each device's
    shard: ``leading`` placed by ``leading_specs`` (the first of them also places the
    output), the buffers and tables by ``_shard_specs``. Returns the output, and with
    ``writes`` the buffers after it."""
    specs, table_specs = _shard_specs(split, len(buffers), tables)
    count = len(leading)

    def run(*args):  # the shard_map's operands: leading, (tables,) buffers
        rest = args[count:]
        if tables is None:
            return function(*args[:count], *rest, tables=None)
        return function(*args[:count], *rest[1:], tables=rest[0])

    return jax.shard_map(run, mesh=split.mesh, in_specs=(*leading_specs, *table_specs, *specs),
                         out_specs=(leading_specs[0], *specs) if writes else leading_specs[0],
                         check_vma=False)(*leading, *_operands(tables), *buffers)


def _shard_specs(split: MeshSplit, count: int, tables: jax.Array | None) -> tuple:
    """How ``split`` places a layer's ``count`` buffers (``CACHE_BUFFERS``: keys and
    values, float or codes, and a quantized cache's scales, split like their KV heads)
    and a paged layer's ``tables`` (whole on every device): ``(buffer specs, table
    specs)``. A contiguous cache splits its rows too; a pool holds every row's blocks,
    so over a pool the rows must stay whole."""
    if tables is None:
        codes = PartitionSpec(split.rows, split.kv_heads, None, None)
        scales = PartitionSpec(split.rows, split.kv_heads, None)
        return (codes, codes, scales, scales)[:count], ()
    if split.splits_rows():
        raise ValueError("a paged pool holds every row's blocks: its decode kernel splits "
                         "heads over a mesh, not rows; keep the batch on one device")
    codes = PartitionSpec(split.kv_heads, None, None, None)
    scales = PartitionSpec(split.kv_heads, None, None)
    return (codes, codes, scales, scales)[:count], (PartitionSpec(),)


def _operands(tables: jax.Array | None) -> tuple:
    """``tables`` as extra operands (of a shard_map, a Pallas call): none without them."""
    return () if tables is None else (tables,)


def _geometry(buffers: tuple, tables: jax.Array | None) -> tuple[int, int, int | None]:
    """``(kv_heads, capacity, block_size)`` of a layer's buffers: a contiguous cache's
    (``block_size`` None), or a paged layer's pools read through ``tables`` (a row's
    capacity: its table's blocks)."""
    if tables is None:
        _, kv_heads, capacity, _ = buffers[0].shape
        return kv_heads, capacity, None
    kv_heads, _, block_size, _ = buffers[0].shape
    return kv_heads, tables.shape[1] * block_size, block_size


def _attend_and_write(queries, keys, values, positions, *buffers, tables: jax.Array | None,
                      scale: float | None, interpret: bool, tuning: Tuning | None):
    """The kernel on one device's operands: ``buffers`` as ``CACHE_BUFFERS`` names them
    (a contiguous cache's, or a paged layer's pools read through ``tables``); returns
    ``(out, *buffers)``."""
    batch, _, heads, head_dim = queries.shape
    kv_dtype = layer_kv_dtype(buffers)
    quantized = kv_dtype in QUANTIZED
    kv_heads, capacity, block_size = _geometry(buffers, tables)
    tuning = tuning or default_tuning(kv_dtype, capacity, head_dim)
    group = heads // kv_heads
    padded_group = max(16, 1 << (group - 1).bit_length())  # Triton's dot needs 16 rows
    parts = part_count(batch, kv_heads, capacity, head_dim, tuning)
    scale = default_scale(head_dim) if scale is None else scale
    kernel = functools.partial(_kernel, scale=scale, parts=parts, group=group,
                               slots=block_slots(head_dim, tuning), quantized=quantized,
                               block_size=block_size, codes_as_float16=tuning.codes_as_float16,
                               interpret=interpret)
    new = keys[:, 0], values[:, 0]  # [batch, kv_heads, head_dim]
    whole = pl.BlockSpec()  # the kernel indexes these itself
    per_head = lambda *block: pl.BlockSpec((None, None, *block),
                                           lambda b, h, s: (b, h) + (0,) * len(block))
    out_specs, out_shape = _partial_specs(batch, kv_heads, parts, group, padded_group, 1,
                                          head_dim, queries.dtype)
    table_inputs = _operands(tables)
    # inputs: positions, the tables, queries, new entries, buffers
    first_buffer = 2 + len(table_inputs) + len(new)
    outputs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, parts),
        in_specs=[whole, *(whole for _ in table_inputs),
                  pl.BlockSpec((None, None, padded_group, head_dim), lambda b, h, s: (b, h, 0, 0)),
                  *(per_head(*entry.shape[2:]) for entry in new), *(whole for _ in buffers)],
        out_specs=out_specs + [whole for _ in buffers],
        out_shape=out_shape + [jax.ShapeDtypeStruct(b.shape, b.dtype) for b in buffers],
        input_output_aliases={first_buffer + i: len(out_shape) + i for i in range(len(buffers))},
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps,
                                             num_stages=tuning.num_stages),
        interpret=interpret,
        name="kvjax_decode_attention",
    )(positions[:, 0], *table_inputs, queries.reshape(batch, kv_heads, group, head_dim), *new,
      *buffers)
    partials, buffers = outputs[:len(out_shape)], outputs[len(out_shape):]
    out = _merge_parts(partials, queries.dtype)  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, 1, heads, head_dim), *buffers


def block_takes(tokens: int, group: int) -> bool:
    """Whether ``attend_cached_block`` should take a block of ``tokens`` a row with
    ``group`` query heads a KV head: at most ``BLOCK_TILES`` tiles of ``BLOCK_ROWS``
    query rows."""
    return tokens * group <= BLOCK_ROWS * BLOCK_TILES


def attend_cached_block(queries: jax.Array, buffers: tuple, positions: jax.Array,
                        scale: float | None = None, interpret: bool = False,
                        split: MeshSplit | None = None, tuning: Tuning | None = None
                        ) -> jax.Array:
    """A block of several tokens a row (a chat turn, a piece of a prompt) attending
    over a contiguous cache that already holds it, by the decode kernel's loop: each
    query sees the slots up to its own position, and the cache is read once per
    ``tuning.query_rows`` query rows of a KV head (``BLOCK_ROWS``: once for a block of
    up to 16 tokens at Llama-3's group of 4), never converted whole.

    Args:
      queries: ``[batch, seq, heads, head_dim]``.
      buffers: the layer's ``(keys, values)`` ``[batch, kv_heads, capacity, head_dim]``,
        or codes and float32 scales ``(keys, values, key_scales, value_scales)``
        (``kvjax.cache.QuantizedKVCache.layer``), the block written.
      positions: ``int32[batch, seq]``; ``-1``: padding (zeros out).
      split: the operands' split over a mesh, as in ``attend_and_write``: each device
        runs the kernel on its rows and heads.
      Others as in ``attend_and_write``.

    Returns:
      ``[batch, seq, heads, head_dim]``, as ``kvjax.attention.quantized.attend_cache``
      (or ``kvjax.attention.plain.attend_cache``) would give it.
    """
    return _run_block(queries, positions, tuple(buffers), None, scale, interpret, split, tuning)


def attend_cached_block_paged(queries: jax.Array, pools: tuple, block_tables: jax.Array,
                              positions: jax.Array, scale: float | None = None,
                              interpret: bool = False, split: MeshSplit | None = None,
                              tuning: Tuning | None = None) -> jax.Array:
    """``attend_cached_block`` over a paged layer (``kvjax.cache.PagedKVCache``) that
    holds the block (``kvjax.attention.paged.write`` first): each row reads its blocks
    through its table as the decode kernel does.

    Args:
      pools: the layer's pools, as in ``attend_and_write_paged`` (not changed).
      block_tables: ``int32[batch, blocks_per_row]``; entries past a row's last
        position are never read.
      split: over a mesh, rows whole on every device: only the heads split.
      Others as in ``attend_cached_block``.

    Returns:
      ``[batch, seq, heads, head_dim]``, as ``kvjax.attention.paged.attend_cache`` would
      give it.
    """
    return _run_block(queries, positions, tuple(pools), block_tables, scale, interpret, split,
                      tuning)


def _run_block(queries, positions, buffers: tuple, tables: jax.Array | None,
               scale: float | None, interpret: bool, split: MeshSplit | None,
               tuning: Tuning | None) -> jax.Array:
    """The block kernel over the cache's ``buffers`` (paged pools when ``tables`` are
    given), on each device's shard under a ``split``."""
    _require_triton()
    block = functools.partial(_attend_cached_block, scale=scale, interpret=interpret,
                              tuning=tuning)
    if split is None:
        return block(queries, positions, *buffers, tables=tables)
    token = PartitionSpec(split.rows, None, split.heads, None)  # [batch, seq, heads, head_dim]
    return _per_device(block, split, (queries, positions),
                       (token, PartitionSpec(split.rows, None)), buffers, tables, writes=False)


def _attend_cached_block(queries, positions, *buffers, tables: jax.Array | None,
                         scale: float | None, interpret: bool, tuning: Tuning | None
                         ) -> jax.Array:
    """The block kernel on one device's operands (``_run_block``)."""
    batch, tokens, heads, head_dim = queries.shape
    kv_dtype = layer_kv_dtype(buffers)
    kv_heads, capacity, block_size = _geometry(buffers, tables)
    tuning = tuning or default_tuning(kv_dtype, capacity, head_dim)
    group = heads // kv_heads
    rows = tokens * group  # a KV head's query rows, token-major
    block_rows = min(tuning.query_rows, max(16, 1 << (rows - 1).bit_length()))
    tiles = -(-rows // block_rows)
    padding = tiles * block_rows - rows
    parts = part_count(batch, kv_heads, capacity, head_dim, tuning)
    scale = default_scale(head_dim) if scale is None else scale
    kernel = functools.partial(_kernel, scale=scale, parts=parts, group=block_rows,
                               slots=block_slots(head_dim, tuning),
                               quantized=kv_dtype in QUANTIZED, block_size=block_size,
                               codes_as_float16=tuning.codes_as_float16, interpret=interpret,
                               tiles=tiles)
    grouped = queries.reshape(batch, tokens, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    grouped = jnp.pad(grouped.reshape(batch, kv_heads, rows, head_dim),
                      ((0, 0), (0, 0), (0, padding), (0, 0)))
    query_positions = jnp.pad(jnp.repeat(positions, group, axis=1), ((0, 0), (0, padding)),
                              constant_values=-1)  # [batch, tiles * block_rows]
    out_specs, out_shape = _partial_specs(batch, kv_heads, parts, tiles * block_rows,
                                          block_rows, tiles, head_dim, queries.dtype)
    whole = pl.BlockSpec()
    table_inputs = _operands(tables)
    partials = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads * tiles, parts),
        in_specs=[whole, *(whole for _ in table_inputs),
                  pl.BlockSpec((None, None, block_rows, head_dim),
                               lambda b, h, s: (b, h // tiles, h % tiles, 0)),
                  *(whole for _ in buffers)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps,
                                             num_stages=tuning.num_stages),
        interpret=interpret,
        name="kvjax_block_attention",
    )(query_positions, *table_inputs, grouped, *buffers)
    out = _merge_parts(partials, queries.dtype)[:, :, :rows]  # [batch, kv_heads, rows, head_dim]
    out = out.reshape(batch, kv_heads, tokens, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, tokens, heads, head_dim)


def _partial_specs(batch: int, kv_heads: int, parts: int, rows: int, block_rows: int,
                   tiles: int, head_dim: int, dtype) -> tuple[list, list]:
    """``(out_specs, out_shape)`` of the kernel's partials over ``rows`` query rows a KV
    head, ``block_rows`` a program (the second grid index ``head * tiles + tile``): with a
    single part the output itself ``[batch, kv_heads, rows, head_dim]``, else each part's
    flash partials ``[batch, kv_heads, parts, rows(, head_dim)]`` (``_merge_parts``)."""
    if parts == 1:
        return ([pl.BlockSpec((None, None, block_rows, head_dim),
                              lambda b, h, s: (b, h // tiles, h % tiles, 0))],
                [jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), dtype)])
    each_part = lambda *block: pl.BlockSpec(
        (None, None, None, block_rows, *block),
        lambda b, h, s: (b, h // tiles, s, h % tiles) + (0,) * len(block))
    shape = lambda *last: jax.ShapeDtypeStruct((batch, kv_heads, parts, rows, *last), jnp.float32)
    return ([each_part(head_dim), each_part(), each_part()],
            [shape(head_dim), shape(), shape()])


def _merge_parts(partials: list, dtype) -> jax.Array:
    """The attention output ``[batch, kv_heads, rows, head_dim]`` in ``dtype`` from the
    kernel's partials (``_partial_specs``): merged over the parts' axis when it has
    several."""
    if len(partials) == 1:
        return partials[0]
    out, top, total = partials  # [batch, kv_heads, parts, rows(, head_dim)]
    weight = jnp.exp(top - top.max(axis=2, keepdims=True))
    total = (total * weight).sum(axis=2)  # 0 for a row that takes no part
    out = (out * weight[..., None]).sum(axis=2) / jnp.maximum(total, 1e-30)[..., None]
    return out.astype(dtype)
