"""build_batch and what the trainer computes from a batch on a rollout's edge cases: empty and immediate-EOS
responses, all-correct and all-incorrect groups, groups of one; token ids outside the vocabulary are refused
with the prompt named before any tensor is built."""

import pytest
import torch

from megatron_scope.losses.objectives import group_normalized_advantages
from megatron_scope.losses.scope import scope_sequence_weights
from megatron_scope.config import LossConfig
from megatron_scope.megatron.loss_func import check_batch, scope_loss_func
from megatron_scope.ops.token_stats import sequence_mean_log_prob
from megatron_scope.ops.vocab_parallel import vocab_parallel_log_probs
from megatron_scope.rollout.batch import (RolloutGroup, build_batch, check_token_ids, sequence_length_for,
                                          split_by_token_budget, split_rows, split_runs, token_counts)
from megatron_scope.rollout.engine import Completion

V, PAD, EOS = 50, 0, 2


def completion(ids, log_prob=-1.0):
    return Completion(list(ids), [log_prob] * len(ids), "stop")


def group(prompt_id, responses, correct, prompt=(1, 5, 6)):
    return RolloutGroup(prompt_id, list(prompt), [completion(r) for r in responses], list(correct))


def score_and_loss(groups, algorithm):
    """The trainer's path at TP=1 with random student/teacher logits: batch, SCOPE weights, GRPO advantages,
    then the loss and its gradient."""
    check_token_ids(groups, V)
    batch = build_batch(groups, sequence_length_for(groups), PAD)
    n, seq = batch["tokens"].shape
    generator = torch.Generator().manual_seed(0)
    student_logits = (2 * torch.randn(n, seq, V, generator=generator)).requires_grad_(True)
    teacher_logits = 2 * torch.randn(n, seq, V, generator=generator)
    student = vocab_parallel_log_probs(student_logits.detach(), batch["labels"], vocab_size=V)
    teacher = vocab_parallel_log_probs(teacher_logits, batch["labels"], vocab_size=V)
    mask = batch["loss_mask"]
    batch.update(
        teacher_logits=teacher_logits, teacher_log_probs=teacher, old_log_probs=student,
        seq_weights=scope_sequence_weights(sequence_mean_log_prob(student, mask), sequence_mean_log_prob(teacher, mask),
                                           batch["correct"], batch["group_ids"]),
        advantages=group_normalized_advantages(batch["correct"].float(), batch["group_ids"]),
    )
    config = LossConfig(algorithm=algorithm)
    check_batch(batch, config)
    loss_sum, count, _ = scope_loss_func(config, V, batch, student_logits)
    loss_sum.backward()
    return batch, loss_sum.detach(), count, student_logits.grad


def test_empty_and_immediate_eos_responses_are_laid_out_exactly():
    """An empty response has no loss position; an immediate EOS has one, the EOS itself."""
    batch = build_batch([group("p", [[], [EOS], [7, 8, EOS]], [True, False, True])], 8, PAD)
    assert batch["loss_mask"].sum(-1).tolist() == [0.0, 1.0, 3.0]
    assert batch["tokens"][:, :5].tolist() == [[1, 5, PAD, PAD, PAD], [1, 5, 6, PAD, PAD], [1, 5, 6, 7, 8]]
    assert batch["labels"][1, 2] == EOS and batch["loss_mask"][1].nonzero().flatten().tolist() == [2]
    assert batch["labels"][2, 2:5].tolist() == [7, 8, EOS] and batch["loss_mask"][2, 2:5].tolist() == [1.0, 1.0, 1.0]
    assert batch["rollout_log_probs"].sum(-1).tolist() == [0.0, -1.0, -3.0]


