"""The optimizer step refuses non-finite updates: a NaN loss or gradient skips the step and leaves parameters,
optimizer state and LR schedule untouched; a finite step updates."""

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH, split_microbatches, tiny_rollout_batch


def _guard_cases(rank, world_size):
    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.config import OptimizerConfig
    from megatron_scope.megatron.optimizer import build_optimizer, guarded_step
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.schedule import forward_backward

    initialize_model_parallel(1, 1, seed=5)
    model = wrap_with_ddp(build_gpt_model(TINY_ARCH, calculate_per_token_loss=True))
    optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=1e-2), 10)

    def backward():
        model.zero_grad_buffer()
        forward_backward(model, split_microbatches(tiny_rollout_batch(), 2), LossConfig(),
                         TINY_ARCH.vocab_size)

    def snapshot():
        return [p.detach().clone() for p in model.parameters()], scheduler.num_steps

    outcomes = {}
    for case in ("nan_loss", "nan_grad", "finite"):
        backward()
        if case == "nan_grad":
            next(model.parameters()).main_grad[0, 0] = float("nan")
        before, steps_before = snapshot()
        outcome = guarded_step(optimizer, scheduler, loss_is_finite=case != "nan_loss")
        after, steps_after = snapshot()
        outcomes[case] = {
            "updated": outcome.updated,
            "reason": outcome.skipped_reason,
            "params_changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
            "scheduler_advanced": steps_after != steps_before,
            "grads_released": all(p.grad is None for p in model.parameters()),
        }
    return outcomes


@pytest.fixture(scope="module")
def outcomes():
    return run_on_ranks(_guard_cases, 1)[0]


@pytest.mark.parametrize("case,reason", [("nan_loss", "non-finite loss"), ("nan_grad", "non-finite gradient norm")])
def test_non_finite_step_is_skipped_and_changes_nothing(outcomes, case, reason):
    result = outcomes[case]
    assert not result["updated"] and reason in result["reason"]
    assert not result["params_changed"] and not result["scheduler_advanced"]
    assert result["grads_released"]


def test_finite_step_updates(outcomes):
    result = outcomes["finite"]
    assert result["updated"] and result["reason"] is None
    assert result["params_changed"] and result["scheduler_advanced"] and result["grads_released"]
