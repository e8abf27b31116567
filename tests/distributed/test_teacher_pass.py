"""The co-located teacher's scoring pass with hidden states (`teacher.colocated.teacher_pass`), on a tiny Megatron
teacher whose last hidden states are poisoned in the first microbatch: NaN at a response position of row 2, Inf in
row 1 (whose response is empty) and NaN at a prompt position of row 0. Only row 2 is flagged, on the device, in
`teacher_hidden_nonfinite`, and `check_batch` names that sequence; the second microbatch passes. The hidden states
come back complete at the response rows (equal to the device's, NaN included): on CPU under gloo, and on CUDA in
pinned host memory."""

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH, split_microbatches, tiny_rollout_batch

POISONED_ROW = 2  # of the first microbatch (rows 0-3 of tiny_rollout_batch)


def _score(device: str) -> dict:
    """teacher_pass over two microbatches on `device` (the process group and TP = PP = 1 set up)."""
    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.loss_func import check_batch, response_positions
    from megatron_scope.megatron.model import build_gpt_model, unwrap_model
    from megatron_scope.teacher.colocated import teacher_pass

    teacher = build_gpt_model(TINY_ARCH)
    microbatches = [{k: v.to(device) for k, v in mb.items()} for mb in split_microbatches(tiny_rollout_batch(), 2)]
    first = microbatches[0]
    assert not first["loss_mask"][1].any() and first["loss_mask"][POISONED_ROW].any() and not first["loss_mask"][0, 0]
    response = int(first["loss_mask"][POISONED_ROW].nonzero()[0, 0])
    made = []  # the hidden states the teacher made, [b, s, H] on the device

    def poison(module, args):  # the output layer's input [s, b, H]: the first microbatch only
        hidden = args[0].clone()
        if not made:
            hidden[response, POISONED_ROW, 3] = float("nan")
            hidden[2, 1, 0] = float("inf")  # row 1: no response position
            hidden[0, 0, 5] = float("nan")  # row 0's prompt
        made.append(hidden.transpose(0, 1).clone())
        return (hidden, *args[1:])

    handle = unwrap_model(teacher).output_layer.register_forward_pre_hook(poison)
    try:
        scored = teacher_pass(teacher, microbatches, LossConfig(), TINY_ARCH.vocab_size)
    finally:
        handle.remove()
    errors = []
    for batch, extras in zip(microbatches, scored):
        try:
            check_batch({**batch, **extras}, LossConfig())
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    flags = [extras["teacher_hidden_nonfinite"] for extras in scored]
    hidden = [extras["teacher_hidden"] for extras in scored]
    return {
        "flags": [f.cpu().tolist() for f in flags],
        "flags_on_device": all(f.device.type == device and f.dtype == torch.bool for f in flags),
        "pinned": [h.is_pinned() for h in hidden] if device == "cuda" else None,
        "hidden_as_made": all(torch.equal(h.to(device).isnan(), m.isnan()) and torch.equal(h.to(device).nan_to_num(),
                                                                                           m.nan_to_num())
                              for h, m in zip(hidden, (m.flatten(0, 1)[rows] for m, rows in
                                                       zip(made, response_positions(microbatches))))),
        "errors": errors,
    }


def _on_cpu(rank, world_size):
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=0)
    return _score("cpu")


def _check(result: dict) -> None:
    expected = [False] * 4
    expected[POISONED_ROW] = True
    assert result["flags"] == [expected, [False] * 4]
    assert result["flags_on_device"] and result["hidden_as_made"]
    first, second = result["errors"]
    assert first is not None and f"batch['teacher_hidden'] holds NaN or Inf on response tokens of sequences " \
                                 f"[{POISONED_ROW}]" in first, first
    assert second is None


def test_teacher_hidden_states_are_checked_per_sequence_on_their_device():
    (result,) = run_on_ranks(_on_cpu, 1, timeout=300)
    _check(result)


@pytest.mark.gpu
def test_teacher_hidden_states_reach_pinned_host_memory_complete_and_checked_on_cuda():
    import torch.distributed as dist

    from megatron_scope.megatron.parallel import init_distributed, initialize_model_parallel

    ours = not dist.is_initialized()
    init_distributed()  # NCCL
    try:
        initialize_model_parallel(1, 1, seed=0)
        result = _score("cuda")
    finally:
        if ours:
            dist.destroy_process_group()
    _check(result)
    assert result["pinned"] == [True, True]


