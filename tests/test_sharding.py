"""One generation over several devices (kvjax.sharding): meshes, placements, collectives,
loading onto a mesh, errors, two processes, the CLI flags and the benchmark script.

The pytest process has a single CPU device; everything that needs several runs in a
subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set
before jax is imported there): ``tests/sharding_worker.py`` does the work and prints one
JSON object, which the tests here check. Models are tiny and each subprocess groups
several meshes, so the file takes about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import kvjax
from kvjax import sharding
from tests.conftest import cli_flag_error, make_config, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ["1x8", "2x4", "4x2", "8x1"]  # data x model
KERNEL_MESHES = ["1x8", "4x2"]  # tests/sharding_worker.py KERNEL_MESHES, INT8_MESHES
INT8_MESHES = ["2x4", "8x1"]
NUM_LAYERS = 2
NEW_TOKENS = 24  # tests/sharding_worker.py NEW_TOKENS


def device_env(devices: int) -> dict:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                    filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run_worker(*args: str, devices: int = 8, timeout: int = 300) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_worker", *args], cwd=ROOT,
                          env=device_env(devices), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**last_json(proc.stdout), "stderr": proc.stderr}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A tiny HF Llama with every bias, 8 query heads over 2 KV heads and a vocabulary of
    100 (split over model=2 and 4, replicated over model=8: 100 % 8 != 0)."""
    from tests.hf_fixtures import make_hf_model, save_checkpoint

    model = make_hf_model("llama_bias", hidden_size=64, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=8, vocab_size=100)
    return save_checkpoint(model, tmp_path_factory.mktemp("hf_sharded"))


@pytest.fixture(scope="module")
def meshes(hf_dir) -> dict:
    return run_worker("meshes", hf_dir)


# ----- same tokens on every mesh -----

@pytest.mark.parametrize("model_kind", ["gqa", "hf"])
@pytest.mark.parametrize("mesh", MESHES)
def test_tokens_equal_one_device(meshes, model_kind, mesh):
    """float32, greedy, 8 rows of different lengths, 24 new tokens: each mesh gives the
    tokens of the same model on one device (built with init_params and shard_params, or
    loaded with kvjax.load(dir, mesh=...)). (Streamed: test_batch_that_data_does_not_divide.)"""
    assert meshes["devices"] == 8
    reference = meshes[model_kind]["reference"]
    assert len(reference) == 8 and all(len(row) == NEW_TOKENS for row in reference)
    assert meshes[model_kind][mesh]["tokens_equal"]


@pytest.mark.parametrize("mesh", MESHES)
def test_int8_cache_on_a_mesh(meshes, mesh):
    """An int8 KV cache's scales ([batch, kv_heads, capacity]) are split like the codes'
    rows and KV heads on each mesh; on 2x4 and 8x1 it gives the one-device int8 tokens."""
    entry = meshes["gqa"][mesh]["int8"]
    if mesh in INT8_MESHES:
        assert entry["tokens_equal"]
    assert entry["scales"]["spec"] == entry["codes"]["spec"][:3]
    assert entry["scales"]["mesh"] == entry["codes"]["mesh"]


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
def test_ring_buffers_on_a_mesh(meshes, mesh):
    """Sliding-window ring buffers and streaming with sinks (positions 4x past the 16
    slots) give the one-device tokens on a mesh; a streaming cache of 16 slots is split
    like the plain one: rows over data, KV heads over model."""
    entry = meshes["gqa"][mesh]["ring"]
    assert entry["window_equal"] and entry["streaming_equal"]
    assert entry["slots"] == 16
    assert entry["keys"]["spec"] == meshes["gqa"][mesh]["cache_keys"]["spec"]


@pytest.mark.parametrize("mesh", MESHES)
def test_batch_that_data_does_not_divide(meshes, mesh):
    """7 prompts on data=2, 4 or 8: generate and generate_stream pad the batch and give
    the 7 rows of the one-device run, and nothing of the padding rows."""
    entry = meshes["gqa"][mesh]
    assert entry["uneven_equal"] and entry["uneven_stream_equal"]
    assert entry["uneven_batch"] == 7


