"""Avg@k and Pass@k from n graded samples per problem (pure Python floats, float64).

Pass@k uses the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", arXiv 2107.03374, Sec. 2.1, Eq. 1): with n samples of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

(the product form avoids the huge binomials). The SCOPE authors (arXiv 2604.10688) report Pass@k from a
bootstrap over their sampled responses, a biased estimator; numbers from this module are unbiased and
can therefore differ slightly from the paper's at equal n and k.

Avg@k is the mean accuracy over the k samples drawn per problem (the "avg@k" / "mean@k" of reasoning
papers), averaged over problems.
"""

from __future__ import annotations

from typing import Sequence


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    return value


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased probability that at least one of k samples (drawn without replacement from the n) is correct.

    Raises ValueError unless 1 <= k <= num_samples and 0 <= num_correct <= num_samples.
    """
    n = _check_count("num_samples", num_samples)
    c = _check_count("num_correct", num_correct)
    k = _check_count("k", k)
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct must be in [0, num_samples={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, num_samples={n}], got {k}: pass@k needs at least k samples")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    probability_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        probability_all_wrong *= 1.0 - k / i
    return 1.0 - probability_all_wrong


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Pass@k averaged over problems; `correct[p][j]` grades sample j of problem p (same n for all)."""
    num_samples = _common_num_samples(correct)
    return sum(pass_at_k(num_samples, sum(map(bool, row)), k) for row in correct) / len(correct)


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Avg@k with k = the samples per problem: mean over problems of the fraction of correct samples."""
    num_samples = _common_num_samples(correct)
    return sum(sum(map(bool, row)) / num_samples for row in correct) / len(correct)


def _common_num_samples(correct: Sequence[Sequence[bool]]) -> int:
    if len(correct) == 0:
        raise ValueError("need at least one problem")
    num_samples = len(correct[0])
    for index, row in enumerate(correct):
        if len(row) != num_samples:
            raise ValueError(
                f"problem {index} has {len(row)} graded samples, problem 0 has {num_samples}: all need the same n"
            )
        for sample, value in enumerate(row):
            if not isinstance(value, bool):
                raise ValueError(f"correct[{index}][{sample}] must be a bool, got {type(value).__name__}: {value!r}")
    if num_samples < 1:
        raise ValueError("need at least one sample per problem")
    return num_samples
