"""RayRolloutEngine: one vLLM engine in a Ray actor on a local Ray, a tied-embedding GQA model.

Checks the interface end to end through Ray: generation, the parity of log-probs with transformers before
and after a weight update streamed in buckets, and that errors raised in the actor reach the caller. The refit by
vLLM's NCCL backend (Ray engines on GPUs of their own): its protocol on CPU over recording actors, and on two GPUs
for real (`pytest -m gpu`).
"""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from megatron_scope.rollout.engine import Completion, SamplingParams  # noqa: E402
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


# ------------------------------------------------------------------------------------------ the NCCL refit's protocol
class RecordingEngineActor:
    """The actor side of a "nccl" refit (`RolloutEngineActor`'s method names), recording each call."""

    def __init__(self):
        self.calls = []

    def join_weight_broadcast(self, init_info):
        self.calls.append(("join", init_info))

    def begin_weight_update(self):
        self.calls.append("begin")

    def receive_weights(self, names, dtype_names, shapes):
        self.calls.append(("receive", names, dtype_names, shapes))

    def abort_weight_update(self):
        self.calls.append("abort")

    def finish_weight_update(self):
        self.calls.append("finish")

    def close(self):
        pass

    def recorded(self):
        return self.calls


NCCL_SHAPES = {"model.embed_tokens.weight": (64, 32), "model.layers.0.mlp.up_proj.weight": (48, 32),
               "model.norm.weight": (32,)}


@pytest.fixture
def nccl_engine(ray_session, monkeypatch):
    """A RayRolloutEngine of two TP = 2 engines refitting by "nccl", over recording actors (no vLLM) and a recording
    broadcast: vLLM's real worker init infos, the bytes kept instead of sent through NCCL (CPU)."""
    from megatron_scope.rollout import vllm_weight_transfer

    class RecordingBroadcast(vllm_weight_transfer.NCCLBroadcast):
        sent: list = []

        def open(self):
            self.device = torch.device("cpu")

        def send(self, named_tensors):
            RecordingBroadcast.sent.append([(name, tensor.clone()) for name, tensor in named_tensors])

    monkeypatch.setattr(vllm_weight_transfer, "NCCLBroadcast", RecordingBroadcast)
    engine = RayRolloutEngine.__new__(RayRolloutEngine)
    engine.config = VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, tensor_parallel_size=2,
                                     weight_transfer="nccl", weight_bucket_bytes=7 << 10)
    engine._dtype, engine._weight_shapes, engine._broadcast = torch.bfloat16, NCCL_SHAPES, None
    engine._actors = [ray.remote(RecordingEngineActor).options(num_cpus=0).remote() for _ in range(2)]
    yield engine, RecordingBroadcast.sent
    engine.close()


def test_an_nccl_refit_joins_once_then_broadcasts_each_checked_bucket_while_every_engine_receives(nccl_engine):
    engine, sent = nccl_engine
    generator = torch.Generator().manual_seed(0)
    weights = [(name, torch.randn(shape, generator=generator)) for name, shape in NCCL_SHAPES.items()]
    engine.update_weights(iter(weights))
    engine.update_weights(iter(weights))
    calls = [ray.get(actor.recorded.remote()) for actor in engine._actors]
    joins = [[c[1] for c in engine_calls if c[0] == "join"] for engine_calls in calls]
    assert [len(j) for j in joins] == [1, 1]  # the group is opened at the first refit only
    assert [j[0]["rank_offset"] for j in joins] == [1, 3] and {j[0]["world_size"] for j in joins} == {5}
    assert all(j[0]["packed"] and j[0]["packed_buffer_size_bytes"] == 7 << 10 for j in joins)
    # 4 KiB + 3 KiB in bf16 fill one 7 KiB bucket; the norm takes the next
    buckets = [["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"], ["model.norm.weight"]]
    receives = [("receive", names, ["bfloat16"] * len(names), [list(NCCL_SHAPES[n]) for n in names]) for names in buckets]
    assert calls[0][1:] == calls[1][1:] == ["begin", *receives, "finish"] * 2
    assert [[name for name, _ in bucket] for bucket in sent] == buckets * 2
    for name, tensor in (pair for bucket in sent for pair in bucket):  # what left: the engine's dtype, same values
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, dict(weights)[name].to(torch.bfloat16))


def test_a_bad_tensor_is_refused_before_its_bucket_is_broadcast_and_the_engines_abort(nccl_engine):
    engine, sent = nccl_engine
    consumed = []

    def stream():
        for name, shape in NCCL_SHAPES.items():
            consumed.append(name)
            yield name, torch.zeros(shape if name != "model.norm.weight" else (31,))

    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(31,\), the checkpoint's is \(32,\)"):
        engine.update_weights(stream())
    assert consumed == list(NCCL_SHAPES)  # drained: the other trainer ranks are inside the stream's collectives
    assert [[name for name, _ in bucket] for bucket in sent] == [list(NCCL_SHAPES)[:2]]  # the bad bucket never left
    calls = ray.get(engine._actors[0].recorded.remote())
    assert calls[-1] == "abort" and "finish" not in calls
    with pytest.raises(ValueError, match=r"update_weights ended without 1 of 3 tensors, e.g. \['model.norm.weight'\]"):
        engine.update_weights(iter([(name, torch.zeros(shape)) for name, shape in NCCL_SHAPES.items()][:2]))


