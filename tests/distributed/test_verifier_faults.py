"""Verifier statuses reach the trainer: every status is counted each step over the whole step (both replicas), each
distinct verifier error is logged once with its answer and gold, and a verifier that fails on more than
--max-verifier-error-fraction of a step's responses stops every rank in that step, naming it and its first error.

Two gloo ranks, each leading the co-located engine of its replica (a recording stand-in: sample j of every prompt is
"A: 5 + j"); 50 prompts x 2 samples per step; learning and the weight stream are replaced (they are not under test).
The injected verifier plugs in through the verifier interface user verifiers implement (`rewards.base`)."""

import logging
import types

from megatron_scope.rewards.synthetic import SyntheticTaskVerifier
from megatron_scope.testing.multiprocess import run_on_ranks


class FlakyVerifier(SyntheticTaskVerifier):
    """The synthetic task's verifier, raising on sample 0 ("A: 5") of the prompts whose gold is below `failing`: on
    `failing` of the step's 100 responses."""

    name = "flaky"

    def __init__(self, failing: int):
        self.failing = failing

    def judge(self, response_text, gold_answer):
        if response_text == "A: 5" and int(gold_answer) < self.failing:
            raise ValueError(f"cannot parse {response_text!r}")
        return super().judge(response_text, gold_answer)


def _two_steps(rank, world_size, failing):
    """Two train_steps; returns (each step's metrics or the error, the trainer's WARNINGs, steps that learned)."""
    import torch

    from megatron_scope import trainer as trainer_module
    from tests.distributed.test_trainer_setup import _RecordingEngine, _stand_in_trainer

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron_scope.trainer").addHandler(handler)
    trainer = _stand_in_trainer(rank, "colocated", range(world_size), engine=_RecordingEngine([]),
                                remote_teacher=False, verifier=FlakyVerifier(failing), prompts=50)
    learned = []

    def learn(groups, metrics, first, longest):
        learned.append(len(groups))
        return types.SimpleNamespace(updated=True)

    trainer.learn = learn
    trainer_module.iter_hf_weights = lambda *args, **kwargs: iter([("a", torch.zeros(1))])
    steps = []
    try:
        for iteration in (1, 2):
            steps.append(trainer.train_step(iteration))
    except Exception as error:  # noqa: BLE001 - the test compares type and message
        steps.append(f"{type(error).__name__}: {error}")
    return steps, warnings, learned


def test_a_verifier_failing_on_1_percent_is_counted_every_step_and_logged_once():
    results = run_on_ranks(_two_steps, 2, args=(1,))
    for steps, _, learned in results:
        assert learned == [25, 25]  # both steps trained
        for metrics in steps:  # the step's totals over both replicas, on every rank
            assert {k: v for k, v in metrics.items() if k.startswith("verifier/")} == {
                "verifier/correct": 2.0, "verifier/wrong": 97.0, "verifier/no_answer": 0.0,
                "verifier/verifier_error": 1.0}  # right: gold "5"'s sample 0, gold "6"'s sample 1; gold "0"'s raised
            assert metrics["rollout/accuracy"] == 0.02
    # the replica that verified prompt p0 warns once (not again at step 2), with the answer and the gold
    logged = [w for _, warnings, _ in results for w in warnings if w.startswith("verifier flaky failed")]
    assert logged == ["verifier flaky failed (ValueError: cannot parse 'A: 5') on answer 'A: 5', gold '0'; such "
                      "answers count as incorrect (verifier/verifier_error), and the run stops when they exceed "
                      "--max-verifier-error-fraction of a step"]


def test_a_verifier_failing_on_10_percent_stops_every_rank_in_the_first_step():
    message = ("verifier flaky: 10 of 100 responses of iteration 1 (10.0%) ended in the verifier's own error, more "
               "than --max-verifier-error-fraction 0.05; the first: ValueError: cannot parse 'A: 5'")
    for rank, (steps, warnings, learned) in enumerate(run_on_ranks(_two_steps, 2, args=(10,))):
        assert steps == [f"VerifierError: {message}"] and learned == []  # stopped before any learning
        assert f"rank {rank} stops: VerifierError: {message}" in warnings
