"""scripts/generate.py as a user runs it: a subprocess on a real checkpoint directory.

Tests that hold the CLI's output against the library's for the same settings run the
command's ``kvjax.cli.main`` in this process instead (``run_in_process``: the same code
once the interpreter has started), so that the library call reuses the programs the
command compiled rather than compiling them a second time.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from jax.extend import backend

import kvjax
from kvjax import cli
from tests.conftest import cli_flag_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate.py")
TWO_PROMPTS = ["The list type", "A dictionary"]


@pytest.fixture(scope="module")
def checkpoint(text_checkpoint):
    return text_checkpoint


@pytest.fixture(scope="module")
def bundled():
    return kvjax.load(kvjax.BUNDLED_MODEL)


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, SCRIPT, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, input=stdin)


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``kvjax.cli.main(args)`` in this process, as ``run_cli`` reports a run: exit status,
    stdout, stderr. ``--no-compile-cache``: the session's program store is the
    subprocesses' (enabling it here would change how this process compiles)."""
    capsys.readouterr()  # what was printed before
    status = cli.main([*args, "--no-compile-cache"])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out.out, out.err)


def stats_tokens(stderr: str) -> int:
    """The new-token count of the CLI's stats line (its last line on stderr)."""
    return int(re.fullmatch(r"\[compile .* \| (\d+) new tokens \| cache .* MiB\]",
                            stderr.strip().splitlines()[-1]).group(1))


def test_json_output_matches_library(checkpoint):
    args = ["--model", checkpoint, "--prompt", "the cat", "--prompt", "a dog ran in",
            "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "20",
            "--top-p", "0.9", "--seed", "4", "--dtype", "float32", "--json"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"tokens", "texts", "stats"}
    expected = kvjax.generate(kvjax.load(checkpoint, dtype="float32"), ["the cat", "a dog ran in"],
                              max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    assert out["tokens"] == expected.tokens
    assert out["texts"] == expected.texts
    assert out["stats"]["new_tokens"] == sum(len(t) for t in expected.tokens)


def test_text_output_is_the_greedy_generation(bundled):
    proc = run_cli("--prompt", "The list type", "--max-new-tokens", "24", "--platform", "cpu")
    assert proc.returncode == 0, proc.stderr
    expected = kvjax.generate(bundled, ["The list type"], max_new_tokens=24)
    assert proc.stdout == "The list type" + expected.texts[0] + "\n"
    assert stats_tokens(proc.stderr) == len(expected.tokens[0]) == 24


def test_absent_platform_is_one_line_error():
    found = sorted(backend.backends())
    for platform, package in (("tpu", "jax[tpu]"), ("gpu", "jax[cuda13]")):
        if {"tpu": "tpu", "gpu": "cuda"}[platform] in found:
            continue  # present here: nothing to refuse
        proc = run_cli("--platform", platform, "--prompt", "x")
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            f"error: --platform {platform}: no {platform.upper()} backend is available here "
            f"(JAX found: {', '.join(found)}); install {package} or drop --platform")
        assert proc.stdout == ""


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--capacity", "-1"], "--capacity must be an integer >= 1"),
    (["--chunk-size", "0"], "--chunk-size must be an integer >= 1"),
])
def test_bad_flag_exits_2(capsys, flags, message):
    error = cli_flag_error(capsys, "--prompt", "x", *flags)
    assert error == f"kvjax-generate: error: {message}"


def test_non_finite_sampling_value_is_one_line_error():
    proc = run_cli("--prompt", "x", "--temperature", "inf")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: temperature must be a finite number >= 0 (0 = greedy), got inf")


