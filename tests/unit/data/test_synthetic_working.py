"""The strict grammar of the synthetic task's working (`--reward synthetic-strict`): reference solutions and
prompts parse to the left-to-right evaluation, a response passes only with exactly those steps, and nothing
a response can contain makes the check raise."""

import random
import time

import pytest

from megatron_scope.data.synthetic import (
    MAX_ANSWER_DIGITS,
    Difficulty,
    Step,
    check_solution_of_prompt,
    check_working,
    generate_problems,
    prompt_steps,
    reference_steps,
    written_working,
)
from tests.unit.data.conftest import DEMO_DIFFICULTY

SOLUTION = "7+5=12 ; 12-3=9 ; A: 9"
STEPS = (Step(7, "+", 5, 12), Step(12, "-", 3, 9))


def test_a_reference_solution_and_its_prompt_give_the_same_steps():
    assert reference_steps(SOLUTION) == STEPS == prompt_steps("Q: 7+5-3=")
    assert prompt_steps("Q: 2+3*4=") == (Step(2, "+", 3, 5), Step(5, "*", 4, 20))  # no operator precedence
    assert written_working(SOLUTION) == (STEPS, 9)
    check_solution_of_prompt("Q: 7+5-3=", SOLUTION)
    assert check_working(SOLUTION, SOLUTION)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("difficulty", [Difficulty(), DEMO_DIFFICULTY,
                                        Difficulty(2, 5, 20, "+-*", allow_negative=True)])
def test_every_generated_problem_passes_with_its_own_solution(seed, difficulty):
    for problem in generate_problems(300, seed, difficulty):
        steps = reference_steps(problem.solution)
        assert steps == prompt_steps(problem.prompt)
        assert str(steps[-1].result) == problem.answer
        check_solution_of_prompt(problem.prompt, problem.solution)
        assert check_working(problem.solution, problem.solution)


def _write(steps, final) -> str:
    return " ; ".join([f"{s.left}{s.operation}{s.operand}={s.result}" for s in steps] + [f"A: {final}"])


@pytest.mark.parametrize("seed", [0, 1])
def test_every_edit_of_a_generated_solution_that_keeps_its_answer_fails(seed):
    """Property: drop, duplicate, swap or change one step of any generated solution, keep its final answer:
    the strict check refuses it (and accepts the unedited rewrite)."""
    rng = random.Random(seed)
    for problem in generate_problems(200, seed, Difficulty(2, 5, 9, "+-*", allow_negative=True)):
        steps, final = list(reference_steps(problem.solution)), int(problem.answer)
        assert check_working(_write(steps, final), problem.solution)
        k = rng.randrange(len(steps))
        edits = [steps[:k] + steps[k + 1:], steps[:k] + [steps[k]] + steps[k:]]
        field = rng.choice(["left", "operand", "result"])
        edits.append(steps[:k] + [steps[k]._replace(**{field: getattr(steps[k], field) + rng.choice([-1, 1])})]
                     + steps[k + 1:])
        other_operation = rng.choice([o for o in "+-*" if o != steps[k].operation])
        edits.append(steps[:k] + [steps[k]._replace(operation=other_operation)] + steps[k + 1:])
        if len(steps) > 1:
            i, j = rng.sample(range(len(steps)), 2)
            swapped = list(steps)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            edits.append(swapped)
        for edited in edits:
            assert edited == steps or not check_working(_write(edited, final), problem.solution), (problem, edited)


def test_negative_intermediates_when_allowed():
    solution = "3-5=-2 ; -2-4=-6 ; -6*2=-12 ; -12+20=8 ; A: 8"
    assert prompt_steps("Q: 3-5-4*2+20=") == reference_steps(solution)
    assert check_working(solution, solution)
    assert check_working(" 3 - 5 = -2;-2 - 4 = -6 ; -6 * 2=-12 ;-12+20 = 8; A:8 ", solution)
    assert not check_working("3-5=-2 ; -2-4=-6 ; -6*2=12 ; 12+20=32 ; A: 8", solution)  # sign dropped
    assert not check_working("3-5=2 ; 2-4=-2 ; -2*2=-4 ; -4+12=8 ; A: 8", solution)
    assert not check_working("3-5=-2 ; -2--4=2 ; A: 8", solution)  # not the prompt's operand, and not a step
    negative_final = "2-9=-7 ; A: -7"
    assert check_working("2-9=-7;A:-7", negative_final) and not check_working("2-9=-7 ; A: 7", negative_final)
    # every generated problem with negatives allowed, some of which go negative
    problems = generate_problems(200, 5, Difficulty(3, 4, 9, "-", allow_negative=True))
    assert any(step.result < 0 for p in problems for step in reference_steps(p.solution))


@pytest.mark.parametrize("response", [
    "7+5=12 ; 12-3=9 ; A: 9",
    "7+5=12;12-3=9;A:9",
    "7 + 5 = 12 ; 12 - 3 = 9 ; A: 9",
    "\t7+5 =12\t;  12-3=  9 ;A:\t9",
    "  7+5=12 ; 12-3=9 ; A: 9  ",
    "\n7+5=12 ; 12-3=9 ; A: 9\n",
    "07+5=12 ; 12-3=09 ; A: 009",  # numbers compare as integers, as the final-answer parser does
])
def test_whitespace_variants_pass(response):
    assert check_working(response, SOLUTION)


def test_a_spaced_reference_is_the_same_reference():
    assert reference_steps("7 + 5 = 12;12 - 3 = 9;A:9") == STEPS
    assert prompt_steps("  Q:7 + 5 -\t3 = ") == STEPS


