"""Tiny random Qwen2 models built with transformers (no downloads) and their reference log-probs."""

from __future__ import annotations

import torch
import transformers


def tiny_qwen2_config(num_kv_heads: int = 2, num_layers: int = 2, tie_word_embeddings: bool = False,
                      vocab_size: int = 500, head_dim: int = 64) -> transformers.Qwen2Config:
    """Two query heads of `head_dim` (vLLM's CPU attention needs 64 or another supported size)."""
    return transformers.Qwen2Config(
        hidden_size=2 * head_dim,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        dtype="float32",
    )


@torch.no_grad()
def random_qwen2(config: transformers.Qwen2Config, seed: int) -> transformers.Qwen2ForCausalLM:
    """Every parameter random (norms and biases too, so a tensor that fails to load shows in the log-probs)."""
    generator = torch.Generator().manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("norm.weight"):
            param.copy_(1 + 0.1 * noise)
        else:
            param.copy_(0.1 * noise)
    return model


def hf_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every parameter as `save_pretrained` writes them (a tied head appears once)."""
    return [(name, param.detach()) for name, param in model.named_parameters()]


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] fp32 logits: row t predicts tokens[t + 1]."""
    return model(torch.tensor([tokens])).logits[0].float()


def token_log_probs(model, prompt: list[int], response: list[int], temperature: float = 1.0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Log-prob of each response token under softmax(logits / temperature) after vLLM's top-p cut."""
    logits = next_token_logits(model, prompt + response)[len(prompt) - 1: -1]
    if temperature > 0:
        logits = logits / temperature
    if top_p < 1:  # as vLLM's apply_top_k_top_p_pytorch: drop the low tail holding <= 1 - top_p of the mass
        sorted_logits, order = logits.sort(dim=-1)
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(tail, float("-inf")))
    log_probs = logits.log_softmax(-1)
    return log_probs.gather(-1, torch.tensor(response)[:, None])[:, 0]
