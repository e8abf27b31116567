"""The Megatron training path on one CUDA device under NCCL (one process, TP = PP = 1):

- a tiny Qwen2 loaded from Hugging Face weights, the SCOPE loss through Megatron's schedule in 2 microbatches:
  the loss and every parameter's gradient (exported under its HF name) equal transformers' float64 autograd
  of the same loss on the CPU;
- one `ScopeTrainer.learn` step (batch to the device, student and co-located teacher scoring passes, SCOPE
  weights, forward/backward, the guarded Megatron optimizer step) runs on the device and moves the weights;
- the collectives of the guards (`raise_on_any_rank`, `guarded_step`) take device tensors under NCCL.

(CI has no GPU: these run on a CUDA machine, `pytest -m gpu`.)
"""

import types

import pytest
import torch
import torch.nn.functional as F

from tests.unit.megatron.test_hf_mapping import ARCHS, tiny_hf_model

pytestmark = pytest.mark.gpu
FAMILY = "qwen2"  # QKV bias, tied embeddings, GQA


@pytest.fixture(scope="module")
def nccl():
    import torch.distributed as dist

    from megatron_scope.megatron.parallel import init_distributed, initialize_model_parallel

    init_distributed()
    assert dist.get_backend() == "nccl"
    initialize_model_parallel(1, 1, seed=0)
    yield
    dist.destroy_process_group()


def _student(hf_model):
    from megatron_scope.megatron.model import build_gpt_model, unwrap_model, wrap_with_ddp
    from megatron_scope.megatron.weight_export import load_hf_weights

    model = wrap_with_ddp(build_gpt_model(ARCHS[FAMILY], calculate_per_token_loss=True))
    load_hf_weights(unwrap_model(model), ARCHS[FAMILY], {n: p.detach() for n, p in hf_model.named_parameters()})
    assert all(p.is_cuda for p in model.parameters())
    return model


def _hf_named_main_grads(model):
    """The DDP main_grad buffers under their HF names (through the weight exporter, QKV split included)."""
    from megatron_scope.megatron.model import unwrap_model
    from megatron_scope.megatron.weight_export import iter_hf_weights

    params = list(unwrap_model(model).parameters())
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad.to(p.dtype)
        return {name: t.detach().double().cpu() for name, t in iter_hf_weights(model, ARCHS[FAMILY])}
    finally:
        for p, data in zip(params, saved):
            p.data = data


def test_scope_loss_and_gradients_on_cuda_equal_float64_transformers(nccl):
    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.loss_func import reduce_reports, scope_loss_func
    from megatron_scope.megatron.schedule import forward_backward
    from megatron_scope.testing.tiny import split_microbatches, tiny_rollout_batch

    vocab = ARCHS[FAMILY].vocab_size
    hf_model = tiny_hf_model(FAMILY)
    model = _student(hf_model)
    batch = tiny_rollout_batch(vocab_size=vocab)
    config = LossConfig(algorithm="scope", kl="reverse")
    microbatches = [{k: v.cuda() for k, v in mb.items()} for mb in split_microbatches(batch, 2)]
    model.zero_grad_buffer()
    loss = reduce_reports(forward_backward(model, microbatches, config, vocab))["loss"]
    grads = _hf_named_main_grads(model)

    reference = hf_model.double()
    logits = reference(input_ids=batch["tokens"]).logits  # [n, s, vocab] float64
    logits = F.pad(logits, (0, batch["teacher_logits"].shape[-1] - vocab))  # Megatron's padded width (masked)
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    loss_sum, count, _ = scope_loss_func(config, vocab, batch64, logits, group=None)
    reference_loss = loss_sum / count
    reference_loss.backward()
    assert loss == pytest.approx(reference_loss.detach().item(), rel=1e-5)
    expected = {name: p.grad for name, p in reference.named_parameters()}
    assert sorted(grads) == sorted(expected)
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        assert (grad - expected[name]).abs().max().item() <= 1e-4 * scale + 1e-8, name


def test_guards_use_device_tensors_under_nccl(nccl):
    from megatron_scope.megatron.schedule import raise_on_any_rank

    raise_on_any_rank(None)
    with pytest.raises(ValueError, match="bad batch"):
        raise_on_any_rank(ValueError("bad batch"))


def test_one_trainer_step_runs_on_cuda(nccl):
    from megatron_scope.config import OptimizerConfig
    from megatron_scope.data.datasets import Prompt, PromptDataset
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.weight_export import load_hf_weights
    from megatron_scope.rollout.batch import RolloutGroup
    from megatron_scope.rollout.engine import Completion
    from megatron_scope.testing.tiny import tiny_run_config
    from megatron_scope.trainer import ScopeTrainer

    arch, vocab = ARCHS[FAMILY], ARCHS[FAMILY].vocab_size
    student = _student(tiny_hf_model(FAMILY, seed=0))
    teacher = build_gpt_model(arch).eval().requires_grad_(False)
    load_hf_weights(teacher, arch, {n: p.detach() for n, p in tiny_hf_model(FAMILY, seed=1).named_parameters()})
    optimizer, scheduler = build_optimizer(student, OptimizerConfig(lr=1e-3), 2)
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(f"p{i}", "q", "1", tuple(torch.randint(0, vocab, (6,), generator=g).tolist())) for i in range(2)]
    groups = []
    for prompt in prompts:  # 2 prompts x G=4 responses of 3-9 tokens, both outcomes in each group
        responses = [torch.randint(0, vocab, (3 + 2 * j,), generator=g).tolist() for j in range(4)]
        completions = [Completion(ids, [-1.0] * len(ids), "stop") for ids in responses]
        groups.append(RolloutGroup(prompt.id, list(prompt.token_ids), completions, [True, False, True, False]))
    config = tiny_run_config(loss=dict(algorithm="scope", kl="reverse"),
                             rollout=dict(prompts_per_step=2, group_size=4, max_new_tokens=16),
                             loop=dict(train_iters=2, micro_batch_size=4))
    trainer = ScopeTrainer(
        config, student, arch, optimizer, scheduler, PromptDataset(prompts, source="prompts"),
        types.SimpleNamespace(pad_id=0, eos_id=1, vocab_size=vocab), None,
        engine=object(), teachers={"teacher": teacher})  # the engine (rank 0's) is never called by `learn`
    before = [p.detach().clone() for p in student.parameters()]
    metrics = {}
    outcome = trainer.learn(groups, metrics)
    assert outcome.updated and metrics["optimizer/skipped"] == 0.0
    assert metrics["loss/loss"] > 0 and metrics["optimizer/grad_norm"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
