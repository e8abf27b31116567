"""The synthetic arithmetic task's verifiers, with MathVerifier's interface (so the trainer's reward and the
eval runner use them interchangeably).

- `SyntheticTaskVerifier` (``--reward synthetic``): the last "A: <int>" of a response must equal the gold
  integer (the row's "answer").
- `StrictSyntheticTaskVerifier` (``--reward synthetic-strict``): the response must also write every step of
  the left-to-right evaluation, right, chained, none missing, extra or reordered
  (megatron_scope.data.synthetic.check_working). Its gold is the row's reference *solution*
  ("7+5=12 ; 12-3=9 ; A: 9"), which holds both the steps and the answer, so the verifier needs nothing but
  (response, gold) pairs like every other verifier. The answers of the task are small and guessable; a
  student that skips or garbles its working still hits the final answer by chance, and SCOPE would
  reinforce those lucky guesses as "correct" (issue 15). Such a response gets `STATUS_WRONG_STEPS`, so a
  run can count lucky guesses: the final-answer accuracy is STATUS_CORRECT + STATUS_WRONG_STEPS.

`GOLD_COLUMNS` says which JSONL column (of synthetic.write_task_files' rows) holds each reward's gold.
"""

from __future__ import annotations

from typing import Sequence

from megatron_scope.data.synthetic import canonical_answer, extract_answer, matches_reference, reference_steps
from megatron_scope.rewards.base import (STATUS_CORRECT, STATUS_VERIFIER_ERROR, STATUS_WRONG, GoldAnswerError,
                                         PerAnswerVerifier, Verdict)

STATUS_NO_ANSWER = "no_answer"
"""The response has no "A: <int>"."""
STATUS_WRONG_STEPS = "wrong_steps"
"""Strict verifier only: the final answer equals the gold one, but the written working is not the
left-to-right evaluation (a step wrong, missing, extra, reordered or garbled, or text around the steps)."""

GOLD_COLUMNS = {"synthetic": "answer", "synthetic-strict": "solution"}
"""--reward -> the task row's column the verifier takes as its gold."""


class SyntheticTaskVerifier(PerAnswerVerifier):
    """Exact integer match of the last "A: <int>"; never raises on a malformed response."""

    name = "synthetic"
    statuses = (STATUS_CORRECT, STATUS_WRONG, STATUS_NO_ANSWER, STATUS_VERIFIER_ERROR)

    def check_gold_answers(self, gold_answers: Sequence[str]) -> None:
        for index, gold in enumerate(gold_answers):
            try:
                canonical_answer(gold)
            except ValueError as error:
                raise GoldAnswerError(f"gold answer {index}: {error}") from None

    def judge(self, response_text: str, gold_answer: str) -> Verdict:
        answer = extract_answer(response_text)
        correct = answer is not None and answer == canonical_answer(gold_answer)
        status = STATUS_NO_ANSWER if answer is None else STATUS_CORRECT if correct else STATUS_WRONG
        return Verdict(correct=correct, status=status, answer=answer)


class StrictSyntheticTaskVerifier(PerAnswerVerifier):
    """Correct iff the response is exactly the gold reference solution's steps and final answer (whitespace
    as lenient as the final-answer parser, content exact). Gold "answers" are reference solutions such as
    "7+5=12 ; 12-3=9 ; A: 9", each checked to be a left-to-right evaluation (GoldAnswerError, a ValueError
    naming it, otherwise). Statuses: STATUS_CORRECT, STATUS_WRONG_STEPS (right answer, wrong working),
    STATUS_WRONG (wrong final answer), STATUS_NO_ANSWER. Never raises on a malformed response; linear time."""

    name = "synthetic-strict"
    statuses = (STATUS_CORRECT, STATUS_WRONG, STATUS_WRONG_STEPS, STATUS_NO_ANSWER, STATUS_VERIFIER_ERROR)

    def __init__(self):
        self._references: dict[str, list] = {}  # each distinct gold solution -> its checked steps

    def check_gold_answers(self, gold_answers: Sequence[str]) -> None:
        for index, gold in enumerate(gold_answers):
            if isinstance(gold, str) and gold in self._references:
                continue
            try:
                self._references[gold] = reference_steps(gold)
            except ValueError as error:
                raise GoldAnswerError(f"gold solution {index}: {error}") from None

    def judge(self, response_text: str, gold_answer: str) -> Verdict:
        self.check_gold_answers([gold_answer])
        steps = self._references[gold_answer]
        answer = extract_answer(response_text)
        if answer is None:
            status = STATUS_NO_ANSWER
        elif answer != str(steps[-1].result):
            status = STATUS_WRONG
        else:
            status = STATUS_CORRECT if matches_reference(response_text, steps) else STATUS_WRONG_STEPS
        return Verdict(correct=status == STATUS_CORRECT, status=status, answer=answer)


def build_synthetic_verifier(reward: str):
    """The verifier of a synthetic --reward ("synthetic" or "synthetic-strict")."""
    if reward == "synthetic":
        return SyntheticTaskVerifier()
    if reward == "synthetic-strict":
        return StrictSyntheticTaskVerifier()
    raise ValueError(f"unknown synthetic reward {reward!r}; expected one of {sorted(GOLD_COLUMNS)}")
