"""TrOPD's off-policy guidance on the rollout side: the α schedule, which prompts are guided, the prefix cut, how the
teacher's prefixes and the student's continuations are joined (seeds, caps, log-probs), and the batch's prefix mask."""

import math

import pytest
import torch

from megatron_scope.rollout.batch import RolloutGroup, build_batch
from megatron_scope.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_scope.rollout.guidance import guidance_alpha, guided_generate, is_guided, teacher_prefix
from megatron_scope.rollout.seeds import StepSeeds

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
    """Writes sample j of a prompt as [base + its seed's call-order number] x 3 + [EOS], truncated to its cap (so a
    test can tell which seed drew which tokens); records each call, and refuses to wake while its peer is awake."""

    def __init__(self, base, generated):
        self.base, self.calls, self.awake, self.generated, self.peer = base, [], False, generated, None

    def generate(self, prompts, params, seeds=None, max_new_tokens=None):
        assert self.awake
        self.generated.append(self.base)
        caps = max_new_tokens or [params.max_new_tokens] * len(prompts)
        self.calls.append((prompts, params, seeds, list(caps)))
        out = []
        for i, (prompt, cap) in enumerate(zip(prompts, caps)):
            group = []
            for j in range(params.n):
                tokens = ([self.base + 10 * i + j] * 3 + [EOS])[:cap]
                group.append(Completion(tokens, [-1.0 * self.base] * len(tokens), "stop" if EOS in tokens else "length"))
            out.append(group)
        return out

    def update_weights(self, named_tensors):
        raise NotImplementedError

    def wake(self, tags=None):
        peers = self.peer if isinstance(self.peer, list) else [self.peer]
        assert not any(peer.awake for peer in peers), "two engines awake at once"
        self.awake = True

    def sleep(self, level=1):
        assert level == 1, "an engine that sleeps mid-rollout keeps its weights"
        self.awake = False


def test_guided_prompts_continue_the_teachers_prefixes_with_their_own_seeds_and_caps():
    generated = []
    student, teacher = RecordingEngine(100, generated), RecordingEngine(500, generated)
    student.peer, teacher.peer = teacher, student  # they share GPUs: one awake at a time
    student.wake()  # awake after the weight sync
    params = SamplingParams(n=2, max_new_tokens=6, temperature=0.7, top_p=0.9, stop_token_ids=(EOS,))
    prompts = [[1, 10], [1, 11], [1, 12], [1, 13]]
    seeds = StepSeeds(0, 3)
    samples, prefixes = guided_generate(student, [teacher] * 4, prompts, [4, 5, 6, 7], params, seeds, 0.5,
                                        alpha=0.7)
    # step indices 5 and 7 are guided (f = 0.5): local prompts 1 and 3
    assert prefixes == [[0, 0], [2, 2], [0, 0], [2, 2]]  # floor(0.7 x 3) of the teacher's 3 tokens
    (teacher_prompts, teacher_params, teacher_seeds, _), = teacher.calls
    assert teacher_prompts == [[1, 11], [1, 13]]
    assert teacher_seeds == seeds.groups([5, 7], 2, "teacher_prefix")
    assert (teacher_params.temperature, teacher_params.top_p, teacher_params.n) == (1.0, 1.0, 2)  # draws from π_T
    assert not teacher.awake and student.awake  # the teacher's put back to sleep, the student's left awake
    assert generated == [500, 100]  # the teacher writes first; then the student draws the whole step in one call
    (requests, request_params, request_seeds, caps), = student.calls
    assert request_params.n == 1  # one request per sample, in prompt order: sample j of prompt i is row 2 i + j
    assert requests == [[1, 10], [1, 10], [1, 11, 500, 500], [1, 11, 501, 501], [1, 12], [1, 12],
                        [1, 13, 510, 510], [1, 13, 511, 511]]
    # an unguided sample keeps its "rollout" seed; a continuation its own "continuation" seed, never the teacher's
    assert request_seeds == [[seeds.seed(index, j, "continuation" if index in (5, 7) else "rollout")]
                             for index in (4, 5, 6, 7) for j in (0, 1)]
    assert caps == [6, 6, 4, 4, 6, 6, 4, 4]  # max_new_tokens minus the prefix's 2 tokens
    assert samples[1][1] == Completion([501, 501, 130, 130, 130, EOS], [-500.0] * 2 + [-100.0] * 4, "stop")
    assert samples[0][1].token_ids == [110, 110, 110, EOS]
    group = RolloutGroup("p1", prompts[1], samples[1], [False, True], prefix_lengths=prefixes[1])
    assert group.prefix_lengths == [2, 2]


