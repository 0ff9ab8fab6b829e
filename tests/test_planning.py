"""kvjax.cache.planning: estimate_bytes against the buffers kvjax creates, max_batch and
max_capacity exact at the boundary, on one device and (one subprocess with 8 CPU
devices, run as ``python -m tests.test_planning``) per device on meshes."""

import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import pytest

import kvjax
from kvjax.cache import KV_DTYPES, create, estimate_bytes, max_batch, max_capacity
from tests.conftest import run_on_cpu_devices

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]  # (data, model)


def configs():
    """Two KV-head layouts: 2 KV heads (grouped over model=4 and 8) and 8 (split evenly)."""
    from tests.conftest import make_config

    return {"kv2": make_config(num_heads=8, num_kv_heads=2, head_dim=8, hidden_size=64,
                               vocab_size=96, num_layers=3),
            "kv8": make_config(num_heads=8, num_kv_heads=8, head_dim=16, hidden_size=128,
                               vocab_size=96, num_layers=2)}


def largest_checks(config, kv_dtype, dtype, budgets, mesh=None, rules=None, step=1):
    """``(budget, max_batch, fits, next_fits)`` and the same for max_capacity: the result
    fits the budget and the next size (``step`` more rows) does not."""
    place = dict(dtype=dtype, mesh=mesh, rules=rules)
    out = []
    for budget in budgets:
        b = max_batch(config, 40, budget, kv_dtype, **place)
        c = max_capacity(config, 2 * step, budget, kv_dtype, **place)
        out.append({
            "budget": budget, "batch": b, "capacity": c,
            "batch_fits": b == 0 or estimate_bytes(config, b, 40, kv_dtype, **place) <= budget,
            "next_batch_fits": estimate_bytes(config, b + step, 40, kv_dtype, **place) <= budget,
            "capacity_fits": c == 0 or estimate_bytes(config, 2 * step, c, kv_dtype,
                                                      **place) <= budget,
            "next_capacity_fits": estimate_bytes(config, 2 * step, c + 1, kv_dtype,
                                                 **place) <= budget})
    return out


def boundary_budgets(config, kv_dtype, dtype, **place) -> list[int]:
    """Budgets on and around exact cache sizes, and between them."""
    step = kvjax.sharding.batch_ways(place.get("mesh"), place.get("rules") or
                                     kvjax.sharding.DEFAULT_RULES) if place.get("mesh") else 1
    exact = [estimate_bytes(config, n * step, 40, kv_dtype, dtype=dtype, **place)
             for n in (1, 3, 7)]
    return [0, exact[0] - 1, *exact, exact[1] + 1, exact[2] - 1, 10 ** 9]


# ----- one device -----

@pytest.mark.parametrize("kv_dtype", [*KV_DTYPES, None])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_estimate_is_the_created_bytes(kv_dtype, dtype):
    for config in configs().values():
        for batch, capacity in ((1, 1), (3, 40), (8, 129)):
            cache = create(config, batch, capacity, kv_dtype, jnp.dtype(dtype))
            assert estimate_bytes(config, batch, capacity, kv_dtype, dtype=dtype) == cache.nbytes
            assert sum(x.nbytes for x in jax.tree.leaves(cache)) == cache.nbytes


def test_estimate_is_what_generate_creates(gqa_model):
    """``Generation.stats["cache_bytes"]``: the bytes of the cache the run created."""
    for kv_dtype in ("int8", None):
        out = kvjax.generate(gqa_model, [[1, 2, 3], [4, 5]], max_new_tokens=4, kv_dtype=kv_dtype)
        s = out.stats
        assert s["cache_bytes"] == estimate_bytes(gqa_model.config, 2, s["capacity"], kv_dtype,
                                                  dtype="float32")


def test_quantized_caches_hold_about_half_of_bfloat16():
    config = configs()["kv8"]  # head_dim 16: scales are 4 of every 20 bytes a token
    bf16 = estimate_bytes(config, 4, 256, "bfloat16")
    for kv_dtype in ("int8", "fp8"):
        assert estimate_bytes(config, 4, 256, kv_dtype) == pytest.approx(bf16 * 20 / 32, rel=1e-3)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_largest_batch_and_capacity_are_exact(kv_dtype):
    config = configs()["kv2"]
    budgets = boundary_budgets(config, kv_dtype, "bfloat16")
    for check in largest_checks(config, kv_dtype, "bfloat16", budgets):
        assert check["batch_fits"] and not check["next_batch_fits"], check
        assert check["capacity_fits"] and not check["next_capacity_fits"], check
    exact = budgets[2]  # one row of 40 slots, to the byte
    assert max_batch(config, 40, exact, kv_dtype) == 1
    assert max_batch(config, 40, exact - 1, kv_dtype) == 0
    assert max_capacity(config, 1, exact, kv_dtype) == 40


def test_largest_with_a_huge_budget_and_few_evaluations(monkeypatch):
    config = configs()["kv2"]
    calls = []
    real = kvjax.cache.planning._abstract_cache
    monkeypatch.setattr(kvjax.cache.planning, "_abstract_cache",
                        lambda *a: calls.append(a) or real(*a))
    budget = 2 ** 50
    b = max_batch(config, 4096, budget, "int8")
    assert len(calls) <= 4
    assert estimate_bytes(config, b, 4096, "int8") <= budget < estimate_bytes(config, b + 1, 4096,
                                                                             "int8")


