"""A user's verifier as a plug-in: `--reward custom --custom-reward-function SPEC`.

SPEC is "package.module:function" (importable on the run's Python path) or "path/to/file.py:function". The
function grades one response, `function(response_text: str, gold_answer: str)`, and returns True (correct), False
(wrong) or a status string; statuses other than "correct" and "wrong" are declared in its `statuses` attribute (a
tuple of strings), since the trainer counts every status each step. It runs in worker processes with a hard deadline
per answer (`rewards.workers.GradingPool`): an answer it raises on is STATUS_VERIFIER_ERROR with the exception's
text, a slow one STATUS_TIMEOUT, one that kills its process STATUS_WORKER_DIED, and a status it did not declare is a
verifier error naming it; the trainer stops the run past --max-verifier-error-fraction of verifier errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Sequence

from megatron_scope.rewards.base import STATUS_CORRECT, STATUS_VERIFIER_ERROR, STATUS_WRONG, Verdict, Verifier
from megatron_scope.rewards.workers import STATUS_TIMEOUT, STATUS_WORKER_DIED, GradingPool, serve

_BUILT_IN = (STATUS_CORRECT, STATUS_WRONG, STATUS_TIMEOUT, STATUS_WORKER_DIED, STATUS_VERIFIER_ERROR)


def load_function(spec: str) -> Callable:
    """The function SPEC ("module:function" or "file.py:function") names; ValueError naming what is wrong."""
    where, separator, name = spec.rpartition(":")
    if not separator or not where or not name:
        raise ValueError(f"--custom-reward-function {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"--custom-reward-function {spec!r}: file {where!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"custom_reward_{os.path.basename(where)[:-3]}", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--custom-reward-function {spec!r}: {where} has no function {name!r}")
    return function


def declared_statuses(function: Callable, spec: str) -> tuple[str, ...]:
    """"correct", "wrong", the function's own `statuses`, and the grading pool's failure statuses."""
    extra = getattr(function, "statuses", ())
    if isinstance(extra, str) or not all(isinstance(status, str) and status for status in extra):
        raise ValueError(f"--custom-reward-function {spec!r}: its statuses attribute must be a tuple of non-empty "
                         f"strings, got {extra!r}")
    return (STATUS_CORRECT, STATUS_WRONG, *dict.fromkeys(s for s in extra if s not in _BUILT_IN),
            *_BUILT_IN[2:])


def _worker_main(conn, spec: str, statuses: tuple[str, ...]) -> None:
    """Serve (response, gold) requests on `conn` with the function of `spec` (`workers.serve`)."""
    function = load_function(spec)

    def grade(request: tuple) -> str:
        result = function(*request)
        status = STATUS_CORRECT if result is True else STATUS_WRONG if result is False else result
        if not isinstance(status, str) or status not in statuses:
            raise ValueError(f"{spec} returned {result!r}, not True, False or one of its statuses {statuses}")
        return status

    serve(conn, grade)


class CustomVerifier(Verifier):
    """The verifier of a user's grading function (see the module), graded in `num_workers` worker processes with a
    `timeout_seconds` deadline per answer. The function is imported here first, so a bad SPEC fails at start-up."""

    name = "custom"

    def __init__(self, spec: str, num_workers: int = 1, timeout_seconds: float = 10.0,
                 worker_start_timeout_seconds: float = 120.0):
        self.spec = spec
        self.statuses = declared_statuses(load_function(spec), spec)
        self.pool = GradingPool(_worker_main, (spec, self.statuses), num_workers, timeout_seconds,
                                worker_start_timeout_seconds, "custom", start_hint=f"--custom-reward-function {spec}")

    def judge_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[Verdict]:
        if len(response_texts) != len(gold_answers):
            raise ValueError(f"{len(response_texts)} responses but {len(gold_answers)} gold answers")
        statuses, errors = self.pool.run(list(enumerate(zip(response_texts, gold_answers))))
        return [Verdict(correct=statuses[i] == STATUS_CORRECT, status=statuses[i], answer=None, error=errors.get(i))
                for i in range(len(response_texts))]

    def close(self) -> None:
        """Stop the workers; the verifier cannot be used afterwards."""
        self.pool.close()
