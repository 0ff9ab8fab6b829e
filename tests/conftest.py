"""Shared fixtures: small random models built directly in kvjax (no checkpoint)."""

import jax
import jax.numpy as jnp
import pytest

import kvjax

# Oracle comparisons are in true float32: no TF32 matmuls on GPUs.
jax.config.update("jax_default_matmul_precision", "highest")


def make_config(num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=97,
                num_layers=2, max_position_embeddings=512, **kw) -> kvjax.ModelConfig:
    return kvjax.ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size,
                             intermediate_size=2 * hidden_size, num_layers=num_layers,
                             num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             max_position_embeddings=max_position_embeddings, **kw)


def make_model(config: kvjax.ModelConfig, seed: int = 0, dtype=jnp.float32,
               scale: float = 5.0) -> kvjax.Model:
    """A random float32 model. Weights are scaled up from init_params' N(0, 0.02) so the
    logits are far from ties and greedy decoding is a sharp test."""
    params = kvjax.init_params(config, jax.random.key(seed), dtype)
    params = jax.tree.map(lambda x: x if x.ndim == 1 else x * scale, params)
    return kvjax.Model(config=config, params=params)


@pytest.fixture(scope="session")
def gqa_model() -> kvjax.Model:
    return make_model(make_config())


class CompileCounter:
    """Counts XLA backend compilations while active (a jax.monitoring listener)."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, _duration, **_):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


_COUNTER = None


@pytest.fixture
def compile_counter() -> CompileCounter:
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CompileCounter()
    return _COUNTER
