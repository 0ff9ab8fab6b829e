"""Tiny random Hugging Face checkpoints and a torch greedy oracle for the parity tests.

torch and transformers are the reference implementation here; kvjax itself never imports
them. Every model is float32, 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA;
GPT-2 is MHA), head_dim 16, vocab 128, built from a fixed torch seed.

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
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
}
# GPT-2 names its fields differently and has no GQA, head_dim or RMSNorm fields.
GPT2_COMMON = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_inner=INTERMEDIATE,
                   n_head=HEADS, initializer_range=INIT_STD, n_positions=128,
                   bos_token_id=1, eos_token_id=2)

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
    # Gemma: GeGLU, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), tied head.
    "gemma": ("gemma", {"pad_token_id": 0}),
    # Gemma 2: + post-norms, soft-capping (caps low enough to bend these logits and
    # scores), query_pre_attn_scalar != head_dim, layer 0 sliding (window 8), layer 1 global.
    "gemma2": ("gemma2", {"pad_token_id": 0, "sliding_window": 8, "query_pre_attn_scalar": 24,
                          "attn_logit_softcapping": 3.0, "final_logit_softcapping": 4.0}),
    # Gemma 3: + QK-norm; layer 0 sliding with its own RoPE base, layer 1 global with
    # another base and linear scaling.
    "gemma3": ("gemma3_text", {"pad_token_id": 0, "sliding_window": 8, "query_pre_attn_scalar": 24,
                               "sliding_window_pattern": 2, "rope_theta": 1_000_000.0,
                               "rope_local_base_freq": 10_000.0,
                               "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    # Phi-3: fused qkv_proj and gate_up_proj (split at load), sliding window 16.
    "phi3": ("phi3", {"pad_token_id": 0, "sliding_window": 16}),
    # Phi-3 longrope: short factors up to 16 positions, long factors beyond.
    "phi3_longrope": ("phi3", {"pad_token_id": 0, "max_position_embeddings": 64,
                               "original_max_position_embeddings": 16,
                               "rope_scaling": {"rope_type": "longrope",
                                                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                "long_factor": [1.0 + 2.0 * i for i in range(8)]}}),
    # GPT-2: learned positions, LayerNorm with bias, MHA, Conv1D layout, fused c_attn, gelu_new.
    "gpt2": ("gpt2", {}),
    # OLMo-2: post-norms only, QK-norm over the whole projection width.
    "olmo2": ("olmo2", {}),
}


def hf_config(variant: str, **overrides) -> transformers.PretrainedConfig:
    model_type, extra = VARIANTS[variant]
    config_cls, _ = _CLASSES[model_type]
    return config_cls(**{**(GPT2_COMMON if model_type == "gpt2" else COMMON), **extra, **overrides})


def make_hf_model(variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random float32 ``*ForCausalLM`` (eval mode) with nonzero biases and norm weights.

    Its attention is transformers' eager (plain) implementation: the oracle is the written
    math, and the default that some transformers versions pick for Gemma 2 (sdpa) leaves
    out its attention soft-capping.
    """
    config = hf_config(variant, **overrides)
    config._attn_implementation = "eager"
    _, model_cls = _CLASSES[config.model_type]
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises biases to zero
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif "norm" in name or "ln_" in name:  # ... and norm weights to one (Gemma: zero)
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
