"""One SRPO trainer step with the self-teacher (real Megatron models loaded from an HF checkpoint; a stand-in rollout,
so no vLLM engine starts): --srpo-teacher ema at TP=2 with --sequence-parallel (the self-teacher's hidden states
re-laid into the student's response rows, each TP rank keeping its share of them) and current at TP=1 on the same groups.

Both teachers are the initial student at the first step, so the two runs must give the same loss. In each: the
self-teacher's log-probs at a failed response re-read under a re-prompt equal the student's own forward of the
re-prompt + response at the shifted positions; with the original prompt as "re-prompt" they equal the student's
old log-probs; rows that are not distilled get nothing; SRPO's weights average 1 over the distilled tokens. With
ema, the teacher after the step is (1 - r) θ_0 + r θ_1, and it survives a checkpoint round trip."""

import itertools
import math
import types

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.workspace import make_workspace

pytestmark = pytest.mark.slow
RATE = 0.05
PROMPTS = ([1, 5, 7], [1, 6, 7, 9])
REPROMPT = [1, 11, 12, 5, 7, 13, 14, 15, 16]  # a longer stand-in re-prompt for row 1 (prompt 0's failure)


def hidden_of_rows(batch: dict, rows: list[int], rank: int) -> torch.Tensor:
    """The rows of this TP rank's share of teacher_hidden (the response rows, in flat order) that belong to the
    sequences `rows`."""
    lengths = (batch["loss_mask"] > 0).sum(1).tolist()
    offsets = [0, *itertools.accumulate(lengths)]
    share = batch["teacher_hidden"]
    low = rank * len(share)
    return torch.cat([share[max(offsets[i], low) - low:max(min(offsets[i + 1], low + len(share)) - low, 0)]
                      for i in rows])


