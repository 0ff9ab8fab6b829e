"""Tiny random Hugging Face checkpoints and a torch greedy oracle for the parity tests.

torch and transformers are the reference implementation here; kvjax itself never imports
them. Every model is float32, 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA),
head_dim 16, vocab 128, built from a fixed torch seed.

The weights are drawn wider than transformers' default N(0, 0.02) (see ``INIT_STD``) and
every norm weight and bias is randomised: with the default init the attention scores are
so small that attention is nearly uniform, so RoPE, masks (sliding window) or a swapped
norm would barely move the logits and a parity test would pass against a wrong model.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

VOCAB = 128
HIDDEN = 64
LAYERS = 2
INTERMEDIATE = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INIT_STD = 0.1  # weight init; makes logits spread over several units so greedy is a sharp test

COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
              intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, initializer_range=INIT_STD,
              max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}

# name -> (model_type, extra config kwargs). Each variant exercises one config feature.
VARIANTS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {"use_sliding_window": False}),  # q/k/v biases (no o_proj bias)
    "qwen3": ("qwen3", {"use_sliding_window": False}),  # q_norm / k_norm
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    # RoPE scaling: original_max_position_embeddings 16 so the scaling changes the
    # frequencies that matter at the ~30 positions the tests use.
    "rope_linear": ("llama", {"max_position_embeddings": 64,
                              "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "rope_llama3": ("llama", {"max_position_embeddings": 64,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16}}),
    "rope_yarn": ("llama", {"max_position_embeddings": 64,
                            "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 16}}),
}


def hf_config(variant: str, **overrides) -> transformers.PretrainedConfig:
    model_type, extra = VARIANTS[variant]
    config_cls, _ = _CLASSES[model_type]
    return config_cls(**{**COMMON, **extra, **overrides})


def make_hf_model(variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random float32 ``*ForCausalLM`` (eval mode) with nonzero biases and norm weights."""
    config = hf_config(variant, **overrides)
    _, model_cls = _CLASSES[config.model_type]
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises biases to zero
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif "norm" in name:  # ... and norm weights to one
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
    return model


def save_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, **kwargs) -> str:
    """``save_pretrained`` as safetensors; returns the directory."""
    directory = os.fspath(directory)
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding by re-running the full sequence each step (no KV cache, no padding).

    Returns (``steps`` new tokens, float32 ``[steps, vocab]`` logits each was chosen from).
    """
    ids = list(prompt)
    tokens, logits = [], []
    for _ in range(steps):
        out = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        token = int(torch.argmax(out))
        tokens.append(token)
        logits.append(out.float().numpy())
        ids.append(token)
    return tokens, np.stack(logits)


@torch.no_grad()
def hf_logits(model: torch.nn.Module, sequence: list[int]) -> np.ndarray:
    """float32 ``[len(sequence), vocab]`` logits of one forward pass over ``sequence``."""
    return model(torch.tensor([sequence]), use_cache=False).logits[0].float().numpy()
