"""--distributed-timeout-minutes reaches torch.distributed's default group and megatron-core's groups."""

import datetime

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_scope.megatron import parallel


def test_the_timeout_reaches_init_process_group_and_megatron_cores_groups(monkeypatch):
    calls = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.update(init=(backend, timeout)))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(parallel.cpu_compat, "install", lambda: None)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **kwargs: calls.update(megatron=kwargs))
    monkeypatch.setattr(parallel, "model_parallel_cuda_manual_seed", lambda seed: None)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # unset here, restored afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    parallel.init_distributed(timeout_minutes=90)
    parallel.initialize_model_parallel(2, 1, seed=1, timeout_minutes=90)
    assert calls["init"] == ("gloo", datetime.timedelta(minutes=90))
    assert calls["megatron"] == dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
                                     distributed_timeout_minutes=90)
