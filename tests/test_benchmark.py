"""scripts/benchmark.py as the owner runs it: a subprocess on CPU with the smallest sizes.

Checks the records' fields, that points which cannot fit a tiny ``--memory-limit`` are
recorded as skipped (before or after compiling) and a model that does not exist as failed while the run goes on."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"case", "implementation", "model", "device", "batch", "prompt_len", "new_tokens",
          "capacity", "filled", "prefill_ms", "mfu", "decode_ms_per_step", "tokens_per_s",
          "mbu", "bound_GBps", "compile_s", "peak_bytes", "versions", "date"}


def test_suite_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"),
         "--cases", "decode", "longctx", "hf", "nocache",
         "--models", "bundled", "no-such-model", "--batches", "1", "512", "4096",
         "--decode-shapes", "16+4", "--longctx-capacity", "128", "--longctx-fills", "32", "96",
         "--longctx-new", "4", "--longctx-prefill", "16", "--nocache-totals", "32",
         "--nocache-new", "4", "--memory-limit", "64MiB", "--reps", "1", "--hbm-gib", "0.01",
         "--gemm-size", "64", "--no-plots", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())

    bounds = records[0]
    assert bounds["case"] == "bounds" and bounds["bound_GBps"] > 0 and bounds["gemm_tflops"] > 0
    assert bounds["peak_tflops"] is None  # no spec sheet for a CPU: MFU stays null
    nocache = [r for r in records if r.get("case") == "nocache"]
    assert [r["total_tokens"] for r in nocache] == [32] and nocache[0]["speedup"] > 0

    suite = [r for r in records if r.get("case") in ("decode", "longctx", "hf")]
    assert all(FIELDS <= set(r) for r in suite)
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(suite)

    def find(case, model, **kw):
        return [r for r in suite if r["case"] == case and r["model"] == model
                and all(r[k] == v for k, v in kw.items())]

    (small,) = find("decode", "bundled", batch=1)
    assert not small.get("skipped") and not small.get("failed"), small
    # (t(N) - t(1)) / (N - 1) of one rep on a shared CPU may be any sign: only present
    assert None not in (small["decode_ms_per_step"], small["tokens_per_s"], small["mbu"])
    assert small["prefill_ms"] > 0 and small["compile_s"] > 0 and small["mfu"] is None
    assert (small["prompt_len"], small["new_tokens"], small["capacity"]) == (16, 4, 20)
    (big,) = find("decode", "bundled", batch=512)  # weights + cache fit 64 MiB, the program not
    assert big["skipped"].startswith("the compiled program needs") and big["mbu"] is None
    (huge,) = find("decode", "bundled", batch=4096)  # the cache alone exceeds 64 MiB
    assert huge["skipped"].startswith("weights + cache needs") and huge["compile_s"] is None

    longctx = find("longctx", "bundled")
    assert [(r["filled"], r["capacity"], r["prompt_len"]) for r in longctx] == [
        (32, 36, 16), (32, 128, 16), (96, 128, 16)]  # fills > --longctx-prefill: a 16-token block
    assert [r["start"] for r in longctx] == [16, 16, 80]
    assert all(r["decode_ms_per_step"] is not None for r in longctx), longctx

    missing = find("decode", "no-such-model") + find("longctx", "no-such-model")
    assert missing and all(r["failed"].startswith("FileNotFoundError") for r in missing)
    assert find("hf", "bundled") and all(r.get("skipped") for r in find("hf", "bundled"))


def test_profile_step_classifies_kernels_and_needs_a_device_trace():
    """scripts/profile_step.py sorts kernel names into kinds, and on CPU (no device
    planes in the trace) stops with a message instead of printing zeros."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import profile_step

    kinds = [profile_step.kind_of(name) for name in (
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "gemm_fusion_dot_12",
        "nvjet_sm90_tst_128x256", "MemcpyD2D", "loop_add_fusion_2", "all_reduce_12_0_fusion_1",
        "ncclDevKernel_AllGather_RING_LL")]
    assert kinds == ["attention", "matmul", "matmul", "copy", "other", "collective", "collective"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "profile_step.py"), "--model", "bundled",
         "--prompt", "16", "--new", "4"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert "the trace has no device kernels (a CPU run?): profile on a GPU" in proc.stderr


