"""Checkpoint/resume of model + optimizer + RNG: a resumed process reproduces the next step exactly, at the
same and at another parallel layout, and a half-written checkpoint is never taken as the latest."""

import os

import pytest

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH, split_microbatches, tiny_rollout_batch


def _setup(tp, pp, seed=3):
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.config import OptimizerConfig
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(tp, pp, seed=seed)
    model = wrap_with_ddp(build_gpt_model(TINY_ARCH, calculate_per_token_loss=True))
    optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=1e-2, lr_warmup_iters=1), 4)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, step):
    from megatron.core import parallel_state

    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.loss_func import reduce_reports
    from megatron_scope.megatron.optimizer import guarded_step
    from megatron_scope.megatron.schedule import forward_backward

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    microbatches = split_microbatches(tiny_rollout_batch(seed=step), 2, tp_rank, tp_size)
    model.zero_grad_buffer()
    reports = forward_backward(model, microbatches, LossConfig(), TINY_ARCH.vocab_size)
    loss = reduce_reports(reports)["loss"] if reports else None
    outcome = guarded_step(optimizer, scheduler, loss_is_finite=True)
    return loss, outcome.grad_norm, optimizer.param_groups[0]["lr"]


def _straight(rank, world_size, root):
    from megatron_scope.megatron.checkpointing import save_checkpoint

    model, optimizer, scheduler = _setup(1, 1)
    results = [_step(model, optimizer, scheduler, 1)]
    save_checkpoint(root, 1, model, optimizer, {"scheduler": scheduler.state_dict()})
    results += [_step(model, optimizer, scheduler, 2), _step(model, optimizer, scheduler, 3)]
    return results


def _resumed(rank, world_size, root, tp, pp):
    from megatron_scope.megatron.checkpointing import load_checkpoint

    model, optimizer, scheduler = _setup(tp, pp, seed=99)  # other init: everything must come from the checkpoint
    state = load_checkpoint(root, model, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    return [_step(model, optimizer, scheduler, 2), _step(model, optimizer, scheduler, 3)], state["iteration"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return root, run_on_ranks(_straight, 1, args=(root,))[0]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["same-layout", "tp2", "pp2"])
def test_resume_reproduces_the_next_steps(straight, tp, pp):
    root, results = straight
    resumed = run_on_ranks(_resumed, tp * pp, args=(root, tp, pp))
    logged = resumed[-1]  # the last rank holds the last stage's loss
    steps, iteration = logged
    assert iteration == 1
    for (loss, grad_norm, lr), (ref_loss, ref_grad_norm, ref_lr) in zip(steps, results[1:]):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grad_norm == pytest.approx(ref_grad_norm, rel=1e-5)
        assert lr == pytest.approx(ref_lr, rel=1e-12)


def test_partial_checkpoint_is_never_the_latest(straight):
    from megatron_scope.megatron.checkpointing import checkpoint_dir, latest_iteration

    root, _ = straight
    os.makedirs(checkpoint_dir(root, 2) + ".tmp")  # a save killed midway leaves only the .tmp directory
    assert latest_iteration(root) == 1