@pytest.mark.parametrize("call, message", [
    (lambda c: estimate_bytes(c, 2, 8, "int4"), "unknown kv_dtype 'int4'; supported: "),
    (lambda c: estimate_bytes(c, 2.0, 8), "batch must be an integer >= 1, got 2.0"),
    (lambda c: estimate_bytes(c, 2, "8"), "capacity must be an integer >= 1, got '8'"),
    (lambda c: estimate_bytes(c, True, 8), "batch must be an integer >= 1, got True"),
    (lambda c: estimate_bytes(c, 0, 8), "batch must be an integer >= 1, got 0"),
    (lambda c: max_batch(c, 8, -1), "budget_bytes must be an integer number of bytes >= 0, got -1"),
    (lambda c: max_batch(c, 8, 1.5e9), "budget_bytes must be an integer number of bytes >= 0"),
    (lambda c: max_batch(c, 0, 100), "capacity must be an integer >= 1, got 0"),
    (lambda c: max_capacity(c, 2.5, 100), "batch must be an integer >= 1, got 2.5"),
    (lambda c: max_capacity(c, 2, 100, "fp4"), "unknown kv_dtype 'fp4'"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(configs()["kv2"])


def test_exported_from_kvjax_cache():
    assert {"estimate_bytes", "max_batch", "max_capacity"} <= set(kvjax.cache.__all__)


# ----- per device, on meshes (one subprocess) -----

@pytest.fixture(scope="module")
def on_meshes() -> dict:
    return run_on_cpu_devices("tests.test_planning", 8)


def test_estimate_per_device_is_the_created_shards(on_meshes):
    cases = on_meshes["caches"]
    assert len(cases) == 2 * (len(MESHES) + 1) * len(KV_DTYPES)
    for case in cases:
        # every device holds the same bytes, and the estimate is what each holds
        assert case["estimate"] == case["most"] == case["least"], case
        assert case["estimate"] < case["whole"], case  # a mesh splits something of each cache


def test_largest_on_a_mesh_moves_in_data_ways(on_meshes):
    for case in on_meshes["largest"]:
        for check in case["checks"]:
            assert check["batch"] % case["data"] == 0, (case["mesh"], check)
            assert check["batch_fits"] and not check["next_batch_fits"], (case["mesh"], check)
            assert check["capacity_fits"] and not check["next_capacity_fits"], (case["mesh"],
                                                                                check)


def test_dry_run_per_device_is_what_a_run_holds(on_meshes):
    """``--dry-run --mesh``'s weights and cache per device against the bundled model
    loaded on that mesh and the cache ``generate`` creates there."""
    for case in on_meshes["dry_run"]:
        report = case["report"]
        assert report["devices"] == 8 and report["rows"] == 4, report
        assert report["weights_bytes"] == case["weights_most"] == case["weights_least"]
        assert report["cache_bytes"] == case["cache_most"], (case["kv_dtype"], report)


def _worker() -> dict:
    """The subprocess's checks (8 CPU devices); returns what the tests above assert on."""
    from kvjax import cli, programs, sharding

    assert jax.device_count() == 8, "set XLA_FLAGS=--xla_force_host_platform_device_count=8"
    rules_split_attention_off = sharding.parse_rules("heads=none,kv_heads=none")
    meshes = [(data, model, None) for data, model in MESHES] + [(2, 4, rules_split_attention_off)]
    caches, largest = [], []
    for name, config in configs().items():
        for data, model, rules in meshes:
            mesh = sharding.make_mesh(data=data, model=model)
            for kv_dtype in KV_DTYPES:
                batch, capacity = 8, 24
                made = sharding.create_sharded(config, mesh, rules or sharding.DEFAULT_RULES,
                                               create, config, batch, capacity, kv_dtype,
                                               jnp.dtype("bfloat16"))
                held = sharding.bytes_per_device(made).values()
                caches.append({"config": name, "mesh": [data, model], "kv_dtype": kv_dtype,
                               "most": max(held), "least": min(held), "whole": made.nbytes,
                               "estimate": estimate_bytes(config, batch, capacity, kv_dtype,
                                                          mesh=mesh, rules=rules)})
            budgets = boundary_budgets(config, "int8", "bfloat16", mesh=mesh, rules=rules)
            largest.append({"mesh": [data, model], "data": data, "checks": largest_checks(
                config, "int8", "bfloat16", budgets, mesh=mesh, rules=rules, step=data)})
    dry_run = []
    mesh = sharding.make_mesh(data=2, model=4)
    bundled = kvjax.load(kvjax.BUNDLED_MODEL, dtype="bfloat16", mesh=mesh)
    weights = sharding.bytes_per_device(bundled.params).values()
    for kv_dtype in ("int8", None):
        flags = ["--dry-run", "--json", "--mesh", "data=2,model=4", "--dtype", "bfloat16",
                 "--prompt", "The list type", "--prompt", "A", "--prompt", "B",
                 "--max-new-tokens", "20"] + (["--kv-dtype", kv_dtype] if kv_dtype else [])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(flags) == 0
        report = json.loads(out.getvalue())
        cache = programs.new_cache(bundled, report["rows"], report["capacity"], kv_dtype=kv_dtype)
        dry_run.append({"kv_dtype": kv_dtype, "report": report, "weights_most": max(weights),
                        "weights_least": min(weights),
                        "cache_most": max(sharding.bytes_per_device(cache).values())})
    return {"caches": caches, "largest": largest, "dry_run": dry_run}


if __name__ == "__main__":
    print(json.dumps(_worker()))
