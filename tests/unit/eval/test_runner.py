"""The evaluation runner with a scripted engine (plumbing only) and the real math verifier."""

import json
import math
import os

import pytest

from megatron_scope.data.datasets import PromptFormat
from megatron_scope.eval.benchmarks import BenchmarkProblem, load_benchmark
from megatron_scope.eval.runner import EvalConfig, evaluate, write_report
from megatron_scope.rewards.math_verifier import GoldAnswerError, MathVerifier
from megatron_scope.rollout.seeds import StepSeeds
from tests.unit.eval.scripted_engine import CharTokenizer, ScriptedEngine

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "eval")
TEMPLATE = PromptFormat("Problem: {prompt}\nPut the final answer in \\boxed{}.")

# n = 4 scripted responses per problem; the comment gives how many are correct (c).
MATH500_SCRIPT = {
    "Simplify $\\frac{6}{8}$.": [  # c = 3: equivalent forms count
        "6/8 reduces to \\boxed{\\frac{3}{4}}",
        "As a decimal: \\boxed{0.75}",
        "Dividing by 2: \\boxed{\\dfrac{3}{4}}",
        "I get \\boxed{\\frac{6}{7}}",
    ],
    "Solve $x^2 = 4$ for all real $x$.": [  # c = 1
        "So \\boxed{2}",
        "The roots are \\boxed{-2, 2}",
        "The answer is 2 and -2.",  # no box
        "\\boxed{\\frac{",  # truncated
    ],
    "For which $x$ is $\\sqrt{x - 1}$ defined?": [  # c = 2
        "\\boxed{[1, \\infty)}",
        "\\boxed{(1, \\infty)}",
        "\\boxed{x \\ge 1} hmm, in interval notation \\boxed{[1,\\infty)}",
        "\\boxed{}",
    ],
    "What is $\\sqrt{50}$ in simplest radical form?": [  # c = 0
        "\\boxed{25}",
        "\\boxed{5\\sqrt{3}}",
        "garbage }}}{{{ \\boxed{\\sqrt{",
        "",
    ],
}
MINERVA_SCRIPT = {
    "A car travels $150$ km in $2$ hours. What is its average speed in km/h?": ["\\boxed{75}"] * 4,  # c = 4
    "What is the period, in seconds, of a wave with frequency $4$ Hz?": [  # c = 1
        "\\boxed{\\frac{1}{4}}",
        "\\boxed{4}",
        "\\boxed{0.4}",
        "\\boxed{2}",
    ],
}
EXPECTED_CORRECT = {"math500": [3, 1, 2, 0], "minerva": [4, 1]}


def exact_pass_at_k(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_seconds=8.0) as shared:
        yield shared


@pytest.fixture(scope="module")
def benchmarks():
    return {
        "math500": load_benchmark("math500", os.path.join(DATA, "math500.jsonl")),
        "minerva": load_benchmark("minerva", os.path.join(DATA, "minerva.jsonl")),
    }


@pytest.fixture(scope="module")
def evaluated(verifier, benchmarks, tmp_path_factory):
    tokenizer = CharTokenizer()
    engine = ScriptedEngine(tokenizer, {**MATH500_SCRIPT, **MINERVA_SCRIPT})
    config = EvalConfig(
        num_samples=4, ks=(1, 2, 4), prompt_format=TEMPLATE, stop_token_ids=(0,), prompts_per_call=3, seed=7
    )
    report = evaluate(engine, tokenizer, benchmarks, config, verifier, show_progress=False)
    output_dir = tmp_path_factory.mktemp("eval_out")
    paths = write_report(report, output_dir)
    return engine, config, report, paths


def test_scores_match_the_scripted_correct_counts(evaluated):
    _, config, report, _ = evaluated
    assert [result.name for result in report.benchmarks] == ["math500", "minerva"]
    for result in report.benchmarks:
        counts = EXPECTED_CORRECT[result.name]
        assert list(result.num_correct_per_problem.values()) == counts
        assert result.avg_at_n == pytest.approx(sum(c / 4 for c in counts) / len(counts), abs=1e-12)
        for k in config.ks:
            expected = sum(exact_pass_at_k(4, c, k) for c in counts) / len(counts)
            assert result.pass_at_k[k] == pytest.approx(expected, abs=1e-12)
    average_avg, average_pass = report.average()
    assert average_avg == pytest.approx((6 / 16 + 5 / 8) / 2)
    assert average_pass[4] == pytest.approx((3 / 4 + 1) / 2)


