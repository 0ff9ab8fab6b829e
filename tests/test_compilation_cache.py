"""kvjax.compilation_cache: generation programs stored on disk by one process and loaded
by the next (JAX's persistent compilation cache)."""

import json
import os
import subprocess
import sys

import pytest

import kvjax
from kvjax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process: enable the cache, count JAX's cache hits, generate greedily with the
# bundled model, print tokens, stats and hits as JSON.
GENERATE = """
import json, sys
import jax
import kvjax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
kvjax.compilation_cache.enable(sys.argv[1], min_compile_time_s=0)
model = kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32")
out = kvjax.generate(model, ["def add(a, b):", "import os"], max_new_tokens=12, stop_tokens=[])
print(json.dumps({"tokens": out.tokens, "stats": out.stats, "hits": len(hits),
                  "in_use": kvjax.compilation_cache.in_use()}))
"""


def generate_in_process(directory) -> dict:
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(directory)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_later_process_loads_the_generation_program(tmp_path):
    """The first process compiles and stores ``generate``'s program (without the
    prefill clock, a host callback JAX would not store); the second loads it from disk
    and gives the same tokens as a process without the cache."""
    first = generate_in_process(tmp_path)
    stored = [name for name in os.listdir(tmp_path) if name.startswith("jit_run-")]
    assert len(stored) == 1, os.listdir(tmp_path)
    second = generate_in_process(tmp_path)
    assert first["in_use"] and second["in_use"]
    assert first["hits"] == 0 and second["hits"] >= 1
    expected = kvjax.generate(kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32"),
                              ["def add(a, b):", "import os"], max_new_tokens=12, stop_tokens=[])
    assert first["tokens"] == second["tokens"] == expected.tokens
    for stats in (first["stats"], second["stats"]):  # timed as a whole, not split
        assert stats["prefill_s"] is None and stats["decode_s"] is None
        assert stats["decode_tokens_per_s"] is None
        assert stats["generate_s"] > 0 and stats["tokens_per_s"] > 0
    assert expected.stats["prefill_s"] > 0 and expected.stats["decode_s"] > 0  # no cache here
    assert not compilation_cache.in_use()


def test_cli_stores_programs_by_default(tmp_path, text_checkpoint):
    """``scripts/generate.py`` keeps its programs in ``$KVJAX_CACHE_DIR`` unless told
    not to; ``--compile-cache DIR`` picks another directory."""
    def run(*args, env_dir=None):
        env = dict(os.environ, KVJAX_CACHE_DIR=str(env_dir or tmp_path / "env"))
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "scripts", "generate.py"), "--model",
             text_checkpoint, "--prompt", "the cat", "--max-new-tokens", "8", "--dtype",
             "float32", "--stop", "0", *args], capture_output=True, text=True, cwd=ROOT,
            env=env, timeout=300)

    stored = run()
    assert stored.returncode == 0, stored.stderr[-3000:]
    assert "prefill + decode" in stored.stderr
    assert any(n.startswith("jit_run-") for n in os.listdir(tmp_path / "env"))
    chosen = run("--compile-cache", str(tmp_path / "chosen"))
    assert chosen.returncode == 0 and any(
        n.startswith("jit_run-") for n in os.listdir(tmp_path / "chosen"))
    plain = run("--no-compile-cache", env_dir=tmp_path / "unused")
    assert plain.returncode == 0 and "| prefill " in plain.stderr
    assert not (tmp_path / "unused").exists()
    assert stored.stdout == chosen.stdout == plain.stdout
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unwritable_default = run(env_dir=blocker / "cache")  # the default: a warning, no cache
    assert unwritable_default.returncode == 0, unwritable_default.stderr[-3000:]
    assert unwritable_default.stdout == plain.stdout
    assert (f"warning: cannot create the compilation cache directory {blocker / 'cache'}: Not "
            "a directory; pass another directory (--compile-cache DIR); compiling without a "
            "cache") in unwritable_default.stderr
    unwritable_chosen = run("--compile-cache", str(blocker / "cache"))  # asked for: an error
    assert unwritable_chosen.returncode == 1
    assert unwritable_chosen.stderr.strip().splitlines()[-1] == (
        f"error: cannot create the compilation cache directory {blocker / 'cache'}: Not a "
        "directory; pass another directory")
    both = run("--compile-cache", str(tmp_path), "--no-compile-cache")
    assert both.returncode == 2
    assert "--compile-cache and --no-compile-cache exclude each other" in both.stderr


def test_enable_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        compilation_cache.enable(tmp_path, min_compile_time_s=-1)
    assert str(e.value) == "min_compile_time_s must be >= 0, got -1"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError) as e:
        compilation_cache.enable(blocker / "cache")
    assert str(e.value) == (f"cannot create the compilation cache directory {blocker / 'cache'}: "
                            "Not a directory; pass another directory")
    assert not compilation_cache.in_use()


def test_default_directory(monkeypatch):
    monkeypatch.setenv("KVJAX_CACHE_DIR", "/somewhere/kv")
    assert compilation_cache.default_directory() == "/somewhere/kv"
    monkeypatch.delenv("KVJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert compilation_cache.default_directory() == "/xdg/kvjax/compiled"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert compilation_cache.default_directory() == "/home/someone/.cache/kvjax/compiled"
