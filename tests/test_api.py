"""Bad input to kvjax.generate fails with a clear message before anything compiles;
sampling defaults of a model."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from tests.conftest import make_config, make_model


@pytest.fixture(scope="module")
def small_model():
    return make_model(make_config(max_position_embeddings=64))


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1, 2], []], {}, "prompt 1 is empty: every prompt needs at least one token"),
    ([], {}, "prompts must be a non-empty list of strings or of token-id lists, "
             "or a 2-D integer array"),
    ("hello", {}, "prompts must be a non-empty list of strings or of token-id lists, "
                  "or a 2-D integer array"),
    ([[1.5, 2]], {}, "prompt 0 must be a flat list of integer token ids, got float64 of shape (2,)"),
    ([[1], [True, False]], {}, "prompt 1 must be a flat list of integer token ids, got bool of "
                               "shape (2,)"),
    ([[[1, 2], [3, 4]]], {}, "prompt 0 must be a flat list of integer token ids, got int64 of "
                             "shape (2, 2)"),
    (np.array([1, 2, 3]), {}, "an array of prompts must be 2-D [batch, tokens], got shape (3,)"),
    (np.array([[1, 2, 97]]), {}, "prompt 0 has token id 97 outside the vocabulary [0, 97)"),
    ([[1, 97]], {}, "prompt 0 has token id 97 outside the vocabulary [0, 97)"),
    ([[-1, 5]], {}, "prompt 0 has token id -1 outside the vocabulary [0, 97)"),
    (["hello"], {}, "text prompts need a tokenizer (tokenizer.json in the checkpoint); "
                    "pass token-id lists instead"),
    ([[1] * 10], dict(max_new_tokens=20, capacity=16),
     "prompt (10 tokens) + max_new_tokens (20) = 30 exceeds the cache capacity (16); "
     "pass capacity >= 30"),
    ([[1] * 40], dict(max_new_tokens=30),
     "prompt (40 tokens) + max_new_tokens (30) = 70 exceeds the model's "
     "max_position_embeddings (64); shorten the prompt or lower max_new_tokens"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    ([[1]], dict(temperature=-1.0), "temperature must be >= 0 (0 = greedy), got -1.0"),
    ([[1]], dict(top_p=0.0), "top_p must be in (0, 1] (or None to disable), got 0.0"),
    ([[1]], dict(top_k=-1), "top_k must be an integer >= 0 (0 or None to disable), got -1"),
    ([[1]], dict(min_p=1.0), "min_p must be in [0, 1) (or None to disable), got 1.0"),
    ([[1]], dict(seed=-3), "seed must be an integer in [0, 2**32), got -3"),
    ([[1]], dict(seed="7"), "seed must be an integer in [0, 2**32), got '7'"),
    ([[1]], dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1, got 2.5"),
    ([[1]], dict(top_k="3"), "top_k must be an integer >= 0 (0 or None to disable), got '3'"),
    ([[1]], dict(stop_tokens=[5, 200]), "stop token 200 is outside the vocabulary [0, 97)"),
    ([[1]], dict(stop_tokens=list(range(17))), "at most 16 stop tokens are supported, got 17"),
])
def test_bad_input_fails_before_compiling(small_model, compile_counter, prompts, kwargs, message):
    with compile_counter as counter, pytest.raises(ValueError) as e:
        kvjax.generate(small_model, prompts, **kwargs)
    assert str(e.value) == message
    assert counter.count == 0


def test_an_array_of_prompts_is_its_rows(small_model):
    ids = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
    as_lists = kvjax.generate(small_model, ids.tolist(), max_new_tokens=4)
    for prompts in (ids, jnp.asarray(ids), list(ids)):
        assert kvjax.generate(small_model, prompts, max_new_tokens=4).tokens == as_lists.tokens


def test_default_capacity_is_a_bucket_capped_at_max_positions(small_model):
    out = kvjax.generate(small_model, [[1, 2, 3]], max_new_tokens=4)
    assert out.stats["capacity"] == 64 and out.stats["prompt_bucket"] == 16
    out = kvjax.generate(small_model, [[1] * 40], max_new_tokens=24)  # needs exactly 64
    assert out.stats["capacity"] == 64 and out.stats["prompt_bucket"] == 64
    # The model has no stop tokens: all 24 are made, the tokens of a cache with room to
    # spare (which attends over its first slots only: another program).
    assert small_model.stop_tokens == () and len(out.tokens[0]) == 24
    roomy = kvjax.generate(small_model, [[1] * 40], max_new_tokens=24, capacity=128)
    assert roomy.stats["capacity"] == 128 and roomy.tokens == out.tokens
    # With a stop token the row ends at its first occurrence (included).
    stop = out.tokens[0][9]
    stopped = kvjax.generate(small_model, [[1] * 40], max_new_tokens=24, stop_tokens=[stop])
    assert stopped.tokens[0] == out.tokens[0][:out.tokens[0].index(stop) + 1]


def test_unknown_dtype():
    with pytest.raises(ValueError) as e:
        kvjax.load("/nonexistent", dtype="float64")
    assert str(e.value) == "unsupported dtype 'float64'; supported: float32, bfloat16, float16"


def test_sampling_defaults_fill_only_values_not_given(small_model):
    """A model's generation_defaults (from generation_config.json) are used for the
    values a call leaves None; a given value wins, 0 / 1 turn a default filter off."""
    prompts = [[1, 2, 3], [4, 5]]
    sampling = dataclasses.replace(small_model, generation_defaults=dict(temperature=0.8, top_k=5,
                                                                         top_p=0.9))
    opts = dict(max_new_tokens=12, seed=3, stop_tokens=[])
    by_default = kvjax.generate(sampling, prompts, **opts)
    explicit = kvjax.generate(small_model, prompts, temperature=0.8, top_k=5, top_p=0.9, **opts)
    assert by_default.tokens == explicit.tokens
    assert by_default.stats["sampling"] == dict(temperature=0.8, top_k=5, top_p=0.9, min_p=None)
    greedy = kvjax.generate(small_model, prompts, **opts)
    assert greedy.stats["sampling"] == dict(temperature=0.0, top_k=None, top_p=None, min_p=None)
    assert kvjax.generate(sampling, prompts, temperature=0.0, **opts).tokens == greedy.tokens
    hotter = kvjax.generate(sampling, prompts, temperature=1.5, top_k=0, top_p=1.0, **opts)
    assert hotter.stats["sampling"] == dict(temperature=1.5, top_k=0, top_p=1.0, min_p=None)
    assert hotter.tokens == kvjax.generate(small_model, prompts, temperature=1.5, **opts).tokens
