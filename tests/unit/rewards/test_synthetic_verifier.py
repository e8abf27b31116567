"""The synthetic task's verifiers behind --reward synthetic / synthetic-strict: MathVerifier's interface, the
strict one's statuses (a right answer with wrong working counted apart), errors on bad gold data only, and
the training prompts loaded with the gold each reward grades against."""

import json

import pytest

from megatron_scope.arguments import build_parser
from megatron_scope.config import REWARDS, build_config
from megatron_scope.data.datasets import DatasetFormatError
from megatron_scope.data.synthetic import Difficulty, generate_problems, write_task_files
from megatron_scope.rewards.math_verifier import STATUS_CORRECT, STATUS_WRONG, GoldAnswerError, Verdict
from megatron_scope.rewards.synthetic import (
    GOLD_COLUMNS,
    STATUS_NO_ANSWER,
    STATUS_WRONG_STEPS,
    StrictSyntheticTaskVerifier,
    SyntheticTaskVerifier,
)
from megatron_scope.train import build_verifier, load_prompts

SOLUTION = "7+5=12 ; 12-3=9 ; A: 9"


def test_the_strict_verifier_grades_the_working_and_counts_lucky_guesses_apart():
    responses = [SOLUTION, "7+5=12;12-3=9;A:9", "A: 9", "7+5=11 ; 11-2=9 ; A: 9", "7+5=12 ; 12-3=8 ; A: 8",
                 "7+5=12 ; 12-3=9", "", "garbage A: 9 garbage"]
    verdicts = StrictSyntheticTaskVerifier().judge_batch(responses, [SOLUTION] * len(responses))
    assert verdicts == [
        Verdict(True, STATUS_CORRECT, "9"), Verdict(True, STATUS_CORRECT, "9"),
        Verdict(False, STATUS_WRONG_STEPS, "9"), Verdict(False, STATUS_WRONG_STEPS, "9"),
        Verdict(False, STATUS_WRONG, "8"), Verdict(False, STATUS_NO_ANSWER, None),
        Verdict(False, STATUS_NO_ANSWER, None),
        Verdict(False, STATUS_WRONG_STEPS, "9"),
    ]
    # the final-answer verifier takes every lucky guess as correct
    lenient = SyntheticTaskVerifier().verify_batch(responses, ["9"] * len(responses))
    assert lenient == [v.status in (STATUS_CORRECT, STATUS_WRONG_STEPS) for v in verdicts]
    assert StrictSyntheticTaskVerifier().verify_batch(responses, [SOLUTION] * len(responses)) == [
        v.correct for v in verdicts]


def test_strict_is_final_answer_correct_and_the_working_right_on_generated_problems():
    problems = generate_problems(100, 4, Difficulty(2, 4, 9, "+-*", allow_negative=True))
    golds = [p.solution for p in problems]
    strict = StrictSyntheticTaskVerifier()
    assert strict.verify_batch(golds, golds) == [True] * len(problems)
    skipped = [f"A: {p.answer}" for p in problems]  # the answer without its working
    assert {v.status for v in strict.judge_batch(skipped, golds)} == {STATUS_WRONG_STEPS}
    assert SyntheticTaskVerifier().verify_batch(skipped, [p.answer for p in problems]) == [True] * len(problems)
    shifted = golds[1:] + golds[:1]  # another problem's working: right only when the two coincide
    assert strict.verify_batch(shifted, golds) == [a == b for a, b in zip(shifted, golds)]


@pytest.mark.parametrize("gold", ["9", "7+5=12 ; 12-3=8 ; A: 8", "7+5=13 ; A: 13", "", None, 9])
def test_a_bad_gold_solution_raises_naming_it_before_any_response_is_graded(gold):
    verifier = StrictSyntheticTaskVerifier()
    with pytest.raises(GoldAnswerError, match=r"gold solution 1: .*" + (repr(gold).replace("+", r"\+")
                                                                      if gold else "")) as error:
        verifier.judge_batch([SOLUTION, SOLUTION], [SOLUTION, gold])
    assert isinstance(error.value, ValueError)
    with pytest.raises(GoldAnswerError, match="gold solution 0"):
        verifier.check_gold_answers([gold])
    verifier.check_gold_answers([SOLUTION, "2-9=-7 ; A: -7"])


