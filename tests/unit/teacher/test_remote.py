"""A remote (vLLM) teacher's scores of the rollouts: sliced to the response tokens, laid out by build_batch at
the sampler's positions, and refused with the prompt and sample named when the engine returns too little,
too much, a non-finite value or a bad top-k (never a silent zero)."""

import math

import pytest
import torch

from megatron_scope.rollout.batch import RolloutGroup, build_batch
from megatron_scope.rollout.engine import Completion, SequenceScores
from megatron_scope.teacher.remote import score_responses

K = 3


class ScriptedTeacher:
    """`RolloutEngine.score`/`score_topk`'s contract (len(sequence) - first values each): at position p log-prob
    -p/10, top-k ids (p - 1, p, ...) with log-probs -1, -2, ...; or a scripted fault that spoils the second
    sequence (`drop` returns one sequence fewer)."""

    def __init__(self, fault=None):
        self.fault, self.calls = fault, []

    def score(self, sequences, first=None):
        return [s.log_probs.tolist() for s in self.score_topk(sequences, 0, first)]

    def score_topk(self, sequences, k, first=None):
        first = first or [1] * len(sequences)
        self.calls.append(([list(s) for s in sequences], k, list(first)))
        positions = [range(f, len(s)) for s, f in zip(sequences, first)]
        lists = [([-p / 10 for p in ps], [[p - 1 + i for i in range(k)] for p in ps], [[-1.0 - i for i in range(k)]
                                                                                      for _ in ps]) for ps in positions]
        spoiled = lists[1] if len(lists) > 1 else None
        if self.fault == "drop":
            lists = lists[:-1]
        elif self.fault == "short":
            spoiled[0].pop()
        elif self.fault == "nan":
            spoiled[0][-1] = math.nan
        elif self.fault == "repeated_id":
            spoiled[1][-1][1] = spoiled[1][-1][0]
        elif self.fault == "padding_row":
            spoiled[1][-1][0] = 60
        return [SequenceScores.from_lists(*values) for values in lists]


PROMPTS = [[1, 5, 6], [1, 7]]
SAMPLES = [[Completion([9, 9, 2], [-0.5] * 3, "stop"), Completion([], [], "stop")],
           [Completion([4], [-0.1], "stop"), Completion([3, 2], [-0.2] * 2, "stop")]]


def _groups(scores):
    return [RolloutGroup(pid, p, list(s), [True] * len(s), t) for pid, p, s, t in zip("ab", PROMPTS, SAMPLES, scores)]


def test_scores_are_the_response_tokens_log_probs():
    engine = ScriptedTeacher()
    scores = score_responses(engine, ["a", "b"], PROMPTS, SAMPLES)
    # the empty response is not sent; each sent sequence is prompt + response, scored from the response on
    assert engine.calls == [([[1, 5, 6, 9, 9, 2], [1, 7, 4], [1, 7, 3, 2]], 0, [3, 2, 2])]
    # positions 2..4 of a 6-token sequence predict the 3 response tokens (prompt of 3: first at index 3 - 1)
    assert [[s.log_probs.tolist() for s in group] for group in scores] == \
        [[pytest.approx([-0.3, -0.4, -0.5]), []], [pytest.approx([-0.2]), pytest.approx([-0.2, -0.3])]]
    assert all(s.topk_ids.numel() == 0 for group in scores for s in group)


def test_topk_scores_are_sliced_like_the_log_probs():
    engine = ScriptedTeacher()
    scores = score_responses(engine, ["a", "b"], PROMPTS, SAMPLES, topk=K, vocab_size=50)
    assert engine.calls[0][1] == K
    first = scores[0][0]
    assert first.topk_ids.tolist() == [[2, 3, 4], [3, 4, 5], [4, 5, 6]]
    assert first.topk_log_probs.tolist() == [[-1.0, -2.0, -3.0]] * 3


