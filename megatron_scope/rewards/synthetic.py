"""The synthetic arithmetic task's verifier, with MathVerifier's interface (so the trainer's reward and the
eval runner use it interchangeably): the last "A: <int>" of a response must equal the gold integer."""

from __future__ import annotations

from typing import Sequence

from megatron_scope.data.synthetic import canonical_answer, extract_answer
from megatron_scope.rewards.math_verifier import STATUS_CORRECT, STATUS_WRONG, GoldAnswerError, Verdict

STATUS_NO_ANSWER = "no_answer"
"""The response has no "A: <int>"."""


class SyntheticTaskVerifier:
    """Exact integer match of the last "A: <int>"; never raises on a malformed response."""

    def check_gold_answers(self, gold_answers: Sequence[str]) -> None:
        for index, gold in enumerate(gold_answers):
            try:
                canonical_answer(gold)
            except ValueError as error:
                raise GoldAnswerError(f"gold answer {index}: {error}") from None

    def judge_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[Verdict]:
        if len(response_texts) != len(gold_answers):
            raise ValueError(f"{len(response_texts)} responses but {len(gold_answers)} gold answers")
        self.check_gold_answers(gold_answers)
        verdicts = []
        for text, gold in zip(response_texts, gold_answers):
            answer = extract_answer(text)
            correct = answer is not None and answer == canonical_answer(gold)
            status = STATUS_NO_ANSWER if answer is None else STATUS_CORRECT if correct else STATUS_WRONG
            verdicts.append(Verdict(correct=correct, status=status, answer=answer))
        return verdicts

    def verify_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[bool]:
        return [verdict.correct for verdict in self.judge_batch(response_texts, gold_answers)]
