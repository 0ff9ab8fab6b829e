"""kvjax.decode drives models it has never seen: a hand-written one and a Flax NNX module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

import kvjax
from kvjax.attention import attend
from kvjax.sampling import SamplingParams

VOCAB, DIM = 31, 16
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5]]


def run_decode(step_fn, params, cache, num_new):
    batch = len(PROMPTS)
    tokens = np.zeros((batch, 8), np.int32)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, :len(prompt)] = prompt
    run = kvjax.jit_decode(step_fn, num_steps=num_new, greedy=True)
    result = run(params, cache, tokens, np.array([len(p) for p in PROMPTS], np.int32),
                 np.int32(num_new), SamplingParams.create(batch), np.uint32(0),
                 np.full((1,), kvjax.PAD_TOKEN, np.int32))
    return np.asarray(result.tokens).tolist()


# A model defined only here: logits are a linear map of the mean of the embeddings of
# the tokens so far. Its cache is the running sum and count, not keys and values.
@struct.dataclass
class RunningMean:
    total: jax.Array  # [batch, dim]
    count: jax.Array  # [batch]


def mean_step(params, tokens, positions, cache):
    real = (positions >= 0)[..., None]  # [batch, seq, 1]
    emb = params["embed"][tokens] * real  # [batch, seq, dim]
    sums = cache.total[:, None] + jnp.cumsum(emb, axis=1)
    counts = cache.count[:, None] + jnp.cumsum(real[..., 0], axis=1)
    logits = jnp.einsum("bsd,vd->bsv", sums / jnp.maximum(counts, 1)[..., None], params["out"])
    return logits, RunningMean(total=sums[:, -1], count=counts[:, -1])


def test_hand_written_model_and_cache():
    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(VOCAB, DIM)).astype(np.float32),
              "out": rng.normal(size=(VOCAB, DIM)).astype(np.float32)}
    cache = RunningMean(total=jnp.zeros((2, DIM)), count=jnp.zeros((2,), jnp.int32))
    got = run_decode(mean_step, params, cache, 12)

    for row, prompt in enumerate(PROMPTS):  # oracle: recompute the mean from scratch
        seq = list(prompt)
        for _ in range(12):
            mean = params["embed"][seq].mean(axis=0)
            seq.append(int(np.argmax(params["out"] @ mean)))
        assert got[row] == seq[len(prompt):]


class TinyAttentionLM(nnx.Module):
    """One attention layer with a KV cache, written as an NNX module."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.pos = nnx.Embed(64, DIM, rngs=rngs)
        self.qkv = nnx.Linear(DIM, 3 * DIM, rngs=rngs)
        self.out = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, tokens, positions, cache: kvjax.KVCache | None):
        x = self.embed(tokens) + self.pos(jnp.maximum(positions, 0))  # [batch, seq, dim]
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        heads = lambda t: t.reshape(*t.shape[:2], 2, DIM // 2)  # [batch, seq, 2, dim/2]
        q, k, v = heads(q), heads(k).transpose(0, 2, 1, 3), heads(v).transpose(0, 2, 1, 3)
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            cache = cache.update(0, k, v, positions).advance(positions)
            keys, values = cache.keys[0], cache.values[0]
            key_positions = cache.slot_positions
        h = attend(q, keys, values, positions, key_positions).reshape(x.shape)
        return self.out(x + h), cache


def test_flax_nnx_module():
    module = TinyAttentionLM(nnx.Rngs(0))
    graphdef, state = nnx.split(module)

    def step(state, tokens, positions, cache):
        return nnx.merge(graphdef, state)(tokens, positions, cache)

    config = kvjax.ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=DIM,
                               intermediate_size=DIM, num_layers=1, num_heads=2,
                               num_kv_heads=2, head_dim=DIM // 2)
    cache = kvjax.KVCache.create(config, batch=2, capacity=32, dtype=jnp.float32)
    got = run_decode(step, state, cache, 16)

    @jax.jit
    def full_forward(tokens, positions):  # the module without a cache, one padded shape
        return module(tokens, positions, None)[0]

    for row, prompt in enumerate(PROMPTS):  # oracle: recompute from scratch every token
        seq = list(prompt)
        for _ in range(16):
            tokens = np.zeros((1, 32), np.int32)
            tokens[0, :len(seq)] = seq
            positions = np.where(np.arange(32) < len(seq), np.arange(32), -1)[None]
            logits = full_forward(tokens, positions)
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert got[row] == seq[len(prompt):]
    assert len(set(got[0])) > 1


def test_static_arguments_are_checked_before_tracing_the_model():
    traced = []

    def step(params, tokens, positions, cache):
        traced.append(tokens.shape)
        return mean_step(params, tokens, positions, cache)

    params = {"embed": np.ones((VOCAB, DIM), np.float32), "out": np.ones((VOCAB, DIM), np.float32)}
    cache = RunningMean(total=jnp.zeros((2, DIM)), count=jnp.zeros((2,), jnp.int32))
    tokens, lengths = np.ones((2, 4), np.int32), np.array([4, 2], np.int32)
    controls = (np.int32(3), SamplingParams.create(2), np.uint32(0),
                np.full((1,), kvjax.PAD_TOKEN, np.int32))
    cases = [
        (dict(num_steps=0), tokens, lengths, "num_steps must be an integer >= 1, got 0"),
        (dict(num_steps=4, sync_every=0), tokens, lengths,
         "sync_every must be an integer >= 1, got 0"),
        (dict(num_steps=4), tokens[0], lengths,
         "prompt_tokens must be [batch, seq] token ids, got shape (4,)"),
        (dict(num_steps=4), tokens, lengths[:1],
         "prompt_lengths must be [batch] = (2,) for prompt_tokens of shape (2, 4), got shape (1,)"),
    ]
    for kwargs, prompt_tokens, prompt_lengths, message in cases:
        run = kvjax.jit_decode(step, greedy=True, **kwargs)
        with pytest.raises(ValueError) as e:
            run(params, cache, prompt_tokens, prompt_lengths, *controls)
        assert str(e.value) == message
    assert traced == []
