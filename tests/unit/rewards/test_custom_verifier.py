"""--reward custom: a user's grading function, loaded by "module:function" or "file.py:function" and run in worker
processes with a hard deadline per answer (rewards.custom on rewards.workers.GradingPool)."""

import os
import textwrap

import pytest

from megatron_scope.rewards.base import STATUS_CORRECT, STATUS_VERIFIER_ERROR, STATUS_WRONG
from megatron_scope.rewards.custom import CustomVerifier
from megatron_scope.rewards.workers import STATUS_TIMEOUT, STATUS_WORKER_DIED

GRADER = textwrap.dedent('''
    import os
    import time


    def judge(response, gold):
        if response == "slow":
            time.sleep(60)
        if response == "crash":
            os._exit(3)
        if response == "raise":
            raise KeyError("no such key")
        if response == "odd":
            return "half right"
        if not response:
            return "no_answer"
        return response.strip() == gold


    judge.statuses = ("no_answer", "correct")  # "correct" is built in: declared twice, counted once
    not_a_function = 3
''')


@pytest.fixture(scope="module")
def grader(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_reward.py"
    path.write_text(GRADER)
    return str(path)


def test_statuses_verdicts_and_every_failure_of_the_users_code(grader):
    with CustomVerifier(f"{grader}:judge", timeout_seconds=2.0) as verifier:
        assert verifier.statuses == (STATUS_CORRECT, STATUS_WRONG, "no_answer", STATUS_TIMEOUT, STATUS_WORKER_DIED,
                                     STATUS_VERIFIER_ERROR)
        verdicts = verifier.judge_batch([" 42", "41", "", "raise", "odd", "slow", "crash", "42"], ["42"] * 8)
        assert [v.status for v in verdicts] == [STATUS_CORRECT, STATUS_WRONG, "no_answer", STATUS_VERIFIER_ERROR,
                                                STATUS_VERIFIER_ERROR, STATUS_TIMEOUT, STATUS_WORKER_DIED,
                                                STATUS_CORRECT]
        assert [v.correct for v in verdicts] == [True] + [False] * 6 + [True]  # workers restarted after 5 and 6
        assert verdicts[3].error == "KeyError: 'no such key'"
        assert "returned 'half right', not True, False or one of its statuses" in verdicts[4].error
        assert verifier.pool.num_timeouts == 1 and verifier.pool.num_worker_deaths == 1


def test_a_module_on_the_python_path(grader, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(grader))  # spawned workers inherit sys.path
    with CustomVerifier("my_reward:judge") as verifier:
        assert verifier.verify_batch(["7", "8"], ["7", "7"]) == [True, False]


def test_a_bad_spec_fails_before_any_worker_starts(grader, tmp_path):
    for spec, message in [("judge", "expected MODULE:FUNCTION or FILE.py:FUNCTION"),
                          (f"{tmp_path}/absent.py:judge", "absent.py' does not exist"),
                          (f"{grader}:missing", "has no function 'missing'"),
                          (f"{grader}:not_a_function", "has no function 'not_a_function'")]:
        with pytest.raises(ValueError, match=message):
            CustomVerifier(spec)
    with pytest.raises(ModuleNotFoundError, match="no_such_package"):
        CustomVerifier("no_such_package.reward:judge")
    bad = tmp_path / "bad_statuses.py"
    bad.write_text("def judge(r, g):\n    return True\n\n\njudge.statuses = 'wrong'\n")
    with pytest.raises(ValueError, match="its statuses attribute must be a tuple of non-empty strings"):
        CustomVerifier(f"{bad}:judge")
