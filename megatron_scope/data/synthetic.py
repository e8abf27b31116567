"""A synthetic reasoning task with checkable answers: multi-step integer arithmetic written out.

The embedded CPU demo (issue 6) needs a task that a 2-4 layer, hidden-128 transformer learns in minutes,
with short responses (<= ~40 tokens) and a rule-based verifier, so that SCOPE's split of each prompt's G
responses into correct and incorrect ones (arXiv 2604.10688, Sec. 3) is exact.

Format (one problem)::

    prompt:   "Q: 7+5-3="
    solution: "7+5=12 ; 12-3=9 ; A: 9"
    answer:   "9"

The expression is evaluated strictly left to right, one operation per step, as the solution writes it
(``"Q: 2+3*4="`` is ``(2+3)*4 = 20``; there is no operator precedence). Operands are integers in
``[0, max_operand]``; with ``allow_negative=False`` every subtrahend is at most the running value, so no
intermediate result is negative.

The verifier reads the *last* ``"A: <int>"`` of a response (`extract_answer`) and compares integers
(`check_response`); it runs in time linear in the response length and never raises on garbage text.

The strict check (`check_working`, behind ``--reward synthetic-strict``) also grades the working: the
response must be exactly the reference solution's steps, in order, then its ``"A: <int>"``. A step is
``<left><op><operand>=<result>`` with ``-`` allowed before ``left`` and ``result`` (negative intermediates);
steps are separated by ``";"``. The reference itself must be the unique left-to-right evaluation
(`reference_steps` checks every step's arithmetic, the chaining and the final answer), so a matching
response has every step right, chained, none missing, extra or reordered. Spaces and tabs are allowed
around every number, operator, ``"="``, ``";"`` and after ``"A:"`` (as `extract_answer` allows after
``"A:"``), and any whitespace at either end; numbers compare as integers (``"012"`` is 12), each at most
MAX_ANSWER_DIGITS digits. Anything else (text before, between or after the steps) fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from typing import Callable, NamedTuple

OPERATIONS = "+-*"
"""The operations the task can use."""

TASK_ALPHABET = "0123456789+-*=;:AQ "
"""Every character a prompt or solution of this task can contain (the tokenizer must cover it)."""

MAX_ANSWER_DIGITS = 32
"""An "A: <int>" with more digits than this is not taken as an answer (bounds the int conversion)."""

_ANSWER_PATTERN = re.compile(r"A:[ \t]*(-?\d+)")
_NUMBER = r"(-?[0-9]{1,%d})" % MAX_ANSWER_DIGITS  # ASCII digits only: strict on content
_OPERAND = r"([0-9]{1,%d})" % MAX_ANSWER_DIGITS
_STEP_PATTERN = re.compile(rf"[ \t]*{_NUMBER}[ \t]*([+*-])[ \t]*{_OPERAND}[ \t]*=[ \t]*{_NUMBER}[ \t]*")
_FINAL_PATTERN = re.compile(rf"[ \t]*A:[ \t]*{_NUMBER}[ \t]*")
_PROMPT_PATTERN = re.compile(rf"Q:[ \t]*{_OPERAND}((?:[ \t]*[+*-][ \t]*[0-9]{{1,{MAX_ANSWER_DIGITS}}})+)[ \t]*=")
_PROMPT_OPERATION = re.compile(r"([+*-])[ \t]*([0-9]+)")


class Problem(NamedTuple):
    """One problem: a stable id, the prompt, the step-by-step solution and the final answer (canonical int)."""

    id: str
    prompt: str
    solution: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """The knobs of the task's difficulty."""

    min_operands: int = 2
    """Fewest operands of a problem (>= 2); the number of steps is operands - 1."""
    max_operands: int = 4
    """Most operands of a problem; each problem draws its count uniformly in [min_operands, max_operands]."""
    max_operand: int = 9
    """Operands are integers in [0, max_operand]."""
    operations: str = "+-"
    """The operations to draw from, uniformly: a non-empty subset of "+-*"."""
    allow_negative: bool = False
    """False: each subtrahend is drawn in [0, min(max_operand, running value)], so no result is negative."""

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"Difficulty needs 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}"
            )
        if self.max_operand < 1:
            raise ValueError(f"Difficulty.max_operand must be >= 1, got {self.max_operand}")
        if not self.operations or any(op not in OPERATIONS for op in self.operations):
            raise ValueError(
                f"Difficulty.operations must be a non-empty subset of {OPERATIONS!r}, got {self.operations!r}"
            )
        if len(set(self.operations)) != len(self.operations):
            raise ValueError(f"Difficulty.operations repeats an operation: {self.operations!r}")


