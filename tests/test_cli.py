"""scripts/generate.py as a user runs it: a subprocess on a real checkpoint directory."""

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
def test_bad_flag_exits_2(flags, message):
    proc = run_cli("--prompt", "x", *flags)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"kvjax-generate: error: {message}"


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


def test_stream_prints_the_same_text(checkpoint):
    common = ["--model", checkpoint, "--max-new-tokens", "20", "--dtype", "float32",
              "--stop", "0", "--platform", "cpu"]
    plain = run_cli(*common, "--prompt", "the dog", "--quiet")
    streamed = run_cli(*common, "--prompt", "the dog", "--stream", "--chunk-size", "3")
    assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "the dog" + plain.stdout
    lines = run_cli(*common, "--prompt", "the dog", "--prompt", "a cat sat", "--stream", "--json")
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


def test_batch_rows_are_told_apart(bundled):
    expected = kvjax.generate(bundled, TWO_PROMPTS, max_new_tokens=40)
    assert all("\n" in text for text in expected.texts)  # what the formats must cope with
    common = ["--prompt", TWO_PROMPTS[0], "--prompt", TWO_PROMPTS[1], "--max-new-tokens", "40"]
    plain = run_cli(*common)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "".join(f"--- row {row} ---\n{prompt}{text}\n" for row, (prompt, text)
                                   in enumerate(zip(TWO_PROMPTS, expected.texts)))
    assert stats_tokens(plain.stderr) == 80
    streamed = run_cli(*common, "--stream", "--chunk-size", "4")
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
