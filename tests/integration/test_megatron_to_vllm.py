"""Megatron (TP=1, TP=2, PP=2 on gloo ranks) -> HF names (weight_export.iter_hf_weights) -> vLLM parity.

Each layout's ranks build a random TINY_ARCH student, compute its own log-probs of a fixed sequence
(vocab-parallel logits gathered over TP, last pipeline stage), export it with `iter_hf_weights` on rank 0,
take one SGD step and export again. The test process streams each export into one vLLM engine and checks
that vLLM's log-probs equal the Megatron student's (fp32, max abs diff <= 1e-4), before and after the step.
The ranks are separate processes, so the export reaches the engine through a safetensors file written by
rank 0 (`save_safetensors_checkpoint`) and is streamed from it tensor by tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH, tiny_batches

TOLERANCE = 1e-4
SEQUENCE = [3, 14, 159, 265, 358, 97, 93, 238, 462, 64, 33, 83, 279, 50, 288, 41]
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (TP, PP)


def _megatron_log_probs(model, tokens: list[int]) -> list[float] | None:
    """Log-prob of tokens[1:] given their prefix; on last-stage ranks (others: None). Forward only."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    inputs = torch.tensor([tokens[:-1]])
    labels = torch.tensor(tokens[1:])
    seq_length = inputs.shape[1]

    def loss_func(output):
        logits = gather_from_tensor_model_parallel_region(output)[0, :, : TINY_ARCH.vocab_size]
        log_probs = logits.float().log_softmax(-1).gather(-1, labels[:, None])[:, 0]
        return log_probs.sum(), {"log_probs": log_probs.detach().clone()}

    def forward_step(data_iterator, model):
        next(data_iterator)
        output = model(inputs, torch.arange(seq_length)[None], None)
        return output, loss_func

    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=seq_length, micro_batch_size=1, forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return reports[0]["log_probs"].tolist()


def _sgd_step(model, learning_rate: float) -> None:
    """One plain SGD step on the language-model loss of two tiny microbatches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = tiny_batches(2, seq_length=16)

    def loss_func(loss_mask, per_token_loss):
        loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=2,
        seq_length=16, micro_batch_size=2, forward_only=False,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(param.grad, alpha=-learning_rate)
            param.grad = None


def _export_layout(rank, world_size, tp, pp, out_dir):
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.weight_export import iter_hf_weights, save_safetensors_checkpoint

    initialize_model_parallel(tp, pp, seed=100 * tp + pp)  # each layout its own random student
    model = build_gpt_model(TINY_ARCH)
    log_probs = []
    for step in range(2):
        log_probs.append(_megatron_log_probs(model, SEQUENCE))
        stream = iter_hf_weights(model, TINY_ARCH, bucket_bytes=64 << 10)  # PP=2: buckets between stages
        if rank == 0:
            save_safetensors_checkpoint(stream, os.path.join(out_dir, f"step{step}"))
        else:
            for _ in stream:
                pass
        if step == 0:
            _sgd_step(model, learning_rate=0.5)
    return log_probs


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(tp, pp): (export dir, [Megatron log-probs before, after the step])} for every layout."""
    root = tmp_path_factory.mktemp("megatron_exports")
    result = {}
    for tp, pp in LAYOUTS:
        out_dir = str(root / f"tp{tp}_pp{pp}")
        ranks = run_on_ranks(_export_layout, tp * pp, args=(tp, pp, out_dir), timeout=600)
        reported = [r for r in ranks if r[0] is not None]
        assert len(reported) == tp  # each TP rank of the last stage
        result[(tp, pp)] = (out_dir, reported[0])
    return result


@pytest.fixture(scope="module")
def engine(exports, tmp_path_factory):
    from megatron_scope.megatron.hf_mapping import hf_config_from_arch
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    model_dir = tmp_path_factory.mktemp("vllm_student")
    shutil.copy(os.path.join(exports[LAYOUTS[0]][0], "step0", "model.safetensors"), model_dir)
    with open(model_dir / "config.json", "w") as f:
        json.dump(hf_config_from_arch(TINY_ARCH, "qwen2"), f)
    engine = VLLMRolloutEngine(VLLMEngineConfig(str(model_dir), kv_cache_bytes=16 << 20, max_model_len=64,
                                                max_num_seqs=8, weight_bucket_bytes=96 << 10))
    yield engine
    engine.close()


def _stream(checkpoint_dir):
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint(checkpoint_dir)
    return ((name, checkpoint[name]) for name in checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_vllm_matches_megatron_after_each_sync(engine, exports, tp, pp):
    out_dir, megatron_log_probs = exports[(tp, pp)]
    step_change = (torch.tensor(megatron_log_probs[1]) - torch.tensor(megatron_log_probs[0])).abs().max()
    assert step_change > 10 * TOLERANCE, "the SGD step barely moved the log-probs: the test could not see a stale sync"
    for step in range(2):
        engine.update_weights(_stream(os.path.join(out_dir, f"step{step}")))
        got = torch.tensor(engine.score([SEQUENCE])[0])
        diff = (got - torch.tensor(megatron_log_probs[step])).abs().max().item()
        assert diff <= TOLERANCE, f"TP={tp} PP={pp} step {step}: vLLM vs Megatron log-probs differ by {diff}"
