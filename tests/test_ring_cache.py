"""Ring buffers for sliding-window layers and streaming with attention sinks
(``kvjax.cache.layout``, ``kvjax.attention.ring``).

Oracles: a Python list model of a ring; ``forward`` without a cache over the whole
sequence (each query masked to its window); transformers' own model decoding one token
at a time with a hand-kept StreamingLLM cache (sinks kept, the oldest window token
dropped and the rest rotated back one position); the plain cache while a row fits.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import kvjax
from kvjax.cache import CacheLayout, LayerSlots, cache_layout, held_positions
from kvjax.cache.layout import write_slots
from kvjax.model import forward
from tests.conftest import make_config, make_model
from tests.hf_fixtures import VOCAB, make_hf_model, save_checkpoint

ATOL = 1e-4  # float32 against float32, as the transformers parity tests


@pytest.mark.parametrize("sinks,window", [(0, 5), (3, 4), (2, 1)])
def test_ring_slots_hold_what_a_python_ring_holds(sinks, window):
    """Blocks of every size written one after another: each slot holds the position a
    list model says (the sinks, then the newest ``window`` positions), and
    ``held_positions`` names them."""
    slots = LayerSlots(sinks + window, window=window, sinks=sinks)
    rows = 2
    buffer = jnp.full((rows, 1, slots.slots), -1, jnp.int32)  # [batch, kv_heads, slots]
    kept = [dict() for _ in range(rows)]  # slot -> position, the list model
    length = np.zeros(rows, np.int32)
    for step, sizes in enumerate([(7, 2), (1, 1), (3, 0), (1, 4), (11, 1), (1, 1), (2, 9)]):
        width = max(sizes)
        positions = np.full((rows, width), -1, np.int32)
        for row, size in enumerate(sizes):
            positions[row, :size] = length[row] + np.arange(size)
            for p in range(length[row], length[row] + size):
                if p < sinks:
                    kept[row][p] = p
                else:  # the newest `window` positions after the sinks, p % window apart
                    kept[row][sinks + (p - sinks) % window] = p
            length[row] += size
        block = jnp.asarray(np.where(positions >= 0, positions, -7))[:, None, :]
        buffer = write_slots(buffer, block, jnp.asarray(positions), slots)
        want = np.full((rows, slots.slots), -1)
        for row in range(rows):
            for slot, p in kept[row].items():
                want[row, slot] = p
        np.testing.assert_array_equal(buffer[:, 0], want, err_msg=f"after block {step}")
        np.testing.assert_array_equal(held_positions(jnp.asarray(length), slots), want)


@pytest.fixture(scope="module")
def window_model():
    """A random model whose layers attend to their last 6 positions."""
    return make_model(make_config(num_layers=2, sliding_window=6, max_position_embeddings=64))


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_chunks_through_a_ring_give_the_full_forward_logits(window_model, kv_dtype):
    """A sequence fed in blocks of every size (a prompt longer than the window, single
    tokens, blocks longer and shorter than the window, rows of padding) through ring
    buffers of 6 slots gives each block's last logits of one forward pass over the whole
    sequence without a cache (float32: within 1e-4; int8: within 0.05)."""
    config, params = window_model.config, window_model.params
    cache = kvjax.cache.create(config, 2, 64, kv_dtype, jnp.float32)
    assert [k.shape[2] for k in cache.keys] == [6, 6] and cache.capacity == 64
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
    full, _ = forward(config, params, jnp.asarray(tokens),
                      jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40)))
    fed = np.zeros(2, np.int32)
    for sizes in [(9, 3), (1, 1), (1, 0), (7, 2), (3, 13), (1, 1), (12, 5), (1, 1)]:
        width = max(sizes)
        block = np.zeros((2, width), np.int32)
        positions = np.full((2, width), -1, np.int32)
        for row, size in enumerate(sizes):
            block[row, :size] = tokens[row, fed[row]:fed[row] + size]
            positions[row, :size] = fed[row] + np.arange(size)
        logits, cache = forward(config, params, jnp.asarray(block), jnp.asarray(positions), cache)
        fed += np.asarray(sizes)
        for row, size in enumerate(sizes):
            if size:  # a row of padding reads nothing and writes nothing
                want = full[row, fed[row] - 1]
                np.testing.assert_allclose(logits[row, -1 if width > 1 else 0], want,
                                           atol=0.05 if kv_dtype else ATOL)
    np.testing.assert_array_equal(cache.lengths, fed)


def test_gemma3_shaped_cache_keeps_the_local_windows_only():
    """A Gemma-3-shaped model (the 4B shape: 34 layers, 5 local with a 1024 window to 1
    global) keeps a ring of 1024 slots in its local layers and ``capacity`` in its
    global ones; ``estimate_bytes`` is the created cache's bytes."""
    config = kvjax.ModelConfig.from_dict(dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        sliding_window=1024, max_position_embeddings=131072))
    local = sum(config.is_local_layer(i) for i in range(34))
    assert (local, 34 - local) == (29, 5)
    for capacity in (512, 32768):
        cache = jax.eval_shape(lambda: kvjax.cache.create(config, 1, capacity, None, jnp.bfloat16))
        slots = [k.shape[2] for k in cache.keys]
        assert slots == [min(capacity, 1024) if config.is_local_layer(i) else capacity
                         for i in range(34)]
        per_slot = 2 * 4 * 256 * 2  # keys and values, 4 KV heads, head_dim 256, bf16
        assert kvjax.cache.estimate_bytes(config, 1, capacity) == \
            per_slot * sum(slots) + 4 == kvjax.cache.tree_nbytes(cache)
    # at 32k: 5 global layers of 32768 slots + 29 rings of 1024 against 34 x 32768
    assert per_slot * sum(slots) / (per_slot * 34 * 32768) == pytest.approx(
        (5 * 32768 + 29 * 1024) / (34 * 32768))


