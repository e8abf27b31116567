"""The shape facts of a pre-norm decoder and Megatron's padded vocabulary: plain Python, no megatron-core, so the dry
run (`memory_estimate`, tools/check_config.py) and the HF mapping import them without building anything."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class DecoderArch:
    """Architecture of a pre-norm decoder: RMSNorm, GQA attention with rotary, SwiGLU MLP."""

    num_layers: int
    """Transformer blocks."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads; head_dim = hidden_size / num_attention_heads unless `head_dim` is set."""
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for MHA."""
    ffn_hidden_size: int
    """SwiGLU inner width (each of gate and up)."""
    vocab_size: int
    """Embedding rows of the HF checkpoint (config.json's vocab_size), unpadded: at least the tokenizer's
    vocabulary, often more (Qwen2.5 checkpoints have 151936 or 152064 rows for 151665 tokens). Megatron
    pads it further (see `padded_vocab_size`)."""
    max_position_embeddings: int = 4096
    """Longest sequence the rotary tables cover."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Output layer shares the input embedding (Qwen2-1.5B, Qwen3-1.7B do)."""
    add_qkv_bias: bool = False
    """Bias on Q, K, V projections (Qwen2 has it; Llama and Qwen3 do not)."""
    qk_layernorm: bool = False
    """RMSNorm on each head's queries and keys (Qwen3)."""
    head_dim: int | None = None
    """Per-head width when it differs from hidden_size / num_attention_heads (Qwen3)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of a freshly built model."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderArch.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim"
            )

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by x TP (as Megatron-LM pads it)."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def common_padded_vocab(archs, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
    """One padded vocabulary for every co-located model (student, teacher, reference): Megatron's padding of the
    largest embedding row count, so their logits' vocab shards line up on each TP rank for the KL."""
    return padded_vocab_size(max(arch.vocab_size for arch in archs), tensor_model_parallel_size, divisible_by)