def _one_step(rank, world_size, ws, teacher, save):
    from megatron_scope import train
    from megatron_scope.arguments import parse_run_config
    from megatron_scope.megatron import checkpointing
    from megatron_scope.megatron.loss_func import row_share
    from megatron_scope.megatron.model import unwrap_model
    from megatron_scope.rollout.batch import RolloutGroup
    from megatron_scope.rollout.engine import Completion
    from megatron_scope.teacher.colocated import log_prob_pass

    idle_engine = types.SimpleNamespace(sleep=lambda level: None, close=lambda: None)  # no rollout here
    train.start_engine = lambda *args, **kwargs: idle_engine
    trainer = train.build_trainer(parse_run_config([
        "--student-hf", ws.student_hf, "--scope-algorithm", "srpo", "--srpo-teacher", teacher,
        "--srpo-ema-rate", str(RATE), "--srpo-reprompt-template", "{prompt} {solution} ; {prompt}",  # task alphabet
        "--tokenizer", ws.tokenizer, "--train-data", ws.train_jsonl,
        "--train-iters", "1", "--prompts-per-step", "2", "--scope-group-size", "2", "--micro-batch-size", "4",
        "--max-new-tokens", "8", "--lr", "1e-3", "--tensor-model-parallel-size", str(world_size),
        "--rollout-tensor-parallel-size", "1", *(["--save", save] if save else []),
        *(["--sequence-parallel"] if world_size > 1 else [])]))
    generator = torch.Generator().manual_seed(0)
    completions = [Completion(torch.randint(3, trainer.vocab_size, (length,), generator=generator).tolist(),
                              [-math.log(trainer.vocab_size)] * length, "stop") for length in (5, 6, 4, 6)]
    # rows: p0 correct, p0 failed (re-prompted), p1 failed (its own prompt as "re-prompt"), p1 correct
    groups = [RolloutGroup("p0", list(PROMPTS[0]), completions[:2], [True, False], None, [None, REPROMPT]),
              RolloutGroup("p1", list(PROMPTS[1]), completions[2:], [False, True], None, [list(PROMPTS[1]), None])]
    expected, scored = {}, []
    initial = {name: p.detach().clone() for name, p in unwrap_model(trainer.student).named_parameters()}
    score = trainer._score

    def checked_score(microbatches, owners, rows):
        # the student's own view of row 1's re-prompted sequence, before the step changes it
        sequence = torch.tensor(REPROMPT + completions[1].token_ids)
        width = 8 * math.ceil((len(sequence) - 1) / 8)
        tokens = torch.zeros(2, width, dtype=torch.long)
        tokens[:, :len(sequence) - 1] = sequence[:-1]
        labels = torch.zeros_like(tokens)
        labels[:, :len(sequence) - 1] = sequence[1:]
        batch = {"tokens": tokens, "labels": labels, "position_ids": torch.arange(width).expand(2, -1)}
        expected["row1"] = log_prob_pass(trainer.student, [batch], trainer.vocab_size)[0][1][0]
        score(microbatches, owners, rows)
        scored.extend(microbatches)

    trainer._score = checked_score
    metrics = {}
    try:
        outcome = trainer.learn(groups, metrics)
        (batch,) = scored
        response = [slice(len(PROMPTS[0]) - 1, len(PROMPTS[0]) - 1 + 5), slice(len(PROMPTS[0]) - 1, len(PROMPTS[0]) + 5),
                    slice(len(PROMPTS[1]) - 1, len(PROMPTS[1]) + 3), slice(len(PROMPTS[1]) - 1, len(PROMPTS[1]) + 5)]
        reprompted = slice(len(REPROMPT) - 1, len(REPROMPT) + 5)
        checks = {
            "distilled": batch["distilled"].tolist() == [False, True, True, False],
            "row 1 re-read under its re-prompt": torch.allclose(batch["teacher_log_probs"][1, response[1]],
                                                                expected["row1"][reprompted], atol=1e-5),
            "row 2 re-read under its own prompt": torch.allclose(batch["teacher_log_probs"][2, response[2]],
                                                                 batch["old_log_probs"][2, response[2]], atol=1e-5),
            "nothing on rows not distilled": not batch["teacher_log_probs"][[0, 3]].any()
            and not hidden_of_rows(batch, [0, 3], rank).any() and not batch["distill_weights"][[0, 3]].any(),
            "hidden states on the distilled rows": bool(hidden_of_rows(batch, [1, 2], rank).abs().sum() > 0),
            "weights average 1": abs(float(batch["distill_weights"][batch["loss_mask"] * batch["distilled"][:, None] > 0]
                                           .mean()) - 1) < 1e-5,
            "updated": outcome.updated,
            "hidden states checked on the device": batch["teacher_hidden_nonfinite"].tolist() == [False] * 4,
            "each TP rank keeps its share of the response rows":
                len(batch["teacher_hidden"]) == row_share(int(batch["loss_mask"].sum()), world_size),
        }
        if teacher == "ema":
            ema = dict(unwrap_model(trainer.ema_teacher.model).named_parameters())
            student = dict(unwrap_model(trainer.student).named_parameters())
            checks["ema"] = all(torch.allclose(ema[n], torch.lerp(initial[n], student[n], RATE), atol=1e-7)
                                for n in student) and any(not torch.equal(student[n], initial[n]) for n in student)
            if save:
                trainer.iteration = 1
                trainer.save()
                saved = {n: p.detach().clone() for n, p in ema.items()}
                for p in ema.values():
                    p.data.zero_()
                checkpointing.load_checkpoint(save, trainer.student, trainer.optimizer, trainer._extra_models())
                checks["ema restored"] = all(torch.equal(ema[n], saved[n]) for n in ema)
    finally:
        trainer.close()
    return checks, metrics["loss/loss"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(str(tmp_path_factory.mktemp("srpo_ws")))


def test_srpo_self_teacher_step_ema_at_tp2_sequence_parallel_equals_current_at_tp1(ws, tmp_path):
    (current,) = run_on_ranks(_one_step, 1, args=(ws, "current", None), timeout=600)
    ema = run_on_ranks(_one_step, 2, args=(ws, "ema", str(tmp_path / "ckpt")), timeout=600)
    for checks, loss in [current, *ema]:
        assert all(checks.values()), {name: ok for name, ok in checks.items() if not ok}
        assert math.isfinite(loss) and loss == pytest.approx(current[1], rel=1e-5)
    assert {"ema", "ema restored"} <= ema[0][0].keys()
