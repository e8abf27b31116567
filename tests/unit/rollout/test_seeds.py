"""Every draw's seed is a hash of what the draw is: no two draws of a run share one, and the same draw always gets
the same seed (runs reproduce, whatever engine draws it)."""

import pytest

from megatron_scope.rollout.seeds import STREAMS, StepSeeds, draw_seed


def test_no_two_draws_of_a_run_share_a_seed():
    """60 iterations x 64 prompts x 8 samples x every stream: 153,600 draws, 153,600 seeds, each in [0, 2^63). The
    offset sum this replaces (seed + iteration + i G + j) collides on most of them."""
    seeds = [draw_seed(1234, t, i, j, stream)
             for t in range(1, 61) for i in range(64) for j in range(8) for stream in STREAMS]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= seed < 2**63 for seed in seeds)
    offset_sums = [1234 + t + i * 8 + j for t in range(1, 61) for i in range(64) for j in range(8)]
    assert len(set(offset_sums)) < len(offset_sums) / 50


def test_a_draw_is_a_pure_function_of_its_name():
    step = StepSeeds(7, 3)
    assert step.seed(5, 2, "rollout") == draw_seed(7, 3, 5, 2, "rollout") == StepSeeds(7, 3).seed(5, 2, "rollout")
    assert step.groups([5, 9], 3, "continuation") == [[draw_seed(7, 3, i, j, "continuation") for j in range(3)]
                                                      for i in (5, 9)]
    assert len({draw_seed(*name) for name in [(7, 3, 5, 2, "rollout"), (8, 3, 5, 2, "rollout"),
                                              (7, 4, 5, 2, "rollout"), (7, 3, 6, 2, "rollout"),
                                              (7, 3, 5, 3, "rollout"), (7, 3, 5, 2, "evaluation")]}) == 6
    with pytest.raises(ValueError, match="unknown random stream 'prefix'"):
        draw_seed(7, 3, 5, 2, "prefix")


def test_each_segment_of_a_response_has_a_seed_of_its_own():
    """Partial rollouts: segment k >= 1 of a response is a new request on the resubmission stream, seeded apart from
    the response's first segment, from its other segments and from every other draw of the step."""
    step = StepSeeds(7, 3)
    segments = [step.seed(5, 2, "resubmission", k) for k in range(1, 50)]
    others = [step.seed(i, j, stream) for i in range(8) for j in range(4) for stream in STREAMS]
    assert len(set(segments + others)) == len(segments) + len(others)
    assert step.seed(5, 2, "resubmission", 0) == step.seed(5, 2, "resubmission")  # segment 0: the plain name
    with pytest.raises(ValueError, match="segment 1 of stream 'rollout'"):
        step.seed(5, 2, "rollout", 1)
    with pytest.raises(ValueError, match="segment -1"):
        step.seed(5, 2, "resubmission", -1)