def _response_only(rank, world_size):
    """log_prob_pass with loss masks (the output layer on the response positions only) and without (the model's
    logits over every position), at TP = world_size with sequence parallelism: this rank's view of both."""
    import torch

    from megatron_scope.megatron.loss_func import response_positions
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.schedule import forward_collect
    from megatron_scope.teacher.colocated import log_prob_pass

    initialize_model_parallel(world_size, 1, seed=0)
    model = build_gpt_model(TINY_ARCH, sequence_parallel=world_size > 1)
    with_masks = split_microbatches(tiny_rollout_batch(), 2)
    without = [{k: v for k, v in batch.items() if k != "loss_mask"} for batch in with_masks]
    masked = log_prob_pass(model, with_masks, TINY_ARCH.vocab_size, temperature=0.7, entropy=True)
    full = log_prob_pass(model, without, TINY_ARCH.vocab_size, temperature=0.7, entropy=True)
    masked_topk = log_prob_pass(model, with_masks, TINY_ARCH.vocab_size, keep="topk", topk=4)
    full_topk = log_prob_pass(model, without, TINY_ARCH.vocab_size, keep="topk", topk=4)
    hidden = log_prob_pass(model, with_masks, TINY_ARCH.vocab_size, keep="hidden")
    states = forward_collect(model, with_masks, lambda batch, output: output.clone(), hidden_states=True)
    topk_keys = ("teacher_topk_ids", "teacher_topk_log_probs", "teacher_topk_tail_log_mass")
    return [{"mask": batch["loss_mask"], "log_probs": (ours[1], theirs[1]),
             "entropy": (ours[0]["teacher_entropy"], theirs[0]["teacher_entropy"]),
             "topk": [(ours_topk[0][key], theirs_topk[0][key]) for key in topk_keys],
             "hidden_share": kept[0]["teacher_hidden"], "hidden_rows": made.flatten(0, 1)[rows]}
            for batch, ours, theirs, ours_topk, theirs_topk, kept, made, rows
            in zip(with_masks, masked, full, masked_topk, full_topk, hidden, states, response_positions(with_masks))]


@pytest.mark.parametrize("world_size", [1, 2], ids=["tp1", "tp2-sequence-parallel"])
def test_forward_passes_apply_the_output_layer_on_response_positions_only(world_size):
    """The log-probs (at temperature 0.7), entropies and top-k of a pass with loss masks equal those from the logits
    over every position at the response positions, and are 0 (the top-k: uniform over its k + 1 outcomes) elsewhere;
    the hidden states it keeps are each TP rank's share of the response rows, which together are those rows."""
    import math

    import torch

    from megatron_scope.megatron.loss_func import row_share

    ranks = run_on_ranks(_response_only, world_size, timeout=300)
    for rank_views in ranks:
        for view in rank_views:
            response = view["mask"] > 0
            assert response.any() and not response.all()
            for ours, theirs in (view["log_probs"], view["entropy"]):
                torch.testing.assert_close(ours[response], theirs[response], rtol=1e-5, atol=1e-5)
                assert not ours[~response].any() and theirs[~response].abs().sum() > 0
            (ids, full_ids), (top, full_top), (tail, full_tail) = view["topk"]
            assert torch.equal(ids[response], full_ids[response])
            torch.testing.assert_close(top[response], full_top[response], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tail[response], full_tail[response], rtol=1e-5, atol=1e-5)
            assert torch.equal(ids[~response], torch.arange(4).expand(int((~response).sum()), 4))
            assert (top[~response] == -math.log(5)).all() and (tail[~response] == -math.log(5)).all()
    for microbatch in range(len(ranks[0])):
        rows = ranks[0][microbatch]["hidden_rows"]
        shares = [rank_views[microbatch]["hidden_share"] for rank_views in ranks]
        assert all(share.shape == (row_share(len(rows), world_size), rows.shape[1]) for share in shares)
        torch.testing.assert_close(torch.cat(shares)[:len(rows)], rows)