@pytest.mark.gpu
def test_an_nccl_refit_on_a_gpu_of_its_own_reaches_the_weights_vllm_scores_with(ray_session, tmp_path):
    """Two GPUs: the engine on the one Ray gives it, this process (the trainer's leader) broadcasting from another."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices: the engine's and the trainer's")
    config = tiny_qwen2_config(num_kv_heads=1, num_layers=2, tie_word_embeddings=True)
    random_qwen2(config, seed=10).save_pretrained(tmp_path)
    engine = RayRolloutEngine(VLLMEngineConfig(str(tmp_path), kv_cache_bytes=8 << 20, max_model_len=64,
                                               max_num_seqs=16, weight_transfer="nccl", weight_bucket_bytes=48 << 10),
                              actor_options={"num_gpus": 1})
    try:
        (engine_gpus,) = engine.gpu_ids
        torch.cuda.set_device(next(d for d in range(torch.cuda.device_count()) if str(d) not in map(str, engine_gpus)))
        other = random_qwen2(config, seed=11)
        engine.update_weights((name, tensor.cuda()) for name, tensor in hf_weights(other))
        assert_scores_match(engine, other)
        engine.update_weights((name, tensor.cuda()) for name, tensor in hf_weights(other))  # the group is reused
        assert_scores_match(engine, other)
    finally:
        engine.close()


class ScoringActor:
    """Stands in for an engine's scoring: log-prob -token at each scored position (top-k: the token, k times);
    records the sequences it was given."""

    def __init__(self):
        self.seen = []

    def score(self, sequences, first=None):
        self.seen.append(sequences)
        return [[-float(t) for t in s[(1 if first is None else f):]] for s, f in zip(sequences, first or sequences)]

    def score_topk(self, sequences, k, first=None):
        from megatron_scope.rollout.engine import SequenceScores

        return [SequenceScores.from_lists(scores, [[t] * k for t in s[1:]], [[0.0] * k for _ in s[1:]])
                for s, scores in zip(sequences, self.score(sequences, first))]

    def recorded(self):
        return self.seen

    def close(self):
        pass


def test_scoring_is_sharded_over_every_engine_by_tokens(ray_session):
    """A vLLM teacher of 3 Ray engines (--teacher-engines 3): each scores one contiguous shard of about equal tokens
    at once, and the results come back in the input's order, as one engine gives them; with fewer sequences than
    engines the rest get none."""
    from megatron_scope.rollout.ray_engine import token_shards

    engine = RayRolloutEngine.__new__(RayRolloutEngine)
    engine._actors = [ray.remote(ScoringActor).options(num_cpus=0).remote() for _ in range(3)]
    lengths = [30, 2, 2, 9, 9, 9, 3, 30, 5, 1]
    sequences = [list(range(i, i + n)) for i, n in enumerate(lengths)]
    first = [1 + i % 3 for i in range(len(sequences))]
    assert engine.score(sequences, first) == [[-float(t) for t in s[f:]] for s, f in zip(sequences, first)]
    seen = [shard for actor in engine._actors for shard in ray.get(actor.recorded.remote())]
    assert [s for shard in seen for s in shard] == sequences and len(seen) == 3  # contiguous, in order, once each
    assert max(sum(map(len, shard)) for shard in seen) <= sum(lengths) / 3 + max(lengths)
    topk = engine.score_topk(sequences[:2], 2)
    assert [scores.log_probs.tolist() for scores in topk] == [[-float(t) for t in s[1:]] for s in sequences[:2]]
    assert topk[1].topk_ids.tolist() == [[t, t] for t in sequences[1][1:]]
    assert token_shards([4, 4], 3) == [range(0, 1), range(1, 2)] and token_shards([], 3) == []
    engine.close()


class ShareActor:
    """Stands in for an engine's generate: response [t] for each prompt [t]; `hold` makes it wait for `release`."""

    def __init__(self):
        self.released = False

    def generate(self, prompts, params, seeds, caps):
        import time

        from megatron_scope.rollout.engine import Completion

        while not self.released:
            time.sleep(0.005)
        return [[Completion(list(p), [0.0], "stop") for _ in group] for p, group in zip(prompts, seeds)]

    def release(self):
        self.released = True

    def close(self):
        pass


def test_each_engines_share_comes_as_soon_as_it_ends(ray_session):
    """generate_shares yields an engine's share as it ends (here the engine holding prompt 1, while the other one is
    still generating: it ends only once released), and generate puts every share back in the input's order."""
    engine = RayRolloutEngine.__new__(RayRolloutEngine)
    engine._actors = [ray.remote(ShareActor).options(num_cpus=0, max_concurrency=2).remote() for _ in range(2)]
    ray.get(engine._actors[1].release.remote())
    prompts, params = [[7, 7, 7], [8], [9, 9]], SamplingParams(n=2)  # shares (longest first): [0, 1] and [2]
    shares = engine.generate_shares(prompts, params)
    responses = [[Completion(p, [0.0], "stop")] * 2 for p in prompts]
    assert next(shares) == ([2], responses[2:])
    ray.get(engine._actors[0].release.remote())
    assert next(shares) == ([0, 1], responses[:2])
    assert next(shares, None) is None
    assert engine.generate(prompts, params) == responses
    engine.close()
