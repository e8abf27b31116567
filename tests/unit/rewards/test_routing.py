"""Verifiers per data source (--reward-by-source): each response is graded by its source's verifier, in order, and
training rows are checked for their own source's verifier."""

import json

import pytest

from megatron_scope.arguments import build_parser
from megatron_scope.config import build_config
from megatron_scope.data.datasets import DatasetFormatError
from megatron_scope.rewards.routing import RoutedVerifier, build_verifier
from megatron_scope.rewards.synthetic import StrictSyntheticTaskVerifier, SyntheticTaskVerifier
from megatron_scope.train import load_prompts

SOLUTION = "7+5=12 ; 12-3=9 ; A: 9"


def _data(*extra, train_data="d"):
    args = build_parser().parse_args(["--student-hf", "s", "--tokenizer", "t", "--train-data", str(train_data),
                                      "--scope-algorithm", "grpo", *extra])
    return build_config(args).data


def test_each_response_is_graded_by_its_sources_verifier_in_order():
    """The final-answer verifier accepts "A: 9" against gold "9"; the strict one grades the working against the
    reference solution. The same text gets each verifier's verdict by its source, the verdicts in input order."""
    with build_verifier(_data("--reward", "synthetic", "--reward-by-source", "strict=synthetic-strict")) as verifier:
        assert isinstance(verifier, RoutedVerifier)
        assert isinstance(verifier.of("strict"), StrictSyntheticTaskVerifier)
        assert isinstance(verifier.of("other"), SyntheticTaskVerifier) and verifier.of(None) is verifier.of("x")
        assert verifier.name == "synthetic (strict: synthetic-strict)"
        assert set(verifier.statuses) == set(SyntheticTaskVerifier.statuses) | set(StrictSyntheticTaskVerifier.statuses)
        texts = ["A: 9", "A: 9", SOLUTION, "A: 8"]
        golds = ["9", SOLUTION, SOLUTION, "8"]
        verdicts = verifier.judge_batch(texts, golds, [None, "strict", "strict", "plain"])
        assert [v.status for v in verdicts] == ["correct", "wrong_steps", "correct", "correct"]
        assert [v.status for v in verifier.judge_batch(["A: 9"], ["9"])] == ["correct"]  # no sources: the default
        with pytest.raises(ValueError, match="1 data sources for 2 responses"):
            verifier.judge_batch(texts[:2], golds[:2], ["strict"])
        verifier.check_gold_answers(["9", SOLUTION], [None, "strict"])
        with pytest.raises(ValueError, match="reference solution '9'"):
            verifier.check_gold_answers(["9"], ["strict"])


def test_without_routes_the_run_has_one_verifier():
    verifier = build_verifier(_data("--reward", "synthetic-strict"))
    assert type(verifier) is StrictSyntheticTaskVerifier


def test_the_worker_verifiers_take_the_worker_flags():
    """--verifier-workers and --verifier-timeout reach the math and custom verifiers' pools (every route's)."""
    flags = ["--reward", "math", "--verifier-workers", "3", "--verifier-timeout", "2.5", "--reward-by-source",
             "code=custom", "--custom-reward-function", "tests/data/custom_reward.py:judge"]
    with build_verifier(_data(*flags)) as verifier:
        for source in (None, "code"):
            pool = verifier.of(source).pool
            assert (pool.num_workers, pool.timeout_seconds) == (3, 2.5)
    with pytest.raises(SystemExit):
        _data("--verifier-workers", "0")


def test_training_rows_are_checked_for_their_own_sources_verifier(tmp_path):
    """A row of a source graded by the math verifier may have a non-integer gold; the synthetic sources' rows must
    have an integer one (the row named in the error)."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"id": "a", "prompt": "1+1=", "answer": "2", "source": "arith"},
            {"id": "b", "prompt": "x?", "answer": "\\frac{1}{2}", "source": "algebra"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = ["--reward", "synthetic", "--data-source-key", "source"]
    dataset = load_prompts(_data(*flags, "--reward-by-source", "algebra=math", train_data=path))
    assert [(p.answer, p.data_source) for p in dataset.prompts] == [("2", "arith"), ("\\frac{1}{2}", "algebra")]
    with pytest.raises(DatasetFormatError, match="line 2: bad answer: gold answer must be an integer"):
        load_prompts(_data(*flags, train_data=path))