def test_garbage_responses_never_raise():
    garbage = ["", "\x00", "A:", ";" * 10_000, "A: " + "9" * 5_000, "7+5=12 ; " * 10_000 + "A: 9", "é" * 100]
    verdicts = StrictSyntheticTaskVerifier().judge_batch(garbage, [SOLUTION] * len(garbage))
    assert not any(v.correct for v in verdicts)
    assert verdicts[-2].status == STATUS_WRONG_STEPS


def test_batch_lengths_must_match():
    with pytest.raises(ValueError, match="2 responses but 1 gold answers"):
        StrictSyntheticTaskVerifier().judge_batch([SOLUTION, SOLUTION], [SOLUTION])


def test_every_reward_has_a_verifier_and_the_flag_reaches_the_configuration():
    from megatron_scope.rewards.custom import CustomVerifier

    assert "synthetic-strict" in REWARDS
    assert isinstance(build_verifier(_data_config("d", "synthetic")), SyntheticTaskVerifier)
    assert isinstance(build_verifier(_data_config("d", "synthetic-strict")), StrictSyntheticTaskVerifier)
    assert _data_config("d", "synthetic-strict").reward == "synthetic-strict"
    custom = _data_config("d", "custom", "--custom-reward-function", "tests/data/custom_reward.py:judge")
    with build_verifier(custom) as verifier:
        assert isinstance(verifier, CustomVerifier) and verifier.statuses[:3] == ("correct", "wrong", "no_answer")


def _data_config(path, reward, *extra):
    args = build_parser().parse_args(["--student-hf", "s", "--teacher-hf", "t", "--tokenizer", "t",
                                      "--train-data", str(path), "--reward", reward, *extra])
    return build_config(args).data


def test_training_prompts_carry_the_gold_of_their_reward(tmp_path):
    files = write_task_files(tmp_path, num_train=30, num_eval=5, seed=0)
    with open(files.train_jsonl) as handle:
        rows = [json.loads(line) for line in handle]
    for reward, column in GOLD_COLUMNS.items():
        dataset = load_prompts(_data_config(files.train_jsonl, reward))
        assert [p.answer for p in dataset.prompts] == [row[column] for row in rows]
        verifier = build_verifier(_data_config(files.train_jsonl, reward))
        assert verifier.verify_batch([row["solution"] for row in rows], [p.answer for p in dataset.prompts]) == [
            True] * len(rows)


@pytest.mark.parametrize("edit,message", [
    (lambda row: row.pop("solution"), "line 2: missing key 'solution'"),
    (lambda row: row.update(solution="1+1=3 ; A: 3"), "line 2: bad answer: reference solution '1\\+1=3 ; A: 3'"),
    (lambda row: row.update(prompt="Q: 1+1="), "prompt 'train-0-1': reference solution .* is not the "
                                               "left-to-right evaluation of prompt 'Q: 1\\+1='"),
    (lambda row: row.update(prompt="What is 1+1?"), "prompt 'train-0-1': prompt 'What is 1\\+1\\?' is not in the form"),
])
def test_bad_strict_rows_are_refused_when_the_prompts_load(tmp_path, edit, message):
    files = write_task_files(tmp_path, num_train=3, num_eval=1, seed=0)
    with open(files.train_jsonl) as handle:
        rows = [json.loads(line) for line in handle]
    edit(rows[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DatasetFormatError, match=message):
        load_prompts(_data_config(path, "synthetic-strict"))


def test_a_non_integer_answer_is_refused_for_the_final_answer_reward(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "prompt": "Q: 1+1=", "answer": "2"}\n'
                    '{"id": "b", "prompt": "Q: 1+2=", "answer": "x"}\n')
    with pytest.raises(DatasetFormatError, match="line 2: bad answer: gold answer must be an integer"):
        load_prompts(_data_config(path, "synthetic"))
    assert [p.answer for p in load_prompts(_data_config(path, "math")).prompts] == ["2", "x"]
