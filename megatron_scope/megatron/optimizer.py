"""Megatron's optimizer and LR schedule, and an optimizer step that refuses non-finite updates."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_scope.config import OptimizerConfig
from megatron_scope.megatron.parallel import collective_device


def build_optimizer(model, settings: OptimizerConfig, train_iters: int):
    """(Megatron optimizer over `model`'s DDP buffers, its OptimizerParamScheduler: linear warm-up, then
    `lr_decay_style` (cosine, linear: to `min_lr` at `train_iters`; constant))."""
    if settings.use_distributed_optimizer and not torch.cuda.is_available():
        raise ValueError("--use-distributed-optimizer needs CUDA: megatron-core's distributed optimizer "
                         "refuses CPU tensors; use the standard optimizer on CPU")
    megatron_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        clip_grad=settings.clip_grad,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        params_dtype=model.config.params_dtype,
        bf16=model.config.bf16,
    )
    optimizer = get_megatron_optimizer(megatron_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if settings.lr_warmup_iters else settings.lr,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.lr_warmup_iters,
        lr_decay_steps=train_iters,
        lr_decay_style=settings.lr_decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


@dataclasses.dataclass
class StepOutcome:
    updated: bool
    grad_norm: float
    skipped_reason: str | None = None


def guarded_step(optimizer, scheduler, loss_is_finite: bool) -> StepOutcome:
    """Clip and step unless the loss (on any rank) or the global gradient norm is NaN/Inf; a skipped step
    leaves every parameter and the optimizer state untouched and zeroes the gradients."""
    flag = torch.tensor([0.0 if loss_is_finite else 1.0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    found_inf = optimizer.prepare_grads()  # main_grad -> the optimizer's grads (+ the fp16 overflow check)
    grad_norm = float(optimizer.get_grad_norm())  # all-reduced over model-parallel ranks
    reason = None
    if flag.item():
        reason = "non-finite loss"
    elif found_inf or not math.isfinite(grad_norm):
        reason = f"non-finite gradient norm ({grad_norm})"
    if reason is None:
        if optimizer.config.clip_grad > 0:
            optimizer.clip_grad_norm(optimizer.config.clip_grad)
        optimizer.step_with_ready_grads()
        scheduler.step(increment=1)
    # prepare_grads made every param.grad an alias of its DDP main_grad; left in place, the next backward
    # would accumulate into the alias and DDP's hook would add it to main_grad again (the first
    # microbatch counted twice). Megatron-LM's train_step zeroes them the same way.
    optimizer.zero_grad()
    return StepOutcome(updated=reason is None, grad_norm=grad_norm, skipped_reason=reason)
