"""The Ray engines' work queue: every prompt exactly once, longest prompts first, several chunks per engine; the
per-sample seeds and per-prompt caps both engines check."""

import pytest

from megatron_scope.rollout.ray_engine import queue_chunks


def test_chunks_cover_every_prompt_once_longest_first():
    lengths = [3, 9, 1, 9, 4, 7, 2, 8, 5, 6]
    chunks = queue_chunks(lengths, num_engines=2, chunks_per_engine=2)
    assert len(chunks) == 4 and all(chunks)
    order = [i for chunk in chunks for i in chunk]
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order[:2] == [1, 3]  # equal lengths keep their batch order


@pytest.mark.parametrize("num_prompts,num_engines,expected", [(0, 2, 0), (3, 4, 3), (8, 2, 8), (100, 3, 12)])
def test_chunk_count(num_prompts, num_engines, expected):
    chunks = queue_chunks([1] * num_prompts, num_engines)
    assert len(chunks) == expected and sum(map(len, chunks)) == num_prompts


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
