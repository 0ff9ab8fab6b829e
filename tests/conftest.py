"""Shared fixtures: small random models built directly in kvjax (no checkpoint)."""

import json
import os
import re
import subprocess
import sys
from importlib import metadata, util


def only_cpus() -> bool:
    """Whether this JAX can run on CPUs only: no accelerator plugin (CUDA, ROCm) and no
    libtpu installed."""
    return not metadata.entry_points(group="jax_plugins") and util.find_spec("libtpu") is None


# Most of the suite's time is XLA compiling tiny programs, and LLVM optimising their CPU
# code is a good part of it: at level 1 instead of the default 2, two test files took
# 88 s against 97 s. Level 0 took 74 s but rounded differently: one int8 code of a
# streaming test's cache flipped (logits 9e-4 apart). Set before jax starts, so every
# process of the suite (its workers, subprocesses, notebooks) inherits it; not where an
# accelerator could run.
if only_cpus() and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                     "--xla_backend_optimization_level=1"]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import kvjax  # noqa: E402

# Oracle comparisons are in true float32: no TF32 matmuls on GPUs.
jax.config.update("jax_default_matmul_precision", "highest")


# The files that take longest on two cores (measured with --durations), collected first:
# pytest-xdist's --dist loadfile hands whole files to its workers in collection order, so
# a long file collected last would leave one worker running it alone at the end.
LONGEST_FIRST = ["test_sharding.py", "test_decode_kernel.py", "test_cli.py",
                 "test_notebooks.py", "test_paged_cache.py", "test_quantized_cache.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable


def make_config(num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=97,
                num_layers=2, max_position_embeddings=512, **kw) -> kvjax.ModelConfig:
    return kvjax.ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size,
                             intermediate_size=2 * hidden_size, num_layers=num_layers,
                             num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             max_position_embeddings=max_position_embeddings, **kw)


def make_model(config: kvjax.ModelConfig, seed: int = 0, dtype=jnp.float32,
               scale: float = 5.0) -> kvjax.Model:
    """A random float32 model. Weights are scaled up from init_params' N(0, 0.02) so the
    logits are far from ties and greedy decoding is a sharp test."""
    params = kvjax.init_params(config, jax.random.key(seed), dtype)
    params = jax.tree.map(lambda x: x if x.ndim == 1 else x * scale, params)
    return kvjax.Model(config=config, params=params)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_cpu_devices(module: str, devices: int) -> dict:
    """Runs ``python -m module`` in a subprocess with ``devices`` CPU devices (XLA only
    makes them before jax starts) and returns the JSON of its last line of output."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_flag_error(capsys, *args: str) -> str:
    """The last stderr line of ``kvjax.cli.main(args)`` run in this process, which must
    refuse a flag with exit status 2 before any work (tests/test_cli.py runs such a
    refusal as a subprocess too)."""
    from kvjax import cli

    capsys.readouterr()  # what was printed before
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def clear_programs() -> None:
    """Forgets kvjax's generation programs: the compiled executables
    (``kvjax.programs.PROGRAMS``) and the traced programs and step functions it builds
    them from, each holding the ``AttentionPlan`` chosen when it was made. A test that
    monkeypatches what ``kvjax.attention.choose`` looks at (``flash.supported``,
    ``decode_attention.supported``) calls this before and after, so that nothing made
    under one setting is reused under the other."""
    from kvjax import programs

    programs.clear()


def count_calls(jaxpr, primitive: str) -> int:
    """How many times ``primitive`` runs in ``jaxpr``: inside a nested call (a layer's
    ``jit``) once per call, not once per printed body."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == primitive
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's Jaxpr, or a Jaxpr
            if hasattr(inner, "eqns"):
                count += count_calls(inner, primitive)
    return count


@pytest.fixture(scope="session", autouse=True)
def compile_cache_of_the_session(tmp_path_factory):
    """``scripts/generate.py`` stores compiled programs (kvjax.compilation_cache): the
    runs of this session keep theirs in a directory of their own, not the user's."""
    previous = os.environ.get("KVJAX_CACHE_DIR")
    os.environ["KVJAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("compiled"))
    yield
    if previous is None:
        del os.environ["KVJAX_CACHE_DIR"]
    else:
        os.environ["KVJAX_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def gqa_model() -> kvjax.Model:
    return make_model(make_config())


class CompileCounter:
    """Counts XLA backend compilations while active (a jax.monitoring listener)."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, _duration, **_):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


_COUNTER = None


@pytest.fixture
def compile_counter() -> CompileCounter:
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CompileCounter()
    return _COUNTER


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today",
        "we like to read books", "she sings a song at night"] * 4


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML chat template,
    saved as Hugging Face files (config, safetensors, tokenizer.json, tokenizer_config)."""
    import tokenizers
    import torch
    import transformers

    directory = tmp_path_factory.mktemp("text_model")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
         "chat_template": CHATML}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=0, bos_token_id=None, initializer_range=0.2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)