def test_bad_input_is_one_line_error(checkpoint):
    proc = run_cli("--model", checkpoint, "--prompt", "the cat sat", "--max-new-tokens", "20",
                   "--capacity", "8")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prompt (")
    assert "exceeds the cache capacity (8); pass capacity >= " in lines[0]
    proc = run_cli("--model", os.path.join(checkpoint, "nope"), "--prompt", "x")
    assert proc.returncode == 1 and "neither a directory nor a Hugging Face Hub id" in proc.stderr


def test_stream_prints_the_same_text(capsys, checkpoint):
    common = ["--model", checkpoint, "--max-new-tokens", "20", "--dtype", "float32",
              "--stop", "0", "--platform", "cpu"]
    plain = run_in_process(capsys, *common, "--prompt", "the dog", "--quiet")
    streamed = run_in_process(capsys, *common, "--prompt", "the dog", "--stream", "--chunk-size",
                              "3")
    assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "the dog" + plain.stdout
    lines = run_in_process(capsys, *common, "--prompt", "the dog", "--prompt", "a cat sat",
                           "--stream", "--json")
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    final = records[-1]
    expected = kvjax.generate(kvjax.load(checkpoint, dtype="float32"), ["the dog", "a cat sat"],
                              max_new_tokens=20, stop_tokens=[0])
    assert final["tokens"] == expected.tokens
    for row in range(2):
        assert sum((r["tokens"] for r in records[:-1] if r["row"] == row), []) == expected.tokens[row]


def test_prompt_from_stdin_and_file(checkpoint, tmp_path):
    common = ["--model", checkpoint, "--max-new-tokens", "6", "--dtype", "float32", "--json"]
    path = tmp_path / "prompt.txt"
    path.write_text("the sun is")
    from_file = json.loads(run_cli(*common, "--prompt-file", str(path)).stdout)
    from_stdin = json.loads(run_cli(*common, stdin="the sun is").stdout)
    from_flag = json.loads(run_cli(*common, "--prompt", "the sun is").stdout)
    assert from_file["tokens"] == from_stdin["tokens"] == from_flag["tokens"]


def test_chat_session_in_the_terminal(checkpoint):
    proc = run_cli("--model", checkpoint, "--chat", "--max-new-tokens", "8", "--dtype", "float32",
                   stdin="hello there\n/stats\nthe cat\n/reset\nhi\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    session = kvjax.ChatSession(kvjax.load(checkpoint, dtype="float32"), max_new_tokens=8)
    first, second = session.send("hello there"), session.send("the cat")
    session.reset()
    third = session.send("hi")
    # input() writes its "you> " prompt to stdout; /stats and /reset print on stderr
    assert proc.stdout == (f"you> model> {first}\nyou> you> model> {second}\nyou> "
                           f"you> model> {third}\nyou> ")
    stats = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert len(stats) == 1 and stats[0]["reply_tokens"] >= 1
    assert "(conversation reset)" in proc.stderr


def test_chat_capacity_message(checkpoint):
    proc = run_cli("--model", checkpoint, "--chat", "--max-new-tokens", "8", "--capacity", "40",
                   "--dtype", "float32", stdin="hi\nthe cat sat on the mat in the park\n")
    assert proc.returncode == 0
    assert "the conversation has reached the cache capacity" in proc.stderr


def test_help_and_flag_conflicts():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--chat" in proc.stdout
    assert 'one line "[N] text" per piece of row N, its newlines\n  written \\n' in proc.stdout
    proc = run_cli("--chat", "--json")
    assert proc.returncode == 2
    assert "--chat is interactive: it takes no --prompt, --prompt-file or --json" in proc.stderr


def test_unreadable_prompt_file_is_one_line_error(checkpoint, tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe")
    cases = ((tmp_path, "Is a directory"), (tmp_path / "missing.txt", "No such file or directory"),
             (binary, "not UTF-8 text"))
    for path, reason in cases:
        proc = run_cli("--model", checkpoint, "--prompt-file", str(path))
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"error: cannot read --prompt-file {path}: {reason}"


def unescape(text: str) -> str:
    """The inverse of the CLI's escaping of a streamed piece."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}[m.group(1)], text)


def test_batch_rows_are_told_apart(capsys, bundled):
    expected = kvjax.generate(bundled, TWO_PROMPTS, max_new_tokens=40)
    assert all("\n" in text for text in expected.texts)  # what the formats must cope with
    common = ["--prompt", TWO_PROMPTS[0], "--prompt", TWO_PROMPTS[1], "--max-new-tokens", "40"]
    plain = run_in_process(capsys, *common)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "".join(f"--- row {row} ---\n{prompt}{text}\n" for row, (prompt, text)
                                   in enumerate(zip(TWO_PROMPTS, expected.texts)))
    assert stats_tokens(plain.stderr) == 80
    streamed = run_in_process(capsys, *common, "--stream", "--chunk-size", "4")
    assert streamed.returncode == 0, streamed.stderr
    pieces = ["", ""]
    for line in streamed.stdout.splitlines():
        row, text = re.fullmatch(r"\[(\d)\] (.*)", line).groups()
        pieces[int(row)] += unescape(text)
    assert pieces == expected.texts


def test_ctrl_c_stops_a_long_generation_at_once():
    """SIGINT while one long compiled call runs (no --stream, no progress bar: stderr is
    not a terminal): exit 130 within a second or two, nothing printed."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored here (a background job), so the CLI rightly ignores it")
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--prompt", TWO_PROMPTS[0], "--prompt", TWO_PROMPTS[1],
         "--no-cache", "--max-new-tokens", "1000", "--no-compile-cache", "--platform", "cpu"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_LOG_COMPILES="1"))  # each compile logs a line on stderr
    try:
        _wait_until_quiet(proc.stderr, seconds=1.5, deadline=60)  # compiled: generating
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - interrupted < 2
        assert proc.stdout.read() == ""
    finally:
        proc.kill()


