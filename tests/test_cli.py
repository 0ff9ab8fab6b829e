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


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


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
