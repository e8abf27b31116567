"""Supervised fine-tuning through Megatron's schedule: the demo pre-trains its teacher and student with it.

Loss: token-mean cross-entropy over solution tokens, L = Σ_t m_t CE_t / Σ_t m_t over the whole global batch
(Megatron's vocab-parallel cross-entropy, `calculate_per_token_loss=True`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_scope.megatron.optimizer import guarded_step


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss = (per_token_loss.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return loss, count, {"lm loss": torch.stack([loss.detach().clone(), count.float()])}


def sft_step(model, optimizer, scheduler, microbatches: list[dict]) -> tuple[float | None, bool]:
    """One optimizer step over `microbatches` ({tokens, labels, loss_mask, position_ids}); returns
    (mean loss on the last stage else None, whether the step was applied)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    model.zero_grad_buffer()
    micro_batch_size, seq_length = microbatches[0]["tokens"].shape
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss = None
    if reports:
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        loss = float(total[0] / total[1])
    outcome = guarded_step(optimizer, scheduler, loss_is_finite=loss is None or loss == loss)
    return loss, outcome.updated


def train_sft(model, optimizer, scheduler, data: dict, iters: int, global_batch_size: int, micro_batch_size: int,
              seed: int = 0, on_step: Callable[[int, float | None], None] | None = None) -> list[float]:
    """`iters` steps on random global batches drawn (seeded) from `data` ([N, seq] SFT tensors)."""
    if global_batch_size % micro_batch_size:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                         f"{micro_batch_size}")
    generator = torch.Generator().manual_seed(seed)
    num_rows = len(data["tokens"])
    losses = []
    for step in range(1, iters + 1):
        rows = torch.randint(0, num_rows, (global_batch_size,), generator=generator)
        microbatches = [{k: v[rows[i : i + micro_batch_size]] for k, v in data.items()}
                        for i in range(0, global_batch_size, micro_batch_size)]
        loss, _ = sft_step(model, optimizer, scheduler, microbatches)
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return losses
