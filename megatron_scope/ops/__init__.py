"""Vocab-parallel math on logits shards (pure torch + torch.distributed; no Megatron model code).

`vocab_parallel` holds the sharded-logit ops (log-sum-exp, log-probs, entropy, full-vocabulary KL) and
their chunking and kernel dispatch, `_chunk_kernels` their per-chunk math (eager or torch.compile),
`linear_kl` the full-vocabulary KL straight from two models' hidden states and output-layer shards (no
stored logits), `topk` a teacher's top-k summary and the KL against it, `token_stats` the communication-free per-token
statistics (sampled KL estimators, per-sequence mean log-prob and perplexity), `reference` float64
full-vocabulary definitions the tests and benchmarks check against.
"""

from megatron_scope.ops.linear_kl import vocab_parallel_linear_distill_stats, vocab_parallel_linear_kl
from megatron_scope.ops.token_stats import SAMPLED_KL, sampled_kl, sequence_mean_log_prob, sequence_perplexity
from megatron_scope.ops.topk import vocab_parallel_topk, vocab_parallel_topk_kl
from megatron_scope.ops.vocab_parallel import (
    BACKEND_ENV,
    FULL_VOCAB_KL,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
    vocab_parallel_logsumexp,
)

__all__ = [
    "BACKEND_ENV",
    "FULL_VOCAB_KL",
    "SAMPLED_KL",
    "sampled_kl",
    "sequence_mean_log_prob",
    "sequence_perplexity",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_linear_distill_stats",
    "vocab_parallel_linear_kl",
    "vocab_parallel_log_probs",
    "vocab_parallel_logsumexp",
    "vocab_parallel_topk",
    "vocab_parallel_topk_kl",
]
