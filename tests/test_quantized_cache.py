"""The int8 / fp8 KV cache (kvjax.cache.QuantizedKVCache) and attention over it."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import programs
from kvjax.attention import plain, quantized
from kvjax.cache import QuantizedKVCache, dequantize, quantize
from tests.conftest import make_config, make_model

KINDS = ("int8", "fp8")


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_round_trip(kind):
    x = jax.random.normal(jax.random.key(0), (3, 2, 5, 64)) * jnp.arange(1, 6)[None, None, :, None]
    codes, scale = quantize(x, kind)
    assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.float8_e4m3fn)
    assert scale.shape == (3, 2, 5) and scale.dtype == jnp.float32
    back = dequantize(codes, scale)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    error = jnp.abs(back - x)
    if kind == "int8":  # rounding to the nearest of 255 levels: half a step at most
        assert bool(jnp.all(error <= scale[..., None] / 2 + 1e-6))
    else:  # e4m3: 3 mantissa bits, relative error <= 2**-4 (plus subnormals near 0)
        assert bool(jnp.all(error <= jnp.abs(x) / 16 + amax * 2 ** -9 + 1e-6))
    np.testing.assert_allclose(jnp.max(jnp.abs(back), axis=-1), amax[..., 0], rtol=1e-6)
    zero_codes, zero_scale = quantize(jnp.zeros((2, 8)), kind)  # no division by zero
    assert bool(jnp.all(zero_scale == 1)) and not bool(jnp.any(dequantize(zero_codes, zero_scale)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window,softcap,seq", [(None, None, 1), (None, None, 5), (7, None, 3),
                                                 (None, 30.0, 1)])
def test_attention_equals_the_plain_path_over_the_dequantized_cache(kind, window, softcap, seq):
    """The oracle: the whole cache dequantized, then plain attention; the quantized path
    reads codes block by block (blocks of 16 here, so several) with the scales folded in.
    Over int8 keys the scores are int8 products of each query row quantized alike, so
    the oracle's queries go through int8 too."""
    batch, heads, kv_heads, capacity, head_dim = 2, 4, 2, 40, 16
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim))
    key_codes, key_scales = quantize(jax.random.normal(keys[1], (batch, kv_heads, capacity, head_dim)), kind)
    value_codes, value_scales = quantize(jax.random.normal(keys[2], (batch, kv_heads, capacity, head_dim)), kind)
    start = np.array([[30], [9]])
    positions = jnp.asarray(start + np.arange(seq)[None, :], jnp.int32)
    positions = positions.at[1, seq - 1:].set(-1)  # a padded query too
    slots = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
    read_queries = dequantize(*quantize(q, kind)) if kind == "int8" else q
    want = plain.attend(read_queries, dequantize(key_codes, key_scales),
                        dequantize(value_codes, value_scales), positions, slots, window, None,
                        softcap)
    got = quantized.attend_cache(q, key_codes, value_codes, key_scales, value_scales, positions,
                                 window, None, softcap, block_slots=16)
    real = np.asarray(positions >= 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(np.asarray(got)))


def test_cache_layout_and_bytes():
    config = make_config(head_dim=128, num_layers=3)
    cache = QuantizedKVCache.create(config, 2, 32, "int8")
    assert [k.shape for k in cache.keys] == [(2, 2, 32, 128)] * 3
    assert [s.shape for s in cache.value_scales] == [(2, 2, 32)] * 3
    bf16 = kvjax.KVCache.create(config, 2, 32, jnp.bfloat16)
    # codes of head_dim bytes + a 4-byte scale per token and KV head: 132 / 256 of bf16
    codes_and_scales = cache.nbytes - cache.lengths.nbytes
    assert codes_and_scales / (bf16.nbytes - bf16.lengths.nbytes) == pytest.approx(132 / 256)
    axes = cache.logical_axes()
    for leaf, names in zip(jax.tree.leaves(cache), jax.tree.leaves(axes, is_leaf=kvjax.cache.is_axes)):
        assert len(names) == leaf.ndim
    with pytest.raises(ValueError, match="unknown kv_dtype 'int4'; supported: bfloat16, "
                                         "float16, float32, int8, fp8"):
        kvjax.cache.create(config, 1, 8, "int4", jnp.float32)