# ----- streaming (attention sinks) -----

def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@torch.no_grad()
def hf_streaming_greedy(model, prompt: list[int], steps: int, sinks: int, window: int):
    """StreamingLLM kept by hand around a transformers model: every token fed alone at
    its position within the cache; once the cache holds ``sinks + window - 1`` tokens,
    the oldest after the sinks is dropped and the keys after it rotated back one
    position (transformers stores keys rotated). Returns (tokens, float32 logits)."""
    inv_freq = model.model.rotary_emb.inv_freq.double()
    cos = torch.cat([torch.cos(-inv_freq)] * 2).float()  # a rotation by -1 position
    sin = torch.cat([torch.sin(-inv_freq)] * 2).float()
    cache = transformers.DynamicCache(config=model.config)
    # transformers 5.x renamed forward's past_key_values to cache (the old name warns)
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    sequence, tokens, logits = list(prompt), [], []
    for fed in range(len(prompt) + steps - 1):
        out = model(torch.tensor([[sequence[fed]]]), **{cache_arg: cache}, use_cache=True,
                    position_ids=torch.tensor([[cache.get_seq_length()]])).logits[0, -1]
        if fed >= len(prompt) - 1:
            tokens.append(int(torch.argmax(out)))
            logits.append(out.float().numpy())
            sequence.append(tokens[-1])
        if cache.get_seq_length() > sinks + window - 1:
            for layer in cache.layers:
                shifted = layer.keys[:, :, sinks + 1:]
                shifted = shifted * cos + _rotate_half(shifted) * sin
                layer.keys = torch.cat([layer.keys[:, :, :sinks], shifted], dim=2)
                layer.values = torch.cat([layer.values[:, :, :sinks],
                                          layer.values[:, :, sinks + 1:]], dim=2)
    return tokens, np.stack(logits)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf_model = make_hf_model("llama")
    directory = save_checkpoint(hf_model, tmp_path_factory.mktemp("llama"))
    return hf_model, kvjax.load(directory, dtype="float32")


@pytest.mark.parametrize("sinks,window", [(4, 12), (0, 16)])
def test_streaming_matches_streaming_llm_on_transformers(llama, sinks, window):
    """A 21-token prompt (longer than the 16 slots) and 48 new tokens, 4x the cache:
    greedy tokens equal, logits within 1e-4, of transformers with a StreamingLLM cache
    kept by hand; ``generate_stream`` gives the same tokens; the cache holds 16 slots a
    layer throughout."""
    hf_model, model = llama
    prompt = np.random.default_rng(5).integers(3, VOCAB, 21).tolist()
    want_tokens, want_logits = hf_streaming_greedy(hf_model, prompt, 48, sinks, window)
    opts = dict(max_new_tokens=48, stop_tokens=[], sink_tokens=sinks, window=window)
    got = kvjax.generate(model, [prompt], return_logits=True, **opts)
    assert got.tokens[0] == want_tokens
    np.testing.assert_allclose(got.logits[0], want_logits, atol=ATOL)
    assert got.stats["capacity"] == 16
    assert got.stats["cache_bytes"] == kvjax.cache.estimate_bytes(
        model.config, 1, 16, dtype="float32", sink_tokens=sinks, window=window)
    stream = kvjax.generate_stream(model, [prompt], chunk_size=8, **opts)
    for _ in stream:
        pass
    assert stream.generation.tokens == got.tokens


def test_streaming_equals_the_plain_cache_while_rows_fit(llama):
    """While prompt + new tokens fit in sinks + window, streaming changes nothing:
    ragged rows, float32 and int8."""
    _, model = llama
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (9, 3, 14)]
    for kv_dtype in (None, "int8"):
        plain = kvjax.generate(model, prompts, max_new_tokens=18, stop_tokens=[],
                               kv_dtype=kv_dtype, return_logits=True)
        streamed = kvjax.generate(model, prompts, max_new_tokens=18, stop_tokens=[],
                                  kv_dtype=kv_dtype, sink_tokens=4, window=28,
                                  return_logits=True)
        assert streamed.tokens == plain.tokens
        for a, b in zip(streamed.logits, plain.logits):
            np.testing.assert_allclose(a, b, atol=ATOL)


