"""benchmarks/benchmark.py as the owner runs it (a subprocess on CPU with the smallest
sizes), and the helpers of benchmarks/bench_lib.py.

The smoke test checks what the records say, not only that they exist: the decode case
times the program ``kvjax.generate`` runs (its greedy tokens are generate's for the same
random model and prompt), its figures follow the definitions of docs/benchmarks.md
(tokens/s, MBU, prefill TFLOP/s), every field it writes is documented there, points that
cannot fit a tiny ``--memory-limit`` are recorded as skipped (before or after compiling)
and a model that does not exist as failed while the run goes on."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
FIELDS = {"case", "implementation", "model", "device", "batch", "prompt_len", "new_tokens",
          "capacity", "filled", "prefill_ms", "mfu", "decode_ms_per_step", "tokens_per_s",
          "mbu", "bound_GBps", "compile_s", "peak_bytes", "versions", "date"}
PROMPT, NEW = 16, 64  # prompt and new tokens at generate's buckets (16, powers of two): its program


def bench_lib():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import bench_lib as lib
    return lib


def documented_fields() -> set[str]:
    """The names in the first column of docs/benchmarks.md's table of record fields."""
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        text = f.read()
    table = re.search(r"^#+ Fields of a record\n(.*?)(?=^#|\Z)", text, re.S | re.M)
    assert table, "docs/benchmarks.md has no 'Fields of a record' section"
    rows = [line.split("|")[1] for line in table.group(1).splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([a-zA-Z_]+)`", cell)}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), ROOT]))}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "benchmark.py"),
         "--cases", "decode", "longctx", "hf", "nocache", "sharedprefix", "--shape", "tiny",
         "--shared-batch", "3", "--shared-prefix", "32",
         "--models", "bundled", "no-such-model", "--batches", "1", "512", "4096",
         "--decode-shapes", f"{PROMPT}+{NEW}", "--longctx-capacity", "128",
         "--longctx-fills", "32", "96", "--longctx-new", "4", "--longctx-prefill", "16",
         "--nocache-totals", "32", "--nocache-new", "4", "--memory-limit", "96MiB",
         "--reps", "3", "--hbm-gib", "0.01", "--gemm-size", "64", "--no-plots",
         "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def find(records, case, model, **kw):
    return [r for r in records if r.get("case") == case and r.get("model") == model
            and all(r[k] == v for k, v in kw.items())]


def test_suite_records_are_complete_and_documented(smoke_run):
    proc, records = smoke_run
    bounds = records[0]
    assert bounds["case"] == "bounds" and bounds["bound_GBps"] > 0 and bounds["gemm_tflops"] > 0
    assert bounds["peak_tflops"] is None  # no spec sheet for a CPU: MFU stays null
    nocache = [r for r in records if r.get("case") == "nocache"]
    # a ratio of two per-token time differences (n tokens less 1): on a loaded CPU a
    # tiny model's difference can come out negative, so its sign is not checked, only
    # that it is finite and the quotient of the two per-token times it records
    assert [r["total_tokens"] for r in nocache] == [32] and np.isfinite(nocache[0]["speedup"])
    assert nocache[0]["speedup"] == pytest.approx(
        nocache[0]["recompute_ms_per_token"] / nocache[0]["cache_ms_per_token"])
    assert nocache[0]["prompt_len"] + nocache[0]["new_tokens"] == 32
    # 3 rows of 32 shared + 16 own tokens, blocks of 16: the first computes all 48, the
    # others find the 2 shared blocks: 64 of 144 prompt tokens served, 80 computed
    (shared,) = [r for r in records if r.get("case") == "sharedprefix"]
    assert (shared["hit_rate"], shared["prompt_over_computed"]) == (64 / 144, 144 / 80)
    assert shared["speedup"] > 0

    suite = [r for r in records if r.get("case") in ("decode", "longctx", "hf")]
    assert all(FIELDS <= set(r) for r in suite)
    documented = documented_fields()
    for r in [bounds] + suite:
        assert set(r) <= documented, f"undocumented fields {set(r) - documented} in {r['case']}"
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(suite)

    (big,) = find(records, "decode", "bundled", batch=512)  # weights + cache fit 96 MiB, the program not
    assert big["skipped"].startswith("the compiled program needs") and big["mbu"] is None
    (huge,) = find(records, "decode", "bundled", batch=4096)  # the cache alone exceeds 96 MiB
    assert huge["skipped"].startswith("weights + cache needs") and huge["compile_s"] is None

    longctx = find(records, "longctx", "bundled")
    assert [(r["filled"], r["capacity"], r["prompt_len"]) for r in longctx] == [
        (32, 36, 16), (32, 128, 16), (96, 128, 16)]  # fills > --longctx-prefill: a 16-token block
    assert [r["start"] for r in longctx] == [16, 16, 80]
    # (t(4) - t(1)) / 3 of a tiny model on a shared CPU may be any sign: only present
    assert all(r["decode_ms_per_step"] is not None and r["prefill_ms"] > 0 for r in longctx)

    missing = find(records, "decode", "no-such-model") + find(records, "longctx", "no-such-model")
    assert missing and all(r["failed"].startswith("FileNotFoundError") for r in missing)
    hf = find(records, "hf", "bundled")
    assert len(hf) == 3 and all(r.get("skipped") for r in hf)  # torch has no CUDA here


def test_decode_record_is_what_generate_does(smoke_run):
    """The decode case's first row: generate's greedy tokens for the same random model,
    prompt and capacity; a positive step time, and tokens/s, MBU and the prefill's
    TFLOP/s as docs/benchmarks.md defines them from it."""
    import jax.numpy as jnp

    import kvjax

    lib = bench_lib()
    _, records = smoke_run
    (small,) = find(records, "decode", "bundled", batch=1)
    assert not small.get("skipped") and not small.get("failed"), small
    assert (small["prompt_len"], small["new_tokens"], small["capacity"], small["filled"]) == (
        PROMPT, NEW, PROMPT + NEW, PROMPT)
    assert small["implementation"] == "kvjax" and small["start"] == 0

    model = lib.random_kvjax_model("bundled", jnp.bfloat16)
    tokens, _ = lib.decode_inputs(model.config, 1, PROMPT)
    expected = kvjax.generate(model, tokens, max_new_tokens=NEW, stop_tokens=[],
                              capacity=PROMPT + NEW)
    assert small["tokens"] == expected.tokens[0]

    step_s = small["decode_ms_per_step"] / 1e3
    assert step_s > 0 and small["tokens_per_s"] == pytest.approx(1 / step_s)
    read = lib.step_bytes(model.config, 1, PROMPT, NEW, PROMPT + NEW)
    assert small["mbu"] == pytest.approx(read / (step_s * small["bound_GBps"] * 1e9))
    assert small["prefill_ms"] > 0 and small["mfu"] is None  # no peak for a CPU
    flops = lib.prefill_flops(model.config, 1, PROMPT)
    assert small["prefill_tflops"] == pytest.approx(flops / (small["prefill_ms"] / 1e3) / 1e12)
    assert small["compile_s"] > 0 and small["program_bytes"] > lib.nbytes(model.params)


def test_kv_bound_recovers_the_rate_and_the_fixed_part(capsys):
    """Steps made of a fixed part and cache bytes at a rate: ``kv_bound`` finds both from
    the bf16 steps at two fills and bounds the int8 steps by their own bytes."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import benchmark

    with open(os.path.join(ROOT, "configs", "llama-3.1-8b.json")) as f:
        shape = json.load(f)
    slots = 8 * shape["num_hidden_layers"] * shape["num_key_value_heads"]  # batch 8
    per_slot = {"bfloat16": slots * 2 * 128 * 2, "int8": slots * 2 * (128 + 4)}  # + scales
    rate, fixed = 3.0e9, 6.0  # bytes a ms, ms
    step = {"bfloat16": lambda read: fixed + read / rate,
            "int8": lambda read: fixed + 0.2 + read / (0.9 * rate)}  # 90% of the rate

    def record(kv_dtype, filled, block_size=None):
        read = per_slot[kv_dtype] * (filled + 32)  # 64 steps: their average fill
        return dict(case="longctx", model="llama-3.1-8b", batch=8, capacity=32768,
                    filled=filled, new_tokens=64, kv_dtype=kv_dtype, block_size=block_size,
                    decode_ms_per_step=step[kv_dtype](read))

    records = [record(d, f) for d in ("bfloat16", "int8") for f in (16384, 32704)]
    records += [record("int8", 8192), record("bfloat16", 16384, 16), record("int8", 16384, 16)]
    rows = benchmark.kv_bound(records)
    assert [(r["filled"], r["kv_dtype"], r["block_size"]) for r in rows] == [
        (16384, "int8", None), (32704, "int8", None)]  # one fill of the paged pool: no rate
    for row in rows:
        bf16 = step["bfloat16"](per_slot["bfloat16"] * (row["filled"] + 32))
        ideal = fixed + per_slot["int8"] * (row["filled"] + 32) / rate
        assert row["rate_GBps"] == pytest.approx(rate / 1e6)
        assert row["fixed_ms"] == pytest.approx(fixed)
        assert row["rate_fraction"] == pytest.approx(0.9)
        assert row["own_fixed_ms"] == pytest.approx(fixed + 0.2)
        assert row["ideal_ms"] == pytest.approx(ideal)
        assert row["ideal_speedup"] == pytest.approx(bf16 / ideal)
        assert row["speedup"] == pytest.approx(bf16 / row["ms"])
    path = os.path.join(ROOT, "benchmarks", "results", "kv_dtype_h100_b8.json")
    assert benchmark.main(["--kv-bound", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# {path}: 2 quantized steps with a full-precision step at two fills"
    assert lines[1].startswith("llama-3.1-8b B=8 capacity 32768 filled 16384, int8: 9.312 "
                               "ms/step against 11.513 (bfloat16), 1.236x; its bytes allow ")


def test_matmul_params_counts_projections_and_lm_head():
    """Model FLOPs count every layer projection and the LM head once per token: for a
    Llama shape, 4 attention and 3 MLP products a layer."""
    import kvjax

    lib = bench_lib()
    config = kvjax.ModelConfig.from_json(lib.config_path("llama-3.2-1b"))
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    assert lib.matmul_params(config) == config.num_layers * per_layer + config.vocab_size * d


def test_profile_kinds_and_a_cpu_trace():
    """bench_lib sorts kernel names into kinds (sharding_benchmark.py --profile), and on
    CPU (no device planes in the trace) raises instead of returning zeros."""
    import jax
    import jax.numpy as jnp

    lib = bench_lib()
    kinds = [lib.kind_of(name) for name in (
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "gemm_fusion_dot_12",
        "nvjet_sm90_tst_128x256", "MemcpyD2D", "loop_add_fusion_2", "all_reduce_12_0_fusion_1",
        "ncclDevKernel_AllGather_RING_LL", "decode_attention_kernel")]
    assert kinds == ["attention", "matmul", "matmul", "copy", "other", "collective",
                     "collective", "attention"]
    if jax.default_backend() != "cpu":
        pytest.skip("a device trace has kernels")
    x = jnp.ones((8, 8))
    with pytest.raises(RuntimeError, match="the trace has no device kernels"):
        lib.traced_runs(lambda n: jax.block_until_ready(x * n), (1, 2), pause_s=0.01)


def test_bandwidth_probe_sums_inside_its_loop():
    """The HBM probe (bench_lib.measure_hbm_bandwidth) times n chained sums less one:
    each sum must stay inside the compiled loop (a hoisted sum would read the array
    once and the probe would report n times the bandwidth), and the total is n sums."""
    import jax.numpy as jnp

    lib = bench_lib()
    chained = lib.chained_sums(9)
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
    lib = bench_lib()
    clock = {"now": 0.0, "calls": 0}

    def chained_sums(n):
        def program(x):
            clock["calls"] += 1
            clock["now"] += (0.2e-3 + n * 1e-3) * (1.5 if clock["calls"] <= 8 else 1.0)
            return x
        return program

    monkeypatch.setattr(lib, "chained_sums", chained_sums)
    monkeypatch.setattr(lib.time, "perf_counter", lambda: clock["now"])
    gib = 2 ** -20
    bytes_read = int(gib * 2 ** 30) // 2 * 2
    assert lib.measure_hbm_bandwidth(gib, chain=8) == pytest.approx(bytes_read / 1e-3)


def test_profile_splits_runs_at_pauses():
    """bench_lib.traced_runs (behind sharding_benchmark.py --profile): one trace of three
    runs is split at the two longest gaps between kernels, and each run is summed by
    kind."""
    lib = bench_lib()

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
    runs = lib.split_runs(many + warm + first, 3)
    assert runs == [warm, first, many]
    a, b = lib.kernel_ms_by_kind(runs[1]), lib.kernel_ms_by_kind(runs[2])
    assert (a["matmul"], a["collective"], a["other"]) == pytest.approx((0.05, 0.006, 0.002))
    assert (b["matmul"], b["collective"], b["other"]) == pytest.approx((0.25, 0.03, 0.002))
    assert b["span"] == pytest.approx(0.292)  # 282 us of kernels and 10 gaps of 1 us
    assert b["busy"] == pytest.approx(0.282) and b["idle"] == pytest.approx(0.010)
    step = lib.per_step(a, b, 5)  # the 5-token run's 4 steps: a GEMM and an all-reduce each
    assert (step["matmul"], step["collective"], step["other"]) == pytest.approx((0.05, 0.006, 0.0))
    assert np.isclose(sum(step[k] for k, _ in lib.KINDS) + step["other"], step["busy"])


def test_kernel_sweep_times_steps_and_blocks_over_each_layout(tmp_path):
    """benchmarks/decode_kernel_sweep.py interpreted on CPU: one record per kind, block
    size and path asked for, over a contiguous and a paged cache, decode steps and blocks
    on the kernel and on the portable path, none with an error (the sweep records a
    point that fails and goes on; CPU times are noise, so only their presence)."""
    sys.path.insert(0, ROOT)
    from benchmarks import decode_kernel_sweep as sweep

    out = tmp_path / "sweep.json"
    sweep.main(["--interpret", "--points", "B2 F40 C64", "--kinds", "int8", "paged-fp8",
                "--block-tokens", "0", "4", "--portable", "--reps", "1", "--steps", "3",
                "--json", str(out)])
    records = json.loads(out.read_text())[1:]
    assert [(r["kind"], r["block_tokens"], r["path"]) for r in records] == [
        ("int8", 0, "kernel"), ("paged-fp8", 0, "kernel"), ("int8", 4, "kernel"),
        ("int8", 4, "portable"), ("paged-fp8", 4, "kernel"), ("paged-fp8", 4, "portable")]
    assert [r.get("error") for r in records] == [None] * 6
    assert all(np.isfinite(r["us"]) for r in records)


def test_kernel_sass_counts_loops_and_a_paged_step_has_two_block_loops():
    """benchmarks/kernel_sass.py: its SASS reader counts the instructions from a backward
    branch's target to the branch (a forward branch is no loop), and the Triton IR it
    takes from JAX's lowering (no GPU, no triton package needed) holds a decode step's
    loops over cache blocks: over a paged pool two, unmasked then masked (four products
    over int8 codes, scores and values in each), over a contiguous cache one."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_lib
    import kernel_sass

    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @P0 BRA 0x60 ;
        /*0020*/                   LDS.U8 R2, [R3] ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0050*/              @P1 BRA 0x20 ;
        /*0060*/                   FADD R5, R5, R6 ;
        /*0070*/             @!P2 BRA 0x60 ;
        /*0080*/                   EXIT ;
    """
    assert kernel_sass.loops(listing) == [
        {"start": "0x20", "instructions": 4,
         "opcodes": {"LDS": 1, "HMMA": 1, "IADD3": 1, "BRA": 1}},
        {"start": "0x60", "instructions": 2, "opcodes": {"FADD": 1, "BRA": 1}}]
    config = bench_lib.model_config("llama-3.1-8b")
    for kind, loops in (("int8", 1), ("paged-int8", 2)):
        ir, _ = kernel_sass.triton_ir(config, (2, 1000, 1024), kind, 16)
        assert (ir.count("scf.for"), ir.count("tt.dot")) == (loops, 2 * loops)


def test_kernel_sass_reads_the_kernel_ncu_listed(tmp_path):
    """benchmarks/kernel_sass.py --ncu-csv: ncu's source page (absolute addresses, the
    program's own output around it) becomes a listing whose loops count from the kernel's
    first instruction; a file with no SASS rows is refused, naming ncu's flags."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import kernel_sass

    listing = tmp_path / "int8.csv"
    listing.write_text('==PROF== Connected to process 1\n{"case": "kernel", "us": 1.0}\n'
                       '"Kernel Name","kvjax_decode_attention"\n"Address","Source"\n'
                       '"0x7f0000001000","      MOV R1, c[0x0][0x28]"\n'
                       '"0x7f0000001010","      LDS.U8 R2, [R3+0x8180]"\n'
                       '"0x7f0000001020","      IMMA.16832.S8.S8 R4, R8, R12, R4"\n'
                       '"0x7f0000001030","      @P1 BRA 0x7f0000001010"\n'
                       '"0x7f0000001040","      EXIT"\n')
    assert kernel_sass.loops(kernel_sass.ncu_listing(str(listing))) == [
        {"start": "0x10", "instructions": 3, "opcodes": {"LDS": 1, "IMMA": 1, "BRA": 1}}]
    out = tmp_path / "loops.json"
    kernel_sass.main(["--ncu-csv", str(listing), "--json", str(out)])
    assert [loop["instructions"] for loop in json.loads(out.read_text())[0]["loops"]] == [3]
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== No kernels were profiled.\n")
    with pytest.raises(ValueError, match="--page source --print-source sass --csv"):
        kernel_sass.ncu_listing(str(empty))


def test_paged_prefill_benchmark_records_each_case(tmp_path):
    """benchmarks/paged_prefill.py on the bundled shape, one layer: a record per case with
    the portable path's time (the cuDNN one only where cuDNN runs), the settings and the
    versions; a malformed case is refused naming the form."""
    sys.path.insert(0, ROOT)
    from benchmarks import paged_prefill

    out = tmp_path / "paged_prefill.json"
    paged_prefill.main(["--shape", "bundled", "--layers", "1", "--reps", "2", "--max-len", "256",
                        "--pool-rows", "4", "--cases", "2x32@64", "1x64@0", "--json", str(out)])
    record = json.loads(out.read_text())
    cases = [(r["rows"], r["width"], r["start"]) for r in record["results"]]
    assert cases == [(2, 32, 64), (1, 64, 0)]
    cudnn = paged_prefill.flash.supported(64, paged_prefill.jnp.bfloat16)  # the bundled head_dim
    for result in record["results"]:
        assert set(result["ms"]) == ({"portable", "cudnn"} if cudnn else {"portable"})
        assert min(result["ms"].values()) > 0
        assert (result["portable_over_cudnn"] is None) != cudnn
    assert record["settings"]["layers"] == 1
    assert record["device"] == jax.devices()[0].device_kind
    assert {"jax", "kvjax"} <= set(record["versions"])
    with pytest.raises(SystemExit):
        paged_prefill.main(["--cases", "4-64"])