@pytest.fixture(scope="module")
def model():
    return make_model(make_config(num_layers=2, vocab_size=97))


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 1, 4], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]]


@pytest.mark.parametrize("kind,tolerance", [("int8", 0.03), ("fp8", 0.15)])
def test_generation_reads_the_quantized_cache(model, kind, tolerance):
    """Ragged greedy generation with an int8/fp8 cache against a float32 cache: the same
    logits within the codes' precision (relative to the largest logit) at every step
    until a row's tokens first differ (after that the inputs differ), and a cache of
    about half the bytes."""
    out = kvjax.generate(model, PROMPTS, max_new_tokens=12, kv_dtype=kind, return_logits=True,
                         stop_tokens=[])
    reference = kvjax.generate(model, PROMPTS, max_new_tokens=12, return_logits=True,
                               stop_tokens=[])
    assert out.stats["cache_bytes"] < 0.6 * reference.stats["cache_bytes"]
    compared = 0
    for tokens, want_tokens, got, want in zip(out.tokens, reference.tokens, out.logits,
                                              reference.logits):
        same = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b),
                    len(tokens) - 1) + 1
        np.testing.assert_allclose(got[:same], want[:same],
                                   atol=tolerance * float(np.max(np.abs(want[:same]))))
        compared += same
    assert compared >= 12  # decode steps that read the quantized cache were compared


def _quality():
    """benchmarks/quality.py as a module."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "quality.py")
    spec = importlib.util.spec_from_file_location("quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def test_bundled_model_continuations_agree_with_a_full_precision_cache():
    """The quality target on the bundled model: greedy continuations of 16 prompts with
    an int8 cache agree with a bfloat16 cache (and a float32 one) on >= 95% of their
    first 64 tokens (benchmarks/quality.py --mode greedy). fp8 does not reach it: 60.7%
    measured, docs/memory.md."""
    quality = _quality()
    assert quality.agreement([[1, 2, 3], [4, 5, 6]], [[1, 7, 3], [4, 5, 6]]) == {
        "agreement": 5 / 6, "mean_first_difference": 2.0, "first_difference": [1, 3]}
    bundled = kvjax.load(kvjax.BUNDLED_MODEL)
    tokens = quality.greedy_tokens(bundled, "int8")
    assert len(tokens) == 16 and all(len(row) == 64 for row in tokens)
    for reference in ("bfloat16", "float32"):
        agree = quality.agreement(tokens, quality.greedy_tokens(bundled, reference))["agreement"]
        assert agree >= 0.95, (reference, agree)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_and_chat_continuation_match_generate(model, kind):
    stream = kvjax.generate_stream(model, PROMPTS, max_new_tokens=20, chunk_size=6, kv_dtype=kind)
    list(stream)
    assert stream.generation.tokens == kvjax.generate(model, PROMPTS, max_new_tokens=20,
                                                       kv_dtype=kind).tokens
    # a continued cache (start > 0): prefill a prompt's head, then its tail at the end of
    # the cache, as a chat turn does; tokens equal one prefill of the whole prompt
    prompt = PROMPTS[2]
    step, _ = programs.step_functions(model, fresh=False, kv_dtype=kind)
    whole = kvjax.generate(model, [prompt], max_new_tokens=8, kv_dtype=kind, capacity=64,
                           stop_tokens=[]).tokens[0]
    cache = programs.new_cache(model, 1, 64, kv_dtype=kind)
    head, tail = prompt[:5], prompt[5:]
    controls = dict(max_new_tokens=np.int32(8), sampling=kvjax.SamplingParams.create(1),
                    seed=np.uint32(0), stop_tokens=np.full((16,), -1, np.int32), greedy=True)
    first = kvjax.decode(step, model.params, cache, np.array([head], np.int32),
                         np.array([len(head)], np.int32), num_steps=1, **controls)
    second = kvjax.decode(step, model.params, first.cache, np.array([tail], np.int32),
                          np.array([len(tail)], np.int32), num_steps=8,
                          start=np.array([len(head)], np.int32), **controls)
    assert np.asarray(second.tokens[0]).tolist() == whole
    assert isinstance(second.cache, QuantizedKVCache) and int(second.cache.lengths[0]) == 19


def test_no_full_precision_copy_of_the_cache():
    """The compiled decode program of an int8 cache never holds a float buffer as large
    as a layer's whole K (or V) codes: attention converts one block at a time."""
    config = make_config(num_layers=2, head_dim=16, max_position_embeddings=2048)
    model = make_model(config)
    batch, capacity = 2, 1024
    program = programs.generation_program(model, num_steps=16, greedy=True, kv_dtype="int8")
    cache = programs.new_cache(model, batch, capacity, kv_dtype="int8")
    text = program.lower(model.params, cache, np.ones((batch, 16), np.int32),
                         np.full((batch,), 16, np.int32), np.full((batch,), 16, np.int32),
                         kvjax.SamplingParams.create(batch), np.uint32(0),
                         np.full((16,), -1, np.int32)).compile().as_text()
    whole = f"{batch},{config.num_kv_heads},{capacity},{config.head_dim}"
    float_copies = re.findall(rf"(?:f32|bf16|f16)\[{whole}\]", text)
    assert re.findall(rf"s8\[{whole}\]", text), "the int8 codes are in the program"
    assert not float_copies


