"""--overlap-grad-reduce: megatron-core DDP reduces the data-parallel gradients bucket by bucket during the last
microbatch's backward; the steps are the ones without it, bit for bit (DP = 2, and DP = 2 x PP = 2, gloo; buckets
small enough that the model spans several)."""

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH, split_microbatches, tiny_rollout_batch

BUCKET_SIZE = 50_000
"""Parameters per bucket: the tiny model's ~0.6M make about a dozen."""


def _steps(rank, world_size, pipeline: int, overlap: bool):
    from megatron.core import parallel_state

    from megatron_scope.config import LossConfig, OptimizerConfig
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.optimizer import build_optimizer, guarded_step
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.schedule import forward_backward

    initialize_model_parallel(1, pipeline, seed=5)
    model = wrap_with_ddp(build_gpt_model(TINY_ARCH, calculate_per_token_loss=True), overlap_grad_reduce=overlap,
                          bucket_size=BUCKET_SIZE)
    buckets = len(model.bucket_groups)
    optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=1e-2), 10)
    dp_rank = parallel_state.get_data_parallel_rank()
    for step in range(2):
        model.zero_grad_buffer()
        batch = tiny_rollout_batch(seed=10 * step + dp_rank)  # each replica its own data: the reduction matters
        forward_backward(model, split_microbatches(batch, 2), LossConfig(), TINY_ARCH.vocab_size)
        assert guarded_step(optimizer, scheduler, loss_is_finite=True).updated
    stage = parallel_state.get_pipeline_model_parallel_rank()
    return stage, buckets, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("pipeline", [1, 2], ids=["dp2", "dp2xpp2"])
def test_overlapped_reduction_gives_the_same_steps(pipeline):
    world = 2 * pipeline
    plain = run_on_ranks(_steps, world, args=(pipeline, False), timeout=300)
    overlapped = run_on_ranks(_steps, world, args=(pipeline, True), timeout=300)
    # megatron-core buckets the first stage only (the later ones' reductions are off the critical path)
    assert all(buckets > 1 for stage, buckets, _ in overlapped if stage == 0)
    for rank, ((stage, _, ours), (_, _, theirs)) in enumerate(zip(overlapped, plain)):
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs)), rank
    for stage in range(pipeline):  # the two replicas of a stage trained on different data and agree: reduced
        replicas = [params for s, _, params in overlapped if s == stage]
        assert len(replicas) == 2 and all(torch.equal(a, b) for a, b in zip(*replicas))