def test_padding_rows_never_extend_the_loop(meshes):
    """One sampled prompt padded to 8 rows on data=8 stops where it stops on one device."""
    rows = meshes["padding_rows"]
    assert rows["stop_at"] < NEW_TOKENS - 2  # the stop token ends the row early
    assert rows["padded"] == rows["one"] and len(rows["one"][0]) == rows["stop_at"] + 1
    assert rows["padded_steps"] == rows["one_steps"] == rows["stop_at"]


def test_chat_session_on_a_mesh(meshes):
    """A ChatSession on a model=4 mesh keeps its cache sharded (KV heads over model_kv)
    and replies exactly as without a mesh, turn after turn, also with its decode steps on
    the decode kernel; so does one on data=2 x model=4, its one conversation padded to
    two rows."""
    chat = meshes["chat"]
    assert chat["1x4"] == chat["plain"] == chat["2x4"] and all(chat["plain"])
    assert chat["1x4_kernel"] == chat["plain"]  # the decode kernel on each device
    assert chat["1x4_kernel_steps"] == ["interpret"]  # (it really ran there)
    assert chat["1x4_cache"] == {"spec": ["data", "model_kv", None, None],
                                 "mesh": {"data": 1, "model_kv": 2, "model_rep": 2}}


@pytest.mark.parametrize("mesh", KERNEL_MESHES)
def test_decode_kernel_on_each_device(meshes, mesh):
    """The decode kernel (interpreted on these CPUs) under shard_map, each device on its
    own rows, query heads and KV heads (1x8: KV heads grouped; 4x2: split, rows too):
    generate and generate_stream give one device's plain-path tokens; the program holds
    the kernel once a layer, as on one device, and gathers no K/V (at most argmax
    partials of the vocab-split LM head)."""
    data, model = map(int, mesh.split("x"))
    kernel = meshes["gqa"][mesh]["kernel"]
    assert kernel["tokens_equal"] and kernel["stream_equal"]
    # every decode step of generate and generate_stream chose the kernel, with the split
    assert kernel["step_kernels"] == ["interpret"]
    assert kernel["plan_splits"] == [str(kernel["split"])]
    grouped = model > 2  # 2 KV heads: each on model / 2 devices
    assert kernel["split"] == (["data", MODEL_ALL, "model_kv"] if grouped
                               else ["data", "model", "model"])  # rows, heads, KV heads
    assert kernel["split_mesh"] == ({"data": data, "model_kv": 2, "model_rep": model // 2}
                                    if grouped else {"data": data, "model": model})
    program = kernel["program"]
    assert program["pallas_calls"] == meshes["gqa"]["kernel_one_device"] == NUM_LAYERS
    assert program["shard_maps"] >= NUM_LAYERS
    for shape in program["all_gather_shapes"]:
        assert shape == [8 // data, model], shape


def test_decode_kernel_with_one_kv_head_on_a_mesh(meshes):
    """MQA on data=2 x model=4: the one KV head is on every device, each device's query
    head reads it; the kernel on each device gives one device's tokens."""
    kernel = meshes["gqa"]["mqa_kernel"]
    assert kernel["tokens_equal"] and kernel["stream_equal"]
    assert kernel["step_kernels"] == ["interpret"]
    assert kernel["split"] == ["data", "model", None]
    assert kernel["split_mesh"] == {"data": 2, "model": 4}
    assert kernel["program"]["pallas_calls"] == NUM_LAYERS


# ----- where every parameter and cache buffer lives -----

MODEL_ALL = ["model_kv", "model_rep"]  # all of `model` on the grouped view of the mesh


def expected_specs(data: int, model: int, vocab: int, kv_heads: int = 2) -> dict:
    grouped = 1 < kv_heads < model and model % kv_heads == 0
    full = MODEL_ALL if grouped else "model"
    kv = "model_kv" if grouped else ("model" if kv_heads % model == 0 else None)
    mesh = ({"data": data, "model_kv": kv_heads, "model_rep": model // kv_heads} if grouped
            else {"data": data, "model": model})
    vocab_axis = full if vocab % model == 0 else None
    specs = {
        "embed": [None, None], "lm_head": [vocab_axis, None], "final_norm": [None],
        "attn_norm": [None], "mlp_norm": [None], "q_norm": [None], "k_norm": [None],
        "wq": [None, full], "bq": [full], "wo": [full, None], "bo": [None],
        "wk": [None, kv], "bk": [kv], "wv": [None, kv], "bv": [kv],
        "w_gate": [None, full], "b_gate": [full], "w_up": [None, full], "b_up": [full],
        "w_down": [full, None], "b_down": [None],
        "cache": ["data", kv, None, None], "lengths": ["data"],
    }
    return {name: {"spec": spec, "mesh": mesh} for name, spec in specs.items()}


@pytest.mark.parametrize("mesh", MESHES)
def test_param_and_cache_shardings(meshes, mesh):
    """The partition table, read back from the arrays' ``.sharding``: wq/w_gate/w_up
    column-split over model, wo/w_down row-split, norms replicated, the LM head
    vocab-parallel when model divides the vocabulary (100 is not split by 8), the
    embedding table (tied or not) replicated, KV heads over model or, with fewer KV
    heads than model devices, each on the devices that read it; the cache (data,
    model | model_kv, None, None)."""
    data, model = map(int, mesh.split("x"))
    gqa, hf = meshes["gqa"][mesh], meshes["hf"][mesh]
    want = expected_specs(data, model, vocab=96)
    assert set(gqa["params"]) == {"embed", "final_norm", "attn_norm", "mlp_norm", "q_norm",
                                  "k_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    for name, got in gqa["params"].items():
        assert got == want[name], name
    assert gqa["cache_keys"] == gqa["cache_values"] == want["cache"]
    assert gqa["cache_lengths"]["spec"] == want["lengths"]["spec"]
    kv_per_device = 2 // min(model, 2)  # grouped KV heads: one per device when model > 2
    assert gqa["cache_shard"] == [8 // data, kv_per_device, 64, 8]

    want = expected_specs(data, model, vocab=100)
    assert set(hf["params"]) == {"embed", "lm_head", "final_norm", "attn_norm", "mlp_norm",
                                 "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "w_gate",
                                 "b_gate", "w_up", "b_up", "w_down", "b_down"}
    for name, got in hf["params"].items():
        assert got == want[name], name


@pytest.mark.parametrize("mesh", MESHES + ["no_grouping_1x8", "rows_unsplit_2x4",
                                           "attention_whole_1x8"])
def test_cache_is_placed_by_the_logical_axes_it_declares(meshes, mesh):
    """Every cache kind made by ``kvjax.programs.new_cache`` on a mesh (K/V buffers and
    the recompute baseline's token history; default and custom rules) names each
    dimension of each array with a logical axis (``logical_axes()``) and lies exactly
    where ``sharding.logical_shardings`` of those axes puts it, split over the mesh."""
    placement = (meshes["gqa"][mesh]["cache_placement"] if mesh in MESHES
                 else meshes["custom_rules"]["placements"][mesh])
    assert placement["kv"]["arrays"] == 2 * NUM_LAYERS + 1  # keys, values, lengths
    assert placement["history"]["arrays"] == 2  # tokens, lengths
    for kind in ("kv", "history"):
        assert placement[kind]["axes_per_dimension"], kind
        assert placement[kind]["shardings_equal"], kind
    assert placement["kv"]["split"]


def test_kv_heads_that_cannot_be_grouped_are_replicated(hf_dir):
    """KV heads are never split: with group_kv_heads=False, with KV heads that do not
    divide model (3 on model=2) or a single KV head (MQA), wk and the cache are
    replicated over model."""
    fallback = run_worker("errors", hf_dir)["fallback"]
    replicated = {"wk": [None, None], "wq": [None, "model"], "cache": ["data", None, None, None]}
    # The decode kernel cannot run per device where a device's query heads read KV heads
    # among several it holds; a single KV head is read by every query head.
    assert fallback["no_grouping_1x8"] == replicated | {"kernel_split": None}
    assert fallback["kv3_model2"] == replicated | {"kernel_split": None}
    assert fallback["mqa_model4"] == replicated | {"kernel_split": ["data", "model", None]}


def test_generate_follows_the_rules_the_model_was_placed_by(meshes):
    """A model placed with other ShardingRules (``shard_model(model, mesh, rules)``)
    records them: generate creates its cache by them (KV heads replicated without
    grouping, so the decode kernel stays off; rows not split where ``batch`` is None, so
    7 rows need no padding on data=2) and gives one device's tokens."""
    rules = meshes["custom_rules"]
    assert rules["no_grouping_1x8"] == {
        "tokens_equal": True,
        "cache_keys": {"spec": ["data", None, None, None], "mesh": {"data": 1, "model": 8}},
        "cache_lengths": {"spec": ["data"], "mesh": {"data": 1, "model": 8}},
        "kernel": [False, None]}
    assert rules["rows_unsplit_2x4"] == {
        "tokens_equal": True,
        "cache_keys": {"spec": [None, "model_kv", None, None],
                       "mesh": {"data": 2, "model_kv": 2, "model_rep": 2}},
        "cache_lengths": {"spec": [None], "mesh": {"data": 2, "model_kv": 2, "model_rep": 2}},
        "kernel": [None, [None, ["model_kv", "model_rep"], "model_kv"]]}


def test_attention_kept_whole_on_every_model_device(meshes):
    """``parse_rules("heads=none,kv_heads=none")`` (the CLI's ``--rules``): attention
    weights and the cache whole on every ``model`` device, the MLP split, so a decode
    step has one all-reduce a layer (w_down's) instead of two; the decode kernel runs on
    each device's rows with every head; tokens equal one device's."""
    whole = meshes["custom_rules"]["attention_whole_1x8"]
    assert whole == {
        "tokens_equal": True,
        "cache_keys": {"spec": ["data", None, None, None], "mesh": {"data": 1, "model": 8}},
        "cache_lengths": {"spec": ["data"], "mesh": {"data": 1, "model": 8}},
        "kernel": [None, ["data", None, None]],
        "params": {"wq": [None, None], "wk": [None, None], "wo": [None, None],
                   "w_gate": [None, "model"], "w_down": ["model", None]},
        "step_all_reduce": NUM_LAYERS}


def test_generate_on_a_one_device_mesh_matches_no_mesh():
    """A model with a 1x1 mesh goes through the sharded path (cache made by
    kvjax.programs.new_cache with kvjax.sharding.create_sharded) and gives the unsharded
    tokens."""
    model = make_model(make_config(num_heads=4, num_kv_heads=2))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    plain = kvjax.generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    on_mesh = sharding.shard_model(model, sharding.make_mesh(data=1, model=1))
    assert on_mesh.mesh is not None
    assert kvjax.generate(on_mesh, prompts, max_new_tokens=8, stop_tokens=[]).tokens == plain.tokens


# ----- the compiled program -----

@pytest.mark.parametrize("mesh", MESHES)
def test_decode_step_collectives(meshes, mesh):
    """One compiled decode step (``jit(step_fn).lower(...).compile().as_text()``): with
    model > 1 the row-split wo and w_down end in all-reduces; no all-gather ever rebuilds a whole weight matrix or a whole
    cache buffer; pure data parallelism (model=1) communicates nothing. The sharded
    cache is still updated in place (every per-device cache byte aliased)."""
    data, model = map(int, mesh.split("x"))
    entry = meshes["gqa"][mesh]
    step = entry["step"]
    weights = {tuple(s) for s in entry["weight_shapes"]}
    gathered = {tuple(s) for s in step["all_gather_shapes"]}
    assert not gathered & weights, gathered & weights
    assert tuple(step["cache_buffer"]) not in gathered
    assert step["all_to_all"] == 0
    if model > 1:
        assert step["all_reduce"] >= 2 * NUM_LAYERS
    else:
        assert step["all_reduce"] == 0 and not gathered
    assert step["alias_bytes"] >= step["cache_per_device"]
    assert step["temp_bytes"] < step["cache_per_device"]


def test_sharded_generation_gathers_nothing_to_one_device(meshes):
    """The meshes task's generations (every mesh, the prefill clock on) compile without
    XLA's warning that it had to gather a sharded array to one device."""
    assert "Involuntary full rematerialization" not in meshes["stderr"]


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
def test_grouped_kv_heads_never_gather_the_cache(meshes, mesh):
    """2 KV heads on model=8 or 4: the whole generation (prefill + decode loop) never
    gathers K/V or the cache (with KV heads replicated instead, XLA re-split the cache
    inside the loop and all-gathered the whole of it afterwards). At most argmax
    partials ([rows, model] values of a vocab-split LM head) are gathered; this model's
    LM head is its replicated tied embedding, so nothing is."""
    program = meshes["gqa"][mesh]["program"]
    data, model = map(int, mesh.split("x"))
    for shape in program["all_gather_shapes"]:
        assert shape == [8 // data, model], shape
    assert program["all_reduce"] >= 2 * NUM_LAYERS


# ----- loading a checkpoint onto a mesh -----

@pytest.mark.parametrize("mesh", MESHES)
def test_load_places_each_shard_directly(meshes, mesh):
    """kvjax.load(dir, mesh=...): every host slice handed to a device is exactly that
    device's shard (never a whole split tensor), every device ends with only its
    shards, and the bytes live on each device while loading never exceed its final
    share plus one tensor (in fact they never exceed the final share).

    CPU devices report no memory_stats(), so the measure is jax.live_arrays() after
    each tensor is placed, counting each device buffer once."""
    data, model = map(int, mesh.split("x"))
    load = meshes["hf"][mesh]["load"]
    assert load["tensors"] == 3 + NUM_LAYERS * 16  # embed, final_norm, lm_head; 16 a layer
    assert load["slices_are_shards"]
    assert load["whole_tensor_slices_of_split_tensors"] == 0
    assert load["whole_copies_on_a_device"] == 0 and load["shard_mismatch"] == 0
    final, peak = load["final_per_device"], load["peak_per_device"]
    assert set(final) == {str(i) for i in range(8)}
    for device, held in final.items():
        assert peak[device] <= held + load["largest_tensor"]
        assert peak[device] == held
        if model > 1:
            assert held < load["total_bytes"] / 1.5
        else:
            assert held == load["total_bytes"]  # data parallel: a full replica each
    assert meshes["memory_stats"] is None  # what CPU reports; GPUs give bytes in use


# ----- errors, before anything compiles -----

def test_error_messages(hf_dir):
    errors = run_worker("errors", hf_dir)
    expected = {
        "too_many_devices": "mesh data=4 x model=4 needs 16 devices but only 8 exist (cpu, 1 "
                            "process); use data * model <= 8",
        "model_not_dividing": "model=3 does not divide the 8 devices; pass data too, or a "
                              "model size in {1, 2, 4, 8}",
        "batch": "batch 3 is not divisible by mesh axis data=2; use a batch that is a multiple "
                 "of 2 or data=1",
        "batch_data4": "batch 6 is not divisible by mesh axis data=4; use a batch that is a "
                       "multiple of 4 or data in {1, 2}",
        "heads": "num_heads 6 not divisible by model=4; use model in {1, 2, 3, 6}",
        "heads_load": "num_heads 8 not divisible by model=3; use model in {1, 2, 4, 8}",
    }
    for name, message in expected.items():
        assert errors[name]["type"] == "ShardingError", (name, errors[name])
        assert errors[name]["message"] == message
        assert errors[name]["compiles"] == 0, name
    assert errors["default_mesh"] == {"data": 1, "model": 8}  # all devices on model
    # the Pallas decode kernel, which XLA cannot split, runs on each device's shard
    # where the devices hold the KV heads their query heads read, else stays off
    assert errors["decode_kernel"] == {
        "2x4": [None, ["data", ["model_kv", "model_rep"], "model_kv"]],
        "4x2": [None, ["data", "model", "model"]],
        "1x1": [None, None], "none": [None, None],
        "kv3_model2": [False, None], "no_grouping_1x8": [False, None]}
    assert errors["data_only"] == {"data": 2, "model": 4}
    assert errors["subset"] == {"data": 1, "model": 2}


def test_parse_rules():
    """``parse_rules`` (the CLI's ``--rules``): named fields set, the rest default; bad
    text names the problem and the fields."""
    assert sharding.parse_rules("") == sharding.DEFAULT_RULES
    assert sharding.parse_rules(" heads=none, kv_heads=None ,group_kv_heads=FALSE") == \
        sharding.ShardingRules(heads=None, kv_heads=None, group_kv_heads=False)
    assert sharding.parse_rules("batch=model,mlp=data") == \
        sharding.ShardingRules(batch="model", mlp="data")
    fields = ("batch, vocab, vocab_in, embed, heads, kv_heads, mlp, cache_seq, cache_blocks, "
              "head_dim, group_kv_heads")
    for text, message in (
            ("heads", f"sharding rule 'heads' is not field=value with a field in {{{fields}}} "
                      "(e.g. heads=none,kv_heads=none)"),
            ("layers=none", f"sharding rule 'layers=none' is not field=value with a field in "
                            f"{{{fields}}} (e.g. heads=none,kv_heads=none)"),
            ("mlp=", f"sharding rule 'mlp=' is not field=value with a field in {{{fields}}} "
                     "(e.g. heads=none,kv_heads=none)"),
            ("heads=none,heads=model", "sharding rule heads given twice in "
                                       "'heads=none,heads=model'"),
            ("group_kv_heads=no", "group_kv_heads must be true or false, got 'no'")):
        with pytest.raises(sharding.ShardingError) as e:
            sharding.parse_rules(text)
        assert str(e.value) == message


def test_too_many_devices_in_this_process():
    n, platform = jax.device_count(), jax.devices()[0].platform
    with pytest.raises(sharding.ShardingError, match=re.escape(
            f"mesh data={n + 1} x model=1 needs {n + 1} devices but only {n} exist "
            f"({platform}, 1 process); use data * model <= {n}")):
        sharding.make_mesh(data=n + 1)
    assert issubclass(sharding.ShardingError, ValueError)
    for size in (0, 1.5, "2", True):
        with pytest.raises(sharding.ShardingError) as e:
            sharding.make_mesh(model=size)
        assert str(e.value) == f"mesh axis model must be an integer >= 1, got {size!r}"


# ----- two processes -----

def test_two_processes_give_one_process_tokens(meshes, hf_dir):
    """Two processes with 4 CPU devices each, joined with initialize_distributed (gloo
    collectives): generate over model=8 spanning both; generate and generate_stream over
    data=2 x model=4, each process holding its own rows; and a checkpoint loaded onto the
    8-device mesh: all give the single-process tokens."""
    port = str(free_port())
    env = device_env(4)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding_worker", "process", str(i),
                               port, hf_dir], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr[-4000:]
        outs.append(last_json(stdout))
    for i, out in enumerate(outs):
        assert (out["process"], out["processes"], out["devices"], out["local_devices"]) == (i, 2, 8, 4)
        assert out["generate_1x8"] == meshes["gqa"]["reference"]
        assert out["generate_2x4"] == meshes["gqa"]["reference"]
        assert out["stream_2x4"] == meshes["gqa"]["reference"]
        assert out["hf_1x8"] == meshes["hf"]["reference"]
        assert out["hf_embed_local_shards"] == 4
    assert outs[0]["cache_rows_local"] == [[0, 4, 1]] * 4  # rows 0-3 live in process 0
    assert outs[1]["cache_rows_local"] == [[4, 8, 1]] * 4


# ----- the command line -----

def run_cli(*args: str, devices: int, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=device_env(devices),
                          timeout=timeout)


def test_cli_mesh_flags(capsys, text_checkpoint):
    common = ["--model", text_checkpoint, "--prompt", "the cat", "--prompt", "a dog ran in",
              "--max-new-tokens", "12", "--dtype", "float32", "--stop", "0", "--json"]
    expected = kvjax.generate(kvjax.load(text_checkpoint, dtype="float32"),
                              ["the cat", "a dog ran in"], max_new_tokens=12, stop_tokens=[0])
    proc = run_cli(*common, "--mesh", "data=2,model=2", devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc.stdout)["tokens"] == expected.tokens

    whole = run_cli(*common, "--mesh", "model=2", "--rules", "heads=none,kv_heads=none",
                    devices=8)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert last_json(whole.stdout)["tokens"] == expected.tokens

    flag_error = lambda *args: cli_flag_error(capsys, "--model", text_checkpoint, *args)
    assert "--rules says how --mesh splits the model: pass --mesh too" in flag_error(
        "--rules", "heads=none")
    assert "argument --mesh: expected data=D,model=M" in flag_error("--mesh", "data=2,heads=4")
    assert "--coordinator, --num-processes and --process-id go together" in flag_error(
        "--coordinator", "localhost:1")
    bad = run_cli(*common, "--mesh", "model=2", "--rules", "heads=nowhere", devices=8)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: rule heads -> 'nowhere': the mesh has no axis 'nowhere' (axes: data, model)")
    bad = run_cli(*common, "--mesh", "data=1,model=3", devices=8)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: num_heads 4 not divisible by model=3; use model in {1, 2, 4}")


def test_cli_two_processes(text_checkpoint):
    """The same command in two processes (2 devices each): process 0 prints the tokens
    of one process; process 1 prints nothing. (On CPU, gloo itself writes its
    "[Gloo] Rank ... connected" lines to standard output, hence the last line.)"""
    args = ["--model", text_checkpoint, "--prompt", "the cat", "--max-new-tokens", "12",
            "--dtype", "float32", "--stop", "0", "--json", "--mesh", "model=4",
            "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    env = device_env(2)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "generate.py"),
                               *args, "--process-id", str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=240))
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, outs[-1][1][-3000:]
    expected = kvjax.generate(kvjax.load(text_checkpoint, dtype="float32"), ["the cat"],
                              max_new_tokens=12, stop_tokens=[0])
    assert last_json(outs[0][0])["tokens"] == expected.tokens
    assert outs[1][0] == ""


# ----- the benchmark script -----

def test_sharding_benchmark_smoke(tmp_path):
    """benchmarks/sharding_benchmark.py with a tiny model on 8 fake CPU devices: every run
    measured, the table printed, the JSON written."""
    path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sharding_benchmark.py"),
         "--shape", "tiny", "--prompt", "16", "--new", "8", "--reps", "1", "--dtype", "float32",
         "--runs", "1:1x1", "1:1x2", "4:1x1", "4:2x4", "1:1x2:heads=none,kv_heads=none",
         "--json", str(path)],
        cwd=ROOT, env=device_env(8), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ms/step" in proc.stdout and "# wrote" in proc.stdout
    records = json.loads(path.read_text())
    assert [(r["batch"], r["data"], r["model"], r["rules"]) for r in records] == [
        (1, 1, 1, ""), (1, 1, 2, ""), (4, 1, 1, ""), (4, 2, 4, ""),
        (1, 1, 2, "heads=none,kv_heads=none")]
    for r in records:  # timings of 8 steps on a shared CPU are noise: only their presence
        assert "failed" not in r and np.isfinite(r["ms_per_step"]) and 0 <= r["agree"] <= 1
        assert r["devices"] == 8 and r["shape"] == "tiny"
    assert records[1]["params_gib_per_device"] < records[0]["params_gib_per_device"]
    assert records[3]["cache_gib_per_device"] < records[2]["cache_gib_per_device"]
    assert np.isclose(records[0]["speedup"], 1.0)
    split, whole = records[1], records[4]  # attention split over model=2, or whole on each
    assert split["cache_spec"].endswith("('data', 'model', None, None)")  # P(...) or PartitionSpec(...)
    assert whole["cache_spec"].endswith("('data', None, None, None)")
    assert whole["collectives"]["all-reduce"] * 2 == split["collectives"]["all-reduce"]
    assert split["params_gib_per_device"] < whole["params_gib_per_device"] \
        < records[0]["params_gib_per_device"]
