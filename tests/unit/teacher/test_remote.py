"""A remote (vLLM) teacher's scores of the rollouts: sliced to the response tokens, laid out by build_batch at
the sampler's positions, and refused with the prompt and sample named when the engine returns too little,
too much or a non-finite value (never a silent zero)."""

import math

import pytest
import torch

from megatron_scope.rollout.batch import RolloutGroup, build_batch
from megatron_scope.rollout.engine import Completion
from megatron_scope.teacher.remote import score_responses


class ScriptedTeacher:
    """`RolloutEngine.score`'s contract (len(sequence) - 1 log-probs each) with values -position/10, or a
    scripted fault: `drop` returns one sequence fewer, `short`/`nan` spoil the second sequence."""

    def __init__(self, fault=None):
        self.fault, self.calls = fault, []

    def score(self, sequences):
        self.calls.append([list(s) for s in sequences])
        scores = [[-(t + 1) / 10 for t in range(len(s) - 1)] for s in sequences]
        if self.fault == "drop":
            scores = scores[:-1]
        elif self.fault == "short":
            scores[1] = scores[1][:-1]
        elif self.fault == "nan":
            scores[1][-1] = math.nan
        return scores


PROMPTS = [[1, 5, 6], [1, 7]]
SAMPLES = [[Completion([9, 9, 2], [-0.5] * 3, "stop"), Completion([], [], "stop")],
           [Completion([4], [-0.1], "stop"), Completion([3, 2], [-0.2] * 2, "stop")]]


def test_scores_are_the_response_tokens_log_probs():
    engine = ScriptedTeacher()
    scores = score_responses(engine, ["a", "b"], PROMPTS, SAMPLES)
    # the empty response is not sent; each sent sequence is prompt + response
    assert engine.calls == [[[1, 5, 6, 9, 9, 2], [1, 7, 4], [1, 7, 3, 2]]]
    # positions 2..4 of a 6-token sequence predict the 3 response tokens (prompt of 3: first at index 3 - 1)
    assert scores == [[[-0.3, -0.4, -0.5], []], [[-0.2], [-0.2, -0.3]]]


def test_build_batch_lays_teacher_scores_out_like_the_sampler_log_probs():
    scores = score_responses(ScriptedTeacher(), ["a", "b"], PROMPTS, SAMPLES)
    groups = [RolloutGroup(pid, p, list(s), [True] * len(s), t) for pid, p, s, t in zip("ab", PROMPTS, SAMPLES, scores)]
    batch = build_batch(groups, seq_length=8, pad_id=0)
    mask = batch["loss_mask"].bool()
    assert torch.equal(batch["teacher_log_probs"] != 0, mask)
    expected = torch.tensor([v for group in scores for sample in group for v in sample])
    torch.testing.assert_close(batch["teacher_log_probs"][mask], expected)
    without = build_batch([RolloutGroup(pid, p, list(s), [True] * len(s)) for pid, p, s in zip("ab", PROMPTS, SAMPLES)],
                          seq_length=8, pad_id=0)
    assert "teacher_log_probs" not in without
    assert torch.equal(without["rollout_log_probs"] != 0, mask)


@pytest.mark.parametrize("fault,message", [
    ("drop", r"returned 2 scored sequences for 3"),
    ("short", r"prompt 'b', response 0: the teacher engine returned 1 log-probs for a sequence of 3 tokens"),
    ("nan", r"prompt 'b', response 0: the teacher engine returned a non-finite log-prob"),
])
def test_a_teacher_that_returns_too_little_or_nan_is_an_error(fault, message):
    with pytest.raises(RuntimeError, match=message):
        score_responses(ScriptedTeacher(fault), ["a", "b"], PROMPTS, SAMPLES)


def test_groups_must_agree_on_teacher_scores():
    with pytest.raises(ValueError, match="response 0 has 3 tokens but 2 teacher log-probs"):
        RolloutGroup("a", PROMPTS[0], SAMPLES[0], [True, False], [[-1.0, -1.0], []])
    scored = RolloutGroup("a", PROMPTS[0], SAMPLES[0], [True, False], [[-1.0] * 3, []])
    plain = RolloutGroup("b", PROMPTS[1], SAMPLES[1], [True, False])
    with pytest.raises(ValueError, match="some groups carry teacher log-probs and some do not"):
        build_batch([scored, plain], seq_length=8, pad_id=0)