def test_build_batch_lays_teacher_scores_out_like_the_sampler_log_probs():
    scores = score_responses(ScriptedTeacher(), ["a", "b"], PROMPTS, SAMPLES, topk=K, vocab_size=50)
    batch = build_batch(_groups(scores), seq_length=8, pad_id=0)
    mask = batch["loss_mask"].bool()
    assert torch.equal(batch["teacher_log_probs"] != 0, mask)
    flat = [s for group in scores for s in group]
    torch.testing.assert_close(batch["teacher_log_probs"][mask], torch.cat([s.log_probs for s in flat]))
    assert batch["teacher_topk_ids"].shape == batch["teacher_topk_log_probs"].shape == (4, 8, K)
    assert torch.equal(batch["teacher_topk_ids"][mask], torch.cat([s.topk_ids for s in flat]))
    assert torch.equal(batch["teacher_topk_log_probs"][mask], torch.cat([s.topk_log_probs for s in flat]))
    # off the responses: a valid top-k (ids 0..k-1, each 1/(k+1)) so the KL there is finite and masked away
    assert batch["teacher_topk_ids"][~mask].tolist() == [list(range(K))] * int((~mask).sum())
    torch.testing.assert_close(batch["teacher_topk_log_probs"][~mask], torch.full((int((~mask).sum()), K),
                                                                                -math.log(K + 1)))
    sampled_only = build_batch(_groups(score_responses(ScriptedTeacher(), ["a", "b"], PROMPTS, SAMPLES)), 8, 0)
    assert "teacher_log_probs" in sampled_only and "teacher_topk_ids" not in sampled_only
    without = build_batch(_groups([None, None]), seq_length=8, pad_id=0)
    assert "teacher_log_probs" not in without
    assert torch.equal(without["rollout_log_probs"] != 0, mask)


@pytest.mark.parametrize("fault,message", [
    ("drop", r"returned 2 scored sequences for 3"),
    ("short", r"prompt 'b', response 0: the teacher engine returned 0 log-probs and 1/1 top-k lists for a response "
              r"of 1 tokens"),
    ("nan", r"prompt 'b', response 0: the teacher engine returned a non-finite log-prob"),
    ("repeated_id", r"prompt 'b', response 0, token 0: the teacher engine returned 2 distinct top-k ids"),
    ("padding_row", r"prompt 'b', response 0, token 0: the teacher's top-3 holds id 60, an embedding row past the "
                    r"tokenizer's 50 tokens"),
])
def test_a_teacher_that_returns_too_little_or_a_bad_topk_is_an_error(fault, message):
    with pytest.raises(RuntimeError, match=message):
        score_responses(ScriptedTeacher(fault), ["a", "b"], PROMPTS, SAMPLES, topk=K, vocab_size=50)


def test_a_groups_scores_match_its_responses_and_unscored_groups_get_placeholders():
    """Scores of another length are refused; with mixed teacher backends only the remote teachers' groups carry
    scores, and the others' rows hold the placeholders a co-located teacher's pass replaces (0 log-probs, the
    uniform top-k)."""
    with pytest.raises(ValueError, match="response 0 has 3 tokens but 2 teacher log-probs"):
        RolloutGroup("a", PROMPTS[0], SAMPLES[0], [True, False], [SequenceScores.from_lists([-1.0] * 2),
                                                                   SequenceScores.from_lists([])])
    topk = lambda n: ([[1, 2]] * n, [[-0.5, -1.5]] * n)  # noqa: E731
    scored = RolloutGroup("a", PROMPTS[0], SAMPLES[0], [True, False], [
        SequenceScores.from_lists([-1.0] * 3, *topk(3)), SequenceScores.from_lists([], *topk(0))])
    plain = RolloutGroup("b", PROMPTS[1], SAMPLES[1], [True, False])
    batch = build_batch([scored, plain], seq_length=8, pad_id=0)
    alone = build_batch([scored], seq_length=8, pad_id=0)
    for key in ("teacher_log_probs", "teacher_topk_ids", "teacher_topk_log_probs", "teacher_topk_tail_log_mass"):
        assert torch.equal(batch[key][:2], alone[key]), key  # the scored group as if alone
    assert (batch["teacher_log_probs"][2:] == 0).all()
    neutral = build_batch([plain, plain], seq_length=8, pad_id=0)  # no scores at all: no teacher tensors
    assert "teacher_log_probs" not in neutral and "teacher_topk_ids" not in neutral
    assert (batch["teacher_topk_ids"][2:] == torch.arange(2, dtype=torch.int32)).all()  # the uniform top-k: 0..k-1
