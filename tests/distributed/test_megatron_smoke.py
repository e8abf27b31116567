"""Real megatron-core on CPU: a GPTModel at TP=2, PP=2 (4 gloo ranks) through the 1F1B pipeline schedule
gives the same loss and gradients as the TP=1, PP=1 model with identical weights.

The reference rank saves its weights and its gradients (as a second checkpoint, gradients in the
parameters' places) with `dist_checkpointing`; the parallel ranks load both, so Megatron itself
reshards the reference into each rank's TP/PP shard and the comparison is shard by shard.
"""

import pytest
import torch

from megatron_scope.megatron.sft import lm_forward_backward
from megatron_scope.testing.checkpoint_compare import current_grads, load_weights, relative_errors, save_grads, save_weights
from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH, tiny_batches

NUM_MICROBATCHES = 4


def _reference(rank, world_size, ckpt_dir):
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=7)
    model = build_gpt_model(TINY_ARCH)
    save_weights(model, f"{ckpt_dir}/weights")
    losses = lm_forward_backward(model, tiny_batches(NUM_MICROBATCHES))
    save_grads(model, current_grads(model), f"{ckpt_dir}/grads")
    return losses


def _parallel(rank, world_size, ckpt_dir, tp, pp):
    from megatron.core import parallel_state

    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(tp, pp, seed=1000 + rank)  # other seed: weights must come from the load
    model = build_gpt_model(TINY_ARCH)
    load_weights(model, f"{ckpt_dir}/weights")
    losses = lm_forward_backward(model, tiny_batches(NUM_MICROBATCHES))
    return {
        "losses": losses if parallel_state.is_pipeline_last_stage() else None,
        "grad_errors": relative_errors(model, current_grads(model), f"{ckpt_dir}/grads"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 2)])
def test_gpt_tp_pp_matches_single_process(tmp_path, tp, pp):
    (reference_losses,) = run_on_ranks(_reference, 1, args=(str(tmp_path),))
    results = run_on_ranks(_parallel, tp * pp, args=(str(tmp_path), tp, pp))

    last_stage_losses = [r["losses"] for r in results if r["losses"] is not None]
    assert len(last_stage_losses) == tp  # every TP rank of the last stage reports
    for losses in last_stage_losses:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)

    checked = 0
    for rank, result in enumerate(results):
        for name, rel_err in result["grad_errors"].items():
            assert rel_err < 1e-5, f"rank {rank}: gradient of {name} differs (max rel err {rel_err:.2e})"
            checked += 1
    assert checked >= 4 * 2 * TINY_ARCH.num_layers  # every rank checked its shard of every layer
