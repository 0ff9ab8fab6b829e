"""The package's layout: modules use each other only through public names, the
``kvjax.api`` aliases, and kvjax where JAX has no Pallas Triton (deprecated since JAX
0.11, to be removed)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys


import kvjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kvjax")


def package_modules() -> dict[str, str]:
    """Dotted name -> path of every module of kvjax (a package is its ``__init__``)."""
    modules = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str, module: str, modules=MODULES) -> list[str]:
    """Where ``source`` (the text of ``module``) uses another kvjax module's private
    (underscore) name: ``from kvjax.x import _name``, or ``_name`` read as an attribute
    of a kvjax module it imported (``kvjax.x._name``, ``x._name``, ``alias._name``)."""
    tree = ast.parse(source)
    package = module if module in modules and modules[module].endswith("__init__.py") \
        else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # a local name -> the kvjax module it is
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "kvjax":
                    continue
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound["kvjax"] = "kvjax"
        elif isinstance(node, ast.ImportFrom):
            source_module = node.module or ""
            if node.level:  # relative: from the module's package upwards
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source_module = ".".join(base + ([node.module] if node.module else []))
            if source_module.split(".")[0] != "kvjax":
                continue
            for alias in node.names:
                if is_private(alias.name) and source_module != module:
                    found.append(f"{module}:{node.lineno}: from {source_module} import "
                                 f"{alias.name}")
                full = f"{source_module}.{alias.name}"
                if full in modules:
                    bound[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.insert(0, inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in bound:
            continue
        target = bound[inner.id]
        for attr in chain:  # walk down submodules to the first name that is not one
            if f"{target}.{attr}" in modules:
                target = f"{target}.{attr}"
                continue
            if is_private(attr) and target != module:
                found.append(f"{module}:{node.lineno}: {target}.{attr}")
            break
    return sorted(set(found))


def test_the_check_finds_private_uses():
    modules = {"kvjax": "kvjax/__init__.py", "kvjax.a": "kvjax/a.py",
               "kvjax.pkg": "kvjax/pkg/__init__.py", "kvjax.pkg.b": "kvjax/pkg/b.py"}
    source = """
import kvjax
import kvjax.pkg.b as b_alias
from kvjax import a
from kvjax.pkg import b
from kvjax.a import _hidden, public, __version__
from . import _sibling_private
from .b import _b_private

def f():
    from kvjax.pkg import b as local_b
    return (kvjax.a._x, kvjax.pkg.b._y, a._z, b._w, b_alias._v, local_b._u, a.public,
            a.__doc__, kvjax.pkg.b.ok._fine_inside_a_value)
"""
    assert private_uses(source, "kvjax.pkg.c", modules) == sorted([
        "kvjax.pkg.c:6: from kvjax.a import _hidden",
        "kvjax.pkg.c:7: from kvjax.pkg import _sibling_private",
        "kvjax.pkg.c:8: from kvjax.pkg.b import _b_private",
        *(f"kvjax.pkg.c:12: {name}" for name in (
            "kvjax.a._x", "kvjax.pkg.b._y", "kvjax.a._z", "kvjax.pkg.b._w", "kvjax.pkg.b._v",
            "kvjax.pkg.b._u"))])
    # a module's own private names are its own business
    assert private_uses("import kvjax.a\nkvjax.a._mine()\nfrom kvjax.a import _mine\n",
                        "kvjax.a", modules) == []


def test_no_module_uses_another_modules_private_names():
    assert {"kvjax", "kvjax.programs", "kvjax.attention.choice",
            "kvjax.kernels.decode_attention", "kvjax.cache.base"} <= set(MODULES)
    found = []
    for module, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as f:
            found += private_uses(f.read(), module)
    assert not found, "\n".join(found)


def test_api_names_are_the_new_modules_names():
    """``kvjax.api`` only re-exports: each name is the object of the module it moved to."""
    from kvjax import api, generation, loading, programs, requests, streaming

    for name, home in [("generate", generation), ("Generation", generation), ("load", loading),
                       ("Model", loading), ("BUNDLED_MODEL", loading),
                       ("PREFILL_CHUNK", programs), ("SYNC_EVERY", programs),
                       ("MAX_STOP_TOKENS", requests), ("fresh_key_limit", requests),
                       ("generate_stream", streaming), ("TokenStream", streaming)]:
        assert getattr(api, name) is getattr(home, name), name
    assert kvjax.generate is generation.generate and kvjax.Model is loading.Model


# ----- without Pallas Triton -----

NO_TRITON = r"""
import importlib.abc, json, sys, warnings

HIDDEN = "jax.experimental.pallas.triton"


class HideTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == HIDDEN or name.startswith(HIDDEN + "."):
            raise ImportError(f"No module named {name!r} (hidden by this test)")
        return None


sys.meta_path.insert(0, HideTriton())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import kvjax
    from kvjax.kernels import decode_attention

    try:
        import jax.experimental.pallas.triton
        hidden = False
    except ImportError:
        hidden = True
    model = kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32")
    out = kvjax.generate(model, json.loads(sys.argv[1]), max_new_tokens=int(sys.argv[2]),
                         stop_tokens=[])
    stream = kvjax.generate_stream(model, json.loads(sys.argv[1]), chunk_size=5,
                                   max_new_tokens=int(sys.argv[2]), stop_tokens=[])
    for _ in stream:
        pass
    try:
        kvjax.attention.choose(model.config, "bfloat16", decode_kernel=True)
        refused = None
    except RuntimeError as e:
        refused = str(e)
print(json.dumps({
    "hidden": hidden, "available": decode_attention.available(),
    "plgpu_is_none": decode_attention.plgpu is None,
    "supported": decode_attention.supported(64, "bfloat16"),
    "triton_imported": HIDDEN in sys.modules, "tokens": out.tokens,
    "stream": stream.generation.tokens, "refused": refused,
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                 if "triton" in str(w.message).lower()]}))
"""


def test_kvjax_without_pallas_triton():
    """A process whose JAX cannot import ``jax.experimental.pallas.triton`` imports
    kvjax, says the kernel is not available, refuses ``decode_kernel=True`` with a
    message, and generates (and streams) the tokens of a normal process."""
    prompts, new_tokens = ["def add(a, b):", "The module"], 12
    proc = subprocess.run([sys.executable, "-c", NO_TRITON, json.dumps(prompts), str(new_tokens)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              filter(None, [ROOT, os.environ.get("PYTHONPATH")]))))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hidden"] and not out["triton_imported"]
    assert out["plgpu_is_none"] and out["available"] is False and out["supported"] is False
    assert out["refused"] and "no Pallas Triton" in out["refused"]
    normal = kvjax.generate(kvjax.load(kvjax.BUNDLED_MODEL, dtype="float32"), prompts,
                            max_new_tokens=new_tokens, stop_tokens=[])
    assert all(len(t) == new_tokens for t in normal.tokens)
    assert out["tokens"] == out["stream"] == normal.tokens
    if kvjax.platform.is_cuda_gpu():  # asked once for a bfloat16 cache: one warning
        assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("RuntimeWarning")
    else:  # the warning is for CUDA GPUs only
        assert out["warnings"] == []
