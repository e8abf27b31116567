"""SCOPE's dual-path weights against the paper's formula, written literally with perplexities."""

import math

import pytest
import torch

from megatron_scope.config import LossConfig
from megatron_scope.losses.scope import scope_sequence_weights


def _config(tau=1.0, norm="mean", use_student_weights=True, use_teacher_weights=True) -> LossConfig:
    """The SCOPE group with these weight settings."""
    return LossConfig(tau=tau, weight_norm=norm, student_path_weights=use_student_weights,
                      teacher_path_weights=use_teacher_weights)


def paper_weights(student_mlp, teacher_mlp, correct, group_ids, tau, norm, use_student=True, use_teacher=True):
    """w_i^stu = PPL_S^(1/τ) / Σ_{Ω_c} PPL_S^(1/τ);  w_i^tea = PPL_T^(-1/τ) / Σ_{Ω_w} PPL_T^(-1/τ) (float64 loops)."""
    n = len(correct)
    weights = [0.0] * n
    for i in range(n):
        subset = [j for j in range(n) if group_ids[j] == group_ids[i] and correct[j] == correct[i]]
        if correct[i]:
            score = lambda j: math.exp(-student_mlp[j]) ** (1 / tau) if use_student else 1.0  # PPL_S^(1/τ)
        else:
            score = lambda j: math.exp(-teacher_mlp[j]) ** (-1 / tau) if use_teacher else 1.0  # PPL_T^(-1/τ)
        weights[i] = score(i) / sum(score(j) for j in subset)
        if norm == "mean":
            weights[i] *= len(subset)
    return torch.tensor(weights)


def _weights(student_mlp, teacher_mlp, correct, group_ids, **kwargs):
    return scope_sequence_weights(
        torch.tensor(student_mlp), torch.tensor(teacher_mlp), torch.tensor(correct), torch.tensor(group_ids),
        _config(**kwargs)
    )


