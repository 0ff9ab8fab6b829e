#!/usr/bin/env python
"""Train ``kvjax-tiny``, the small Llama bundled with kvjax, from text every Python has.

    python scripts/train_tiny.py                      # the bundled model (about 20 min, 2 CPU cores)
    python scripts/train_tiny.py --smoke --out /tmp/t # a tiny model in a few seconds (CI)

Corpus: the documentation CPython ships with itself, so training needs no network:
``pydoc_data.topics.topics`` (the language reference topics that ``help()`` shows) and
the module, class and function docstrings of the pure-Python standard library (files
under ``sysconfig.get_paths()["stdlib"]`` in sorted order, parsed with ``ast``; tests,
IDLE, demos and site-packages skipped). Every 50th document is held out for validation.

Tokenizer: byte-level BPE (``tokenizers``) trained on the training documents, so any
text round-trips; special tokens ``<|endoftext|>`` (id 0, separates documents),
``<|im_start|>``, ``<|im_end|>``.

Model: exactly what ``kvjax.ModelConfig(model_type="llama")`` reads from the
``config.json`` written here (the config is built from that dict), GQA, tied embeddings.
The loss is kvjax's own ``kvjax.model.forward`` (``cache=None``: causal attention within
each block) with cross-entropy, trained in float32 with optax AdamW, a linear warm-up +
cosine decay schedule sized for ``--steps`` and global-norm gradient clipping.

``--minutes`` is an optional time cap: training stops after the first step that ends
past it (the schedule stays sized for ``--steps``, so a capped run ends at a higher
learning rate, and the model card says how many steps ran). Without the cap (the
default) a run is reproducible: the same ``--seed`` gives the same weights on the same
machine. The full run is 1000 steps, about 17 minutes on 2 idle CPU cores.

Output: a Hugging Face directory (config.json, generation_config.json, model.safetensors
in bfloat16, tokenizer.json, tokenizer_config.json with a ChatML chat template,
special_tokens_map.json, README.md), written to a temporary directory next to ``--out``
and renamed into place, so ``--out`` is never half-written.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time

import numpy as np

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "kvjax", "assets", "kvjax-tiny")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS, IM_START, IM_END = 0, 1, 2
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# stdlib directories that are tests, demos, GUIs or third-party code, not documentation.
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
             "dist-packages", "__pycache__"}
HOLDOUT_EVERY = 50  # every 50th document (2%) is held out for validation
MIN_DOCSTRING = 20  # characters; shorter docstrings ("Return self.") add little English

# Model and training sizes. "full" is the bundled model; "smoke" runs in seconds.
PRESETS = {
    "full": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4,
                 num_heads=4, num_kv_heads=2, seq_len=256, batch_size=16, steps=1000,
                 warmup=100, lr=3e-3, max_position_embeddings=1024, eval_every=100,
                 eval_batches=None, max_documents=None),
    "smoke": dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, seq_len=32, batch_size=4, steps=3,
                  warmup=1, lr=3e-3, max_position_embeddings=128, eval_every=0,
                  eval_batches=2, max_documents=60),
}


# ----------------------------------------------------------------------------- corpus

def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the pure-Python stdlib, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs
                         if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOCSTRING:
                        docs.append(doc.strip())
    return docs


def documents(max_documents: int | None = None) -> list[str]:
    """The corpus: pydoc topics (sorted by name) then stdlib docstrings."""
    from pydoc_data.topics import topics

    docs = [d for d in (topics[name].strip() for name in sorted(topics)) if d]
    if max_documents is not None and len(docs) >= max_documents:
        return docs[:max_documents]  # (--smoke) without parsing the stdlib
    docs += stdlib_docstrings()
    return docs if max_documents is None else docs[:max_documents]


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``HOLDOUT_EVERY``-th document is held out."""
    train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY // 2]
    held = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: any text round-trips; the special tokens get ids 0, 1, 2."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    return tok