def _wait_until_quiet(stream, seconds: float, deadline: float) -> None:
    """Waits until ``stream`` has printed a line and then nothing for ``seconds``."""
    last = []
    reader = threading.Thread(target=lambda: [last.append(time.monotonic()) for _ in stream],
                              daemon=True)
    reader.start()
    start = time.monotonic()
    while not last or time.monotonic() - last[-1] < seconds:
        assert time.monotonic() - start < deadline, "the CLI printed no compile log in time"
        time.sleep(0.1)


# ----- --dry-run and --kv-dtype -----

def dry_run(*args):
    proc = run_cli("--dry-run", *args)
    return proc, (json.loads(proc.stdout) if "--json" in args and proc.stdout else None)


def test_dry_run_is_the_run_it_plans(bundled):
    """The cache and weights bytes of --dry-run are those of the run itself (what
    ``generate`` creates, the loaded weights) and of ``kvjax.cache.estimate_bytes``."""
    flags = ["--prompt", TWO_PROMPTS[0], "--prompt", TWO_PROMPTS[1], "--max-new-tokens", "40"]
    proc, report = dry_run(*flags, "--json")
    assert proc.returncode == 0, proc.stderr
    run = kvjax.generate(bundled, TWO_PROMPTS, max_new_tokens=40)
    assert (report["rows"], report["capacity"]) == (2, run.stats["capacity"])
    assert report["cache_bytes"] == run.stats["cache_bytes"] == kvjax.cache.estimate_bytes(
        bundled.config, 2, run.stats["capacity"], dtype="float32")
    assert report["weights_bytes"] == kvjax.cache.tree_nbytes(bundled.params)
    assert report["total_bytes"] == (report["weights_bytes"] + report["cache_bytes"]
                                     + report["scratch_bytes"])
    assert report["scratch_bytes"] == sum(report["scratch_estimate"].values()) > 0
    assert report["fits"] and report["memory_bytes"] > 0
    text, _ = dry_run(*flags)
    assert text.returncode == 0, text.stderr
    assert re.search(rf"^  KV cache +{report['cache_bytes']:,} bytes ", text.stdout, re.M)
    assert re.search(rf"^  weights +{report['weights_bytes']:,} bytes ", text.stdout, re.M)
    assert "scratch, estimated as a prefill piece's largest temporaries: activations " \
        in text.stdout
    assert text.stdout.splitlines()[-1].startswith("fits: ")


