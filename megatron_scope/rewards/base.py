"""The verifier interface: what the trainer and the evaluation call, and what a user's verifier implements.

A verifier grades each response against its prompt's gold answer and says why with a status; only STATUS_CORRECT is
correct. The trainer counts every status of `Verifier.statuses` each step, and stops the run when too many answers
end in STATUS_VERIFIER_ERROR (the verifier itself failed: a format it cannot parse, a regression), which would
otherwise grade them "incorrect" and send them down SCOPE's teacher path while the run looks healthy.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

STATUS_CORRECT = "correct"
STATUS_WRONG = "wrong"
"""Parsed, compared, not equivalent."""
STATUS_VERIFIER_ERROR = "verifier_error"
"""The verifier raised on this answer (`Verdict.error` says what)."""


class GoldAnswerError(ValueError):
    """A gold answer the verifier cannot grade against: a data problem, never graded as 'wrong'."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The grade of one response."""

    correct: bool
    """The response's answer is equivalent to the gold answer."""
    status: str
    """One of the verifier's `statuses` (why it is correct or not)."""
    answer: str | None
    """The extracted final answer, or None when there was none."""
    error: str | None = None
    """With STATUS_VERIFIER_ERROR: the exception's type and message."""


def error_verdict(error: BaseException) -> Verdict:
    """The verdict of an answer the verifier raised on: incorrect, STATUS_VERIFIER_ERROR, "<Type>: <message>"."""
    return Verdict(correct=False, status=STATUS_VERIFIER_ERROR, answer=None, error=f"{type(error).__name__}: {error}")


class Verifier(abc.ABC):
    """Grades responses against gold answers (texts and golds in, verdicts out)."""

    name: str = "verifier"
    """How errors and logs name it."""
    statuses: tuple[str, ...] = (STATUS_CORRECT, STATUS_WRONG, STATUS_VERIFIER_ERROR)
    """Every status `judge_batch` may return; the trainer counts each one every step."""

    def check_gold_answers(self, gold_answers: Sequence[str]) -> None:
        """Raise GoldAnswerError naming any gold answer this verifier cannot grade against (before sampling)."""

    @abc.abstractmethod
    def judge_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[Verdict]:
        """A Verdict per (response, gold) pair. An answer the verifier fails on is a STATUS_VERIFIER_ERROR verdict
        (never an exception, which would stop the run for one answer); a bad gold answer raises GoldAnswerError."""

    def verify_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[bool]:
        return [verdict.correct for verdict in self.judge_batch(response_texts, gold_answers)]

    def close(self) -> None:
        """Release what the verifier holds (worker processes); it cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PerAnswerVerifier(Verifier):
    """A Verifier from a function of one (response, gold) pair: `judge`; an exception it raises becomes that answer's
    STATUS_VERIFIER_ERROR verdict. Gold answers are checked for the whole batch first."""

    @abc.abstractmethod
    def judge(self, response_text: str, gold_answer: str) -> Verdict:
        """The verdict of one response."""

    def judge_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[Verdict]:
        if len(response_texts) != len(gold_answers):
            raise ValueError(f"{len(response_texts)} responses but {len(gold_answers)} gold answers")
        self.check_gold_answers(gold_answers)
        verdicts = []
        for text, gold in zip(response_texts, gold_answers):
            try:
                verdicts.append(self.judge(text, gold))
            except Exception as error:  # noqa: BLE001 - one answer's failure is counted, not fatal
                verdicts.append(error_verdict(error))
        return verdicts