def token_stream(tok, docs: list[str]) -> np.ndarray:
    """All documents encoded, each followed by ``<|endoftext|>``."""
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS)
    return np.asarray(ids, np.int32)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping ``[n, seq_len + 1]`` windows (inputs and shifted targets)."""
    n = (len(stream) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


# ----------------------------------------------------------------------------- files

def hf_config(p: dict, vocab_size: int) -> dict:
    """``config.json`` for transformers' LlamaForCausalLM (and kvjax)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "num_hidden_layers": p["num_layers"],
        "num_attention_heads": p["num_heads"],
        "num_key_value_heads": p["num_kv_heads"],
        "head_dim": p["hidden_size"] // p["num_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": p["max_position_embeddings"],
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": EOS,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        "torch_dtype": "bfloat16",
    }


def write_tokenizer_files(tok, directory: str, max_length: int) -> None:
    tok.save(os.path.join(directory, "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    _write_json(directory, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(directory, "special_tokens_map.json", {
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    })


def write_weights(config, params, path: str) -> None:
    """``params`` (kvjax layout) as a bfloat16 safetensors file with Hugging Face names."""
    import jax
    import ml_dtypes
    from safetensors.numpy import save_file

    from kvjax.checkpoint import tensor_specs

    tensors = {}

    def add(spec, value):  # tree.map checks that params and specs have the same structure
        array = np.asarray(value, np.float32)
        array = array.T if spec.transpose else array
        assert array.shape == spec.hf_shape, (spec.hf_name, array.shape, spec.hf_shape)
        tensors[spec.hf_name] = np.ascontiguousarray(array.astype(ml_dtypes.bfloat16))

    jax.tree.map(add, tensor_specs(config), params)
    save_file(tensors, path, metadata={"format": "pt"})


