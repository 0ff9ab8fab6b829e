"""scripts/generate.py as a user runs it: a subprocess on a real checkpoint directory."""

import json
import os
import subprocess
import sys

import pytest

import kvjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(text_checkpoint):
    return text_checkpoint


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, input=stdin)


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


def test_text_output(checkpoint):
    proc = run_cli("--model", checkpoint, "--prompt", "the sun", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the sun")
    assert "tok/s" in proc.stderr


def test_bad_flag_exits_2(checkpoint):
    proc = run_cli("--model", checkpoint, "--prompt", "x", "--max-new-tokens", "many")
    assert proc.returncode == 2
    assert "argument --max-new-tokens: invalid int value: 'many'" in proc.stderr


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
    assert proc.stdout.count("model> ") == 3
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