def solve(operands: list[int], operations: list[str]) -> tuple[str, int]:
    """(step-by-step solution, final value) of `operands` combined left to right by `operations`."""
    if len(operations) != len(operands) - 1 or not operations:
        raise ValueError(f"{len(operands)} operands need {len(operands) - 1} >= 1 operations, got {operations!r}")
    value = operands[0]
    steps = []
    for operation, operand in zip(operations, operands[1:]):
        result = _apply(value, operation, operand)
        steps.append(f"{value}{operation}{operand}={result}")
        value = result
    return " ; ".join(steps + [f"A: {value}"]), value


def _apply(left: int, operation: str, right: int) -> int:
    if operation == "+":
        return left + right
    if operation == "-":
        return left - right
    if operation == "*":
        return left * right
    raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS!r}")


def _draw_problem(rng: random.Random, difficulty: Difficulty) -> tuple[str, str, int]:
    num_operands = rng.randint(difficulty.min_operands, difficulty.max_operands)
    value = rng.randint(0, difficulty.max_operand)
    operands, operations = [value], []
    for _ in range(num_operands - 1):
        operation = rng.choice(difficulty.operations)
        high = difficulty.max_operand
        if operation == "-" and not difficulty.allow_negative:
            high = min(high, value)
        operand = rng.randint(0, high)
        operands.append(operand)
        operations.append(operation)
        value = _apply(value, operation, operand)
    expression = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(operations, operands[1:]))
    solution, answer = solve(operands, operations)
    return f"Q: {expression}=", solution, answer


