"""Vocab-parallel math on logits shards (pure torch + torch.distributed; no Megatron model code).

`vocab_parallel` holds the public ops, `_chunk_kernels` their per-chunk math (eager or torch.compile),
`reference` float64 full-vocabulary definitions the tests and benchmarks check against.
"""

from megatron_scope.ops.vocab_parallel import (
    sampled_kl,
    sequence_mean_log_prob,
    sequence_perplexity,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
    vocab_parallel_logsumexp,
    vocab_parallel_topk_kl,
)

__all__ = [
    "sampled_kl",
    "sequence_mean_log_prob",
    "sequence_perplexity",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_log_probs",
    "vocab_parallel_logsumexp",
    "vocab_parallel_topk_kl",
]
