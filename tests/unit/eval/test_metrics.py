"""Pass@k against brute-force enumeration over k-subsets and the exact binomial ratio; Avg@k."""

import itertools
import math
from fractions import Fraction

import pytest

from megatron_scope.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (c correct) that contain a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_brute_force_enumeration_exhaustively(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(64, 3, 8), (256, 17, 64), (1024, 1, 1000), (4096, 100, 16), (200, 199, 1)])
def test_matches_exact_binomial_ratio_at_large_n(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_edge_cases():
    assert pass_at_k(16, 0, 1) == 0.0
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0  # k = n: any correct sample is in the only subset
    assert pass_at_k(16, 4, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16, abs=1e-15)  # pass@1 = c / n
    assert pass_at_k(16, 3, 14) == 1.0  # n - c < k


@pytest.mark.parametrize(
    "n, c, k, message",
    [
        (4, 1, 5, "k must be in \\[1, num_samples=4\\], got 5"),
        (4, 1, 0, "k must be in"),
        (4, 5, 1, "num_correct must be in \\[0, num_samples=4\\], got 5"),
        (4, -1, 1, "num_correct must be in"),
        (0, 0, 1, "num_samples must be >= 1"),
        (4.0, 1, 1, "num_samples must be an int, got float"),
        (4, True, 1, "num_correct must be an int, got bool"),
    ],
)
def test_bad_arguments_raise(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_and_avg_at_k_over_problems():
    correct = [
        [True, False, False, False],
        [True, True, True, True],
        [False, False, False, False],
    ]
    assert avg_at_k(correct) == pytest.approx((1 / 4 + 1 + 0) / 3)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # pass@1 equals avg@n
    assert mean_pass_at_k(correct, 2) == pytest.approx((float(brute_force_pass_at_k(4, 1, 2)) + 1 + 0) / 3)
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)


def test_ragged_or_non_bool_grades_raise():
    with pytest.raises(ValueError, match="problem 1 has 1 graded samples, problem 0 has 2"):
        avg_at_k([[True, False], [True]])
    with pytest.raises(ValueError, match="correct\\[0\\]\\[1\\] must be a bool, got int"):
        mean_pass_at_k([[True, 1]], 1)
    with pytest.raises(ValueError, match="at least one problem"):
        avg_at_k([])
