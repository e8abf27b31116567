"""Several co-located teachers (--teacher NAME=HF_DIR, --teacher-route-key): one `ScopeTrainer.learn` step of SCOPE
with the full-vocabulary reverse KL (the fused KL from each teacher's hidden states and its own output layer) on 2
gloo ranks, at TP=2 and at DP=2 (each rank's share of the step's rollout, as --rollout-placement rank0 sends it; at
DP=2 rank 0 trains only teacher a's prompts and rank 1 only b's: each scores with its own rows' teachers, and the
per-teacher reduction still meets on both).

- two identical teachers, prompts split between them, give the one teacher's loss, KL, gradient norm and every
  gradient (rtol 1e-5): routing, teacher-pure microbatches and per-microbatch output layers change nothing else;
- the step's share of prompts and accuracy per teacher; a resume refuses a checkpoint of another teacher set;
- two different teachers: each teacher's rows see that teacher and no other (teacher/a/* equals the run where both
  names hold a's model, teacher/b/* the run where both hold b's), and the gradient moves;
- --teacher-residency scoring (teachers take turns on the device) gives that step bit for bit, and after it each
  teacher holds only its output layer on the device.
"""

import types

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from tests.unit.megatron.test_hf_mapping import ARCHS, tiny_hf_model

pytestmark = pytest.mark.slow
FAMILY = "qwen3"  # untied output layer: each teacher's own
ROUTES = {"tp2": ("a", "b", "a", "b"), "dp2": ("a", "a", "b", "b")}  # prompt i's teacher; DP=2: 2 prompts per rank


def _learn_with(teachers, routes, layout, residency="all"):
    """`learn` once from the same initial student with `teachers` ({name: HF model}; one unnamed teacher when
    `routes` is None) under --teacher-residency `residency`: (metrics, the student's gradients, each teacher's
    parameter bytes on the device after the step: (output layer, the rest))."""
    from megatron_scope.config import OptimizerConfig
    from megatron_scope.data.datasets import Prompt, PromptDataset
    from megatron_scope.megatron.model import build_gpt_model, output_layer_weight, unwrap_model, wrap_with_ddp
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.weight_export import load_hf_weights
    from megatron_scope.rollout.batch import RolloutGroup
    from megatron_scope.rollout.engine import Completion
    from megatron_scope.testing.checkpoint_compare import current_grads
    from megatron_scope.rewards.base import Verdict
    from megatron_scope.rewards.synthetic import SyntheticTaskVerifier
    from megatron_scope.testing.tiny import tiny_run_config
    from megatron_scope.trainer import Rollout, ScopeTrainer

    arch = ARCHS[FAMILY]

    def megatron(hf_model, trained=False):
        model = build_gpt_model(arch, calculate_per_token_loss=trained)
        load_hf_weights(model, arch, {n: p.detach() for n, p in hf_model.named_parameters()})
        return wrap_with_ddp(model) if trained else model.eval().requires_grad_(False)

    student = megatron(tiny_hf_model(FAMILY, seed=0), trained=True)
    models = {name: megatron(hf) for name, hf in teachers.items()}
    optimizer, scheduler = build_optimizer(student, OptimizerConfig(lr=1e-3), 2)
    g = torch.Generator().manual_seed(0)
    prompts, groups = [], []
    for i, route in enumerate(ROUTES[layout]):  # 4 prompts x G=4 responses of 3-9 tokens, both outcomes in each
        ids = tuple(torch.randint(0, arch.vocab_size, (6,), generator=g).tolist())
        prompts.append(Prompt(f"p{i}", "q", "1", ids, None, route if routes else None))
        responses = [torch.randint(0, arch.vocab_size, (3 + 2 * j,), generator=g).tolist() for j in range(4)]
        completions = [Completion(r, [-1.0] * len(r), "stop") for r in responses]
        correct = [True, False, i % 2 == 0, False]
        verdicts = [Verdict(ok, "correct" if ok else "wrong", "1") for ok in correct]
        groups.append(RolloutGroup(prompts[-1].id, list(ids), completions, correct, verdicts=verdicts))
    named = dict(teachers=tuple((name, name) for name in teachers), teacher_hf=None) if routes else {}
    named["teacher_residency"] = residency
    config = tiny_run_config(models=named, data=dict(teacher_route_key="teacher" if routes else None),
                             loss=dict(algorithm="scope", kl="reverse"),
                             rollout=dict(prompts_per_step=4, group_size=4, max_new_tokens=16, placement="rank0"),
                             loop=dict(train_iters=2, micro_batch_size=2),
                             parallel=dict(tensor_model_parallel_size=2 if layout == "tp2" else 1))
    trainer = ScopeTrainer(config, student, arch, optimizer, scheduler, PromptDataset(prompts, source="prompts"),
                           types.SimpleNamespace(pad_id=0, eos_id=1, vocab_size=arch.vocab_size), SyntheticTaskVerifier(),
                           engine=object() if torch.distributed.get_rank() == 0 else None, teachers=models)
    metrics = trainer._rollout_metrics(trainer._share(Rollout(1, groups, 0, {"rollout": 1.0, "busy": 1.0})))
    assert trainer.learn(groups, metrics).updated
    trainer._check_teachers("ckpt", {name: name for name in teachers} if routes else {"teacher": "teacher"})
    with pytest.raises(ValueError, match=r"ckpt: the checkpoint's run distilled from the teachers \{'teacher': 'x'\} "
                                         r"\(name: HF directory\); this run has .*: resume with the same"):
        trainer._check_teachers("ckpt", {"teacher": "x"})
    resident = {}
    for name, model in models.items():
        head = output_layer_weight(model).untyped_storage()
        rest = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
                if p.untyped_storage().data_ptr() != head.data_ptr()}
        resident[name] = (head.nbytes(), sum(rest.values()))
    return metrics, current_grads(unwrap_model(student)), resident


