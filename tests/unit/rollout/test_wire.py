"""rollout/wire.py: `pack` / `unpack` round-trip a step's groups exactly, every optional field present or absent."""

import dataclasses
import math
import pickle

import pytest
import torch

from megatron_scope.rewards.base import Verdict
from megatron_scope.rollout.batch import RolloutGroup, build_batch, sequence_length_for
from megatron_scope.rollout.engine import Completion, SequenceScores
from megatron_scope.rollout.wire import pack, unpack


def _scores(generator, length, k):
    return SequenceScores(torch.randn(length, generator=generator),
                          torch.randint(0, 1000, (length, k), generator=generator, dtype=torch.int32),
                          torch.randn(length, k, generator=generator))


def _groups(teacher_k=None, reference=False, self_teacher=False, prefixes=False, verdicts=True, version=3):
    """Three prompt groups of G = 3 responses, one of them empty, with -inf and tiny log-probs; `teacher_k`: the
    teacher's top-k width (None: no teacher scores; 0: sampled-token log-probs only)."""
    g = torch.Generator().manual_seed(0)
    groups = []
    for i in range(3):
        lengths = [0, 4 + i, 1] if i == 1 else [2 + i, 5, 3]
        completions = []
        for j, length in enumerate(lengths):
            log_probs = [float(x) for x in torch.randn(length, generator=g, dtype=torch.float64)]
            if length and j == 1:
                log_probs[0], log_probs[-1] = -math.inf, -1e-300
            completions.append(Completion(torch.randint(0, 150000, (length,), generator=g).tolist(), log_probs,
                                          "length" if j == 2 else "stop",
                                          ((0, version + i), (1, version + i + 1)) if length > 1 else ()))
        correct = [j == i for j in range(3)]
        groups.append(RolloutGroup(
            f"prompt-{i}", torch.randint(0, 150000, (5 + i,), generator=g).tolist(), completions, correct,
            teacher_scores=None if teacher_k is None else [_scores(g, n, teacher_k) for n in lengths],
            self_teacher_prompts=([None if ok else [7, 8, 9 + j] for j, ok in enumerate(correct)] if self_teacher
                                  else None),
            prefix_lengths=[min(1, n) for n in lengths] if prefixes else None,
            reference_scores=[_scores(g, n, 0) for n in lengths] if reference else None,
            verdicts=[Verdict(ok, "correct" if ok else "wrong", f"a{i}", None) for ok in correct] if verdicts else None,
            weight_version=version + i))
    return groups


def _same(got, expected):
    """The groups are equal field by field; tensors equal in dtype, shape and bits."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for field in dataclasses.fields(RolloutGroup):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if field.name in ("teacher_scores", "reference_scores") and y is not None:
                for s, t in zip(x, y, strict=True):
                    for name in ("log_probs", "topk_ids", "topk_log_probs"):
                        u, v = getattr(s, name), getattr(t, name)
                        assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), name
            elif field.name == "completions":
                for c, d in zip(x, y, strict=True):
                    assert (c.token_ids, c.finish_reason, c.versions) == (d.token_ids, d.finish_reason, d.versions)
                    assert [math.copysign(1, p) for p in c.log_probs] == [math.copysign(1, p) for p in d.log_probs]
                    assert [p.hex() for p in c.log_probs] == [p.hex() for p in d.log_probs]  # bit for bit
            else:
                assert x == y, field.name


def test_the_wire_format_knows_every_field():
    """A field added to RolloutGroup or Completion must be added to the wire format (and here)."""
    assert [f.name for f in dataclasses.fields(RolloutGroup)] == [
        "prompt_id", "prompt_token_ids", "completions", "correct", "teacher_scores", "self_teacher_prompts",
        "prefix_lengths", "reference_scores", "verdicts", "weight_version"]
    assert [f.name for f in dataclasses.fields(Completion)] == ["token_ids", "log_probs", "finish_reason", "versions"]


@pytest.mark.parametrize("options", [
    {},
    dict(teacher_k=0),
    dict(teacher_k=4, reference=True),
    dict(teacher_k=2, self_teacher=True, prefixes=True, reference=True),
    dict(verdicts=False, self_teacher=True),
])
def test_pack_unpack_round_trips_exactly(options):
    groups = _groups(**options)
    extra = (2, 17, {"rollout": 1.5, "busy": 2.0})
    buffer = pack(groups, extra)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    got, got_extra = unpack(buffer.clone())
    assert got_extra == extra
    _same(got, groups)
    assert build_batch(got, sequence_length_for(got), 0).keys() == build_batch(groups, sequence_length_for(groups),
                                                                               0).keys()
    for key, value in build_batch(got, 32, 0).items():
        assert torch.equal(value, build_batch(groups, 32, 0)[key]), key


def test_no_groups_and_a_mix_of_scored_and_unscored_groups():
    assert unpack(pack([])) == ([], None)
    scored, unscored = _groups(teacher_k=3), _groups()
    mixed = [scored[0], unscored[1], scored[2]]  # several teachers, some remote: only theirs carry scores
    _same(unpack(pack(mixed))[0], mixed)


def test_the_buffer_is_smaller_than_the_pickled_groups():
    groups = _groups(teacher_k=0)
    assert len(pack(groups)) < len(pickle.dumps(groups))


def test_ids_outside_int32_and_ragged_topk_are_refused():
    groups = _groups()
    groups[1].completions[1].token_ids[2] = 2**31
    with pytest.raises(ValueError, match=r"response: token ids outside \[0, 2\*\*31\): \[2147483648\]"):
        pack(groups)
    groups = _groups(teacher_k=2)
    scores = groups[0].teacher_scores[1]
    groups[0].teacher_scores[1] = SequenceScores(scores.log_probs, scores.topk_ids[:-1], scores.topk_log_probs)
    with pytest.raises(ValueError, match=r"prompt 'prompt-0': teacher_scores of a 5-token response has top-k of "
                                         r"shapes \(4, 2\) and \(5, 2\), not \(5, k\)"):
        pack(groups)


def test_a_truncated_buffer_is_refused():
    buffer = pack(_groups())
    with pytest.raises(ValueError, match=r"a packed rollout of \d+ bytes whose header describes \d+"):
        unpack(buffer[:-8])
