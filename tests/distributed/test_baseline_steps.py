"""One trainer step of the baselines' paper features at TP=2 (real Megatron models loaded from HF checkpoints; the
rollout is a stand-in, so no vLLM engine starts).

ExOPD: with --exopd-reference-hf set to the teacher's own checkpoint (an architecture other than the student's),
the reference's log-probs must be the teacher's bit for bit: proof that π_ref is the model the flag names, loaded
at the run's TP; --rollout-is-threshold's reported mean weight must be min(π_S / μ, C) averaged over the step's
response tokens. TrOPD with guidance prefixes: the sampled trust region's draws are the same on both TP ranks,
the outliers' top-k forward KL runs on the co-located teacher's top-k, and TP=2 gives one process's step."""

import math
import os
import types

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.workspace import make_workspace, save_random_qwen2

pytestmark = pytest.mark.slow
THRESHOLD = 1.5


def _one_step(rank, world_size, ws, reference_hf, algorithm_flags):
    from megatron_scope import train
    from megatron_scope.arguments import parse_run_config
    from megatron_scope.rollout.batch import RolloutGroup
    from megatron_scope.rollout.engine import Completion

    idle_engine = types.SimpleNamespace(sleep=lambda level: None, close=lambda: None)  # no rollout here
    train.start_engine = lambda *args, **kwargs: idle_engine
    trainer = train.build_trainer(parse_run_config([
        "--student-hf", ws.student_hf, "--teacher-hf", reference_hf, *algorithm_flags,
        "--tokenizer", ws.tokenizer, "--train-data", ws.train_jsonl, "--train-iters", "1", "--prompts-per-step", "2",
        "--scope-group-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "8", "--lr", "1e-3",
        "--tensor-model-parallel-size", str(world_size), "--rollout-tensor-parallel-size", "1"]))
    generator = torch.Generator().manual_seed(0)
    groups = []
    for p in range(2):  # stand-in rollouts: random tokens, sampler log-probs around the random student's
        completions = []
        for _ in range(2):
            tokens = torch.randint(3, trainer.vocab_size, (6,), generator=generator).tolist()
            log_probs = (-math.log(trainer.vocab_size) + torch.randn(6, generator=generator)).tolist()
            completions.append(Completion(tokens, log_probs, "length"))
        guided = "--tropd-prefix-fraction" in algorithm_flags  # prompt 1's responses start with 2 and 4 teacher tokens
        groups.append(RolloutGroup(f"p{p}", [1, 5 + p, 7], completions, [p == 0, False],
                                   prefix_lengths=([2, 4] if p else [0, 0]) if guided else None))
    scored = []
    score = trainer._score
    trainer._score = lambda microbatches, *rows: (score(microbatches, *rows), scored.extend(microbatches))
    metrics = {}
    try:
        outcome = trainer.learn(groups, metrics)
    finally:
        trainer.close()
    if "--exopd-reference-hf" not in algorithm_flags:  # TrOPD: its draws, the teacher's top-k, the prefix tokens
        return (outcome.updated, metrics["loss/loss"], [b["trust_uniform"] for b in scored],
                all(b["teacher_topk_ids"].shape[-1] == 8 for b in scored), metrics["loss/prefix_token_fraction"],
                metrics["optimizer/grad_norm"])
    same_as_teacher = all(torch.equal(b["ref_log_probs"], b["teacher_log_probs"]) for b in scored)
    mask = torch.cat([b["loss_mask"].flatten() for b in scored])
    ratio = torch.cat([(b["old_log_probs"] - b["rollout_log_probs"]).flatten() for b in scored]).double()
    expected_weight = float((ratio.exp().clamp_max(THRESHOLD) * mask).sum() / mask.sum())
    expected_truncated = float(((ratio.exp() > THRESHOLD) * mask).sum() / mask.sum())
    return (same_as_teacher, outcome.updated, metrics["loss/loss"], metrics["loss/is_weight"], expected_weight,
            metrics["loss/is_truncated_fraction"], expected_truncated)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(str(tmp_path_factory.mktemp("baseline_steps_ws")))


def test_exopd_reference_model_and_rollout_is_weights_at_tp2(ws):
    from megatron_scope.data.tokenizer import Tokenizer

    vocab = Tokenizer.load(ws.tokenizer).vocab_size
    # the teacher's "base model": another architecture than the student's (3 layers, hidden 256)
    reference_hf = save_random_qwen2(os.path.join(ws.root, "reference_hf"), vocab, 3, 256, seed=5)
    flags = ["--scope-algorithm", "exopd", "--exopd-reference-hf", reference_hf,
             "--rollout-is-threshold", str(THRESHOLD)]
    results = run_on_ranks(_one_step, 2, args=(ws, reference_hf, flags), timeout=600)
    for same_as_teacher, updated, loss, is_weight, expected_weight, truncated, expected_truncated in results:
        assert same_as_teacher and updated and torch.isfinite(torch.tensor(loss))
        assert is_weight == pytest.approx(expected_weight, rel=1e-6)
        assert truncated == pytest.approx(expected_truncated, rel=1e-6) and 0 < truncated < 1
    assert results[0][2] == results[1][2]  # both TP ranks report the same loss


def test_tropd_with_top_k_forward_outliers_and_guidance_prefixes_at_tp2_equals_one_process(ws):
    """The sampled trust region, top-k forward-KL outliers and guided responses (prompt 1's start with 2 and 4
    teacher-written tokens, imitated with forward KL): TP=2 gives the single process's loss and gradient norm."""
    flags = ["--scope-algorithm", "tropd", "--scope-kl", "k1", "--tropd-outlier", "forward", "--scope-topk", "8",
             "--tropd-prefix-fraction", "0.5", "--tropd-prefix-beta", "0.5"]
    (single,) = run_on_ranks(_one_step, 1, args=(ws, ws.teacher_hf, flags), timeout=600)
    (updated0, loss0, draws0, topk0, prefix0, norm0), (updated1, loss1, draws1, topk1, prefix1, norm1) = run_on_ranks(
        _one_step, 2, args=(ws, ws.teacher_hf, flags), timeout=600)
    assert updated0 and updated1 and topk0 and topk1 and loss0 == loss1 and torch.isfinite(torch.tensor(loss0))
    assert all(torch.equal(a, b) for a, b in zip(draws0, draws1, strict=True))  # one draw per token, TP-replicated
    assert prefix0 == prefix1 == single[4] == 6 / 24  # 2 + 4 of the step's 4 x 6 response tokens
    assert loss0 == pytest.approx(single[1], rel=1e-5) and norm0 == pytest.approx(single[5], rel=1e-4)

