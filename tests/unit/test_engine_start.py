"""How train.py starts a leader's engines: one at a time, each asleep before the next starts (the rollout engine at
level 2, a refit follows; teacher and reference at level 1), the engines closed when a later start fails; and the
gpu_memory_utilization that lets vLLM's start-up check pass beside the trainer."""

from types import SimpleNamespace

import pytest
import torch

from megatron_scope import train
from megatron_scope.config import RolloutConfig
from megatron_scope.testing.tiny import tiny_run_config


def _start_all(monkeypatch, config, fail_on=None):
    """start_engines with start_engine recording (name, the residency's holder when it starts, later calls)."""
    events = []

    def start(config, model_dir, num_ray_engines, max_logprobs=0, residency=None, name="rollout"):
        if name == fail_on:
            raise RuntimeError(f"the {name} engine failed to start")
        residency.acquire(name)  # what VLLMRolloutEngine does at its start
        events.append(("start", name))

        def sleep(level):
            residency.release(name)
            events.append(("sleep", name, level))

        return SimpleNamespace(sleep=sleep, close=lambda: events.append(("close", name)))

    monkeypatch.setattr(train, "start_engine", start)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    try:
        return train.start_engines(config, "reference_hf"), events
    except RuntimeError as error:
        return str(error), events


def test_each_engine_sleeps_before_the_next_starts(monkeypatch):
    config = tiny_run_config(models=dict(teacher_backend="vllm", reference_backend="vllm"),
                             loss=dict(algorithm="exopd"), rollout=dict(placement="rank0"))
    engines, events = _start_all(monkeypatch, config)
    assert all(engine is not None for engine in engines)
    assert events == [("start", "rollout"), ("sleep", "rollout", 2), ("start", "teacher"), ("sleep", "teacher", 1),
                      ("start", "reference"), ("sleep", "reference", 1)]


def test_a_failed_start_closes_the_engines_already_started(monkeypatch):
    config = tiny_run_config(models=dict(teacher_backend="vllm"), loss=dict(kl="k1"), rollout=dict(placement="rank0"))
    error, events = _start_all(monkeypatch, config, fail_on="teacher")
    assert error == "the teacher engine failed to start"
    assert events == [("start", "rollout"), ("sleep", "rollout", 2), ("close", "rollout")]


def test_the_start_up_utilization_leaves_room_for_the_engines_contexts(monkeypatch):
    rollout = RolloutConfig()
    assert train.engine_memory_utilization(rollout, on_these_gpus=False) is None  # Ray engines: vLLM's default
    assert train.engine_memory_utilization(RolloutConfig(gpu_memory_utilization=0.5), on_these_gpus=True) == 0.5
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (67 * gib, 80 * gib))  # the trainer holds 13 GiB
    assert train.engine_memory_utilization(rollout, on_these_gpus=True) == pytest.approx(0.8125)  # (67 - 2) / 80
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1 * gib, 80 * gib))
    with pytest.raises(ValueError, match="1.0 of 80.0 GiB of GPU memory are free: no room to start a vLLM engine"):
        train.engine_memory_utilization(rollout, on_these_gpus=True)
