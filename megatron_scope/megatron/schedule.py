"""Run SCOPE microbatches through Megatron's pipeline schedule (1F1B with PP > 1, no-pipelining otherwise)."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_scope.megatron.loss_func import ScopeLossConfig, check_batch, scope_loss_func


def forward_backward(model, microbatches: list[dict], loss_config: ScopeLossConfig, forward_only: bool = False):
    """Forward (and backward) of `model` over `microbatches` with the SCOPE loss; returns the per-microbatch
    reports on the last pipeline stage ([] elsewhere).

    Every microbatch is checked on every rank first, so bad data stops the step before any collective.
    Each microbatch holds `tokens`, `position_ids` and the keys of `scope_loss_func`; with TP > 1,
    `teacher_logits` is this rank's vocabulary shard. Gradients land in the DDP `main_grad` buffers already
    divided by the global loss count (`calculate_per_token_loss=True` in the model's config).
    """
    if not microbatches:
        raise ValueError("forward_backward needs at least one microbatch")
    if not model.config.calculate_per_token_loss:
        raise ValueError("the SCOPE loss normalises over the global batch: build the model with "
                         "calculate_per_token_loss=True")
    for batch in microbatches:
        check_batch(batch, loss_config)
    shapes = {tuple(batch["tokens"].shape) for batch in microbatches}
    if len(shapes) != 1:
        raise ValueError(f"all microbatches must share one [micro_batch, seq] shape, got {sorted(shapes)}")
    micro_batch_size, seq_length = shapes.pop()
    group = parallel_state.get_tensor_model_parallel_group()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, partial(scope_loss_func, loss_config, batch, group=group)

    with torch.no_grad() if forward_only else torch.enable_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
