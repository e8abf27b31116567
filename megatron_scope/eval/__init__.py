"""Evaluation: Avg@k and unbiased Pass@k on the paper's math benchmarks, graded by the shared verifier."""

from megatron_scope.eval.benchmarks import (
    BENCHMARK_NAMES,
    BENCHMARK_SCHEMAS,
    BenchmarkFormatError,
    BenchmarkProblem,
    iter_benchmark,
    load_benchmark,
    load_eval_sets,
)
from megatron_scope.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k
from megatron_scope.eval.runner import (EvalConfig, EvalReport, EvalSet, build_report, evaluate, plot_accuracy_vs_k,
                                        prepare_sets, sample_and_grade, write_report)

__all__ = [
    "BENCHMARK_NAMES",
    "BENCHMARK_SCHEMAS",
    "BenchmarkFormatError",
    "BenchmarkProblem",
    "EvalConfig",
    "EvalReport",
    "EvalSet",
    "build_report",
    "avg_at_k",
    "evaluate",
    "iter_benchmark",
    "load_benchmark",
    "load_eval_sets",
    "mean_pass_at_k",
    "pass_at_k",
    "plot_accuracy_vs_k",
    "prepare_sets",
    "sample_and_grade",
    "write_report",
]
