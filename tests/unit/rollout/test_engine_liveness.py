"""VLLMRolloutEngine._call, the guard around every vLLM call, without vLLM: a stand-in engine-core process
that dies, a call that never answers, vLLM's own error after a death, and errors that pass through."""

import signal
import threading
import time
from types import SimpleNamespace

import pytest

from megatron_scope.rollout.engine import RolloutEngineDiedError
from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine


class StandInProcess:
    name, pid, exitcode = "EngineCore", 4242, None


def stand_in_engine(call_timeout_s=None):
    """A VLLMRolloutEngine whose `_llm` is a stand-in with one engine-core process (vLLM never starts)."""
    engine = VLLMRolloutEngine.__new__(VLLMRolloutEngine)
    engine.config = VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, call_timeout_s=call_timeout_s)
    engine._died = None
    process = StandInProcess()
    resources = SimpleNamespace(engine_dead=False, engine_manager=SimpleNamespace(processes=[process]))
    engine._llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(resources=resources)))
    return engine, process, resources


def test_a_call_waiting_on_a_process_that_dies_raises_promptly():
    engine, process, _ = stand_in_engine()
    never = threading.Event()
    killer = threading.Timer(0.3, lambda: setattr(process, "exitcode", -signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(RolloutEngineDiedError) as raised:
        engine._call("generate", never.wait)
    assert time.monotonic() - start < 5
    assert str(raised.value) == (
        "vLLM rollout engine on '/models/student': its EngineCore process (pid 4242) died (killed by SIGKILL) "
        "during generate; it cannot be used again: restart the run (--load resumes from the last complete checkpoint)")
    with pytest.raises(RolloutEngineDiedError, match="during generate"):  # refused from now on, same message
        engine._call("update_weights", lambda: "never called")
    never.set()


def test_vllms_own_error_after_a_death_names_the_process():
    engine, process, resources = stand_in_engine()

    def dies():
        process.exitcode = 3
        raise RuntimeError("EngineCore encountered an issue")

    with pytest.raises(RolloutEngineDiedError,
                       match=r"EngineCore process \(pid 4242\) died \(exit code 3\) during score"):
        engine._call("score", dies)
    engine, process, resources = stand_in_engine()
    resources.engine_dead = True  # vLLM noticed first (e.g. the core reported its own failure)
    with pytest.raises(RolloutEngineDiedError, match="vLLM reports its engine core dead during generate"):
        engine._call("generate", lambda: None)


def test_a_call_past_the_timeout_counts_as_hung():
    engine, _, _ = stand_in_engine(call_timeout_s=0.3)
    never = threading.Event()
    with pytest.raises(RolloutEngineDiedError, match=r"no answer within call_timeout_s=0.3 s during update_weights"):
        engine._call("update_weights", never.wait)
    never.set()
    with pytest.raises(ValueError, match="call_timeout_s must be > 0"):
        VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, call_timeout_s=0)


def test_results_and_other_errors_pass_through_while_alive():
    engine, _, _ = stand_in_engine(call_timeout_s=10)
    assert engine._call("generate", lambda a, b=0: a + b, 2, b=3) == 5

    def bad():
        raise ValueError("prompt 3 is too long")

    with pytest.raises(ValueError, match="prompt 3 is too long"):
        engine._call("generate", bad)
    assert engine._died is None and engine._call("generate", lambda: "still usable") == "still usable"
