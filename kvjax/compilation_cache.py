"""Compiled programs kept on disk between processes (JAX's persistent compilation cache).

Each process compiles its generation programs anew: seconds for small models, 10–12 s
for a whole Llama-3.1-8B generation on an H100's host (docs/experiments.md), of which
1.4–2.0 s remain when the program is loaded instead. With the cache enabled
a later process (another ``scripts/generate.py`` run, a restarted server or notebook)
loads the program that an earlier one stored instead of compiling it; on GPUs XLA's
GEMM autotuning results are stored beside them, so even new shapes compile faster.

    kvjax.compilation_cache.enable()            # before the first generation
    model = kvjax.load(...)
    kvjax.generate(model, prompts)              # compiled once, then loaded by later runs

``scripts/generate.py`` enables it by default (``--compile-cache DIR``,
``--no-compile-cache``). The directory is trusted: a program found there is run, so it
must not be writable by others (JAX's warning for ``set_cache_dir``).

JAX does not store programs that call back to the host. ``kvjax.generate``'s program
notes when its prefill is done with such a callback (it splits the timing in
``Generation.stats`` into ``prefill_s`` and ``decode_s``); while the cache is in use
``generate`` compiles the program without it, and ``stats`` report the two together
(``generate_s``; ``prefill_s``, ``decode_s`` and ``decode_tokens_per_s`` None).
Tokens are the same either way.
"""

from __future__ import annotations

import os

import jax

ENV_DIRECTORY = "KVJAX_CACHE_DIR"


def default_directory() -> str:
    """``$KVJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvjax/compiled``, else
    ``~/.cache/kvjax/compiled``."""
    if os.environ.get(ENV_DIRECTORY):
        return os.environ[ENV_DIRECTORY]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvjax", "compiled")


def enable(directory: str | os.PathLike | None = None, *,
           min_compile_time_s: float = 0.1) -> str:
    """Stores compiled programs in ``directory`` (default ``default_directory()``) and
    loads them from there instead of compiling; returns the absolute directory.

    Applies to every program this process compiles from now on, kvjax's and your own
    (it sets ``jax_compilation_cache_dir``). ``min_compile_time_s``: programs that
    compile faster than this are not stored (JAX's own default is 1 s, which would leave
    out small models' generation programs: the bundled model's took 1.3 s to compile on
    a CPU and 0.4 s to load from the cache).

    Raises:
      ValueError: the directory cannot be created or written, or
        ``min_compile_time_s < 0``.
    """
    if not min_compile_time_s >= 0:
        raise ValueError(f"min_compile_time_s must be >= 0, got {min_compile_time_s!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(directory or default_directory())))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the compilation cache directory {path}: "
                         f"{e.strerror}; pass another directory") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"the compilation cache directory {path} is not writable; pass "
                         "another directory")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    # JAX decides whether to use its cache at the first compile of the process; start
    # over so that the directory takes effect after earlier compiles too.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    return path


def in_use() -> bool:
    """Whether this process stores compiled programs on disk (by ``enable`` or by JAX's
    own ``jax_compilation_cache_dir`` setting)."""
    return bool(jax.config.jax_compilation_cache_dir) and bool(
        jax.config.jax_enable_compilation_cache)
