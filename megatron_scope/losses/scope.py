"""SCOPE's dual-path adaptive sequence weights (arXiv 2604.10688, Sec. 3).

For a prompt x with G sampled responses, split by the verifier into correct Ω_c(x) and incorrect Ω_w(x):

  student path (correct):   w_i^stu = PPL_S(y_i|x)^(1/τ)  / Σ_{j∈Ω_c(x)} PPL_S(y_j|x)^(1/τ)
  teacher path (incorrect): w_i^tea = PPL_T(y_i|x)^(-1/τ) / Σ_{j∈Ω_w(x)} PPL_T(y_j|x)^(-1/τ)

with PPL(y|x) = exp(-mean_t log p(y_t | x, y_<t)) over response tokens. In log space both are softmaxes
over the subset: of -mean_logp_S/τ (a correct response the student found unlikely, at its capability
boundary, gets more weight) and of +mean_logp_T/τ (an incorrect response the teacher finds plausible,
so can really correct, gets more weight). Weights carry no gradient.

Normalisation (`LossConfig.weight_norm`, --scope-weight-norm): "sum" is the paper's formula (weights sum to 1
within each subset); "mean" multiplies by the subset's size (weights average 1), as the authors' released
experiments did.
The released code computes the student-path weight with the opposite sign, PPL_S^(-1/τ) (favouring confident
correct responses); the paper's sign is the default and `LossConfig.student_path_exponent` = -1
(--scope-student-path-exponent -1) gives the released one.
"""

from __future__ import annotations

import torch

from megatron_scope.config import LossConfig

def _check_sequence_tensors(**tensors: torch.Tensor) -> int:
    lengths = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
        raise ValueError(f"per-sequence inputs must be 1-D tensors of equal length, got shapes {lengths}")
    return next(iter(lengths.values()))[0]


def subset_ids(correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dense id of each sequence's (prompt group, path) subset: 2 * rank_of(group_id) + correct."""
    _, group_index = torch.unique(group_ids, return_inverse=True)
    return 2 * group_index + correct.long()


def segment_softmax(scores: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """softmax(scores) within each segment (float64 internally; stable for any magnitude)."""
    num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    scores64 = scores.double()
    segment_max = torch.full((num_segments,), -torch.inf, dtype=torch.float64, device=scores.device)
    segment_max = segment_max.scatter_reduce(0, segment_ids, scores64, reduce="amax")
    exp = torch.exp(scores64 - segment_max[segment_ids])
    segment_sum = torch.zeros(num_segments, dtype=torch.float64, device=scores.device).index_add(0, segment_ids, exp)
    return exp / segment_sum[segment_ids]


@torch.no_grad()
def scope_sequence_weights(
    student_mean_log_prob: torch.Tensor,
    teacher_mean_log_prob: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    config: LossConfig = LossConfig(),
) -> torch.Tensor:
    """One weight per sequence: w^stu where `correct`, w^tea where not (see the module docstring).

    Args:
        student_mean_log_prob: [N] mean_t log π_S(y_t) over each response's tokens (0 for an empty response).
        teacher_mean_log_prob: [N] the same under the teacher.
        correct: [N] bool verifier outcome.
        group_ids: [N] int prompt id of each response; any order, need not be contiguous.
        config: the SCOPE group: `tau` (temperature τ > 0 of both weightings), `weight_norm` ("sum": weights sum
            to 1 per subset; "mean": they average 1), `student_path_weights` / `teacher_path_weights` (False gives
            that path uniform weights).
    Returns:
        [N] float32 weights, no gradient. A subset's weights depend only on its own members.
    """
    _check_sequence_tensors(
        student_mean_log_prob=student_mean_log_prob,
        teacher_mean_log_prob=teacher_mean_log_prob,
        correct=correct,
        group_ids=group_ids,
    )
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor, got {correct.dtype}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    tau, use_student_weights, use_teacher_weights = config.tau, config.student_path_weights, config.teacher_path_weights
    for name, values, used in (
        ("student_mean_log_prob", student_mean_log_prob, use_student_weights),
        ("teacher_mean_log_prob", teacher_mean_log_prob, use_teacher_weights),
    ):
        relevant = values[correct] if name.startswith("student") else values[~correct]
        if used and not torch.isfinite(relevant).all():
            raise ValueError(f"{name} has non-finite values: {relevant[~torch.isfinite(relevant)].tolist()}")

    subsets = subset_ids(correct, group_ids)
    uniform = torch.zeros_like(subsets, dtype=torch.float64)  # a disabled path: equal scores, uniform weights
    exponent = config.student_path_exponent  # PPL^(exponent/τ) = exp(-exponent · mean log-prob / τ)
    student_scores = -exponent * student_mean_log_prob.double() / tau if use_student_weights else uniform
    teacher_scores = teacher_mean_log_prob.double() / tau if use_teacher_weights else uniform
    weights = segment_softmax(torch.where(correct, student_scores, teacher_scores), subsets)
    if config.weight_norm == "mean":
        subset_size = torch.bincount(subsets, minlength=int(subsets.max()) + 1 if subsets.numel() else 0)
        weights = weights * subset_size[subsets]
    return weights.float()
