"""RayRolloutEngine: one vLLM engine in a Ray actor on a local Ray, a tied-embedding GQA model.

Checks the interface end to end through Ray: generation, the parity of log-probs with transformers before
and after a weight update streamed in buckets, and that errors raised in the actor reach the caller.
"""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from megatron_scope.rollout.engine import SamplingParams  # noqa: E402
from megatron_scope.rollout.ray_engine import RayRolloutEngine  # noqa: E402
from megatron_scope.rollout.seeds import StepSeeds  # noqa: E402
from megatron_scope.rollout.vllm_engine import VLLMEngineConfig  # noqa: E402
from tests.integration.hf_models import hf_weights, random_qwen2, tiny_qwen2_config, token_log_probs  # noqa: E402

TOLERANCE = 1e-4
SEQUENCE = [5, 17, 123, 42, 499, 0, 256, 311, 77, 8, 150, 64]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    config = tiny_qwen2_config(num_kv_heads=1, num_layers=2, tie_word_embeddings=True)  # GQA, tied head
    path = tmp_path_factory.mktemp("tiny_qwen2_tied")
    model = random_qwen2(config, seed=10)
    model.save_pretrained(path)
    engine = RayRolloutEngine(
        VLLMEngineConfig(str(path), kv_cache_bytes=8 << 20, max_model_len=64, max_num_seqs=16,
                         weight_bucket_bytes=48 << 10)
    )
    yield engine, model, random_qwen2(config, seed=11)
    engine.close()


def assert_scores_match(engine, model):
    got = torch.tensor(engine.score([SEQUENCE])[0])
    diff = (got - token_log_probs(model, SEQUENCE[:1], SEQUENCE[1:])).abs().max().item()
    assert diff <= TOLERANCE, f"vLLM (in a Ray actor) vs transformers log-probs differ by {diff}"


@pytest.mark.slow
def test_generate_through_ray_matches_transformers(setup):
    engine, model, _ = setup
    prompts = [[1, 2, 3], [9]]
    groups = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5, temperature=1.0),
                             StepSeeds(0, 0).groups(range(len(prompts)), 2, "rollout"))
    assert [len(g) for g in groups] == [2, 2]
    for prompt, group in zip(prompts, groups):
        for completion in group:
            assert len(completion.token_ids) == 5 and completion.finish_reason == "length"
            expected = token_log_probs(model, prompt, completion.token_ids)
            assert (torch.tensor(completion.log_probs) - expected).abs().max() <= TOLERANCE


@pytest.mark.slow
def test_update_weights_streams_buckets_to_the_actor(setup):
    engine, model, other = setup
    assert "lm_head.weight" not in dict(hf_weights(model))  # tied: the head is the embedding
    assert_scores_match(engine, model)
    engine.update_weights(iter(hf_weights(other)))
    assert_scores_match(engine, other)
    engine.update_weights(hf_weights(model))
    assert_scores_match(engine, model)


@pytest.mark.slow
def test_actor_errors_reach_the_caller(setup, tmp_path):
    engine, model, _ = setup
    with pytest.raises(ValueError, match="prompt 0 has token ids outside"):
        engine.generate([[1, 10_000]], SamplingParams(max_new_tokens=2))
    weights = hf_weights(model)
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([(weights[0][0], weights[0][1][:3])] + weights[1:])
    assert_scores_match(engine, model)  # nothing was sent: the old weights are intact
    with pytest.raises(FileNotFoundError, match="missing_model"):
        RayRolloutEngine(VLLMEngineConfig(str(tmp_path / "missing_model"), kv_cache_bytes=1 << 24))
