"""The Ray engines' shares of a step: every prompt exactly once, one share per engine dealt longest prompt first;
the per-sample seeds and per-prompt caps both engines check."""

import pytest

from megatron_scope.rollout.ray_engine import engine_shares


def test_each_engine_gets_one_share_dealt_longest_first():
    lengths = [3, 9, 1, 9, 4, 7, 2, 8, 5, 6]
    shares = engine_shares(lengths, num_engines=3)
    assert shares == [[1, 5, 4, 2], [3, 9, 0], [7, 8, 6]]  # 9 9 8 | 7 6 5 | 4 3 2 | 1; equal lengths keep batch order
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in share) for share in shares]
    assert max(totals) - min(totals) <= max(lengths)


@pytest.mark.parametrize("num_prompts,num_engines,expected", [(0, 2, 0), (3, 4, 3), (8, 2, 2), (100, 3, 3)])
def test_share_count(num_prompts, num_engines, expected):
    shares = engine_shares([1] * num_prompts, num_engines)
    assert len(shares) == expected and sum(map(len, shares)) == num_prompts and all(shares)


def test_per_prompt_plan_defaults_and_refusals():
    """The per-sample seeds and per-prompt caps both engines (vLLM, Ray) check before any request starts."""
    from megatron_scope.rollout.engine import SamplingParams, per_prompt_plan

    params = SamplingParams(n=2, max_new_tokens=8)
    assert per_prompt_plan([[1], [2]], params, None, None) == ([[None, None], [None, None]], [8, 8])
    assert per_prompt_plan([[1], [2]], params, ((5, 6), (3, 4)), (1, 8)) == ([[5, 6], [3, 4]], [1, 8])
    with pytest.raises(ValueError, match=r"generate: 1 seed groups and 2 max_new_tokens for 2 prompts"):
        per_prompt_plan([[1], [2]], params, [[0, 1]], None)
    with pytest.raises(ValueError, match=r"every prompt needs n=2 seeds, got \[1\]"):
        per_prompt_plan([[1], [2]], params, [[0, 1], [2]], None)
    with pytest.raises(ValueError, match=r"max_new_tokens must lie in \[1, 8\], got \[0, 9\]"):
        per_prompt_plan([[1], [2], [3]], params, None, [0, 8, 9])
