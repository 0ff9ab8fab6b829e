"""kvjax against Hugging Face transformers on tiny random checkpoints.

Each checkpoint is written with ``save_pretrained`` (safetensors), loaded with
``kvjax.load`` and decoded greedily with ``kvjax.generate``; the oracle is the torch model
that was saved, re-run over the whole growing sequence for every step (no KV cache, no
padding, one prompt at a time). Compiles are kept few: every family test runs the same
batch shape (3 prompts, bucket 16, capacity 64, 32 steps), so a family costs one compile.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import kvjax
from kvjax.config import RopeScaling
from kvjax.rope import rope_inverse_frequencies
from tests.hf_fixtures import (HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, VOCAB,
                               hf_greedy, hf_logits, make_hf_model, save_checkpoint)

STEPS = 32
ATOL = 1e-4  # float32 vs float32: observed max |diff| ~3e-6 with logits spread over ~6 units

_rng = np.random.default_rng(1234)
# Ragged on purpose; the longest (13) + 32 steps = 45 positions, far past Mistral's window of 8.
FAMILY_PROMPTS = [_rng.integers(3, VOCAB, n).tolist() for n in (13, 5, 9)]
RAGGED_PROMPTS = [_rng.integers(3, VOCAB, n).tolist() for n in (3, 11, 7)]
ROPE_PROMPT = _rng.integers(3, VOCAB, 20).tolist()

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "llama_bias", "llama_tied",
            "gemma", "gemma2", "gemma3", "phi3", "gpt2", "olmo2"]

# HF config overrides that each switch one feature of a variant off. With the same
# weights, each gives clearly different logits on the generated sequence, so the 1e-4
# parity could not pass with that feature ignored (the window bites: 44 positions, window
# 8 or 16; a window of 128 never does).
ABLATIONS = {
    "mistral": [{"sliding_window": None}],
    "gemma2": [{"sliding_window": 128}, {"attn_logit_softcapping": None},
               {"final_logit_softcapping": None}, {"query_pre_attn_scalar": HEAD_DIM}],
    "gemma3": [{"sliding_window": 128},
               {"rope_local_base_freq": 1_000_000.0},  # sliding layer with the global base
               {"rope_scaling": None}],  # global layer without its linear scaling
    "phi3": [{"sliding_window": None}],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """variant -> (torch model, checkpoint directory), each made once per module."""
    made = {}

    def get(variant):
        if variant not in made:
            model = make_hf_model(variant)
            made[variant] = (model, save_checkpoint(model, tmp_path_factory.mktemp(variant)))
        return made[variant]

    return get


@pytest.fixture(scope="module")
def float32_run(checkpoint):
    """variant -> (kvjax model, generation of FAMILY_PROMPTS), each run once per module."""
    runs = {}

    def get(variant):
        if variant not in runs:
            _, directory = checkpoint(variant)
            model = kvjax.load(directory, dtype="float32")
            runs[variant] = model, kvjax.generate(
                model, FAMILY_PROMPTS, max_new_tokens=STEPS, temperature=0.0, stop_tokens=[],
                return_logits=True)
        return runs[variant]

    return get


def assert_rows_match_hf(hf_model, prompts, generation, steps, label):
    """Every row of a kvjax generation equals HF greedy decoding of that prompt alone."""
    assert len(generation.tokens) == len(prompts)
    for row, prompt in enumerate(prompts):
        hf_tokens, hf_step_logits = hf_greedy(hf_model, prompt, steps)
        tokens, logits = generation.tokens[row], generation.logits[row]
        assert tokens == hf_tokens, (
            f"{label} row {row} (prompt length {len(prompt)}): greedy tokens differ from HF "
            f"first at step {next(i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b)}"
            f"\nkvjax: {tokens}\nHF:    {hf_tokens}")
        assert logits.shape == (steps, VOCAB) and logits.dtype == np.float32
        diff = np.abs(logits - hf_step_logits).max(axis=-1)  # [steps]
        assert diff[0] < ATOL, f"{label} row {row}: prefill logits differ from HF by {diff[0]:.2e}"
        worst = int(diff.argmax())
        assert diff[worst] < ATOL, (
            f"{label} row {row}: step {worst} logits differ from HF by {diff[worst]:.2e}")
        # Not a trivial pass: the logits are spread out, so a 1e-4 match means something.
        assert np.ptp(hf_step_logits[0]) > 1.0


@pytest.mark.parametrize("variant", FAMILIES)
def test_greedy_tokens_and_logits_match_hf(variant, checkpoint, float32_run):
    hf_model, _ = checkpoint(variant)
    model, generation = float32_run(variant)
    assert generation.stats["batch"] == 3 and generation.stats["capacity"] == 64
    assert [len(t) for t in generation.tokens] == [STEPS] * 3  # stop_tokens=[]: never stops
    assert_rows_match_hf(hf_model, FAMILY_PROMPTS, generation, STEPS, variant)
    _assert_feature_is_exercised(variant, model, hf_model, generation)


def _assert_feature_is_exercised(variant, model, hf_model, generation):
    """The config features a variant is about were read and matter for these weights."""
    prompt = FAMILY_PROMPTS[0]
    sequence = prompt + generation.tokens[0][:-1]
    for overrides in ABLATIONS.get(variant, []):
        ablated = make_hf_model(variant, **overrides)
        ablated.load_state_dict(hf_model.state_dict())
        logits = hf_logits(ablated, sequence)[len(prompt) - 1:]
        assert np.abs(logits - generation.logits[0]).max() > 0.05, f"{variant} {overrides}"

    config, layer0 = model.config, model.params["layers"][0]
    if config.sliding_window:  # the windowed layers kept rings of their window, not 64 slots
        full = dataclasses.replace(config, sliding_window=None)
        assert generation.stats["cache_bytes"] < kvjax.cache.estimate_bytes(full, 3, 64,
                                                                             dtype="float32")
    if variant == "mistral":
        assert config.sliding_window == 8 and config.layer_window(1) == 8
    elif variant in ("gemma", "gemma2", "gemma3"):
        assert config.norm_offset == 1.0 and config.norm_scale_float32
        assert config.scale_embeddings and config.activation == "gelu_tanh"
        assert config.tie_word_embeddings and "lm_head" not in model.params
        # HF stores (1 + w) norm weights as w: randomised around 1 here, so the offset matters.
        assert np.asarray(layer0["attn_norm"]).mean() > 0.5
        if variant != "gemma":
            assert config.post_norms and config.query_scale == pytest.approx(24 ** -0.5)
            assert config.layer_types == ("sliding_attention", "full_attention")
            assert (config.layer_window(0), config.layer_window(1)) == (8, None)
        if variant == "gemma2":
            assert (config.attn_logit_softcap, config.final_logit_softcap) == (3.0, 4.0)
            assert np.abs(generation.logits[0]).max() < 4.0  # capped
        if variant == "gemma3":
            assert config.qk_norm and config.qk_norm_per_head
            assert (config.local_rope_theta, config.rope_theta) == (10_000.0, 1_000_000.0)
            assert config.rope_scaling.rope_type == "linear"
    elif variant == "phi3":  # fused [q | k | v] and [gate | up] rows, split at load
        assert config.sliding_window == 16
        state = hf_model.state_dict()
        qkv = state["model.layers.0.self_attn.qkv_proj.weight"].numpy()
        gate_up = state["model.layers.0.mlp.gate_up_proj.weight"].numpy()
        q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        np.testing.assert_array_equal(layer0["wk"], qkv[q:q + kv].T)
        np.testing.assert_array_equal(layer0["w_up"], gate_up[INTERMEDIATE:].T)
    elif variant == "gpt2":
        assert config.position_embedding == "learned" and config.norm == "layer"
        assert not config.gated_mlp and "w_gate" not in layer0
        assert config.num_kv_heads == config.num_heads == HEADS
        assert config.qkv_bias and config.o_bias and config.mlp_bias
        assert model.params["pos_embed"].shape == (128, HIDDEN)
        assert np.abs(np.asarray(layer0["attn_norm_bias"])).max() > 0.1
    elif variant == "olmo2":
        assert not config.pre_norms and config.post_norms and "attn_norm" not in layer0
        assert config.qk_norm and not config.qk_norm_per_head
        assert layer0["q_norm"].shape == (HEADS * HEAD_DIM,)
        assert layer0["k_norm"].shape == (KV_HEADS * HEAD_DIM,)
    elif variant == "qwen2":
        assert config.qkv_bias and not config.o_bias
        for name in ("bq", "bk", "bv"):
            assert np.abs(np.asarray(layer0[name])).max() > 0.1, name
    elif variant == "qwen3":
        assert config.qk_norm
        for name in ("q_norm", "k_norm"):
            assert layer0[name].shape == (HEAD_DIM,)
            assert np.abs(np.asarray(layer0[name]) - 1).max() > 0.1, name
    elif variant == "llama_bias":
        assert config.qkv_bias and config.o_bias and config.mlp_bias
        for name in ("bq", "bk", "bv", "bo", "b_gate", "b_up", "b_down"):
            assert np.abs(np.asarray(layer0[name])).max() > 0.1, name
    elif variant == "llama_tied":
        assert config.tie_word_embeddings and "lm_head" not in model.params
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    else:
        assert variant == "llama"
        assert not (config.qkv_bias or config.o_bias or config.mlp_bias or config.qk_norm)
        assert config.sliding_window is None and "lm_head" in model.params


def test_ragged_batch_rows_equal_hf_alone(checkpoint, float32_run):
    # Same batch size, prompt bucket, capacity and steps as the family test: no new compile.
    hf_model, _ = checkpoint("llama")
    model, _ = float32_run("llama")
    assert sorted(len(p) for p in RAGGED_PROMPTS) == [3, 7, 11]
    generation = kvjax.generate(model, RAGGED_PROMPTS, max_new_tokens=STEPS, temperature=0.0,
                                stop_tokens=[], return_logits=True)
    assert generation.stats["prompt_bucket"] == 16  # rows padded to different extents
    assert_rows_match_hf(hf_model, RAGGED_PROMPTS, generation, STEPS, "ragged llama")
    # The rows really are different sequences (not one row broadcast).
    assert len({tuple(t) for t in generation.tokens}) == 3


ROPE_VARIANTS = {"rope_linear": "linear", "rope_llama3": "llama3", "rope_yarn": "yarn"}


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_rope_scaling_matches_hf(variant, checkpoint):
    rope_type = ROPE_VARIANTS[variant]
    hf_model, directory = checkpoint(variant)
    model = kvjax.load(directory, dtype="float32")
    assert model.config.rope_scaling.rope_type == rope_type

    inv_freq, attention_factor = rope_inverse_frequencies(model.config)
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_model.config, "cpu")
    hf_inv_freq = hf_inv_freq.double().numpy()
    assert len(inv_freq) == HEAD_DIM // 2
    np.testing.assert_allclose(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(float(hf_attention_factor), rel=1e-6)
    if rope_type == "yarn":
        assert attention_factor > 1.1  # 0.1 * ln(4) + 1: it is actually applied
    # The scaling changes the frequencies (not the default table under another name).
    default, _ = rope_inverse_frequencies(dataclasses.replace(model.config,
                                                              rope_scaling=RopeScaling()))
    assert np.abs(np.asarray(inv_freq) / np.asarray(default) - 1).max() > 0.1

    steps = 8
    generation = kvjax.generate(model, [ROPE_PROMPT], max_new_tokens=steps, temperature=0.0,
                                stop_tokens=[], return_logits=True)
    assert_rows_match_hf(hf_model, [ROPE_PROMPT], generation, steps, variant)

    # With default RoPE the same weights give clearly different logits on this sequence.
    unscaled = make_hf_model("llama", max_position_embeddings=64)
    unscaled.load_state_dict(hf_model.state_dict())
    sequence = ROPE_PROMPT + generation.tokens[0][:-1]
    unscaled_logits = hf_logits(unscaled, sequence)[len(ROPE_PROMPT) - 1:]
    assert np.abs(unscaled_logits - generation.logits[0]).max() > 0.05


def test_phi3_longrope_matches_hf(checkpoint):
    """Longrope: kvjax picks short or long factors per compiled program, by the cache
    capacity (long when capacity > original_max_position_embeddings). HF picks by the
    current length and recomputes its cache when a run crosses over; the two agree for
    every run that stays within the capacity <= original length (short) and for prompts
    longer than the original length (long from the first step)."""
    hf_model, directory = checkpoint("phi3_longrope")
    model = kvjax.load(directory, dtype="float32")
    scaling = model.config.rope_scaling
    assert scaling.rope_type == "longrope" and scaling.original_max_position_embeddings == 16

    tables = {}
    for label, max_length, hf_seq_len in (("short", 16, 16), ("long", 32, 17)):
        inv_freq, attention_factor = rope_inverse_frequencies(model.config, max_length=max_length)
        hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["longrope"](
            hf_model.config, "cpu", seq_len=hf_seq_len)
        np.testing.assert_allclose(inv_freq, hf_inv_freq.double().numpy(), rtol=1e-6, atol=0)
        assert attention_factor == pytest.approx(float(hf_attention_factor), rel=1e-6)
        assert attention_factor > 1.2  # sqrt(1 + ln 4 / ln 16): applied to both sets
        tables[label] = np.asarray(inv_freq)
    assert np.abs(tables["long"] / tables["short"] - 1).max() > 0.5

    steps = 8
    for prompt, capacity in ((ROPE_PROMPT[:5], 16), (ROPE_PROMPT, 64)):  # short, long
        generation = kvjax.generate(model, [prompt], max_new_tokens=steps, temperature=0.0,
                                    stop_tokens=[], capacity=capacity, return_logits=True)
        assert generation.stats["capacity"] == capacity
        assert_rows_match_hf(hf_model, [prompt], generation, steps, f"longrope capacity {capacity}")


# Reduced precision: kvjax's prefill logits vs its own float32 logits (which match HF to
# 1e-4 above), measured relative to the largest float32 logit. Rounding the weights alone
# perturbs them by 2**-9 (bfloat16, 8 significant bits) or 2**-12 (float16, 11 bits)
# relative, and the activations are rounded again at every layer; over all six families
# of this file that gives at most ~2.1% (bfloat16) and ~0.21% (float16) of the logit scale
# (~1.2% and ~0.2% for the llama used here). The tolerances leave 2.5-5x headroom, yet
# stay far below what a wrong model gives (logits of these models have std ~0.8 against
# a max of ~2.5, so a wrong or mis-read weight moves them by tens of percent). A nonzero lower bound proves the computation really ran in reduced precision.
REL_TOL = {"bfloat16": 5e-2, "float16": 1e-2}


def _load_low_precision(checkpoint, dtype):
    _, directory = checkpoint("llama")
    model = kvjax.load(directory, dtype=dtype)
    assert model.params["embed"].dtype == jnp.dtype(dtype)
    assert model.dtype == jnp.dtype(dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {jnp.dtype(dtype)}
    return model


def _assert_prefill_close(generation, reference, rows, dtype):
    for row in rows:
        got, want = generation.logits[row][0], reference.logits[row][0]
        assert got.dtype == np.float32
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < rel < REL_TOL[dtype], f"{dtype} row {row}: prefill logits off by {rel:.2%}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_prefill_close_to_float32(dtype, checkpoint, float32_run):
    model = _load_low_precision(checkpoint, dtype)
    _, reference = float32_run("llama")  # row 0 equals HF on FAMILY_PROMPTS[0] alone
    generation = kvjax.generate(model, [FAMILY_PROMPTS[0]], max_new_tokens=1, stop_tokens=[],
                                return_logits=True)
    assert generation.stats["cache_bytes"] == (
        2 * LAYERS * 1 * KV_HEADS * 64 * HEAD_DIM * 2 + 4)  # K and V in 2-byte elements
    _assert_prefill_close(generation, reference, [0], dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_batched_prefill_close_to_float32(dtype, checkpoint, float32_run):
    model = _load_low_precision(checkpoint, dtype)
    _, reference = float32_run("llama")
    try:
        generation = kvjax.generate(model, FAMILY_PROMPTS, max_new_tokens=1, stop_tokens=[],
                                    return_logits=True)
    except jax.errors.JaxRuntimeError as e:
        if "DotThunk" not in str(e):
            raise
        pytest.fail(
            f"kvjax bug: generate(dtype={dtype}) with a batch of 3 fails on the XLA CPU backend "
            f"({e}). The probabilities x values einsum in kvjax/attention.py, "
            "'bkgqs,bksd->bqkgd' with preferred_element_type=float32, lowers to a "
            "bf16 x bf16 -> f32 dot that XLA:CPU cannot run when batch > 1; contracting to "
            "'bkgqs,bksd->bkgqd' and transposing to [batch, queries, kv_heads, group, "
            "head_dim] afterwards runs.")
    _assert_prefill_close(generation, reference, range(len(FAMILY_PROMPTS)), dtype)
