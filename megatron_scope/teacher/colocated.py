"""A co-located teacher's view of the rollouts: forward-only passes of Megatron models with the student's TP/PP.

`log_prob_pass` runs any model (the student before its step, the teacher, ExOPD's reference) through the
pipeline schedule and keeps, on the last stage, the temperature-1 log-probs of the labels and whatever of the
teacher's distribution the loss reads (`teacher_pass`): its vocabulary shard of logits for a full-vocabulary
KL or SRPO's entropy, its vocab-parallel top-k for --scope-kl topk, nothing more for sampled-token estimators.
The vocabulary is never gathered: log-probs and the top-k communicate per-token statistics over the TP group.
"""

from __future__ import annotations

from megatron.core import parallel_state

from megatron_scope.config import LossConfig
from megatron_scope.megatron.schedule import forward_collect
from megatron_scope.ops.topk import vocab_parallel_topk
from megatron_scope.ops.vocab_parallel import vocab_parallel_log_probs


def log_prob_pass(model, microbatches: list[dict], vocab_size: int, keep: str | None = None, topk: int = 0,
                  temperature: float = 1.0) -> list:
    """Forward only: per microbatch (extra inputs, log-probs of the labels under softmax(logits / temperature))
    under `model`, on the last stage ([] elsewhere). Extras, by `keep`: None nothing; "logits" the vocab shard
    {teacher_logits};
    "topk" {teacher_topk_ids, teacher_topk_log_probs, teacher_topk_tail_log_mass}, `topk` + 1 values per token
    instead of V/TP."""
    group = parallel_state.get_tensor_model_parallel_group()

    def collect(batch, logits):
        scaled = logits / temperature if temperature != 1.0 else logits
        log_probs = vocab_parallel_log_probs(scaled, batch["labels"], group=group, vocab_size=vocab_size)
        if keep == "logits":
            return {"teacher_logits": logits}, log_probs
        if keep == "topk":
            ids, top, tail = vocab_parallel_topk(logits, topk, group=group, vocab_size=vocab_size)
            return {"teacher_topk_ids": ids, "teacher_topk_log_probs": top, "teacher_topk_tail_log_mass": tail}, log_probs
        return {}, log_probs

    return forward_collect(model, microbatches, collect)


def teacher_pass(teacher, microbatches: list[dict], config: LossConfig, vocab_size: int) -> list[dict]:
    """The teacher's loss inputs per microbatch on the last stage ([] elsewhere): teacher_log_probs and, as
    `config` needs, teacher_logits or the top-k (see the module docstring)."""
    keep = "logits" if config.needs_teacher_logits else "topk" if config.teacher_topk else None
    return [{**extras, "teacher_log_probs": log_probs}
            for extras, log_probs in log_prob_pass(teacher, microbatches, vocab_size, keep, config.teacher_topk)]