def test_engine_receives_templated_prompts_in_batches(evaluated, benchmarks):
    engine, _, _, _ = evaluated
    assert [len(prompts) for prompts, _, _ in engine.calls] == [3, 1, 2]  # prompts_per_call = 3
    first_prompts, params, _ = engine.calls[0]
    assert first_prompts[0] == TEMPLATE.template.replace("{prompt}", benchmarks["math500"][0].problem)
    assert (params.n, params.stop_token_ids) == (4, (0,))
    # sample j of a benchmark's problem i: the "evaluation" stream's seed of (7, 0, i, j), whatever the batching
    seeds = StepSeeds(7, 0)
    assert [call[2] for call in engine.calls] == [seeds.groups(range(0, 3), 4, "evaluation"),
                                                  seeds.groups(range(3, 4), 4, "evaluation"),
                                                  seeds.groups(range(0, 2), 4, "evaluation")]


def test_per_sample_records(evaluated):
    _, _, report, paths = evaluated
    assert len(report.samples) == (4 + 2) * 4
    with open(paths["samples"]) as handle:
        records = [json.loads(line) for line in handle]
    assert len(records) == len(report.samples)
    first = records[0]
    assert first["benchmark"] == "math500" and first["problem_id"] == "test/prealgebra/1.json"
    assert first["correct"] is True and first["answer"] == "\\frac{3}{4}" and first["gold_answer"] == "\\frac{3}{4}"
    assert first["response"] == MATH500_SCRIPT["Simplify $\\frac{6}{8}$."][0]
    statuses = {record["status"] for record in records}
    assert {"correct", "wrong", "no_boxed_answer"} <= statuses


def test_json_and_markdown_reports(evaluated):
    _, _, report, paths = evaluated
    with open(paths["json"]) as handle:
        results = json.load(handle)
    assert results["benchmarks"]["minerva"]["avg@4"] == pytest.approx(5 / 8)
    assert results["benchmarks"]["minerva"]["pass@2"] == pytest.approx((1 + exact_pass_at_k(4, 1, 2)) / 2)
    assert results["average"]["pass@4"] == pytest.approx(0.875)
    assert results["ks"] == [1, 2, 4] and results["num_samples"] == 4
    with open(paths["markdown"]) as handle:
        markdown = handle.read()
    assert markdown == report.to_markdown()
    lines = markdown.strip().split("\n")
    assert lines[0] == "| benchmark | problems | avg@4 | pass@1 | pass@2 | pass@4 |"
    assert lines[3] == "| minerva | 2 | 62.50 | 62.50 | 75.00 | 100.00 |"
    assert lines[4] == "| average | 6 | 50.00 | 50.00 | 66.67 | 87.50 |"


def test_plot_file_written(evaluated):
    _, _, _, paths = evaluated
    with open(paths["plot"], "rb") as handle:
        png = handle.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_gold_answer_fails_before_any_sampling(verifier):
    tokenizer = CharTokenizer()
    engine = ScriptedEngine(tokenizer, {"q": ["\\boxed{1}"]})
    config = EvalConfig(num_samples=1, ks=(1,), prompt_format=TEMPLATE)
    with pytest.raises(GoldAnswerError, match="'}'"):
        evaluate(engine, tokenizer, {"x": [BenchmarkProblem("1", "q", "}")]}, config, verifier, show_progress=False)
    assert engine.calls == []


def test_engine_returning_the_wrong_shape_is_an_error(verifier):
    class ShortEngine(ScriptedEngine):
        def generate(self, prompts, params, seeds=None, max_new_tokens=None):
            return super().generate(prompts, params, seeds)[:-1]

    tokenizer = CharTokenizer()
    engine = ShortEngine(tokenizer, {"q1": ["\\boxed{1}"], "q2": ["\\boxed{2}"]})
    config = EvalConfig(num_samples=1, ks=(1,), prompt_format=TEMPLATE)
    problems = [BenchmarkProblem("1", "q1", "1"), BenchmarkProblem("2", "q2", "2")]
    with pytest.raises(RuntimeError, match="ShortEngine.generate returned 1 prompts.*expected 2 prompts with 1 each"):
        evaluate(engine, tokenizer, {"x": problems}, config, verifier, show_progress=False)