@pytest.mark.parametrize("algorithm", ["scope", "grpo"])
def test_empty_responses_and_uniform_groups_give_finite_numbers(algorithm):
    """All-correct and all-incorrect groups get defined weights (averaging 1 per path) and advantage 0; an
    empty response is legal, contributes nothing to the loss and gets no gradient."""
    groups = [
        group("all-correct", [[7, EOS], [8, 9, EOS], [EOS]], [True, True, True]),
        group("all-incorrect", [[10, EOS], [11, 12, 13, EOS], [14]], [False, False, False]),
        group("mixed", [[], [EOS], [15, 16, EOS]], [True, False, False]),
    ]
    batch, loss_sum, count, grad = score_and_loss(groups, algorithm)
    weights, advantages = batch["seq_weights"], batch["advantages"]
    assert torch.isfinite(weights).all() and torch.isfinite(loss_sum) and torch.isfinite(grad).all()
    assert weights[:3].mean().item() == pytest.approx(1.0) and weights[3:6].mean().item() == pytest.approx(1.0)
    assert advantages[:6].tolist() == [0.0] * 6 and advantages[6:].abs().min() > 0
    assert int(count) == 9  # sequence-level: the empty response counts as a response with loss 0
    assert grad[6].abs().max() == 0  # the empty response (row 6) trains nothing
    # ... and contributes nothing: scaling its weight leaves the loss unchanged
    scaled = dict(batch, seq_weights=weights * torch.tensor([1.0] * 6 + [10.0, 1.0, 1.0]))
    logits = torch.zeros_like(grad)  # any logits: the empty row has no loss position
    config = LossConfig(algorithm=algorithm)
    assert scope_loss_func(config, V, scaled, logits)[0] == scope_loss_func(config, V, batch, logits)[0]