@pytest.mark.parametrize("response", [
    "A: 9",                                     # all working skipped
    "12-3=9 ; A: 9",                            # first step missing
    "7+5=12 ; A: 9",                            # last step missing
    "7+5=12 ; 12-3=9 ; 9+0=9 ; A: 9",           # extra step
    "7+5=12 ; 7+5=12 ; 12-3=9 ; A: 9",          # repeated step
    "5+7=12 ; 12-3=9 ; A: 9",                   # operands swapped
    "7-3=4 ; 4+5=9 ; A: 9",                     # steps reordered (same answer)
    "7+5=11 ; 11-2=9 ; A: 9",                   # wrong arithmetic, chained
    "7+5=13 ; 12-3=9 ; A: 9",                   # wrong arithmetic, not chained
    "7+5=12 ; 13-4=9 ; A: 9",                   # not chained to the previous result
    "7+5=12 ; 12-3=9",                          # no final answer
    "Q: 7+5-3= 7+5=12 ; 12-3=9 ; A: 9",         # prompt echoed before the working
    "7+5=12 ; 12-3=9 ; A: 9 ; A: 9",            # answer twice
    "7+5=12 ; 12-3=9 ; A: 9 done",              # text after the answer
    "7+5=12 12-3=9 ; A: 9",                     # separator missing
    "7+5=12 ;; 12-3=9 ; A: 9",                  # empty step
    "7+5=12 ; 12-3=9 ; A : 9",                  # "A :" is no answer for the final-answer parser either
    "7+5=12\n; 12-3=9 ; A: 9",                  # a newline inside the working
    "7+5=12 ; 12−3=9 ; A: 9",                   # a Unicode minus
    "7+5=١٢ ; ١٢-3=9 ; A: 9",                   # non-ASCII digits
    "7+5=12 ; 12-3=9 ; A: 9.0",
])
def test_a_wrong_missing_extra_or_reordered_step_fails(response):
    assert not check_working(response, SOLUTION)


@pytest.mark.parametrize("response", ["", " ", "\n", ";", "A:", "=", "7+5=", "garbage", "A: 9" * 1000,
                                      ";" * 3, "7+5=12 ; 12-3=" + "9" * (MAX_ANSWER_DIGITS + 1) + " ; A: 9",
                                      "\x00\x01", "7+5=12 ; 12-3=9 ; A: " + "9" * 10_000])
def test_garbage_and_empty_text_fail_without_raising(response):
    assert not check_working(response, SOLUTION)
    written_working(response)  # None or some parse, never an exception


def test_huge_random_text_is_linear_time():
    rng = random.Random(0)
    alphabet = "0123456789+-*=;:AQ \t\n"
    texts = ["".join(rng.choice(alphabet) for _ in range(20_000)) for _ in range(5)]
    texts += ["1" * 200_000, "1+" * 100_000, "7+5=12 ;" * 50_000 + " A: 9", " " * 200_000 + "A: 9"]
    start = time.perf_counter()
    for text in texts:
        check_working(text, SOLUTION)
        written_working(text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("solution,message", [
    ("A: 9", "has no step"),
    ("7+5=13 ; 13-3=10 ; A: 10", "step 1 says 7\\+5=13, but it is 12"),
    ("7+5=12 ; 11-2=9 ; A: 9", "step 2 starts from 11, not from the result 12 of step 1"),
    ("7+5=12 ; 12-3=9 ; A: 8", "final answer 8 is not the last step's result 9"),
    ("9", "is not in the form"),
    ("", "is not in the form"),
    ("7/5=1 ; A: 1", "is not in the form"),
])
def test_a_bad_reference_solution_is_a_value_error_naming_it(solution, message):
    with pytest.raises(ValueError, match=message) as error:
        reference_steps(solution)
    assert repr(solution) in str(error.value)
    with pytest.raises(ValueError):
        check_working("7+5=12 ; 12-3=9 ; A: 9", solution)


@pytest.mark.parametrize("bad", [None, 9, b"7+5=12 ; A: 12"])
def test_a_reference_that_is_not_a_str_is_a_value_error(bad):
    with pytest.raises(ValueError, match="reference solution must be a str"):
        reference_steps(bad)


@pytest.mark.parametrize("prompt", ["Q: 7=", "7+5-3=", "Q: 7+5-3", "Q: -7+5=", "Q: 7/5=", "Q: 7+-5=", ""])
def test_a_bad_prompt_is_a_value_error_naming_it(prompt):
    with pytest.raises(ValueError, match="is not in the form") as error:
        prompt_steps(prompt)
    assert repr(prompt) in str(error.value)


def test_a_solution_of_another_prompt_is_a_value_error_naming_both():
    with pytest.raises(ValueError, match=r"'7\+5=12 ; 12-3=9 ; A: 9' is not the left-to-right evaluation of "
                                         r"prompt 'Q: 7\+5-4=': expected '7\+5=12 ; 12-4=8 ; A: 8'"):
        check_solution_of_prompt("Q: 7+5-4=", SOLUTION)
    with pytest.raises(ValueError, match="expected '7\\+5=12 ; 12-3=9 ; A: 9'"):
        check_solution_of_prompt("Q: 7+5-3=", "7+5=12 ; 12-3=9 ; 9+0=9 ; A: 9")


def test_a_response_that_is_not_a_str_is_a_type_error():
    with pytest.raises(TypeError):
        check_working(None, SOLUTION)


def test_a_solution_decoded_from_its_tokens_passes(task_files, tokenizer):
    """What the rollout engine hands the verifier: the solution's pieces + EOS, decoded."""
    import json

    with open(task_files.eval_jsonl) as handle:
        solutions = [json.loads(line)["solution"] for line in handle][:50]
    for solution in solutions:
        assert check_working(tokenizer.decode(tokenizer.encode(solution, add_eos=True)), solution)