def test_bad_kv_dtype_and_options(model):
    with pytest.raises(ValueError, match="unknown kv_dtype 'int4'"):
        kvjax.generate(model, PROMPTS, kv_dtype="int4")
    with pytest.raises(ValueError, match="unknown kv_dtype 'int4'"):
        kvjax.generate_stream(model, PROMPTS, kv_dtype="int4")
    with pytest.raises(ValueError, match="use_cache=False keeps none"):
        kvjax.generate(model, PROMPTS, kv_dtype="int8", use_cache=False)
    with pytest.raises(ValueError, match="unknown kv_dtype 'int4'"):
        kvjax.ChatSession(kvjax.load(kvjax.BUNDLED_MODEL), kv_dtype="int4")


def test_perplexity_through_the_cache_equals_one_forward_pass():
    """benchmarks/quality.py scores each token with a decode step reading the cache; with
    a float32 cache that is exactly what one causal forward pass over the window gives."""
    quality = _quality()
    bundled = kvjax.load(kvjax.BUNDLED_MODEL)
    rows = quality.windows(bundled.tokenizer.encode(
        "The for statement is used to iterate over the elements of a sequence (such as a "
        "string, tuple or list) or other iterable object. " * 4), 48)[:3]
    prefix = 16
    got = quality.score(bundled, rows, prefix, "float32")
    positions = np.broadcast_to(np.arange(rows.shape[1], dtype=np.int32), rows.shape)
    logits, _ = kvjax.forward(bundled.config, bundled.params, rows, positions)  # no cache
    log_probs = jax.nn.log_softmax(logits[:, prefix - 1:-1])
    want = -np.mean(np.take_along_axis(np.asarray(log_probs), rows[:, prefix:, None], axis=2))
    assert got == pytest.approx(float(want), rel=1e-5)
    assert quality.score(bundled, rows, prefix, "int8") == pytest.approx(float(want), rel=0.02)
    through = quality.logits_through_cache(bundled, rows, prefix, "float32")
    np.testing.assert_allclose(through, np.asarray(logits[:, prefix - 1:-1]), atol=1e-4)
    # streaming: while the rows fit, the same; a 16-token window alone over 48-token rows
    # is one forward pass whose every layer attends to its last 16 positions
    assert quality.score(bundled, rows, prefix, "float32", window=48, sink_tokens=0) == \
        pytest.approx(got, rel=1e-5)
    windowed = dataclasses.replace(bundled.config, sliding_window=16)
    logits, _ = kvjax.forward(windowed, bundled.params, rows, positions)
    log_probs = jax.nn.log_softmax(logits[:, prefix - 1:-1])
    want = -np.mean(np.take_along_axis(np.asarray(log_probs), rows[:, prefix:, None], axis=2))
    assert quality.score(bundled, rows, prefix, "float32", window=16, sink_tokens=0) == \
        pytest.approx(float(want), rel=1e-5)
    assert abs(float(want) - got) > 1e-3  # the window bites