def test_each_guided_prompt_continues_its_own_teachers_prefix():
    """Two routed teachers (several --teacher): each writes the prefixes of its guided prompts only, one engine awake at
    a time, each with the seeds of its prompts' step indices (as with one teacher)."""
    generated = []
    student, first, second = (RecordingEngine(base, generated) for base in (100, 500, 700))
    for engine in (student, first, second):
        engine.peer = [other for other in (student, first, second) if other is not engine]
    student.wake()
    params = SamplingParams(n=2, max_new_tokens=6, stop_token_ids=(EOS,))
    prompts = [[1, 10], [1, 11], [1, 12], [1, 13]]
    seeds = StepSeeds(0, 3)
    samples, prefixes = guided_generate(student, [first, second, first, first], prompts, [0, 1, 2, 3], params, seeds,
                                        1.0, alpha=1.0)  # every prompt guided
    assert generated == [500, 700, 100]  # each teacher once, in prompt order; then the student's one call
    ((first_prompts, _, first_seeds, _),), ((second_prompts, _, second_seeds, _),) = first.calls, second.calls
    assert first_prompts == [[1, 10], [1, 12], [1, 13]] and first_seeds == seeds.groups([0, 2, 3], 2, "teacher_prefix")
    assert second_prompts == [[1, 11]] and second_seeds == seeds.groups([1], 2, "teacher_prefix")
    # prompt i's prefixes are its own teacher's (the i-th of that teacher's call)
    assert [samples[i][0].token_ids[:3] for i in range(4)] == [[500] * 3, [700] * 3, [510] * 3, [520] * 3]
    assert prefixes == [[3, 3]] * 4 and not first.awake and not second.awake and student.awake


class MarkovEngine(RolloutEngine):
    """A tiny model sampled as vLLM samples: each request draws its tokens from its own torch generator seeded with its
    seed. Tokens 0..3 (no stop token); the next token's distribution depends on the last token only
    (`TRANSITIONS[last]`, the prompt's last token for the first)."""

    def __init__(self):
        self.awake = False

    def generate(self, prompts, params, seeds=None, max_new_tokens=None):
        caps = max_new_tokens or [params.max_new_tokens] * len(prompts)
        out = []
        for prompt, group, cap in zip(prompts, seeds, caps):
            completions = []
            for seed in group:
                generator, tokens, log_probs = torch.Generator().manual_seed(seed), [], []
                for _ in range(cap):
                    probs = TRANSITIONS[(tokens or prompt)[-1]]
                    token = int(torch.multinomial(probs, 1, generator=generator))
                    tokens.append(token)
                    log_probs.append(math.log(probs[token]))
                completions.append(Completion(tokens, log_probs, "length"))
            out.append(completions)
        return out

    def update_weights(self, named_tensors):
        raise NotImplementedError

    def wake(self, tags=None):
        self.awake = True

    def sleep(self, level=1):
        self.awake = False


TRANSITIONS = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]],
                           dtype=torch.float64)


def _joint_chi_square(seeds) -> float:
    """Pearson's χ² of the (teacher's prefix token, continuation's first token) pairs of 2000 guided prompts x 2
    samples against π_T(y1) π_S(z | y1), teacher and student the same chain (the case where shared noise shows
    most); 15 degrees of freedom."""
    engine, teacher = MarkovEngine(), MarkovEngine()
    prompts, indices = [[3]] * 2000, list(range(2000))
    params = SamplingParams(n=2, max_new_tokens=2)  # the teacher writes 2 tokens; α = 0.5 keeps 1, the student adds 1
    samples, prefix_lengths = guided_generate(engine, [teacher] * len(prompts), prompts, indices, params, seeds, 1.0,
                                                    alpha=0.5)
    assert all(k == 1 for row in prefix_lengths for k in row)
    counts = torch.zeros(4, 4, dtype=torch.float64)
    for group in samples:
        for completion in group:
            counts[completion.token_ids[0], completion.token_ids[1]] += 1
    expected = counts.sum() * TRANSITIONS[3][:, None] * TRANSITIONS
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_continuation_is_drawn_independently_of_its_teacher_prefix():
    """The joint draw (prefix, continuation's first token) has the distribution π_T(prefix) π_S(· | prefix): χ² with 15
    degrees of freedom below its 0.999 quantile (37.7). Merging the streams (the continuation seeded as the
    teacher's sample, the old `seed + i n + j` overlap) fails the same test by far."""
    assert _joint_chi_square(StepSeeds(0, 1)) < 37.7

    class MergedStreams(StepSeeds):
        def seed(self, prompt_index, sample_index, stream):
            return super().seed(prompt_index, sample_index, "rollout")

    assert _joint_chi_square(MergedStreams(0, 1)) > 1000


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