def test_bad_benchmarks_are_rejected_before_sampling(verifier):
    tokenizer = CharTokenizer()
    engine = ScriptedEngine(tokenizer, {})
    config = EvalConfig(num_samples=1, ks=(1,), prompt_format=TEMPLATE)
    with pytest.raises(ValueError, match="no benchmarks"):
        evaluate(engine, tokenizer, {}, config, verifier)
    with pytest.raises(ValueError, match="benchmark 'x' has no problems"):
        evaluate(engine, tokenizer, {"x": []}, config, verifier)
    duplicate = [BenchmarkProblem("1", "a", "1"), BenchmarkProblem("1", "b", "2")]
    with pytest.raises(ValueError, match="duplicate problem id '1'"):
        evaluate(engine, tokenizer, {"x": duplicate}, config, verifier)
    with pytest.raises(ValueError, match="expected \\(id, problem, gold_answer\\) str tuples"):
        evaluate(engine, tokenizer, {"x": [("1", "a", 1)]}, config, verifier)
    assert engine.calls == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=4, ks=(1, 8)), "k=8 must be an int in \\[1, num_samples=4\\]"),
        (dict(num_samples=4, ks=(0,)), "k=0"),
        (dict(num_samples=4, ks=(4, 1)), "strictly increasing"),
        (dict(num_samples=4, ks=()), "at least one k"),
        (dict(num_samples=0, ks=(1,)), "num_samples must be an int >= 1, got 0"),
        (dict(num_samples=4, ks=(1,), temperature=-1.0), "temperature must be >= 0"),
        (dict(num_samples=4, ks=(1,), prompts_per_call=0), "prompts_per_call must be an int >= 1"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_template_keeps_literal_braces(verifier):
    engine, tokenizer = ScriptedEngine(CharTokenizer(), {"1+{x}": ["\\boxed{1}"]}), CharTokenizer()
    config = EvalConfig(num_samples=1, ks=(1,), prompt_format=PromptFormat("{prompt} -> \\boxed{}"))
    evaluate(engine, tokenizer, {"x": [BenchmarkProblem("1", "1+{x}", "1")]}, config, verifier, False)
    assert engine.calls[0][0] == ["1+{x} -> \\boxed{}"]


def test_the_strict_synthetic_verifier_through_the_runner_counts_statuses():
    """The runner takes the strict verifier (gold = reference solution) like any other; each benchmark counts
    its verdict statuses, so a right answer reached with wrong working ("wrong_steps") is reported apart."""
    from megatron_scope.rewards.synthetic import StrictSyntheticTaskVerifier

    problems = [BenchmarkProblem("a", "Q: 7+5-3=", "7+5=12 ; 12-3=9 ; A: 9"),
                BenchmarkProblem("b", "Q: 2*3=", "2*3=6 ; A: 6")]
    script = {"Q: 7+5-3=": ["7+5=12 ; 12-3=9 ; A: 9", "A: 9", "7+5=12 ; 12-3=8 ; A: 8"],
              "Q: 2*3=": ["2*3=6;A:6", "2+3=5 ; A: 6", "nothing"]}
    tokenizer = CharTokenizer()
    report = evaluate(ScriptedEngine(tokenizer, script), tokenizer, {"arithmetic": problems},
                      EvalConfig(num_samples=3, ks=(1, 3)), StrictSyntheticTaskVerifier(),
                      show_progress=False)
    result = report.benchmarks[0]
    assert result.num_correct_per_problem == {"a": 1, "b": 1}
    assert result.status_counts == {"correct": 2, "no_answer": 1, "wrong": 1, "wrong_steps": 2}
    assert report.to_json()["benchmarks"]["arithmetic"]["statuses"] == result.status_counts
    assert [s.status for s in report.samples if s.problem_id == "b"] == ["correct", "wrong_steps", "no_answer"]
    with pytest.raises(GoldAnswerError, match="gold solution 0: reference solution '9'"):
        evaluate(ScriptedEngine(tokenizer, script), tokenizer, {"x": [BenchmarkProblem("a", "Q: 7+5-3=", "9")]},
                 EvalConfig(num_samples=3, ks=(1,)), StrictSyntheticTaskVerifier(),
                 show_progress=False)