@pytest.fixture(scope="module")
def bundled():
    return kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32")


def test_streaming_chat_never_runs_out_and_its_memory_stays_flat(bundled):
    """A streaming chat goes on far past its 64 slots; every turn's cache has the same
    buffers; the plain chat of the same capacity refuses the turn that overflows, and
    until then the streaming replies equal the plain ones."""
    chat = kvjax.ChatSession(bundled, max_new_tokens=12, temperature=0, sink_tokens=4, window=60)
    plain = kvjax.ChatSession(bundled, capacity=64, max_new_tokens=12, temperature=0)
    shapes = None
    overflowed = False
    for turn in range(8):
        reply = chat.send(f"Tell me about lists, part {turn}.")
        leaves = [(x.shape, x.dtype) for x in jax.tree.leaves(chat._cache)]
        assert shapes in (None, leaves)
        shapes = leaves
        if not overflowed:
            try:
                assert plain.send(f"Tell me about lists, part {turn}.") == reply
            except kvjax.CapacityError:
                overflowed = True
    assert overflowed and chat.cache_fill > 4 * 64


def test_streaming_checks_its_sizes_before_compiling(llama):
    _, model = llama
    cases = [
        (dict(sink_tokens=16, capacity=16), "sink_tokens (16) must be smaller than the capacity "
         "(16): the window after the sinks needs at least one slot; pass a capacity >= 17 or "
         "fewer sink tokens"),
        (dict(sink_tokens=4, window=20, capacity=16), "sink_tokens (4) + window (20) = 24 is "
         "larger than the capacity (16); pass capacity >= 24 or window <= 12"),
        (dict(sink_tokens=4), "streaming needs its window: pass window (positions each query "
         "sees after the sinks) or capacity (sink_tokens + window)"),
        (dict(window=0), "window must be an integer >= 1, got 0"),
        (dict(sink_tokens=-1, window=8), "sink_tokens must be an integer >= 0, got -1"),
        (dict(window=8, use_cache=False), "window and sink_tokens say what the KV cache keeps; "
         "use_cache=False keeps none"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as error:
            kvjax.generate(model, [[5, 6]], max_new_tokens=4, **kwargs)
        assert str(error.value) == message
    gpt2 = dataclasses.replace(make_config(), model_type="gpt2", position_embedding="learned")
    with pytest.raises(ValueError) as error:
        kvjax.cache.create(gpt2, 1, 16, None, jnp.float32, window=8)
    assert str(error.value) == ("streaming (window, sink_tokens) needs rotary position "
                                "embeddings; gpt2 learns one embedding per position, up to 512: "
                                "generate without window and sink_tokens")


def test_cache_layout_is_static_structure():
    """Two layouts with equal buffers are different pytree structures (a program
    compiled for one is never run on the other)."""
    config = make_config(num_layers=1)
    plain = kvjax.cache.create(config, 1, 16, None, jnp.float32)
    streaming = kvjax.cache.create(config, 1, 16, None, jnp.float32, window=12, sink_tokens=4)
    assert [k.shape for k in plain.keys] == [k.shape for k in streaming.keys]
    assert jax.tree.structure(plain) != jax.tree.structure(streaming)
    assert streaming.layout == CacheLayout(16, (LayerSlots(16, window=12, sinks=4),), True)
    assert not bool(streaming.replace(lengths=jnp.array([1000])).is_full[0])
    assert cache_layout(config, 16) == CacheLayout(16, (LayerSlots(16),))
    assert dataclasses.replace(streaming.layout, streaming=False) != streaming.layout


def test_planning_counts_rings_and_streaming(window_model):
    """``max_capacity`` of a model whose every layer keeps a 6-slot ring: once 6 slots
    fit, every capacity does, up to ``max_position_embeddings`` (streaming too); one
    byte less and the answer is the largest that fits. Without windows, streaming
    caches grow with their window: ``max_capacity`` and ``max_batch`` agree with a
    scan."""
    config = window_model.config
    at = lambda capacity, **kw: kvjax.cache.estimate_bytes(config, 2, capacity, "int8", **kw)
    assert kvjax.cache.max_capacity(config, 2, at(6), "int8") == 64
    assert kvjax.cache.max_capacity(config, 2, at(6) - 1, "int8") == 5
    assert kvjax.cache.max_capacity(config, 2, at(10, sink_tokens=4), "int8", sink_tokens=4) == 64
    config = make_config(max_position_embeddings=64)  # no windows: streaming caches grow
    budget = at(40, sink_tokens=4) + 3
    fits = [c for c in range(5, 200) if at(c, sink_tokens=4) <= budget]
    assert kvjax.cache.max_capacity(config, 2, budget, "int8", sink_tokens=4) == max(fits) == 40
    per_row = kvjax.cache.estimate_bytes(config, 1, 40, "int8", sink_tokens=4, window=20)
    assert kvjax.cache.max_batch(config, 40, 3 * per_row, "int8", sink_tokens=4,
                                 window=20) == 3