def test_groups_of_one_get_weight_one_and_advantage_zero():
    """G = 1 (--scope-group-size 1): each response is its prompt's only member on its path."""
    groups = [group(f"p{i}", [r], [ok]) for i, (r, ok) in enumerate([([7, EOS], True), ([8, 9], False), ([], True)])]
    batch, loss_sum, _, grad = score_and_loss(groups, "scope")
    assert batch["seq_weights"].tolist() == [1.0, 1.0, 1.0]
    assert batch["advantages"].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(loss_sum) and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "responses, prompt, match",
    [
        ([[7, EOS], [V + 3, EOS]], (1, 5),
         r"prompt 'p': response 1 has token ids outside the vocabulary \[0, 50\): \[53\]"),
        ([[7, -1]], (1, 5), r"prompt 'p': response 0 has token ids outside the vocabulary \[0, 50\): \[-1\]"),
        ([[7]], (1, V, V + 1), r"prompt 'p': prompt has token ids outside the vocabulary \[0, 50\): \[50, 51\]"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_named(responses, prompt, match):
    groups = [group("ok", [[7, EOS]], [True]), group("p", responses, [True] * len(responses), prompt=prompt)]
    with pytest.raises(ValueError, match=match):
        check_token_ids(groups, V)


def test_log_probs_must_match_the_response():
    bad = RolloutGroup("p", [1, 5], [Completion([7, 8, EOS], [-1.0, -1.0], "stop")], [True])
    with pytest.raises(ValueError, match=r"prompt 'p': a response of 3 tokens has 2 log-probs"):
        build_batch([bad], 8, PAD)


def test_token_budget_microbatches_hold_every_row_once_within_the_budget():
    responses = [[7] * k + [EOS] for k in (0, 3, 17, 9, 30, 1, 12, 5)]
    groups = [group("a", responses[:4], [True, False, True, False]),
              group("b", responses[4:], [False, True, True, False])]
    batch = build_batch(groups, sequence_length_for(groups), PAD)
    batch["row"] = torch.arange(len(batch["tokens"]))
    assert batch["sequence_lengths"].tolist() == [3 + len(r) - 1 for r in responses]
    microbatches = split_by_token_budget(batch, max_tokens=64, max_rows=3)
    rows = torch.cat([m["row"] for m in microbatches])
    assert sorted(rows.tolist()) == list(range(8))  # every row exactly once
    lengths = [int(batch["sequence_lengths"][r]) for r in rows]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    for m in microbatches:
        rows_here, width = m["tokens"].shape
        assert width == -(-int(m["sequence_lengths"].max()) // 8) * 8  # padded to its own longest, multiple of 8
        assert rows_here <= 3 and (rows_here * width <= 64 or rows_here == 1)
        for key in ("tokens", "labels", "loss_mask", "position_ids", "rollout_log_probs"):
            full = batch[key][m["row"]]
            assert torch.equal(m[key], full[:, :width]), key
            assert not full[:, width:].count_nonzero() or key in ("position_ids",), key  # only padding was cut
    assert [tuple(m["tokens"].shape) for m in microbatches] == [(1, 40), (2, 24), (3, 16), (2, 8)]
    # the step's token counts: the rows' own positions, and what each microbatching computes
    real = sum(3 + len(r) - 1 for r in responses)
    assert [int(x) for x in token_counts(batch, microbatches)] == [real, 40 + 48 + 48 + 16]
    assert [int(x) for x in token_counts(batch, split_rows(batch, 4))] == [real, 8 * batch["tokens"].shape[1]]


def test_group_inputs_do_not_depend_on_the_microbatching():
    """SCOPE's weights and GRPO's advantages over token-budget microbatches of different widths equal those of
    one microbatch (rows matched by their index)."""
    from megatron_scope.megatron.loss_func import add_group_inputs

    responses = [[7] * k + [EOS] for k in (0, 3, 17, 9, 30, 1, 12, 5)]
    groups = [group("a", responses[:4], [True, False, True, False]),
              group("b", responses[4:], [False, True, True, False])]
    batch = build_batch(groups, sequence_length_for(groups), PAD)
    generator = torch.Generator().manual_seed(1)
    batch.update(row=torch.arange(8), old_log_probs=-torch.rand(batch["loss_mask"].shape, generator=generator),
                 teacher_log_probs=-torch.rand(batch["loss_mask"].shape, generator=generator))
    for config in (LossConfig(), LossConfig(loss_agg_mode="scope-released")):
        whole = [dict(batch)]
        add_group_inputs(whole, config)
        budget = split_by_token_budget(batch, max_tokens=40, max_rows=4)
        add_group_inputs(budget, config)
        for key in ("seq_weights", "advantages"):
            order = torch.cat([m["row"] for m in budget])
            torch.testing.assert_close(torch.cat([m[key] for m in budget]), whole[0][key][order])


def test_a_served_references_scores_become_ref_log_probs_at_the_response_positions():
    from megatron_scope.rollout.engine import SequenceScores

    scores = [SequenceScores.from_lists([-0.5, -1.5]), SequenceScores.from_lists([-2.0])]
    group = RolloutGroup("a", [1, 5], [Completion([7, 8], [0.0] * 2, "stop"), Completion([9], [0.0], "stop")],
                         [True, False], reference_scores=scores)
    batch = build_batch([group], 8, pad_id=0)
    expected = torch.zeros(2, 8)
    expected[0, 1:3], expected[1, 1] = torch.tensor([-0.5, -1.5]), -2.0
    assert torch.equal(batch["ref_log_probs"], expected) and "teacher_log_probs" not in batch
    with pytest.raises(ValueError, match="response 1 has 1 tokens but 2 reference log-probs"):
        RolloutGroup("a", [1], group.completions, [True, False], reference_scores=[scores[0], scores[0]])


def test_widths_are_multiples_of_tensor_parallelism_for_sequence_parallelism():
    from megatron_scope.rollout.batch import padded_sequence_length, sequence_multiple

    assert [sequence_multiple(tp) for tp in (1, 2, 4, 8, 3, 6)] == [8, 8, 8, 8, 24, 24]
    assert padded_sequence_length(30, sequence_multiple(3)) == 48 and padded_sequence_length(30, 8) == 32


def test_split_runs_cuts_a_batch_where_its_rows_label_changes():
    """Consecutive rows of one label (e.g. the teacher they read) stay together, in row order; every row once."""
    batch = {"tokens": torch.arange(12).view(6, 2), "correct": torch.tensor([1, 0, 1, 1, 0, 0]).bool()}
    runs = split_runs(batch, ["a", "a", "b", "b", "b", "a"])
    assert [label for label, _ in runs] == ["a", "b", "a"]
    assert [rows["tokens"][:, 0].tolist() for _, rows in runs] == [[0, 2], [4, 6, 8], [10]]
    assert [rows["correct"].tolist() for _, rows in runs] == [[True, False], [True, True, False], [False]]
    assert [label for label, _ in split_runs(batch, [None] * 6)] == [None]
    with pytest.raises(ValueError, match="5 labels for 6 rows"):
        split_runs(batch, ["a"] * 5)