def test_default_text_is_the_committed_held_out_text():
    """The default text of benchmarks/quality.py: >= 20k tokens of the bundled tokenizer,
    and none of its documents is one the bundled model trained on."""
    import json

    quality = _quality()
    with open(quality.TEXT_FILE, encoding="utf-8") as f:
        record = json.load(f)
    tokens = kvjax.load(kvjax.BUNDLED_MODEL).tokenizer.encode(quality.load_text("held-out+numpy"))
    assert len(tokens) == record["tokens"] >= 20_000
    assert sum(source["documents"] for source in record["sources"]) == len(record["documents"])
    train = set(quality._train_tiny().split(quality._train_tiny().documents())[0])
    assert not train & set(record["documents"])


def test_family_quality_against_torch():
    """--mode families on one QK-norm family: the float32 cache's teacher-forced logits
    equal the torch model's forward pass (an independent oracle), its metrics equal
    torch's KL and argmax on the same logits, and an int8 cache stays close."""
    pytest.importorskip("transformers")
    import torch

    from tests.hf_fixtures import hf_logits

    quality = _quality()
    hf_model, model = quality.family_model("qwen3", positions=128)
    rows = np.random.default_rng(0).integers(3, 128, (2, 40), dtype=np.int32)
    prefix = 8
    through = quality.logits_through_cache(model, rows, prefix, "float32")
    want = np.stack([hf_logits(hf_model, row.tolist())[prefix - 1:-1] for row in rows])
    np.testing.assert_allclose(through, want, atol=1e-4)
    assert quality.compare_logits(through, through) == {
        "top1_agreement": 1.0, "mean_kl": 0.0, "max_abs_logit_diff": 0.0}
    compared = quality.family_quality(model, rows, prefix, ["int8"], reference="float32")
    int8 = quality.logits_through_cache(model, rows, prefix, "int8")
    log_p = torch.log_softmax(torch.tensor(through, dtype=torch.float64), -1).reshape(-1, 128)
    log_q = torch.log_softmax(torch.tensor(int8, dtype=torch.float64), -1).reshape(-1, 128)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    assert compared["int8"]["mean_kl"] == pytest.approx(float(kl), rel=1e-6)
    assert compared["int8"]["top1_agreement"] == np.mean(through.argmax(-1) == int8.argmax(-1))
    assert compared["int8"]["max_abs_logit_diff"] == pytest.approx(
        float(np.abs(through - int8).max()))
    assert 0 < compared["int8"]["mean_kl"] < 1e-3 and compared["int8"]["top1_agreement"] >= 0.9


def test_fp8_where_the_backend_cannot_hold_it(model, monkeypatch):
    """This backend holds fp8 (a quantization compiles here); where one cannot, generate
    and ChatSession refuse before compiling, naming the kv_dtype that works there."""
    from kvjax.cache import quantized

    assert quantized.can_store("fp8", jax.default_backend())
    monkeypatch.setattr(quantized, "can_store", lambda kv_dtype, platform: kv_dtype == "int8")
    message = (f"kv_dtype='fp8' stores float8_e4m3fn codes, which this JAX cannot hold on "
               f"{jax.default_backend()}; use kv_dtype='int8' there (or a float kv_dtype)")
    with pytest.raises(ValueError) as error:
        kvjax.generate(model, PROMPTS, kv_dtype="fp8")
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        kvjax.ChatSession(kvjax.load(kvjax.BUNDLED_MODEL), kv_dtype="fp8")
    assert str(error.value) == message