def _runs(rank, world_size, layout):
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(2 if layout == "tp2" else 1, 1, seed=0)
    first, second = tiny_hf_model(FAMILY, seed=1), tiny_hf_model(FAMILY, seed=2)
    one, one_grads, _ = _learn_with({"teacher": first}, None, layout)
    same, same_grads, _ = _learn_with({"a": first, "b": tiny_hf_model(FAMILY, seed=1)}, ROUTES, layout)
    both_a, _, _ = _learn_with({"a": first, "b": first}, ROUTES, layout)
    both_b, _, _ = _learn_with({"a": second, "b": second}, ROUTES, layout)
    routed, routed_grads, resident = _learn_with({"a": first, "b": second}, ROUTES, layout)
    turns, turns_grads, turns_resident = _learn_with({"a": first, "b": second}, ROUTES, layout, residency="scoring")
    grad_errors = {name: float((same_grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30))
                   for name, grad in one_grads.items()}
    moved = max(float((routed_grads[name] - grad).abs().max() / grad.abs().max()) for name, grad in one_grads.items())
    turns_equal = all(torch.equal(turns_grads[name], grad) for name, grad in routed_grads.items())
    return one, same, both_a, both_b, routed, grad_errors, moved, (turns, turns_equal, resident, turns_resident)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_prompts_routed_to_teachers_read_their_own_teacher(layout):
    for one, same, both_a, both_b, routed, grad_errors, moved, taking_turns in run_on_ranks(_runs, 2, args=(layout,),
                                                                                            timeout=600):
        if not one:  # nothing logged off the last stage (every rank is a last stage here)
            continue
        for key in ("loss/loss", "loss/incorrect/kl", "loss/incorrect/weight", "optimizer/grad_norm"):
            assert same[key] == pytest.approx(one[key], rel=1e-5), key
        assert max(grad_errors.values()) < 1e-5, grad_errors
        assert same["teacher/a/prompt_fraction"] == same["teacher/b/prompt_fraction"] == 0.5
        assert (same["teacher/a/accuracy"], same["teacher/b/accuracy"]) == ((0.5, 0.25) if layout == "tp2" else
                                                                            (0.375, 0.375))
        for name, alone in (("a", both_a), ("b", both_b)):  # each name's rows see its own teacher only
            for key in ("loss", "incorrect/kl", "incorrect/teacher_ppl", "correct/kl"):
                assert routed[f"teacher/{name}/{key}"] == pytest.approx(alone[f"teacher/{name}/{key}"], rel=1e-5), \
                    (name, key)
        assert routed["teacher/a/incorrect/kl"] != pytest.approx(both_b["teacher/a/incorrect/kl"], rel=1e-3)
        assert not any(key.startswith("teacher/") for key in one)  # one teacher: nothing per teacher
        assert moved > 1e-3  # a second teacher moves the gradient
        # --teacher-residency scoring: the same step bit for bit, and after it only each teacher's output layer is
        # on the device (the rest waits in host memory until the teacher's next scoring pass)
        turns, turns_equal, resident, turns_resident = taking_turns
        differ = {k: (v, routed[k]) for k, v in turns.items()
                  if v != routed.get(k) and not k.startswith(("time/", "throughput/"))}  # timing varies
        assert turns_equal and turns.keys() == routed.keys() and not differ, differ
        for name in ("a", "b"):
            head, rest = resident[name]
            assert rest > 0 and turns_resident[name] == (head, 0), (name, resident, turns_resident)