def generate_problems(
    n: int,
    seed: int,
    difficulty: Difficulty = Difficulty(),
    *,
    id_prefix: str = "arith",
    unique: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> list[Problem]:
    """`n` problems drawn deterministically from `seed`, with ids "<id_prefix>-<seed>-<index>".

    unique: no prompt repeats. keep: only prompts it accepts are returned (e.g. `is_held_out` or its
    negation). Both redraw, and raise ValueError if the problem space runs out.
    """
    if n < 0:
        raise ValueError(f"generate_problems: n must be >= 0, got {n}")
    rng = random.Random(f"synthetic-arithmetic-{seed}")
    seen: set[str] = set()
    problems: list[Problem] = []
    max_draws = 100 * n + 1000
    draws = 0
    while len(problems) < n:
        if draws >= max_draws:
            raise ValueError(
                f"generate_problems: found only {len(problems)} of {n} problems (unique={unique}, keep={keep}) "
                f"after {draws} draws; the problem space of {difficulty} is too small"
            )
        draws += 1
        prompt, solution, answer = _draw_problem(rng, difficulty)
        if (keep is not None and not keep(prompt)) or (unique and prompt in seen):
            continue
        seen.add(prompt)
        problems.append(Problem(f"{id_prefix}-{seed}-{len(problems)}", prompt, solution, str(answer)))
    return problems


def is_held_out(prompt: str, fraction: float = 0.1) -> bool:
    """Whether `prompt` belongs to the evaluation split: a fixed hash of the prompt text, below `fraction`.

    Every prompt is on one side for good, so the splits never share a prompt and both follow the task's
    distribution (a random held-out draw would instead exhaust the small 2- and 3-operand spaces).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) < fraction * 2**32


def extract_answer(response_text: str) -> str | None:
    """The integer of the last "A: <int>" in `response_text`, canonical (no leading zeros, "-0" -> "0").

    None when there is none, or when it has more than MAX_ANSWER_DIGITS digits. Linear time; never
    raises on any str.
    """
    if not isinstance(response_text, str):
        raise TypeError(f"extract_answer expects a str, got {type(response_text).__name__}")
    last = None
    for last in _ANSWER_PATTERN.finditer(response_text):
        pass
    if last is None:
        return None
    digits = last.group(1)
    if len(digits.lstrip("-")) > MAX_ANSWER_DIGITS:
        return None
    return str(int(digits))


def canonical_answer(answer: str | int) -> str:
    """A gold answer as a canonical integer string; ValueError naming it if it is not an integer."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise ValueError(f"gold answer must be an integer str or int, got {answer!r}")
    text = str(answer).strip()
    if not re.fullmatch(r"-?\d{1,%d}" % MAX_ANSWER_DIGITS, text):
        raise ValueError(f"gold answer must be an integer of at most {MAX_ANSWER_DIGITS} digits, got {answer!r}")
    return str(int(text))


def check_response(response_text: str, answer: str | int) -> bool:
    """The task's reward: True iff the last "A: <int>" of the response equals the gold `answer`.

    Garbage, empty or huge responses give False, never an exception; a gold answer that is not an
    integer raises ValueError (a data error, not a wrong response).
    """
    gold = canonical_answer(answer)
    return extract_answer(response_text) == gold


class Step(NamedTuple):
    """One written step "<left><operation><operand>=<result>", as integers."""

    left: int
    operation: str
    operand: int
    result: int


def written_working(response_text: str) -> tuple[tuple[Step, ...], int] | None:
    """(steps, final answer) of a text in the strict format (module docstring), or None when it is not in it.

    Linear time; never raises on any str (a number of more than MAX_ANSWER_DIGITS digits is "not in it").
    """
    if not isinstance(response_text, str):
        raise TypeError(f"written_working expects a str, got {type(response_text).__name__}")
    *step_texts, final_text = response_text.strip().split(";")
    final = _FINAL_PATTERN.fullmatch(final_text)
    if final is None:
        return None
    steps = []
    for step_text in step_texts:
        match = _STEP_PATTERN.fullmatch(step_text)
        if match is None:
            return None
        left, operation, operand, result = match.groups()
        steps.append(Step(int(left), operation, int(operand), int(result)))
    return tuple(steps), int(final.group(1))


def reference_steps(solution: str) -> tuple[Step, ...]:
    """The steps of a reference solution, checked to be a left-to-right evaluation: at least one step, each
    arithmetically right, each starting from the previous step's result, and the final "A: <int>" equal to
    the last result. ValueError naming the solution otherwise (a data error)."""
    if not isinstance(solution, str):
        raise ValueError(f"reference solution must be a str, got {solution!r}")
    parsed = written_working(solution)
    if parsed is None:
        raise ValueError(f"reference solution {solution!r} is not in the form '<a><op><b>=<c> ; ... ; A: <int>' "
                         f"(ops {OPERATIONS!r}, integers of at most {MAX_ANSWER_DIGITS} digits)")
    steps, final = parsed
    if not steps:
        raise ValueError(f"reference solution {solution!r} has no step before its 'A: <int>'")
    for number, step in enumerate(steps, start=1):
        if number > 1 and step.left != steps[number - 2].result:
            raise ValueError(f"reference solution {solution!r}: step {number} starts from {step.left}, not from "
                             f"the result {steps[number - 2].result} of step {number - 1}")
        expected = _apply(step.left, step.operation, step.operand)
        if step.result != expected:
            raise ValueError(f"reference solution {solution!r}: step {number} says "
                             f"{step.left}{step.operation}{step.operand}={step.result}, but it is {expected}")
    if final != steps[-1].result:
        raise ValueError(f"reference solution {solution!r}: final answer {final} is not the last step's result "
                         f"{steps[-1].result}")
    return steps


def prompt_steps(prompt: str) -> tuple[Step, ...]:
    """The unique left-to-right evaluation of a prompt such as "Q: 7+5-3=" (spaces and tabs allowed), as
    steps. ValueError naming the prompt when it is not one, or a result has more than MAX_ANSWER_DIGITS digits."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {prompt!r}")
    match = _PROMPT_PATTERN.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not in the form 'Q: <a><op><b>...=' (ops {OPERATIONS!r}, "
                         f"non-negative integers of at most {MAX_ANSWER_DIGITS} digits)")
    value, steps = int(match.group(1)), []
    for operation, operand_text in _PROMPT_OPERATION.findall(match.group(2)):
        result = _apply(value, operation, int(operand_text))
        if len(str(abs(result))) > MAX_ANSWER_DIGITS:
            raise ValueError(f"prompt {prompt!r}: the intermediate result {result} has more than "
                             f"{MAX_ANSWER_DIGITS} digits")
        steps.append(Step(value, operation, int(operand_text), result))
        value = result
    return tuple(steps)


def check_solution_of_prompt(prompt: str, solution: str) -> None:
    """ValueError naming both unless `solution` is exactly the left-to-right evaluation of `prompt`."""
    expected = prompt_steps(prompt)
    if reference_steps(solution) != expected:
        operands = [expected[0].left] + [step.operand for step in expected]
        correct, _ = solve(operands, [step.operation for step in expected])
        raise ValueError(f"reference solution {solution!r} is not the left-to-right evaluation of prompt "
                         f"{prompt!r}: expected {correct!r}")


def check_working(response_text: str, solution: str) -> bool:
    """The strict reward: True iff the response writes exactly the steps of the reference `solution` and
    its final answer (the format of the module docstring; every step right, chained, none missing, extra or
    reordered). Never raises on a response str; a bad reference raises ValueError (`reference_steps`)."""
    return matches_reference(response_text, reference_steps(solution))


def matches_reference(response_text: str, steps: tuple[Step, ...]) -> bool:
    """`check_working` against steps already checked by `reference_steps` (or `prompt_steps`)."""
    if not isinstance(response_text, str):
        raise TypeError(f"matches_reference expects a str, got {type(response_text).__name__}")
    if response_text.count(";") != len(steps):  # cheap rejection before any parsing
        return False
    return written_working(response_text) == (tuple(steps), steps[-1].result)


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """Where `write_task_files` put the task."""

    train_jsonl: str
    """Rows {"id", "prompt", "solution", "answer"} of the training split."""
    eval_jsonl: str
    """Same rows for the evaluation split: prompts never in the training split (see `is_held_out`)."""
    corpus_txt: str
    """One "prompt+solution" line per training problem: the tokenizer's training text."""


def write_task_files(
    out_dir: str | os.PathLike,
    num_train: int,
    num_eval: int,
    seed: int,
    difficulty: Difficulty = Difficulty(),
    eval_fraction: float = 0.1,
) -> TaskFiles:
    """Generate the train and eval splits and the tokenizer corpus under `out_dir` (created if missing).

    The prompts with `is_held_out(prompt, eval_fraction)` form the eval split (drawn from seed + 1, the
    same distribution as training, repeats allowed); all others the training split (drawn from seed).
    No eval prompt is ever trained on, so evaluation measures generalisation, not recall.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"write_task_files needs num_train, num_eval >= 1, got {num_train}, {num_eval}")
    train = generate_problems(num_train, seed, difficulty, id_prefix="train",
                              keep=lambda prompt: not is_held_out(prompt, eval_fraction))
    evaluation = generate_problems(num_eval, seed + 1, difficulty, id_prefix="eval",
                                   keep=lambda prompt: is_held_out(prompt, eval_fraction))
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    files = TaskFiles(
        train_jsonl=os.path.join(out_dir, "train.jsonl"),
        eval_jsonl=os.path.join(out_dir, "eval.jsonl"),
        corpus_txt=os.path.join(out_dir, "corpus.txt"),
    )
    for path, problems in ((files.train_jsonl, train), (files.eval_jsonl, evaluation)):
        _write_atomically(path, "".join(json.dumps(p._asdict()) + "\n" for p in problems))
    _write_atomically(files.corpus_txt, "".join(p.prompt + p.solution + "\n" for p in train))
    return files


def _write_atomically(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)
