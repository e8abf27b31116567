"""--rl-offload-optimizer-during-inference and --rl-offload-teacher-during-inference (`megatron/offload.py`): the
gradient buffers and a forward-only teacher's parameter storages are freed on the device while the engines
generate; afterwards the teacher's parameters and the optimizer's state are back bit for bit, the gradient buffers
back zeroed, and training goes on. One rank (gloo on CPU; its `gpu` twin under NCCL also sees the optimizer's state
in host memory meanwhile: megatron-core moves CUDA tensors only)."""

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks


def _offload_round_trip(rank, world_size, cuda: bool) -> dict:
    import torch.distributed as dist

    from megatron_scope.config import OptimizerConfig
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.offload import RolloutOffload
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.testing.tiny import TINY_ARCH, lm_optimizer_step

    if cuda:
        dist.destroy_process_group()
        dist.init_process_group("nccl")
        torch.cuda.set_device(0)
    initialize_model_parallel(1, 1, seed=3)
    student = wrap_with_ddp(build_gpt_model(TINY_ARCH))
    teacher = build_gpt_model(TINY_ARCH).eval().requires_grad_(False)
    optimizer, _ = build_optimizer(student, OptimizerConfig(lr=1e-2), train_iters=3)
    lm_optimizer_step(student, optimizer)  # Adam state exists
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    state_before = {k: v.detach().clone() for k, v in _optimizer_tensors(optimizer).items()}

    offload = RolloutOffload(student, optimizer, teacher.parameters(), offload_optimizer=True, offload_frozen=True)
    offload.offload()
    while_offloaded = {
        "grad_storage_bytes": sum(b.grad_data.untyped_storage().nbytes() for b in student.buffers),
        "teacher_storage_bytes": sum(p.untyped_storage().nbytes() for p in teacher.parameters()),
        "optimizer_on_device": any(t.device.type == "cuda" for t in _optimizer_tensors(optimizer).values()),
    }
    offload.restore()
    state_after = _optimizer_tensors(optimizer)
    result = {
        **while_offloaded,
        "teacher_equal": all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters())),
        "optimizer_equal": state_before.keys() == state_after.keys()
        and all(torch.equal(state_before[k], state_after[k]) and state_after[k].device == state_before[k].device
                for k in state_before),
        "grads_zero": all(bool((b.grad_data == 0).all()) for b in student.buffers),
    }
    lm_optimizer_step(student, optimizer)  # training goes on with what came back
    result["finite_after"] = all(bool(torch.isfinite(p).all()) for p in student.parameters())
    return result


def _optimizer_tensors(optimizer) -> dict:
    """Every tensor of the Megatron optimizer's inner torch optimizers: fp32 main params and Adam state."""
    tensors = {}
    for i, inner in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for j, group in enumerate(inner.optimizer.param_groups):
            for k, param in enumerate(group["params"]):
                tensors[(i, j, k, "param")] = param.data
                for name, value in inner.optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[(i, j, k, name)] = value
    return tensors


def _check(result: dict) -> None:
    assert result["grad_storage_bytes"] == 0 and result["teacher_storage_bytes"] == 0, result  # freed meanwhile
    assert result["teacher_equal"] and result["optimizer_equal"] and result["grads_zero"], result
    assert result["finite_after"]


def test_offload_round_trip_on_cpu():
    (result,) = run_on_ranks(_offload_round_trip, 1, args=(False,))
    _check(result)


@pytest.mark.gpu
def test_offload_round_trip_on_a_gpu():
    (result,) = run_on_ranks(_offload_round_trip, 1, args=(True,))
    assert not result["optimizer_on_device"]
    _check(result)


def _teacher_turns(rank, world_size, cuda: bool) -> dict:
    """Two forward-only teachers under `TeacherTurns`: device memory after it takes them (their output layers only),
    during each one's turn (that teacher's body back, bit for bit, and its forward unchanged) and after."""
    import torch.distributed as dist

    from megatron_scope.megatron.model import build_gpt_model, output_layer_weight
    from megatron_scope.megatron.offload import TeacherTurns
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.testing.tiny import TINY_ARCH

    if cuda:
        dist.destroy_process_group()
        dist.init_process_group("nccl")
        torch.cuda.set_device(0)
    initialize_model_parallel(1, 1, seed=5)
    teachers = {name: build_gpt_model(TINY_ARCH).eval().requires_grad_(False) for name in ("a", "b")}
    before = {name: [p.detach().clone() for p in model.parameters()] for name, model in teachers.items()}
    tokens = torch.randint(0, TINY_ARCH.vocab_size, (2, 8), device="cuda" if cuda else "cpu")
    positions = torch.arange(8, device=tokens.device).expand(2, 8)

    def logits(model):
        with torch.no_grad():
            return model(tokens, positions, None).float()

    expected = {name: logits(model) for name, model in teachers.items()}
    heads = {name: [output_layer_weight(model)] for name, model in teachers.items()}
    head_bytes = sum(w.untyped_storage().nbytes() for ws in heads.values() for w in ws)
    resident = lambda: sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()  # noqa: E731
                            for m in teachers.values() for p in m.parameters()}.values())
    total = resident()
    turns = TeacherTurns(teachers, heads)
    result = {"total": total, "heads": head_bytes, "after_init": resident(), "during": {}, "equal": {}, "same": {}}
    for name, model in teachers.items():
        with turns.on_device(name):
            result["during"][name] = resident()
            result["equal"][name] = all(torch.equal(a, b) for a, b in zip(before[name], model.parameters()))
            result["same"][name] = torch.equal(logits(model), expected[name])
    result["after"] = resident()
    return result


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_teachers_take_turns_on_the_device(device):
    """--teacher-residency scoring (`TeacherTurns`): between turns only the output layers stay; a turn brings that
    teacher's weights back bit for bit (its logits unchanged) and the other's stay away."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    (result,) = run_on_ranks(_teacher_turns, 1, args=(device == "cuda",))
    body = (result["total"] - result["heads"]) // 2  # the two teachers have the same shapes
    assert result["after_init"] == result["after"] == result["heads"], result
    assert result["during"] == {"a": result["heads"] + body, "b": result["heads"] + body}, result
    assert all(result["equal"].values()) and all(result["same"].values()), result
