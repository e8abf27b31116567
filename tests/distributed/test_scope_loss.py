"""The SCOPE loss through Megatron's schedules: the same batch as one microbatch or as token-budget microbatches of
varying [rows, width] (several, accumulated), at TP=1, TP=2 and PP=2, gives the same loss and gradients (rtol
1e-5), for several objectives and KL kinds, with the teacher as logits or as last hidden states + output layer
(the fused KL from hidden states for SCOPE's reverse KL and JSD: the student's logits never exist; SRPO: one
microbatch of teacher logits)."""

import math

import pytest


from megatron_scope.testing.checkpoint_compare import (
    current_grads,
    load_weights,
    relative_errors,
    save_grads,
    save_weights,
)
from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH, split_microbatches, tiny_rollout_batch, tiny_teacher_weight

MICROBATCHES = (1, "budget")  # one, and token-budget microbatches of varying [rows, width]
TOKEN_BUDGET = 48  # tiny_rollout_batch's 8 rows use 8 to 24 positions: microbatches of 2 x 24, 2 x 16, 3 x 16, ...
VARIANTS = {  # name: LossConfig keyword arguments
    "scope-reverse-seq": dict(algorithm="scope", kl="reverse"),
    "scope-reverse-seq-hidden": dict(algorithm="scope", kl="reverse"),
    "scope-jsd-token-hidden": dict(algorithm="scope", kl="jsd", loss_agg_mode="token-mean"),
    "scope-topk": dict(algorithm="scope", kl="topk", topk=8),  # tiny_rollout_batch's k
    "srpo-hidden": dict(algorithm="srpo", kl="reverse"),
}
SAME_AS = {"scope-reverse-seq-hidden": "scope-reverse-seq"}  # one teacher given two ways


def _build(tp, pp, seed):
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(tp, pp, seed=seed)
    return wrap_with_ddp(build_gpt_model(TINY_ARCH, calculate_per_token_loss=True, variable_seq_lengths=True))


def _run(model, variant, num_microbatches):
    from megatron.core import parallel_state

    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.loss_func import reduce_reports
    from megatron_scope.megatron.schedule import forward_backward
    from megatron_scope.rollout.batch import split_by_token_budget

    config = LossConfig(**VARIANTS[variant])
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    hidden = variant.endswith("-hidden")
    batch = tiny_rollout_batch(teacher_hidden=hidden)
    if num_microbatches == "budget":
        microbatches = split_microbatches(batch, 1, tp_rank, tp_size)
        microbatches = split_by_token_budget(microbatches[0], TOKEN_BUDGET, max_rows=3)
        assert len(microbatches) >= 3 and len({tuple(m["tokens"].shape) for m in microbatches}) > 1
    else:
        microbatches = split_microbatches(batch, num_microbatches, tp_rank, tp_size)
    teacher_weight = tiny_teacher_weight().chunk(tp_size)[tp_rank] if hidden else None
    model.zero_grad_buffer()
    reports = forward_backward(model, microbatches, config, TINY_ARCH.vocab_size, teacher_weight=teacher_weight)
    loss = reduce_reports(reports)["loss"] if parallel_state.is_pipeline_last_stage() else None
    return loss, current_grads(model)


def _reference(rank, world_size, ckpt_dir):
    model = _build(1, 1, seed=3)
    save_weights(model, f"{ckpt_dir}/weights")
    losses, grads = {}, {}
    for variant in VARIANTS:
        for m in MICROBATCHES:
            losses[variant, m], grads[variant, m] = _run(model, variant, m)
    split_errors = {
        (variant, m): max(
            float((grads[variant, m][k] - grads[variant, 1][k]).abs().max() / grads[variant, 1][k].abs().max())
            for k in grads[variant, 1]
        )
        for variant in VARIANTS
        for m in MICROBATCHES
    }
    for variant, same in SAME_AS.items():
        split_errors[variant, "vs", same] = max(
            float((grads[variant, 1][k] - grads[same, 1][k]).abs().max() / grads[same, 1][k].abs().max())
            for k in grads[same, 1]
        )
    for variant in VARIANTS:
        save_grads(model, grads[variant, 1], f"{ckpt_dir}/grads-{variant}")
    return losses, split_errors


def _parallel(rank, world_size, ckpt_dir, tp, pp):
    model = _build(tp, pp, seed=100 + rank)
    load_weights(model, f"{ckpt_dir}/weights")
    results = {}
    for variant in VARIANTS:
        for m in MICROBATCHES:
            loss, grads = _run(model, variant, m)
            results[variant, m] = (loss, max(relative_errors(model, grads, f"{ckpt_dir}/grads-{variant}").values()))
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt_dir = str(tmp_path_factory.mktemp("scope_loss"))
    losses, split_errors = run_on_ranks(_reference, 1, args=(ckpt_dir,))[0]
    return ckpt_dir, losses, split_errors


def test_microbatch_split_invariance_single_process(reference):
    _, losses, split_errors = reference
    for (variant, m), loss in losses.items():
        assert loss == pytest.approx(losses[variant, 1], rel=1e-5), (variant, m)
        assert split_errors[variant, m] < 1e-5, (variant, m, split_errors[variant, m])
    assert len({round(losses[v, 1], 6) for v in VARIANTS}) == len(VARIANTS) - len(SAME_AS)  # the others differ
    for variant, same in SAME_AS.items():
        assert losses[variant, 1] == pytest.approx(losses[same, 1], rel=1e-5), variant
        assert split_errors[variant, "vs", same] < 1e-5, (variant, split_errors[variant, "vs", same])
    assert all(math.isfinite(loss) and loss != 0 for loss in losses.values()), losses


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_matches_single_process(reference, tp, pp):
    ckpt_dir, losses, _ = reference
    results = run_on_ranks(_parallel, tp * pp, args=(ckpt_dir, tp, pp))
    for rank, result in enumerate(results):
        for (variant, m), (loss, grad_error) in result.items():
            if loss is not None:
                assert loss == pytest.approx(losses[variant, 1], rel=1e-5), (rank, variant, m)
            assert grad_error < 1e-5, f"rank {rank} {variant} x{m}: gradient max rel err {grad_error:.2e}"
    assert sum(r[next(iter(r))][0] is not None for r in results) == tp  # the last stage's ranks reported