def test_dry_run_reads_no_weights(tmp_path):
    """A checkpoint directory without its safetensors: the dry run needs none of it."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(kvjax.BUNDLED_MODEL, name), "rb").read())
    proc, report = dry_run("--model", str(tmp_path), "--prompt", "x", "--kv-dtype", "int8",
                           "--dtype", "bfloat16", "--json")
    assert proc.returncode == 0, proc.stderr
    config = kvjax.ModelConfig.from_json(str(tmp_path))
    assert report["cache_bytes"] == kvjax.cache.estimate_bytes(config, 1, report["capacity"],
                                                               "int8")
    assert report["weights_bytes"] == kvjax.cache.tree_nbytes(
        kvjax.params.abstract_params(config, "bfloat16"))


def test_dry_run_downloads_no_weights_from_the_hub(monkeypatch, capsys):
    """For a Hub id the dry run fetches only the small files (config, tokenizer), never
    the safetensors; a generation fetches both."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return kvjax.BUNDLED_MODEL

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert cli.main(["--model", "org/name", "--prompt", "x", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_bytes"] > 0
    assert asked == [("org/name", ["*.json", "tokenizer.model"])]
    assert kvjax.loading.resolve_checkpoint("org/name") == kvjax.BUNDLED_MODEL
    assert asked[-1] == ("org/name", ["*.json", "tokenizer.model", "*.safetensors"])


def test_dry_run_that_does_not_fit_says_what_would(bundled):
    flags = ["--prompt", "a", "--prompt", "b", "--prompt", "c", "--prompt", "d",
             "--capacity", "512", "--memory-budget", "17MiB"]
    proc, report = dry_run(*flags, "--json")
    assert proc.returncode == 1 and not report["fits"]
    assert report["memory_bytes"] == 17 * 2 ** 20 and report["memory_source"] == "--memory-budget"
    room = report["memory_bytes"] - report["weights_bytes"] - report["scratch_bytes"]
    config = bundled.config
    for kv_dtype in ("float32", "int8"):
        largest = report["fitting"][kv_dtype]
        size = lambda b, c: kvjax.cache.estimate_bytes(config, b, c, kv_dtype, dtype="float32")
        b, c = largest["max_batch"], largest["max_capacity"]
        assert (b == 0 or size(b, 512) <= room) and size(b + 1, 512) > room
        assert size(4, c) <= room < size(4, c + 1)
    assert report["fitting"]["int8"]["max_batch"] >= 1  # int8 fits a row where float32 does not
    text, _ = dry_run(*flags)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    f32, int8 = report["fitting"]["float32"], report["fitting"]["int8"]
    assert f"  largest batch that fits at capacity 512: {f32['max_batch']}" in lines
    assert (f"  largest capacity that fits at batch 4: {f32['max_capacity']} (this run needs "
            f">= {report['fitting']['capacity_needed']})") in lines
    assert any(line.startswith("with --kv-dtype int8: KV cache ") for line in lines)
    assert f"  largest batch that fits at capacity 512 with --kv-dtype int8: " \
           f"{int8['max_batch']}" in lines


def test_dry_run_over_int8_that_does_not_fit():
    """Asked for an int8 cache, the dry run says what fits with it and suggests no int8."""
    flags = ["--prompt", "a", "--prompt", "b", "--capacity", "4096", "--kv-dtype", "int8",
             "--memory-budget", "17MiB"]
    proc, report = dry_run(*flags, "--json")
    assert proc.returncode == 1 and sorted(report["fitting"]) == ["capacity_needed", "int8"]
    largest = report["fitting"]["int8"]
    text, _ = dry_run(*flags)
    assert text.returncode == 1 and "Traceback" not in text.stderr, text.stderr
    lines = text.stdout.splitlines()
    assert lines[-2:] == [
        f"  largest batch that fits at capacity 4096: {largest['max_batch']}",
        f"  largest capacity that fits at batch 2: {largest['max_capacity']} (this run "
        f"needs >= {report['fitting']['capacity_needed']})"]


def test_dry_run_when_not_even_one_row_fits():
    proc, _ = dry_run("--prompt", "x", "--memory-budget", "1MiB")
    assert proc.returncode == 1
    assert ("  not even one row of one slot fits: the weights and the scratch alone need "
            in proc.stdout)
    assert "with --kv-dtype int8: KV cache " in proc.stdout


@pytest.mark.parametrize("budget, expected", [("8GiB", 8 * 2 ** 30), ("1.5GB", 1_500_000_000),
                                              ("123456", 123456), ("2m", 2 * 2 ** 20)])
def test_memory_budget_units(capsys, budget, expected):
    status = cli.main(["--prompt", "x", "--memory-budget", budget, "--dry-run", "--json"])
    assert status == (0 if expected > 2 ** 30 else 1)  # 1: the run does not fit the budget
    assert json.loads(capsys.readouterr().out)["memory_bytes"] == expected


@pytest.mark.parametrize("flags, message", [
    (["--memory-budget", "8XB", "--dry-run"], "argument --memory-budget: expected bytes, a "
                                              "number with an optional unit"),
    (["--memory-budget", "8GiB"], "--memory-budget is the device memory a --dry-run plans for"),
    (["--dry-run", "--no-cache"], "--dry-run plans a generation's KV cache"),
    (["--kv-dtype", "int8", "--no-cache"], "--kv-dtype sets what the KV cache stores"),
    (["--kv-dtype", "int4"], "argument --kv-dtype: invalid choice: 'int4'"),
    (["--window", "8", "--no-cache"], "--window and --sink-tokens say what the KV cache keeps"),
    (["--block-size", "8"], "--block-size sets up the prefix cache: pass --paged too"),
    (["--paged", "--no-cache"], "--paged runs rows in one pool of blocks that keeps whole "
                                "prefixes: it takes no --no-cache"),
])
def test_planning_flag_errors_exit_2(capsys, flags, message):
    assert cli_flag_error(capsys, "--prompt", "x", *flags).startswith(
        f"kvjax-generate: error: {message}")


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_kv_dtype_generates_what_the_library_does(capsys, bundled, kv_dtype):
    proc = run_in_process(capsys, "--prompt", "The list type", "--max-new-tokens", "24",
                          "--kv-dtype", kv_dtype, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = kvjax.generate(bundled, ["The list type"], max_new_tokens=24, kv_dtype=kv_dtype)
    assert out["tokens"] == expected.tokens
    assert out["stats"]["cache_bytes"] == expected.stats["cache_bytes"] == \
        kvjax.cache.estimate_bytes(bundled.config, 1, expected.stats["capacity"], kv_dtype)
    streamed = run_in_process(capsys, "--prompt", "The list type", "--max-new-tokens", "24",
                              "--kv-dtype", kv_dtype, "--stream", "--quiet")
    assert streamed.stdout == expected.texts[0] + "\n"


def test_chat_with_kv_dtype(checkpoint):
    proc = run_cli("--model", checkpoint, "--chat", "--max-new-tokens", "8", "--dtype", "float32",
                   "--kv-dtype", "int8", stdin="hello there\n")
    assert proc.returncode == 0, proc.stderr
    session = kvjax.ChatSession(kvjax.load(checkpoint, dtype="float32"), max_new_tokens=8,
                                kv_dtype="int8")
    assert proc.stdout == f"you> model> {session.send('hello there')}\nyou> "


def test_streaming_runs_past_the_capacity(capsys, bundled):
    """--sink-tokens and --window: 200 new tokens through 64 slots, the library's tokens
    and cache bytes; a streaming --chat never reaches the capacity message."""
    proc = run_in_process(capsys, "--prompt", "The list type", "--max-new-tokens", "200",
                          "--sink-tokens", "4", "--window", "60", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = kvjax.generate(bundled, ["The list type"], max_new_tokens=200, sink_tokens=4,
                              window=60)
    assert out["tokens"] == expected.tokens and len(out["tokens"][0]) > 64
    assert out["stats"]["capacity"] == 64
    assert out["stats"]["cache_bytes"] == kvjax.cache.estimate_bytes(
        bundled.config, 1, 64, sink_tokens=4, window=60, dtype="float32")
    chat = run_cli("--chat", "--max-new-tokens", "40", "--sink-tokens", "4", "--window", "28",
                   stdin="hello there\nthe cat sat on the mat in the park\nand then?\n")
    assert chat.returncode == 0, chat.stderr
    assert "capacity" not in chat.stderr and chat.stdout.count("model> ") == 3


def test_paged_chat_serves_a_repeated_conversation_from_the_prefix_cache():
    """--chat --paged: after /reset, the same first message is served from the pool
    (/stats shows it) and the reply is the one before."""
    proc = run_cli("--chat", "--paged", "--block-size", "8", "--prefix-cache-mb", "16",
                   "--max-new-tokens", "8", "--temperature", "0",
                   stdin="hello there\n/reset\nhello there\n/stats\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.split("you> ") if line.startswith("model> ")]
    assert len(replies) == 2 and replies[0] == replies[1]
    stats = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    cache = stats[-1]["prefix_cache"]
    assert cache["cached_tokens"] > 0 and cache["block_size"] == 8
    assert cache["blocks"]["device"]["total"] == 16 * 2 ** 20 // cache["block_bytes"]
