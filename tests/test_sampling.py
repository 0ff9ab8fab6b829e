"""Sampling: filters that can be caught breaking their promise, seeds, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.sampling import SamplingParams, check_sampling_values, sample

DRAWS = 4000


def draw(logits: np.ndarray, **values) -> np.ndarray:
    """``DRAWS`` samples from one row of logits, each with its own key."""
    params = SamplingParams.create(DRAWS, **values)
    batch_logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (DRAWS, len(logits)))
    keys = jax.random.split(jax.random.key(0), DRAWS)
    return np.asarray(jax.jit(sample, static_argnums=3)(batch_logits, keys, params, False))


LOGITS = np.log(np.array([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))


def test_top_k_never_leaves_the_top_k():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=50) * 2
    tokens = draw(logits, temperature=1.5, top_k=5)
    top5 = set(np.argsort(-logits)[:5])
    assert set(tokens) <= top5
    assert len(set(tokens)) == 5  # all five are reachable


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # Cumulative mass before each token: 0, .40, .65, .80, .90, .96. With top_p=0.7 the
    # first three are kept (mass before < 0.7), renormalised to .40/.80, .25/.80, .15/.80.
    tokens = draw(LOGITS, temperature=1.0, top_p=0.7)
    assert set(tokens) == {0, 1, 2}
    freq = np.bincount(tokens, minlength=6) / DRAWS
    np.testing.assert_allclose(freq[:3], [0.5, 0.3125, 0.1875], atol=0.03)


def test_min_p_drops_tokens_below_fraction_of_the_best():
    # min_p=0.3: keep probabilities >= 0.3 * 0.40 = 0.12 -> tokens 0, 1, 2.
    tokens = draw(LOGITS, temperature=1.0, min_p=0.3)
    assert set(tokens) == {0, 1, 2}


def test_filters_compose_in_order():
    # top_k=4 renormalises to .4/.9, .25/.9, .15/.9, .1/.9 = .444, .278, .167, .111;
    # then top_p=0.8 keeps tokens with mass before < 0.8: 0, .444, .722 -> tokens 0, 1, 2.
    tokens = draw(LOGITS, temperature=1.0, top_k=4, top_p=0.8)
    assert set(tokens) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    cold = np.bincount(draw(LOGITS, temperature=0.5), minlength=6) / DRAWS
    plain = np.bincount(draw(LOGITS, temperature=1.0), minlength=6) / DRAWS
    expected_cold = np.exp(LOGITS / 0.5) / np.exp(LOGITS / 0.5).sum()
    np.testing.assert_allclose(cold, expected_cold, atol=0.03)
    np.testing.assert_allclose(plain, np.exp(LOGITS), atol=0.03)


def test_tiny_temperature_equals_greedy():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(64, 300)), jnp.float32)
    keys = jax.random.split(jax.random.key(3), 64)
    sampled = sample(logits, keys, SamplingParams.create(64, temperature=1e-4), False)
    greedy = sample(logits, keys, SamplingParams.create(64), True)
    np.testing.assert_array_equal(sampled, np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(greedy, sampled)


def test_a_rows_draw_does_not_depend_on_its_neighbours_filters():
    """The sort that filters need runs only when some row filters (``kept_tokens``);
    an unfiltered row draws the same token with and without a filtering neighbour."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(2, 500)) * 3, jnp.float32)
    run = jax.jit(sample, static_argnums=3)
    for key in range(50):
        keys = jax.random.split(jax.random.key(key), 2)
        alone = SamplingParams.create(2, temperature=0.9)
        beside = SamplingParams(temperature=alone.temperature, top_k=jnp.array([0, 3], jnp.int32),
                                top_p=jnp.array([1.0, 0.5], jnp.float32), min_p=alone.min_p)
        plain, filtered = (np.asarray(run(logits, keys, params, False))
                           for params in (alone, beside))
        assert plain[0] == filtered[0]
        assert filtered[1] in np.argsort(-np.asarray(logits[1]))[:3]


def test_generate_seeds(gqa_model):
    prompts = [[1, 2, 3], [4, 5]]
    kwargs = dict(max_new_tokens=32, temperature=1.0, stop_tokens=[])
    a = kvjax.generate(gqa_model, prompts, seed=5, **kwargs)
    b = kvjax.generate(gqa_model, prompts, seed=5, **kwargs)
    c = kvjax.generate(gqa_model, prompts, seed=6, **kwargs)
    assert a.tokens == b.tokens
    assert a.tokens[0] != c.tokens[0] and a.tokens[1] != c.tokens[1]
    # A row's randomness does not depend on the rows after it.
    alone = kvjax.generate(gqa_model, prompts[:1], seed=5, **kwargs)
    assert alone.tokens[0] == a.tokens[0]
    # Temperature -> 0 in sampling mode gives the greedy tokens.
    cold = kvjax.generate(gqa_model, prompts, seed=5, max_new_tokens=32, temperature=1e-5,
                          stop_tokens=[])
    greedy = kvjax.generate(gqa_model, prompts, max_new_tokens=32, stop_tokens=[])
    assert cold.tokens == greedy.tokens


@pytest.mark.parametrize("values, message", [
    (dict(temperature=-0.1), "temperature must be >= 0 (0 = greedy), got -0.1"),
    (dict(top_k=-1), "top_k must be an integer >= 0 (0 or None to disable), got -1"),
    (dict(top_k=2.5), "top_k must be an integer >= 0 (0 or None to disable), got 2.5"),
    (dict(top_p=0.0), "top_p must be in (0, 1] (or None to disable), got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1] (or None to disable), got 1.5"),
    (dict(min_p=1.0), "min_p must be in [0, 1) (or None to disable), got 1.0"),
    (dict(min_p=-0.5), "min_p must be in [0, 1) (or None to disable), got -0.5"),
    # NaN and infinity are in no range (an infinite temperature would sample uniformly)
    (dict(temperature=float("inf")),
     "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (dict(temperature=float("nan")),
     "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (dict(temperature=float("-inf")),
     "temperature must be a finite number >= 0 (0 = greedy), got -inf"),
    (dict(top_p=float("nan")), "top_p must be in (0, 1] (or None to disable), got nan"),
    (dict(top_p=float("inf")), "top_p must be in (0, 1] (or None to disable), got inf"),
    (dict(min_p=float("nan")), "min_p must be in [0, 1) (or None to disable), got nan"),
    (dict(min_p=float("inf")), "min_p must be in [0, 1) (or None to disable), got inf"),
])
def test_out_of_range_values(values, message):
    full = dict(temperature=1.0, top_k=None, top_p=None, min_p=None) | values
    with pytest.raises(ValueError) as e:
        check_sampling_values(**full)
    assert str(e.value) == message
