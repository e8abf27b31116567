import json
import random
import time

import pytest

from megatron_scope.data.synthetic import (
    MAX_ANSWER_DIGITS,
    Difficulty,
    check_response,
    extract_answer,
    generate_problems,
    is_held_out,
    write_task_files,
)
from tests.unit.data.conftest import DEMO_DIFFICULTY


def evaluate_left_to_right(prompt: str) -> int:
    """Independent of the generator: parenthesise the expression left to right and let Python evaluate it."""
    assert prompt.startswith("Q: ") and prompt.endswith("=")
    expression = prompt[3:-1]
    numbers, operators, current = [], [], ""
    for character in expression:
        if character in "+-*" and current:
            numbers.append(current)
            operators.append(character)
            current = ""
        else:
            current += character
    numbers.append(current)
    text = numbers[0]
    for operator, number in zip(operators, numbers[1:]):
        text = f"({text}{operator}{number})"
    return eval(text)  # digits, + - * and parentheses only, checked below


def test_generation_is_deterministic_and_seed_dependent():
    first = generate_problems(200, seed=3, difficulty=DEMO_DIFFICULTY)
    assert first == generate_problems(200, seed=3, difficulty=DEMO_DIFFICULTY)
    assert first != generate_problems(200, seed=4, difficulty=DEMO_DIFFICULTY)
    assert len({p.id for p in first}) == 200


@pytest.mark.parametrize("difficulty", [
    DEMO_DIFFICULTY,
    Difficulty(min_operands=3, max_operands=5, max_operand=20, operations="-", allow_negative=True),
    Difficulty(max_operands=2, operations="*"),
])
def test_answers_and_every_step_are_correct(difficulty):
    for problem in generate_problems(300, seed=1, difficulty=difficulty):
        assert set(problem.prompt[3:-1]) <= set("0123456789+-*")
        assert int(problem.answer) == evaluate_left_to_right(problem.prompt)
        steps = problem.solution.split(" ; ")
        assert steps[-1] == f"A: {problem.answer}"
        for step in steps[:-1]:
            left, result = step.split("=")
            assert evaluate_left_to_right(f"Q: {left}=") == int(result)
        operations = sum(problem.prompt.count(op) for op in "+-*")  # operands are never negative
        assert len(steps) - 1 == operations and difficulty.min_operands <= operations + 1 <= difficulty.max_operands
        assert check_response(problem.solution, problem.answer)


def test_knobs_are_respected():
    difficulty = Difficulty(min_operands=3, max_operands=3, max_operand=5, operations="-", allow_negative=False)
    for problem in generate_problems(300, seed=0, difficulty=difficulty):
        operands = [int(x) for x in problem.prompt[3:-1].split("-")]
        assert len(operands) == 3 and max(operands) <= 5
        assert int(problem.answer) >= 0 and all(int(s.split("=")[1]) >= 0 for s in problem.solution.split(" ; ")[:-1])


def test_unique_kept_prompts_and_exhaustion():
    two_operands = Difficulty(max_operands=2)
    held_out = generate_problems(50, seed=1, difficulty=two_operands, unique=True, keep=lambda p: "+" in p)
    assert len({p.prompt for p in held_out}) == 50 and all("+" in p.prompt for p in held_out)
    # two operands in [0, 2] with "+" only: 9 distinct prompts
    with pytest.raises(ValueError, match="too small"):
        generate_problems(10, seed=0, difficulty=Difficulty(max_operands=2, max_operand=2, operations="+"), unique=True)


def test_held_out_split_is_a_fixed_fraction_of_prompts():
    prompts = {p.prompt for p in generate_problems(5000, seed=0)}
    held = {p for p in prompts if is_held_out(p, 0.1)}
    assert 0.07 < len(held) / len(prompts) < 0.13
    assert held == {p for p in prompts if is_held_out(p, 0.1)} and held < {p for p in prompts if is_held_out(p, 0.3)}
    for fraction in (0, 1, -0.5):
        with pytest.raises(ValueError, match="fraction"):
            is_held_out("Q: 1+1=", fraction)


@pytest.mark.parametrize("kwargs", [dict(min_operands=1), dict(min_operands=3, max_operands=2), dict(max_operand=0),
                                    dict(operations=""), dict(operations="+/"), dict(operations="++")])
def test_bad_difficulty_names_the_value(kwargs):
    with pytest.raises(ValueError, match="Difficulty"):
        Difficulty(**kwargs)


def test_write_task_files(tmp_path):
    files = write_task_files(tmp_path, num_train=600, num_eval=200, seed=5, difficulty=DEMO_DIFFICULTY)
    train = [json.loads(line) for line in open(files.train_jsonl)]
    evaluation = [json.loads(line) for line in open(files.eval_jsonl)]
    assert len(train) == 600 and len(evaluation) == 200
    assert set(train[0]) == {"id", "prompt", "solution", "answer"}
    assert all(is_held_out(r["prompt"]) for r in evaluation) and not any(is_held_out(r["prompt"]) for r in train)
    assert len({r["id"] for r in train + evaluation}) == 800
    # both splits follow the task's distribution: every operand count shows up in the eval split
    steps = {r["solution"].count(";") for r in evaluation}
    assert steps == {1, 2, 3}
    corpus = open(files.corpus_txt).read().splitlines()
    assert corpus == [r["prompt"] + r["solution"] for r in train]
    assert open(files.train_jsonl).read() == open(write_task_files(
        tmp_path / "again", 600, 200, 5, DEMO_DIFFICULTY).train_jsonl).read()
    with pytest.raises(ValueError, match="fraction"):
        write_task_files(tmp_path / "bad", 10, 10, 0, eval_fraction=1.5)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("response, expected", [
    ("7+5=12 ; 12-3=9 ; A: 9", "9"),
    ("A: 3 ; 1+1=2 ; A: 12", "12"),      # the last answer counts
    ("A:12", "12"),
    ("A: -4", "-4"),
    ("A: 007", "7"),
    ("A: -0", "0"),
    ("A: 12abc", "12"),
    ("", None),
    ("7+5=12 ; 12-3=9 ;", None),
    ("A: ", None),
    ("A: x", None),
    ("a: 9", None),
    ("\x00\ufffd⁇ A: ", None),
    ("A: " + "9" * (MAX_ANSWER_DIGITS + 1), None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_check_response_correct_incorrect_garbage():
    assert check_response("7+5=12 ; 12-3=9 ; A: 9", "9")
    assert check_response("7+5=12 ; 12-3=9 ; A: 9", 9)
    assert not check_response("7+5=12 ; 12-3=9 ; A: 8", "9")
    assert not check_response("A: 19", "9")
    assert not check_response("A: 9", "19")
    assert not check_response("A: 9 ; A: 10", "9")
    assert not check_response("", "9")
    rng = random.Random(0)
    for _ in range(200):
        garbage = "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 60)))
        check_response(garbage, "3")  # never raises


def test_check_response_on_very_long_responses_is_fast_and_exact():
    pathological = ["A:" * 300_000, "A: " + "1" * 1_000_000, "A: 1" * 200_000 + "x", "9" * 1_000_000]
    start = time.perf_counter()
    results = [check_response(text, "1") for text in pathological]
    assert time.perf_counter() - start < 2.0
    assert results == [False, False, True, False]


@pytest.mark.parametrize("gold", ["", "nine", "1.5", None, True, "1" * 40])
def test_bad_gold_answer_raises(gold):
    with pytest.raises(ValueError, match="gold answer"):
        check_response("A: 1", gold)
