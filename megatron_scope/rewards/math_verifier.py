r"""Math answer verification with math-verify, safe to call from the trainer and from evaluation.

SCOPE (arXiv 2604.10688, Sec. 3) splits each prompt's G responses into correct ones (reinforced with
student-perplexity-weighted MLE) and incorrect ones (distilled with teacher-perplexity-weighted KL); the
split is a rule-based check of the final answer. The trainer's reward and the evaluation's Avg@k / Pass@k
(megatron_scope/eval) both call this module, so training and evaluation grade identically.

Grading rule:
1. The answer is the content of the *last* ``\boxed{...}`` (or ``\fbox{...}``) of the response, braces
   matched (escaped ``\{``, ``\}`` do not count). No box, an unclosed box, an empty box, or one longer
   than ``max_answer_chars`` -> wrong. This scan runs in the calling process, in time linear in
   ``max_answer_chars`` after one ``str.rfind``, so a megabyte of garbage costs microseconds.
2. The gold answer (surrounding ``$`` removed) and the extracted answer, each wrapped in ``\boxed{}``, are
   parsed by ``math_verify.parse`` (LaTeX -> sympy via latex2sympy2_extended, with a string fallback)
   and compared by ``math_verify.verify(gold, answer)``: string match, numeric match to 6 decimals,
   symbolic equality, sets / intervals / tuples / matrices, ``x = 5`` against ``5``.

Why worker processes: math-verify bounds its parse and compare time with ``signal.alarm``, which
(a) works only in the main thread (elsewhere it raises ValueError: a Ray threaded actor, a data-loader
thread), (b) replaces the host process's SIGALRM handler while it runs, and (c) cannot interrupt a long
call inside a C extension. So every math-verify call here runs in a spawned worker process
(`rewards.workers.GradingPool`), in that process's main thread, and the calling process installs no signal
handler. The caller enforces a hard wall-clock deadline per answer: a worker past it is killed (and restarted on
the next use) and the answer counts wrong; a worker that dies (segfault, OOM kill) is treated the same. Per
answer, one pipe round trip carries the extracted answer and the gold string out and a status string back
(bytes, not the response). Workers start with the "spawn" method, so an entry script that uses the verifier needs
an ``if __name__ == "__main__":`` guard (as for vLLM and dist_checkpointing).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Sequence

from megatron_scope.rewards.base import (STATUS_CORRECT, STATUS_VERIFIER_ERROR, STATUS_WRONG, GoldAnswerError, Verdict,
                                         Verifier)
from megatron_scope.rewards.workers import STATUS_TIMEOUT, STATUS_WORKER_DIED, GradingPool, serve


BOX_COMMANDS = ("\\boxed", "\\fbox")
"""LaTeX commands whose argument is taken as the final answer."""

# Verdict statuses (STATUS_CORRECT, STATUS_WRONG and STATUS_VERIFIER_ERROR: rewards.base). Only STATUS_CORRECT means
# correct.
STATUS_NO_BOXED_ANSWER = "no_boxed_answer"
"""No box, an unclosed box, or an empty one."""
STATUS_ANSWER_TOO_LONG = "answer_too_long"
STATUS_UNPARSEABLE_ANSWER = "unparseable_answer"
"""math-verify extracted nothing from the boxed content."""
_STATUS_GOLD_OK = "gold_ok"
_STATUS_GOLD_UNPARSEABLE = "gold_unparseable"


def extract_last_boxed(text: str, max_answer_chars: int = 1000) -> str | None:
    r"""The stripped content of the last ``\boxed{...}``/``\fbox{...}`` in `text`, or None.

    None when there is no box, the last box is not followed by ``{``, is unclosed, is empty, or its
    content exceeds `max_answer_chars` (use `_extract` to tell these apart).
    """
    answer, _ = _extract(text, max_answer_chars)
    return answer


def _extract(text: str, max_answer_chars: int) -> tuple[str | None, str | None]:
    """(answer, None) or (None, failure status); scans at most max_answer_chars after the last box."""
    start = -1
    for command in BOX_COMMANDS:
        found = text.rfind(command)
        if found >= 0:
            start = max(start, found + len(command))
    if start < 0:
        return None, STATUS_NO_BOXED_ANSWER
    position = start
    while position < len(text) and text[position] in " \t":
        position += 1
    if position >= len(text) or text[position] != "{":
        return None, STATUS_NO_BOXED_ANSWER
    content_start = position + 1
    scan_end = min(len(text), content_start + max_answer_chars + 1)
    depth = 1
    position = content_start
    while position < scan_end:
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                answer = text[content_start:position].strip()
                if not answer:
                    return None, STATUS_NO_BOXED_ANSWER
                return answer, None
        position += 1
    if scan_end < len(text):  # more than max_answer_chars before any closing brace
        return None, STATUS_ANSWER_TOO_LONG
    return None, STATUS_NO_BOXED_ANSWER  # the text ended inside the box


def normalize_gold_answer(gold_answer: str) -> str:
    """The gold string with surrounding whitespace and one pair of enclosing ``$``/``$$`` removed."""
    gold = gold_answer.strip()
    for delimiter in ("$$", "$"):
        if len(gold) > 2 * len(delimiter) and gold.startswith(delimiter) and gold.endswith(delimiter):
            gold = gold[len(delimiter) : -len(delimiter)].strip()
            break
    return gold


# ----------------------------------------------------------------------------------------------------
# Worker side: runs in a spawned process, math-verify in its main thread.


def _worker_main(conn, parse_timeout_seconds: int, compare_timeout_seconds: int) -> None:
    """Serve (answer | None, gold) requests on `conn` until it closes or receives None."""
    # math-verify logs the whole input at WARNING on each timeout; the caller reports statuses instead.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    parsed_golds: collections.OrderedDict[str, list] = collections.OrderedDict()
    # Warm up before signalling ready: the first parse imports latex2sympy's ANTLR grammar (~1 s, more
    # under load), which must not count against the first real answer's timeouts.
    _grade_in_this_process("\\frac{1}{2}", "0.5", {}, None, None)
    serve(conn, lambda request: _grade_in_this_process(*request, parsed_golds, parse_timeout_seconds,
                                                       compare_timeout_seconds))


def _grade_in_this_process(answer, gold, parsed_golds, parse_timeout_seconds, compare_timeout_seconds) -> str:
    """A status for `answer` against `gold` (or a gold check when answer is None); main thread only.

    Timeouts are math-verify's (signal.alarm, whole seconds; None disables them).
    """
    import math_verify
    from math_verify import LatexExtractionConfig

    extraction = [LatexExtractionConfig()]
    gold_parsed = parsed_golds.get(gold)
    if gold_parsed is None:
        # No signal timeout for the gold: an empty parse must mean "unparseable", never "slow"; the
        # caller's hard deadline still bounds it.
        gold_parsed = math_verify.parse("\\boxed{" + gold + "}", extraction_config=extraction, parsing_timeout=None)
        parsed_golds[gold] = gold_parsed
        if len(parsed_golds) > 4096:
            parsed_golds.popitem(last=False)
    if not gold_parsed:
        return _STATUS_GOLD_UNPARSEABLE
    if answer is None:
        return _STATUS_GOLD_OK
    answer_parsed = math_verify.parse(
        "\\boxed{" + answer + "}", extraction_config=extraction, parsing_timeout=parse_timeout_seconds
    )
    if not answer_parsed:
        return STATUS_UNPARSEABLE_ANSWER
    equivalent = math_verify.verify(gold_parsed, answer_parsed, timeout_seconds=compare_timeout_seconds)
    return STATUS_CORRECT if equivalent else STATUS_WRONG


# ----------------------------------------------------------------------------------------------------
# Caller side.


class MathVerifier(Verifier):
    """Grades responses against gold answers in `num_workers` spawned processes with a hard deadline.

    Thread-safe (calls are serialised by a lock); use as a context manager or call `close()`; workers
    are daemon processes and are also stopped when the verifier is garbage-collected or Python exits.
    Workers start on first use (~1-2 s each) and are reused across calls.
    """

    name = "math"
    statuses = (STATUS_CORRECT, STATUS_WRONG, STATUS_NO_BOXED_ANSWER, STATUS_ANSWER_TOO_LONG, STATUS_UNPARSEABLE_ANSWER,
                STATUS_TIMEOUT, STATUS_WORKER_DIED, STATUS_VERIFIER_ERROR)

    def __init__(
        self,
        num_workers: int = 1,
        timeout_seconds: float = 10.0,
        max_answer_chars: int = 1000,
        worker_start_timeout_seconds: float = 120.0,
    ):
        """
        Args:
            num_workers: worker processes grading in parallel.
            timeout_seconds: hard wall-clock limit for grading one answer; past it the worker is killed
                and the answer counts wrong (status "timeout"). math-verify's own signal timeouts inside
                the worker (answer parse, each comparison) are half of it, at least 1 s, so most slow
                answers end softly without a worker restart.
            max_answer_chars: a boxed answer longer than this counts wrong without being parsed.
            worker_start_timeout_seconds: a worker that does not report ready in time is an error.
        """
        if isinstance(max_answer_chars, bool) or not isinstance(max_answer_chars, int) or max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be an int >= 1, got {max_answer_chars!r}")
        self.max_answer_chars = max_answer_chars
        inner_timeout_seconds = max(1, int(timeout_seconds / 2)) if timeout_seconds > 0 else 1
        self.pool = GradingPool(_worker_main, (inner_timeout_seconds, inner_timeout_seconds), num_workers,
                                timeout_seconds, worker_start_timeout_seconds, "math",
                                start_hint="is math-verify installed?")
        """The worker processes; `pool.num_timeouts` and `pool.num_worker_deaths` count over its life."""

    # -- public API ----------------------------------------------------------------------------------

    def verify(self, response_text: str, gold_answer: str) -> bool:
        """True iff the response's last boxed answer is equivalent to `gold_answer`."""
        return self.judge_batch([response_text], [gold_answer])[0].correct

    def judge_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[Verdict]:
        """A `Verdict` for each (response, gold) pair.

        Raises:
            ValueError: lengths differ, or an item is not a str (raised before any grading).
            GoldAnswerError: a gold answer is empty or unparseable (a data error, not a wrong answer).
        """
        golds = self._validate_batch(response_texts, gold_answers)
        extracted = [_extract(text, self.max_answer_chars) for text in response_texts]
        jobs = [(index, answer, golds[index]) for index, (answer, _) in enumerate(extracted) if answer is not None]
        statuses, errors = self.pool.run([(index, (answer, gold)) for index, answer, gold in jobs])
        bad_golds = sorted({golds[index] for index, status in statuses.items() if status == _STATUS_GOLD_UNPARSEABLE})
        if bad_golds:
            raise GoldAnswerError(f"math-verify cannot parse gold answer(s) {bad_golds!r}")
        verdicts = []
        for index, (answer, failure) in enumerate(extracted):
            if answer is None:
                verdicts.append(Verdict(correct=False, status=failure, answer=None))
            else:
                status = statuses[index]
                verdicts.append(Verdict(correct=status == STATUS_CORRECT, status=status, answer=answer,
                                        error=errors.get(index)))
        return verdicts

    def check_gold_answers(self, gold_answers: Sequence[str]) -> None:
        """Raise GoldAnswerError naming every gold answer that is empty or that math-verify cannot parse.

        Call before sampling so that a bad data file fails before any generation is spent on it.
        """
        golds = self._validate_batch([""] * len(gold_answers), gold_answers)
        unique_golds = sorted(set(golds))
        statuses, _ = self.pool.run([(index, (None, gold)) for index, gold in enumerate(unique_golds)])
        bad = [unique_golds[index] for index, status in sorted(statuses.items()) if status == _STATUS_GOLD_UNPARSEABLE]
        if bad:
            raise GoldAnswerError(f"math-verify cannot parse gold answer(s) {bad!r}")
        failed = {unique_golds[i]: status for i, status in sorted(statuses.items()) if status != _STATUS_GOLD_OK}
        if failed:  # a timeout or a dead worker says nothing about the gold answer itself
            raise RuntimeError(f"could not check gold answer(s) {failed!r} (status per answer)")

    def close(self) -> None:
        """Stop the workers; the verifier cannot be used afterwards."""
        self.pool.close()

    # -- internals -----------------------------------------------------------------------------------

    @staticmethod
    def _validate_batch(response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[str]:
        if len(response_texts) != len(gold_answers):
            raise ValueError(
                f"got {len(response_texts)} responses but {len(gold_answers)} gold answers; they must pair up"
            )
        golds = []
        for index, (text, gold) in enumerate(zip(response_texts, gold_answers)):
            if not isinstance(text, str):
                raise ValueError(f"response {index} must be a str, got {type(text).__name__}")
            if not isinstance(gold, str):
                raise ValueError(f"gold answer {index} must be a str, got {type(gold).__name__}: {gold!r}")
            normalized = normalize_gold_answer(gold)
            if not normalized:
                raise GoldAnswerError(f"gold answer {index} is empty: {gold!r}")
            golds.append(normalized)
        return golds


_default_verifier: MathVerifier | None = None
_default_verifier_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier behind `verify` and `verify_batch` (one worker, 10 s deadline)."""
    global _default_verifier
    with _default_verifier_lock:
        if _default_verifier is None or _default_verifier.pool.closed:
            _default_verifier = MathVerifier()
        return _default_verifier


def verify(response_text: str, gold_answer: str) -> bool:
    r"""True iff the last ``\boxed{}`` answer of `response_text` is equivalent to `gold_answer`.

    Never raises for a malformed response (it is simply wrong) and never hangs (hard deadline in a
    worker process); raises GoldAnswerError for an empty or unparseable gold answer.
    """
    return default_verifier().verify(response_text, gold_answer)


def verify_batch(response_texts: Sequence[str], gold_answers: Sequence[str]) -> list[bool]:
    """`verify` for each pair, with the process-wide verifier."""
    return default_verifier().verify_batch(response_texts, gold_answers)
