"""Tiny models and batches shared by tests and benchmarks (deterministic, no downloads)."""

from __future__ import annotations

import torch

from megatron_scope.megatron.model import DecoderArch

# head_dim 64: vLLM's CPU attention rejects 16 (see ../shared/ENVIRONMENT.md), so tiny models use 64.
TINY_ARCH = DecoderArch(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=2,
    num_query_groups=2,
    ffn_hidden_size=256,
    vocab_size=500,  # padded by Megatron to 512 at TP 1-4
    max_position_embeddings=256,
    add_qkv_bias=True,
)


def tiny_batches(num_microbatches: int, micro_batch_size: int = 2, seq_length: int = 32, seed: int = 0):
    """Language-model microbatches [b, s]: tokens, next-token labels, a loss mask with padding at the end."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, TINY_ARCH.vocab_size, (micro_batch_size, seq_length + 1), generator=generator)
        lengths = torch.randint(seq_length // 2, seq_length + 1, (micro_batch_size,), generator=generator)
        loss_mask = (torch.arange(seq_length)[None, :] < lengths[:, None]).float()
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": loss_mask,
                "position_ids": torch.arange(seq_length).expand(micro_batch_size, -1).contiguous(),
            }
        )
    return batches