def test_bandwidth_probe_sums_inside_its_loop():
    """The HBM probe (bench_lib.measure_hbm_bandwidth) times n chained sums less one:
    each sum must stay inside the compiled loop (a hoisted sum would read the array
    once and the probe would report n times the bandwidth), and the total is n sums."""
    import re

    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_lib

    chained = bench_lib.chained_sums(9)
    ones = jnp.ones((1000,), jnp.bfloat16)
    assert float(chained(ones)) == 9000.0
    hlo = chained.lower(ones).compile().as_text()
    bodies = dict(re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M))

    def reduces(name: str) -> bool:  # the computation or a fusion it calls reduces
        text = bodies[name]
        return " reduce(" in text or any(reduces(c) for c in re.findall(r"calls=%([\w.\-]+)", text))

    entry = re.search(r"^ENTRY %(\S+) ", hlo, re.M).group(1)
    loop = re.search(r"while\(.*body=%([\w.\-]+)", bodies[entry])
    assert loop, "the loop of sums was compiled away: the sums do not depend on the carry"
    assert reduces(loop.group(1)) and not reduces(entry)


def test_bandwidth_probe_warms_up_before_timing(monkeypatch):
    """measure_hbm_bandwidth on a fake device whose first 8 calls run 1.5x slow (a GPU
    fresh from idle) and whose n-sum program takes 0.2 ms + n ms: the bound is exactly
    ``chain`` sums' bytes per ``chain`` ms. Timing the one-sum program while the device
    is slow would shrink the difference and overstate the bound."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_lib

    clock = {"now": 0.0, "calls": 0}

    def chained_sums(n):
        def program(x):
            clock["calls"] += 1
            clock["now"] += (0.2e-3 + n * 1e-3) * (1.5 if clock["calls"] <= 8 else 1.0)
            return x
        return program

    monkeypatch.setattr(bench_lib, "chained_sums", chained_sums)
    monkeypatch.setattr(bench_lib.time, "perf_counter", lambda: clock["now"])
    gib = 2 ** -20
    bytes_read = int(gib * 2 ** 30) // 2 * 2
    assert bench_lib.measure_hbm_bandwidth(gib, chain=8) == pytest.approx(bytes_read / 1e-3)


def test_profile_splits_runs_at_pauses():
    """profile_step.traced_runs (behind profile_step.py and sharding_benchmark.py
    --profile): one trace of three runs is split at the two longest gaps between
    kernels, and each run is summed by kind."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import profile_step

    def run(t0, kernels):  # kernels back to back from t0 (ns), 1 us apart
        events, t = [], t0
        for name, duration in kernels:
            events.append((t, t + duration, name))
            t += duration + 1_000
        return events

    one = [("gemm_fusion_dot_1", 50_000), ("all_reduce_3_fusion", 6_000), ("loop_add_fusion", 2_000)]
    warm = run(0, one[1:])  # a first run the trace caught only in part
    first = run(400_000_000, one)
    many = run(800_000_000, one + 4 * [("gemm_fusion_dot_1", 50_000), ("all_reduce_3_fusion", 6_000)])
    runs = profile_step.split_runs(many + warm + first, 3)
    assert runs == [warm, first, many]
    a, b = profile_step.kernel_ms_by_kind(runs[1]), profile_step.kernel_ms_by_kind(runs[2])
    assert (a["matmul"], a["collective"], a["other"]) == pytest.approx((0.05, 0.006, 0.002))
    assert (b["matmul"], b["collective"], b["other"]) == pytest.approx((0.25, 0.03, 0.002))
    assert b["span"] == pytest.approx(0.292)  # 282 us of kernels and 10 gaps of 1 us
    assert b["busy"] == pytest.approx(0.282) and b["idle"] == pytest.approx(0.010)
    step = profile_step.per_step(a, b, 5)  # the 5-token run's 4 steps: a GEMM and an all-reduce each
    assert (step["matmul"], step["collective"], step["other"]) == pytest.approx((0.05, 0.006, 0.0))