def _write_json(directory: str, name: str, obj) -> None:
    with open(os.path.join(directory, name), "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_text(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def model_card(info: dict) -> str:
    c = info["config"]
    evals = "\n".join(f"| {s} | {l:.4f} |" for s, l in info["evals"])
    return f"""---
library_name: kvjax
pipeline_tag: text-generation
language: en
---

# kvjax-tiny

A {info['params'] / 1e6:.2f}M-parameter Llama-architecture language model bundled with
kvjax so that `python scripts/generate.py` works offline. It writes Python-documentation
flavoured English; it is a demo and a test fixture, not a useful assistant (the ChatML
`chat_template` is there for the chat API, the model was never trained on chats).

| | |
|---|---|
| architecture | `LlamaForCausalLM`: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, {c['num_attention_heads']} query heads over {c['num_key_value_heads']} KV heads (GQA), head_dim {c['head_dim']}, tied embeddings, RoPE theta {c['rope_theta']:g} |
| vocabulary | {c['vocab_size']} byte-level BPE tokens; `<|endoftext|>` = 0 (document separator, eos), `<|im_start|>` = 1, `<|im_end|>` = 2 |
| context | trained on {info['seq_len']}-token blocks; `max_position_embeddings` {c['max_position_embeddings']} (quality drops past {info['seq_len']} tokens) |
| weights | bfloat16 (`model.safetensors`), trained in float32 |
| corpus | CPython {info['python']} documentation: `pydoc_data.topics` ({info['topics']} topics) + stdlib module/class/function docstrings; {info['train_docs']} training documents ({info['train_tokens']:,} tokens), {info['held_docs']} held out ({info['held_tokens']:,} tokens, every {HOLDOUT_EVERY}th document) |
| training | {info['steps_run']} of {info['steps']} steps{' (stopped by the --minutes cap)' if info['capped'] else ''}, batch {info['batch_size']} x {info['seq_len']} tokens, AdamW (peak lr {info['lr']:g}, weight decay 0.1, warm-up {info['warmup']} steps + cosine decay), clip global norm 1.0, seed {info['seed']}; {info['minutes']:.1f} min ({info['tokens_per_s']:,.0f} tokens/s) on {info['machine']} |
| held-out loss | **{info['held_loss']:.4f}** (float32 weights), {info['held_loss_bf16']:.4f} (the stored bfloat16 weights); final train loss {info['train_loss']:.4f} |

Held-out loss during training:

| step | held-out loss |
|---|---|
{evals}

Command (the same command, seed and machine give the same weights, unless the
`--minutes` cap stops the run early):

```bash
{info['command']}
```

Greedy sample (`kvjax.generate`, float32, prompt "The module"):

> The module{info['sample']}

Training data is derived from the CPython documentation and source (PSF License).
"""


def write_directory(out: str, files: dict) -> None:
    """Writes into a fresh temp dir next to ``out`` then swaps it in with renames."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".tmp-", dir=parent)
    try:
        for write in files.values():
            write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- training

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="optimizer steps (full: 1000, smoke: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=None,
                        help="time cap: stop after the step that passes this many minutes of "
                             "training (the schedule stays sized for --steps; default: no cap, "
                             "so the run is reproducible)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, a few seconds")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-every", type=int, help="held-out loss every N steps (0: only at the end)")
    parser.add_argument("--no-save", action="store_true", help="train and report only (timing runs)")
    args = parser.parse_args(argv)

    p = dict(PRESETS["smoke" if args.smoke else "full"])
    for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("seq_len", "seq_len"),
                      ("layers", "num_layers"), ("lr", "lr"), ("eval_every", "eval_every")):
        if getattr(args, flag) is not None:
            p[key] = getattr(args, flag)
    if p["steps"] < 1:
        parser.error("--steps must be >= 1")

    import jax
    import jax.numpy as jnp
    try:
        import optax
    except ImportError:
        sys.exit('the training recipe needs optax: pip install -e ".[train]"')

    import kvjax
    from kvjax.model import forward
    from kvjax.tokenizer import Tokenizer

    t_start = time.perf_counter()
    docs = documents(p["max_documents"])
    train_docs, held_docs = split(docs)
    tok = train_tokenizer(train_docs, p["vocab_size"])
    train_stream, held_stream = token_stream(tok, train_docs), token_stream(tok, held_docs)
    train_windows = windows(train_stream, p["seq_len"])
    held_windows = windows(held_stream, p["seq_len"])
    if p["eval_batches"] is not None:
        held_windows = held_windows[:p["eval_batches"] * p["batch_size"]]
    print(f"corpus: {len(train_docs)} train docs ({len(train_stream):,} tokens, "
          f"{len(train_windows)} blocks of {p['seq_len']}), {len(held_docs)} held-out docs "
          f"({len(held_stream):,} tokens); vocab {tok.get_vocab_size()}; "
          f"{time.perf_counter() - t_start:.1f}s", flush=True)

    config_dict = hf_config(p, tok.get_vocab_size())
    config = kvjax.ModelConfig.from_dict(config_dict)  # exactly what kvjax will load

    key = jax.random.key(args.seed)
    params = kvjax.init_params(config, key, jnp.float32)  # N(0, 0.02), norms 1
    # GPT-2 style: shrink the projections that write into the residual stream.
    residual_scale = 1.0 / math.sqrt(2 * config.num_layers)
    params["layers"] = tuple({k: v * residual_scale if k in ("wo", "w_down") else v
                              for k, v in layer.items()} for layer in params["layers"])
    n_params = sum(x.size for x in jax.tree.leaves(params))

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=p["lr"], warmup_steps=min(p["warmup"], p["steps"] - 1),
        decay_steps=p["steps"], end_value=p["lr"] * 0.05)
    decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)  # no decay on norm weights
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask))
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        tokens, targets = batch[:, :-1], batch[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _ = forward(config, params, tokens, positions, None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def eval_loss(params, batch):
        return loss_fn(params, batch)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    train_step = jax.jit(train_step, donate_argnums=(0, 1))

    def held_out_loss(params) -> float:
        losses = []
        for i in range(0, len(held_windows), p["batch_size"]):
            batch = held_windows[i:i + p["batch_size"]]
            losses.append((float(eval_loss(params, jnp.asarray(batch))), len(batch)))
        return sum(l * n for l, n in losses) / sum(n for _, n in losses)

    rng = np.random.default_rng(args.seed)
    order, cursor = rng.permutation(len(train_windows)), 0
    tokens_per_step = p["batch_size"] * p["seq_len"]
    print(f"model: {n_params / 1e6:.2f}M params ({config.num_layers} layers, hidden "
          f"{config.hidden_size}, {config.num_heads}/{config.num_kv_heads} heads); "
          f"{p['steps']} steps of {p['batch_size']}x{p['seq_len']} tokens "
          f"(~{p['steps'] * tokens_per_step / len(train_stream):.1f} epochs); seed {args.seed}",
          flush=True)

    evals, train_losses = [], []
    t_train = time.perf_counter()
    t_last, step_last = t_train, 0
    log_every = max(1, min(25, p["steps"] // 10))
    capped = False
    step = 0
    for step in range(1, p["steps"] + 1):
        if cursor + p["batch_size"] > len(order):  # next epoch, a fresh permutation
            order, cursor = rng.permutation(len(train_windows)), 0
        batch = jnp.asarray(train_windows[order[cursor:cursor + p["batch_size"]]])
        cursor += p["batch_size"]
        params, opt_state, loss, grad_norm = train_step(params, opt_state, batch)
        if step % log_every == 0 or step == p["steps"] or step == 1:
            loss = float(loss)
            train_losses.append(loss)
            now = time.perf_counter()
            rate = (step - step_last) * tokens_per_step / (now - t_last)
            print(f"step {step:5d}/{p['steps']}  loss {loss:.4f}  grad_norm {float(grad_norm):.3f}  "
                  f"lr {float(schedule(step - 1)):.2e}  {rate:,.0f} tokens/s  "
                  f"{(now - t_train) / 60:.1f} min", flush=True)
            t_last, step_last = now, step
        if p["eval_every"] and step % p["eval_every"] == 0 and step != p["steps"]:
            evals.append((step, held_out_loss(params)))
            print(f"step {step:5d}  held-out loss {evals[-1][1]:.4f}", flush=True)
            t_last = time.perf_counter()  # don't count evaluation in tokens/s
        if (args.minutes is not None and time.perf_counter() - t_train > args.minutes * 60
                and step != p["steps"]):
            print(f"stopping at step {step}: past the --minutes {args.minutes:g} cap", flush=True)
            capped = True
            break
    train_seconds = time.perf_counter() - t_train
    held = held_out_loss(params)
    evals.append((step, held))
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    held_bf16 = held_out_loss(params_bf16)
    print(f"held-out loss {held:.4f} (float32), {held_bf16:.4f} (bfloat16 weights); "
          f"{step} steps in {train_seconds / 60:.1f} min "
          f"({step * tokens_per_step / train_seconds:,.0f} tokens/s)", flush=True)

    if args.no_save:
        return 0

    sample_model = kvjax.Model(config=config, params=params_bf16, tokenizer=Tokenizer(tok),
                               stop_tokens=(EOS, IM_END))
    sample = kvjax.generate(sample_model, ["The module"], max_new_tokens=40).texts[0]
    print(f"sample: The module{sample}", flush=True)

    command = "python scripts/train_tiny.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    info = dict(config=config_dict, params=n_params, seq_len=p["seq_len"], python=platform.python_version(),
                topics=len(__import__("pydoc_data.topics").topics.topics), train_docs=len(train_docs),
                held_docs=len(held_docs), train_tokens=len(train_stream), held_tokens=len(held_stream),
                steps_run=step, steps=p["steps"], capped=capped, batch_size=p["batch_size"],
                lr=p["lr"], warmup=p["warmup"], seed=args.seed, minutes=train_seconds / 60,
                machine=f"{os.cpu_count()} CPU cores ({platform.machine()}, jax {jax.__version__})",
                tokens_per_s=step * tokens_per_step / train_seconds,
                held_loss=held, held_loss_bf16=held_bf16, train_loss=train_losses[-1], evals=evals,
                command=command, sample=sample.replace("\n", " "))
    generation_config = {"bos_token_id": EOS, "eos_token_id": [EOS, IM_END], "pad_token_id": EOS,
                         "do_sample": False}
    write_directory(args.out, {
        "config.json": lambda d: _write_json(d, "config.json", config_dict),
        "generation_config.json": lambda d: _write_json(d, "generation_config.json", generation_config),
        "tokenizer": lambda d: write_tokenizer_files(tok, d, p["max_position_embeddings"]),
        "model.safetensors": lambda d: write_weights(config, params, os.path.join(d, "model.safetensors")),
        "README.md": lambda d: _write_text(d, "README.md", model_card(info)),
    })
    print(f"wrote {args.out} in {(time.perf_counter() - t_start) / 60:.1f} min total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
