"""scripts/convert.py's exit codes, the same as scripts/generate.py's: 0 ok, 1 bad input
or model, 2 bad flags (test_orbax_store.py converts a checkpoint)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_model_exits_1_with_one_line(tmp_path):
    missing = tmp_path / "missing"
    proc = convert("--model", str(missing), "--out", str(tmp_path / "store"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: {missing} is neither a directory nor a Hugging Face Hub id (org/name)")
    proc = convert("--model", str(tmp_path), "--out", str(tmp_path / "store"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: no config.json in {tmp_path}: point kvjax at a Hugging Face checkpoint "
        "directory (one holding config.json and model.safetensors)")
    assert not (tmp_path / "store").exists()


def test_bad_flags_exit_2(tmp_path):
    proc = convert("--model", str(tmp_path), "--out", str(tmp_path / "store"), "--shards", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "convert.py: error: unrecognized arguments: --shards 2")
    proc = convert("--out", str(tmp_path / "store"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "convert.py: error: the following arguments are required: --model")


def test_help_states_the_exit_codes():
    proc = convert("--help")
    assert proc.returncode == 0
    assert ("exit codes (as scripts/generate.py): 0 ok, 1 bad input or model, 2 bad flags,\n"
            "  130 interrupted") in proc.stdout
