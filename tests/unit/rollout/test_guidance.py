"""TrOPD's off-policy guidance on the rollout side: the α schedule, which prompts are guided, the prefix cut, how the
teacher's prefixes and the student's continuations are joined (seeds, caps, log-probs), and the batch's prefix mask."""

import math

import pytest
import torch

from megatron_scope.rollout.batch import RolloutGroup, build_batch
from megatron_scope.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_scope.rollout.guidance import guidance_alpha, guided_generate, is_guided, teacher_prefix

EOS = 2


def test_alpha_anneals_from_one_by_a_cosine():
    assert guidance_alpha(1, 10) == 1.0
    assert guidance_alpha(6, 10) == pytest.approx(0.5)
    assert guidance_alpha(10, 10) == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2)
    assert all(guidance_alpha(t, 10) > guidance_alpha(t + 1, 10) for t in range(1, 10))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1 / 3, 1.0])
def test_a_share_of_the_prompts_is_guided_spread_over_the_batch(fraction):
    guided = [i for i in range(12) if is_guided(i, fraction)]
    assert len(guided) == math.floor(12 * fraction + 1e-9)
    assert all(b - a >= math.floor(1 / fraction) for a, b in zip(guided, guided[1:])) if fraction else not guided


def test_prefix_keeps_floor_alpha_of_the_response_without_its_stop_token():
    response = Completion([5, 6, 7, 8, EOS], [-0.1, -0.2, -0.3, -0.4, -0.5], "stop")
    assert teacher_prefix(response, 1.0, 16, (EOS,)).token_ids == [5, 6, 7, 8]  # never the stop token
    half = teacher_prefix(response, 0.6, 16, (EOS,))
    assert (half.token_ids, half.log_probs) == ([5, 6], [-0.1, -0.2])  # floor(0.6 x 4)
    assert teacher_prefix(response, 1.0, 3, (EOS,)).token_ids == [5, 6]  # the student writes at least one token
    truncated = Completion([5, 6, 7, 8], [-0.1] * 4, "length")  # no stop token to drop
    assert teacher_prefix(truncated, 0.5, 16, (EOS,)).token_ids == [5, 6]
    assert teacher_prefix(response, 0.0, 16, (EOS,)).token_ids == []


class RecordingEngine(RolloutEngine):
    """Writes response j of a prompt as [base + seed] x 3 + [EOS], seed = params.seed + index n + j (the engine
    contract), truncated to its cap; records each call, and refuses to wake while its peer is awake."""

    def __init__(self, base, generated):
        self.base, self.calls, self.awake, self.generated, self.peer = base, [], False, generated, None

    def generate(self, prompts, params, indices=None, max_new_tokens=None):
        assert self.awake
        self.generated.append(self.base)
        caps = max_new_tokens or [params.max_new_tokens] * len(prompts)
        self.calls.append((prompts, params, list(indices), list(caps)))
        out = []
        for prompt, index, cap in zip(prompts, indices, caps):
            group = []
            for j in range(params.n):
                tokens = ([self.base + params.seed + index * params.n + j] * 3 + [EOS])[:cap]
                group.append(Completion(tokens, [-1.0 * self.base] * len(tokens), "stop" if EOS in tokens else "length"))
            out.append(group)
        return out

    def update_weights(self, named_tensors):
        raise NotImplementedError

    def wake(self):
        assert not self.peer.awake, "two engines awake at once"
        self.awake = True

    def sleep(self):
        self.awake = False


def test_guided_prompts_continue_the_teachers_prefixes_with_their_own_seeds_and_caps():
    generated = []
    student, teacher = RecordingEngine(100, generated), RecordingEngine(500, generated)
    student.peer, teacher.peer = teacher, student  # they share GPUs: one awake at a time
    student.wake()  # awake after the weight sync
    params = SamplingParams(n=2, max_new_tokens=6, temperature=0.7, top_p=0.9, stop_token_ids=(EOS,), seed=0)
    prompts = [[1, 10], [1, 11], [1, 12], [1, 13]]
    samples, prefixes = guided_generate(student, teacher, prompts, [4, 5, 6, 7], params, 0.5, alpha=0.7)
    # step indices 5 and 7 are guided (f = 0.5): local prompts 1 and 3
    assert prefixes == [[0, 0], [2, 2], [0, 0], [2, 2]]  # floor(0.7 x 3) of the teacher's 3 tokens
    (teacher_prompts, teacher_params, teacher_indices, _), = teacher.calls
    assert teacher_prompts == [[1, 11], [1, 13]] and teacher_indices == [5, 7]
    assert (teacher_params.temperature, teacher_params.top_p, teacher_params.n) == (1.0, 1.0, 2)  # draws from π_T
    assert not teacher.awake and student.awake  # the teacher's put back to sleep, the student's left awake
    assert generated == [500, 100, 100]  # the teacher writes first
    unguided, continued = student.calls
    assert unguided[0] == [[1, 10], [1, 12]] and unguided[2] == [4, 6]
    assert continued[0][0] == [1, 11, 510, 510] and continued[1].n == 1
    assert continued[2] == [10, 11, 14, 15] and continued[3] == [4, 4, 4, 4]  # sample j of prompt i: i n + j
    # sample j keeps its unguided seed: the teacher's tokens, then the student's own stream for sample j
    assert samples[1][1] == Completion([511, 511, 111, 111, 111, EOS], [-500.0] * 2 + [-100.0] * 4, "stop")
    assert samples[0][1].token_ids == [109, 109, 109, EOS]  # seed 0 + 4 n + 1
    group = RolloutGroup("p1", prompts[1], samples[1], [False, True], prefix_lengths=prefixes[1])
    assert group.prefix_lengths == [2, 2]


def test_prefix_mask_marks_the_teachers_tokens_at_their_label_positions():
    groups = [RolloutGroup("a", [1, 5, 6], [Completion([7, 8, 9], [0.0] * 3, "stop"), Completion([7], [0.0], "stop")],
                           [True, False], prefix_lengths=[2, 0])]
    batch = build_batch(groups, 8, pad_id=0)
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, 2:4] = True  # labels 7 and 8 sit at positions 2 and 3 (prompt of 3 tokens)
    assert torch.equal(batch["prefix_mask"], expected)
    assert torch.equal(batch["labels"][0, 2:4], torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="prefix lengths \\[4, 0\\] do not fit"):
        RolloutGroup("a", [1], groups[0].completions, [True, False], prefix_lengths=[4, 0])
    with pytest.raises(ValueError, match="some groups carry prefix lengths and some do not"):
        build_batch([groups[0], RolloutGroup("b", [1], groups[0].completions, [True, False])], 8, pad_id=0)
