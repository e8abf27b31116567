"""Tiny models and batches shared by tests and benchmarks (deterministic, no downloads)."""

from __future__ import annotations

import torch

from megatron_scope.megatron.arch import DecoderArch

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


def lm_optimizer_step(student, optimizer) -> None:
    """One Megatron optimizer step of the DDP-wrapped `student` on the language-model loss of two `tiny_batches`."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(loss_mask, per_token_loss):
        loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    student.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(tiny_batches(2, seq_length=16)),
                                model=[student], num_microbatches=2, seq_length=16, micro_batch_size=2,
                                forward_only=False)
    optimizer.step()


TINY_TEACHER_HIDDEN = 24
"""Hidden size of the stand-in teacher whose last hidden states and output layer `tiny_rollout_batch` draws."""


def tiny_teacher_weight(vocab_size: int | None = None) -> torch.Tensor:
    """The stand-in teacher's output layer [padded vocab, TINY_TEACHER_HIDDEN] (logits of scale ~3)."""
    from megatron_scope.megatron.arch import padded_vocab_size

    padded = padded_vocab_size(vocab_size or TINY_ARCH.vocab_size, 1)
    generator = torch.Generator().manual_seed(1234)
    return 3 * torch.randn(padded, TINY_TEACHER_HIDDEN, generator=generator) / TINY_TEACHER_HIDDEN**0.5


def tiny_rollout_batch(num_prompts: int = 2, group_size: int = 4, prompt_length: int = 8, seq_length: int = 24,
                       topk: int = 8, seed: int = 0, vocab_size: int | None = None,
                       teacher_hidden: bool = False) -> dict:
    """A deterministic rollout batch as the SCOPE loss sees it: prompt + response tokens, response mask
    (lengths vary; one response is empty), verifier outcomes, prompt group ids, full-vocabulary teacher logits
    (Megatron-padded width, padding included; `teacher_hidden`: the teacher's last hidden states instead, whose
    logits under `tiny_teacher_weight` are those logits), the teacher's sampled-token and top-k log-probs,
    old/reference log-probs, SCOPE weights, GRPO advantages and SRPO's routing and weights computed over the whole
    batch. `vocab_size`:
    default TINY_ARCH's."""
    from megatron_scope.losses.objectives import group_normalized_advantages, srpo_distill_weights
    from megatron_scope.losses.scope import scope_sequence_weights
    from megatron_scope.megatron.arch import padded_vocab_size

    g = torch.Generator().manual_seed(seed)
    n = num_prompts * group_size
    vocab = vocab_size or TINY_ARCH.vocab_size
    padded = padded_vocab_size(vocab, 1)
    tokens = torch.randint(0, vocab, (n, seq_length + 1), generator=g)
    lengths = torch.randint(1, seq_length - prompt_length + 1, (n,), generator=g)
    lengths[1] = 0
    position = torch.arange(seq_length)[None, :]
    loss_mask = ((position >= prompt_length - 1) & (position < prompt_length - 1 + lengths[:, None])).float()
    correct = torch.rand(n, generator=g) < 0.5
    correct[:group_size] = torch.tensor([True, False] * (group_size // 2))  # both paths in group 0
    group_ids = torch.arange(10, 10 + num_prompts).repeat_interleave(group_size)[torch.randperm(n, generator=g)]
    hidden = torch.randn(n, seq_length, TINY_TEACHER_HIDDEN, generator=g)
    teacher_logits = hidden @ tiny_teacher_weight(vocab).t()
    labels = tokens[:, 1:]
    teacher_log_probs = torch.log_softmax(teacher_logits[..., :vocab].double(), -1).gather(-1, labels[..., None])[..., 0]
    teacher_all = torch.log_softmax(teacher_logits[..., :vocab].double(), -1)
    topk_log_probs, topk_ids = teacher_all.topk(topk, dim=-1)
    topk_tail = teacher_all.scatter(-1, topk_ids, float("-inf")).logsumexp(-1)
    old_log_probs = teacher_log_probs.float() - 0.3 * torch.rand(n, seq_length, generator=g)
    student_mean = -3 * torch.rand(n, generator=g)
    teacher_mean = -3 * torch.rand(n, generator=g)
    teacher = {"teacher_hidden": hidden} if teacher_hidden else {"teacher_logits": teacher_logits}
    teacher_entropy = -(teacher_all.exp() * teacher_all).sum(-1).float()
    distilled = ~correct  # SRPO's routing with an external teacher
    return {
        **teacher,
        "tokens": tokens[:, :-1].contiguous(),
        "position_ids": position.expand(n, -1).contiguous(),
        "labels": labels.contiguous(),
        "loss_mask": loss_mask,
        "correct": correct,
        "group_ids": group_ids,
        "sequence_lengths": prompt_length - 1 + lengths,
        "teacher_log_probs": teacher_log_probs.float(),
        "teacher_topk_ids": topk_ids,
        "teacher_topk_log_probs": topk_log_probs.float(),
        "teacher_topk_tail_log_mass": topk_tail.float(),
        "old_log_probs": old_log_probs,
        "ref_log_probs": old_log_probs - 0.1,
        "seq_weights": scope_sequence_weights(student_mean, teacher_mean, correct, group_ids),
        "advantages": group_normalized_advantages(correct.float(), group_ids),
        "distilled": distilled,
        "distill_weights": srpo_distill_weights([teacher_entropy], [loss_mask * distilled[:, None]], beta=1.0)[0],
    }


def split_microbatches(batch: dict, num_microbatches: int, tp_rank: int = 0, tp_size: int = 1) -> list[dict]:
    """Row-split `batch` into microbatches; `teacher_logits` keeps only TP rank `tp_rank`'s vocabulary shard."""
    from megatron_scope.rollout.batch import split_rows

    microbatches = split_rows(batch, num_microbatches)
    if "teacher_logits" in batch:
        shard = batch["teacher_logits"].shape[-1] // tp_size
        for micro in microbatches:
            micro["teacher_logits"] = micro["teacher_logits"][..., tp_rank * shard : (tp_rank + 1) * shard].contiguous()
    return microbatches


def tiny_run_config(models: dict | None = None, loss: dict | None = None, rollout: dict | None = None,
                    loop: dict | None = None, parallel: dict | None = None, optimizer: dict | None = None,
                    data: dict | None = None, validation: dict | None = None):
    """A RunConfig for tests that build components by hand: stand-in paths (never read) and a co-located teacher,
    with each section's fields overridden by the given dicts."""
    from megatron_scope.config import (
        DataConfig, LoopConfig, LossConfig, ModelsConfig, OptimizerConfig, ParallelConfig, RolloutConfig, RunConfig,
        ValidationConfig,
    )

    return RunConfig(models=ModelsConfig(**{"student_hf": "student", "tokenizer": "tokenizer", "teacher_hf": "teacher",
                                            **(models or {})}),
                     data=DataConfig(**{"train_data": "prompts.jsonl", **(data or {})}), loss=LossConfig(**(loss or {})),
                     rollout=RolloutConfig(**(rollout or {})), loop=LoopConfig(**(loop or {})),
                     parallel=ParallelConfig(**(parallel or {})), optimizer=OptimizerConfig(**(optimizer or {})),
                     validation=ValidationConfig(**(validation or {})))
