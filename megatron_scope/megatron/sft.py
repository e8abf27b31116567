"""Supervised fine-tuning through Megatron's schedule: the demo pre-trains its teacher and student with it.

Loss: token-mean cross-entropy over solution tokens, L = Σ_t m_t CE_t / Σ_t m_t over the whole global batch
(Megatron's vocab-parallel cross-entropy, `calculate_per_token_loss=True`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from megatron_scope.megatron.optimizer import guarded_step
from megatron_scope.megatron.schedule import run_schedule


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss = (per_token_loss.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    # clone: the schedule divides the returned loss in place
    return loss, count, {"lm loss": torch.stack([loss.detach().clone(), count.float()])}


def lm_forward_backward(model, microbatches: list[dict]) -> list[float]:
    """Forward and backward of the language-model loss over `microbatches` ({tokens, labels, loss_mask,
    position_ids}) through Megatron's schedule; returns each microbatch's mean loss on the last stage
    ([] elsewhere). Gradients accumulate in the model (DDP `main_grad` when wrapped)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    reports = run_schedule(model, microbatches, forward_step, forward_only=False)
    return [float(r["lm loss"][0] / r["lm loss"][1]) for r in reports]


def sft_step(model, optimizer, scheduler, microbatches: list[dict]) -> tuple[float | None, bool]:
    """One optimizer step over `microbatches`; returns (mean loss over the global batch on the last stage,
    else None; whether the step was applied)."""
    model.zero_grad_buffer()
    losses = lm_forward_backward(model, microbatches)
    counts = [float(b["loss_mask"].sum()) for b in microbatches]
    loss = sum(l * c for l, c in zip(losses, counts)) / sum(counts) if losses else None
    outcome = guarded_step(optimizer, scheduler, loss_is_finite=loss is None or math.isfinite(loss))
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