def test_hand_computed_signs_and_sums():
    # group 7: two correct (student mean log-probs -1, -2) and one incorrect; group 3: two incorrect.
    student = [-1.0, -2.0, -0.3, -0.1, -0.2]
    teacher = [-0.4, -0.4, -0.5, -1.0, -3.0]
    correct = [True, True, False, False, False]
    groups = [7, 7, 7, 3, 3]
    w = _weights(student, teacher, correct, groups, tau=1.0, norm="sum")
    e = math.e
    # the correct response the student finds LESS likely (-2, higher perplexity) gets MORE weight
    expected = [1 / (1 + e), e / (1 + e), 1.0, 1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))]
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=0)
    # the incorrect response the teacher finds MORE likely (-1 vs -3) gets more weight
    assert w[3] > w[4]
    w_mean = _weights(student, teacher, correct, groups, tau=1.0, norm="mean")
    torch.testing.assert_close(w_mean, torch.tensor(expected) * torch.tensor([2, 2, 1, 2, 2.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm", ["mean", "sum"])
@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_matches_paper_formula_on_random_batches(norm, tau):
    generator = torch.Generator().manual_seed(0)
    n = 40
    student = (-3 * torch.rand(n, generator=generator, dtype=torch.float64)).tolist()
    teacher = (-3 * torch.rand(n, generator=generator, dtype=torch.float64)).tolist()
    correct = (torch.rand(n, generator=generator) < 0.5).tolist()
    groups = torch.randint(100, 106, (n,), generator=generator).tolist()  # shuffled, non-contiguous ids
    w = _weights(student, teacher, correct, groups, tau=tau, norm=norm)
    torch.testing.assert_close(w, paper_weights(student, teacher, correct, groups, tau, norm).float(), rtol=1e-6, atol=0)
    for gid in set(groups):  # per prompt and path: weights sum to 1 (sum) or average 1 (mean)
        for path in (True, False):
            members = [i for i in range(n) if groups[i] == gid and correct[i] == path]
            if members:
                total = float(w[members].sum())
                assert total == pytest.approx(1.0 if norm == "sum" else len(members), rel=1e-6)


def test_all_correct_all_incorrect_single_member_and_empty_responses():
    # group 0 all correct, group 1 all incorrect, group 2 a single response, group 3 has an empty response
    # (mean log-prob 0 by convention, perplexity 1: the most likely possible under the student).
    student = [-1.0, -2.0, -9.0, -9.0, -5.0, 0.0, -1.0]
    teacher = [-9.0, -9.0, -1.0, -2.0, -5.0, -9.0, -9.0]
    correct = [True, True, False, False, True, True, True]
    groups = [0, 0, 1, 1, 2, 3, 3]
    w = _weights(student, teacher, correct, groups, tau=1.0, norm="mean")
    torch.testing.assert_close(w, paper_weights(student, teacher, correct, groups, 1.0, "mean").float(), rtol=1e-6, atol=0)
    assert w[4] == 1.0  # a group of one
    assert w[5] < w[6]  # the empty response is the least surprising, so the least weight on the student path
    assert torch.isfinite(w).all()


def test_permutation_equivariant_and_groups_independent():
    generator = torch.Generator().manual_seed(1)
    n = 24
    student, teacher = -2 * torch.rand(n, generator=generator), -2 * torch.rand(n, generator=generator)
    correct = torch.rand(n, generator=generator) < 0.5
    groups = torch.randint(0, 4, (n,), generator=generator)
    w = scope_sequence_weights(student, teacher, correct, groups)
    perm = torch.randperm(n, generator=generator)
    torch.testing.assert_close(scope_sequence_weights(student[perm], teacher[perm], correct[perm], groups[perm]), w[perm])
    other = groups != groups[0]
    changed_teacher = teacher.clone()
    changed_teacher[other] -= 5.0  # changing other groups leaves group 0's weights alone
    torch.testing.assert_close(scope_sequence_weights(student, changed_teacher, correct, groups)[~other], w[~other])


@pytest.mark.parametrize("norm,uniform", [("mean", 1.0), ("sum", 0.5)])
def test_disabled_paths_are_uniform(norm, uniform):
    student, teacher = [-1.0, -3.0, -0.5, -2.5], [-0.1, -4.0, -1.0, -2.0]
    correct, groups = [True, True, False, False], [0, 0, 0, 0]
    w = _weights(student, teacher, correct, groups, norm=norm, use_student_weights=False)
    assert w[:2].tolist() == [uniform, uniform] and w[2] != w[3]
    w = _weights(student, teacher, correct, groups, norm=norm, use_teacher_weights=False)
    assert w[2:].tolist() == [uniform, uniform] and w[0] != w[1]


def test_no_gradient_and_extreme_values():
    student = torch.tensor([-1e4, -1.0, -2.0], requires_grad=True)
    w = scope_sequence_weights(student, torch.zeros(3), torch.tensor([True, True, False]), torch.tensor([0, 0, 0]),
                               _config(tau=0.01))
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tau=0.0), "tau must be > 0"),
        (dict(norm="max"), "norm must be one of"),
        (dict(correct=torch.tensor([1, 0, 1])), "correct must be a bool"),
        (dict(group_ids=torch.tensor([0.0, 0.0, 1.0])), "group_ids must be an integer"),
        (dict(correct=torch.tensor([True, False])), "equal length"),
        (dict(teacher_mean_log_prob=torch.tensor([0.0, float("nan"), 0.0])), "teacher_mean_log_prob has non-finite"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    inputs = dict(
        student_mean_log_prob=torch.tensor([-1.0, -2.0, -3.0]),
        teacher_mean_log_prob=torch.tensor([-1.0, -2.0, -3.0]),
        correct=torch.tensor([True, False, True]),
        group_ids=torch.tensor([0, 0, 1]),
    )
    settings = {key: kwargs.pop(key) for key in ("tau", "norm") if key in kwargs}
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=match):
        scope_sequence_weights(**inputs, config=_config(**settings))


def test_the_released_student_path_sign_favours_confident_responses():
    """--scope-student-path-exponent -1 (the authors' released code): w_stu ∝ PPL_S^(-1/τ), the reverse order of
    the paper's PPL_S^(+1/τ); the teacher path is the same either way."""
    student, teacher = [-0.5, -2.0, -1.0, -3.0], [-1.0, -1.0, -0.5, -2.0]
    correct, groups = [True, True, False, False], [0, 0, 0, 0]
    paper = _weights(student, teacher, correct, groups)
    released = scope_sequence_weights(torch.tensor(student), torch.tensor(teacher), torch.tensor(correct),
                                      torch.tensor(groups), LossConfig(student_path_exponent=-1))
    assert paper[1] > paper[0] and released[0] > released[1]  # -2.0 is the less confident correct response
    total = math.exp(-0.5) + math.exp(-2.0)  # mean norm: exp(mean log-prob / τ) / Σ, times the subset's size 2
    torch.testing.assert_close(released[:2], torch.tensor([2 * math.exp(-0.5) / total, 2 * math.exp(-2.0) / total]))
    torch.testing.assert_close(released[2:], paper[2:])
