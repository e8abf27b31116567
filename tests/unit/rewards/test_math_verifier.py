"""The math verifier: last-box extraction, math-verify equivalence, robustness, hard deadline, threads."""

import threading
import time

import pytest

from megatron_scope.rewards import math_verifier, workers
from megatron_scope.rewards.math_verifier import (
    STATUS_ANSWER_TOO_LONG,
    STATUS_CORRECT,
    STATUS_NO_BOXED_ANSWER,
    STATUS_TIMEOUT,
    STATUS_WRONG,
    GoldAnswerError,
    MathVerifier,
    extract_last_boxed,
)


@pytest.fixture(scope="module")
def verifier():
    # 6 s hard deadline: math-verify's own alarms are then 3 s, which bounds the garbage cases.
    with MathVerifier(num_workers=2, timeout_seconds=6.0) as shared:
        yield shared


# (response, gold, expected): responses as a model writes them.
EQUIVALENCE_CASES = [
    ("Adding, $\\frac{1}{4}+\\frac{1}{4}=\\frac{1}{2}$, so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("Therefore the probability is \\boxed{0.5}.", "\\frac12", True),
    ("So $p = \\boxed{\\dfrac{3}{4}}$", "0.75", True),
    ("Rounding, I get \\boxed{0.33}.", "\\frac{1}{3}", False),
    ("The final answer is \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
    ("The answer is $\\boxed{204}$.", "204", True),
    ("The answer is $\\boxed{205}$.", "204", False),
    ("AIME answers are padded: \\boxed{015}", "15", True),
    ("Solving, \\boxed{x = 5}", "5", True),
    ("The solution set is \\boxed{\\{2, 1\\}}", "\\{1, 2\\}", True),
    ("Both roots: \\boxed{2, -2}", "-2, 2", True),
    ("Both roots: \\boxed{\\pm 3}", "-3, 3", True),
    ("Both roots: \\boxed{3}", "-3, 3", False),
    ("The domain is \\boxed{[1, \\infty)}.", "[1,\\infty)", True),
    ("The domain is \\boxed{(1, \\infty)}.", "[1,\\infty)", False),
    ("The interval \\boxed{(0, 1]}", "(0,1]", True),
    ("Expanding gives \\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("First I thought \\boxed{3}, but correcting the sign: \\boxed{5}", "5", True),
    ("First I thought \\boxed{3}, but correcting the sign: \\boxed{5}", "3", False),
    ("Old-style box: \\fbox{42}", "42", True),
    ("The speed is \\boxed{75}", "$75$", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
]


@pytest.mark.parametrize("response, gold, expected", EQUIVALENCE_CASES)
def test_equivalence_on_real_looking_responses(verifier, response, gold, expected):
    assert verifier.verify(response, gold) is expected


def test_batched_form_matches_single_calls(verifier):
    responses = [case[0] for case in EQUIVALENCE_CASES]
    golds = [case[1] for case in EQUIVALENCE_CASES]
    assert verifier.verify_batch(responses, golds) == [case[2] for case in EQUIVALENCE_CASES]


@pytest.mark.parametrize(
    "response",
    [
        "The answer is 42.",  # plain math-verify would accept this; the rule here is the last box
        "",
        "\\boxed{}",
        "\\boxed{   }",
        "I conclude \\boxed{\\frac{4}{2",  # truncated at max_new_tokens
        "\\boxed 42",
    ],
)
def test_responses_without_a_usable_box_are_wrong(verifier, response):
    [verdict] = verifier.judge_batch([response], ["42"])
    assert verdict == math_verifier.Verdict(correct=False, status=STATUS_NO_BOXED_ANSWER, answer=None)


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{}}}{{\\frac{",
        "\\boxed{\\frac{}{}{}\\sqrt}",
        "\\boxed{\\\\\\\\}",
        "\\boxed{\x00\x01\ufffd\U0001f600}",
        "\\boxed{\\begin{pmatrix} 1 & 2 \\end{array}}",
        "\\boxed{" + "(" * 500 + "}",
        "\\boxed{9^{9^{9^{9}}}}",  # sympy would build an astronomically large integer
        "\\boxed{10^{10^{8}}!}",
    ],
)
def test_garbage_answers_count_wrong_without_crashing(verifier, response):
    [verdict] = verifier.judge_batch([response], ["5"])
    assert verdict.correct is False


def test_extremely_long_responses(verifier):
    filler = "Let me think about this again. " * 70_000  # ~2 MB
    start = time.perf_counter()
    verdicts = verifier.judge_batch(
        [filler + "\\boxed{7}", "\\boxed{" + filler + "}", "\\boxed{" + filler, filler],
        ["7", "7", "7", "7"],
    )
    assert [v.status for v in verdicts] == [
        STATUS_CORRECT,
        STATUS_ANSWER_TOO_LONG,
        STATUS_ANSWER_TOO_LONG,
        STATUS_NO_BOXED_ANSWER,
    ]
    assert time.perf_counter() - start < 15


def test_extract_last_boxed():
    assert extract_last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert extract_last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_last_boxed("\\boxed{\\}}") == "\\}"
    assert extract_last_boxed("\\fbox{1} then \\boxed {2}") == "2"
    assert extract_last_boxed("\\boxed{2} then \\fbox{1}") == "1"
    assert extract_last_boxed("\\boxed{" + "1" * 10 + "}", max_answer_chars=10) == "1" * 10
    assert extract_last_boxed("\\boxed{" + "1" * 11 + "}", max_answer_chars=10) is None
    assert extract_last_boxed("no box") is None


def test_verdict_reports_status_and_answer(verifier):
    verdicts = verifier.judge_batch(["so \\boxed{ 3/4 }", "so \\boxed{1/4}"], ["\\frac{3}{4}", "\\frac{3}{4}"])
    assert verdicts[0] == math_verifier.Verdict(correct=True, status=STATUS_CORRECT, answer="3/4")
    assert verdicts[1] == math_verifier.Verdict(correct=False, status=STATUS_WRONG, answer="1/4")


def test_bad_gold_answers_raise_instead_of_grading_wrong(verifier):
    with pytest.raises(GoldAnswerError, match="gold answer 1 is empty"):
        verifier.verify_batch(["\\boxed{1}", "\\boxed{1}"], ["1", " $ $ "])
    with pytest.raises(GoldAnswerError, match=r"\\\\text\{\}"):
        verifier.verify("\\boxed{1}", "\\text{}")
    with pytest.raises(GoldAnswerError, match=r"'\}'"):
        verifier.check_gold_answers(["1", "\\frac{1}{2}", "}"])
    verifier.check_gold_answers(["1", "\\frac{1}{2}", "$[1,\\infty)$"])


def test_bad_arguments_raise_value_error(verifier):
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        verifier.verify_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="response 0 must be a str, got bytes"):
        verifier.verify_batch([b"\\boxed{1}"], ["1"])
    with pytest.raises(ValueError, match="gold answer 0 must be a str, got int"):
        verifier.verify_batch(["\\boxed{1}"], [1])
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)
    with pytest.raises(ValueError, match="timeout_seconds"):
        MathVerifier(timeout_seconds=0)


def test_safe_from_a_worker_thread(verifier):
    """math-verify itself refuses to run off the main thread (signal.alarm); the verifier does not."""
    import math_verify

    results, errors = [], []

    def grade():
        results.append(verifier.verify("\\boxed{\\frac{2}{4}}", "0.5"))
        try:
            math_verify.parse("\\boxed{1}", parsing_timeout=1)
        except ValueError as error:
            errors.append(error)

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join()
    assert results == [True]
    assert len(errors) == 1 and "threaded" in str(errors[0])


def test_hard_deadline_kills_a_slow_worker_and_recovers():
    # Hard deadline 0.3 s; math-verify's own alarm is then 1 s, so this answer (which runs into
    # math-verify's alarm, see the garbage test) is stopped by the hard deadline: the worker is killed.
    with MathVerifier(num_workers=1, timeout_seconds=0.3) as fast:
        fast.verify("\\boxed{1}", "1")  # start the worker outside the timed part
        start = time.perf_counter()
        [verdict] = fast.judge_batch(["\\boxed{9^{9^{9^{9}}} - 9^{9^{9^{9}}}}"], ["0"])
        elapsed = time.perf_counter() - start
        assert verdict.status == STATUS_TIMEOUT and verdict.correct is False
        assert elapsed < 5  # the status proves the hard deadline fired; this only catches a hang
        assert fast.pool.num_timeouts == 1
        assert fast.verify("\\boxed{2}", "2")  # a fresh worker takes over


def test_recovers_from_a_dead_worker():
    with MathVerifier(num_workers=1, timeout_seconds=20.0) as single:
        assert single.verify("\\boxed{1}", "1")
        single.pool.workers[0].process.kill()
        single.pool.workers[0].process.join()
        assert single.verify("\\boxed{2}", "2")
        assert single.verify("\\boxed{3}", "3")


def test_closed_verifier_refuses_work():
    closed = MathVerifier()
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.verify("\\boxed{1}", "1")


def test_module_level_functions_share_one_verifier():
    assert math_verifier.verify("\\boxed{\\frac{1}{2}}", "0.5") is True
    assert math_verifier.verify_batch(["\\boxed{1}", "\\boxed{2}"], ["1", "1"]) == [True, False]
    assert math_verifier.default_verifier() is math_verifier.default_verifier()
    math_verifier.default_verifier().close()


def test_an_exception_inside_math_verify_is_a_counted_verdict_with_its_message(monkeypatch):
    """math-verify raising in the worker grades that answer STATUS_VERIFIER_ERROR and sends back the exception's type
    and message (`Verdict.error`); the other answers of the call are graded as usual. The worker loop runs in a thread
    of this process (timeouts off: signal.alarm needs the main thread), serving the verifier through a real pipe."""
    import multiprocessing
    import types

    from megatron_scope.rewards.base import STATUS_VERIFIER_ERROR

    real = math_verifier._grade_in_this_process

    def grade(answer, gold, *args):
        if answer == "boom":
            raise RecursionError("maximum recursion depth exceeded in latex2sympy")
        return real(answer, gold, {}, None, None)

    monkeypatch.setattr(math_verifier, "_grade_in_this_process", grade)
    parent, child = multiprocessing.Pipe(duplex=True)
    worker = threading.Thread(target=math_verifier._worker_main, args=(child, None, None), daemon=True)
    worker.start()
    assert parent.recv() == "ready"
    verifier = MathVerifier(num_workers=1)
    verifier.pool.workers[0] = workers.Worker(types.SimpleNamespace(is_alive=lambda: False, join=lambda timeout: None,
                                                                    kill=lambda: None), parent)
    verdicts = verifier.judge_batch(["\\boxed{boom}", "\\boxed{4}", "\\boxed{5}"], ["4", "4", "4"])
    assert [(v.status, v.error) for v in verdicts] == [
        (STATUS_VERIFIER_ERROR, "RecursionError: maximum recursion depth exceeded in latex2sympy"),
        (STATUS_CORRECT, None), (STATUS_WRONG, None)]
    assert not verdicts[0].correct and verdicts[0].answer == "boom"
    verifier.close()
    worker.join(5)
    assert not worker.is_alive()
