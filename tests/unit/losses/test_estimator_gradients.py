"""Every teacher signal trains toward the divergence it names: with the loss function Megatron calls, the
expected gradient over a token sampled from the student, taken exactly (one row per vocabulary entry,
weighted by the student's probability), equals ∇ KL(π_S ‖ π_T) computed directly in float64."""

import pytest
import torch

from megatron_scope.config import BaselineConfig, LossConfig
from megatron_scope.megatron.loss_func import scope_loss_func

V = 12


def _logits(seed: int, scale: float = 1.5) -> torch.Tensor:
    return scale * torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _expected_gradient(config: LossConfig, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """E_{y ~ π_S}[∇_z ℓ(y)] of `scope_loss_func`: row v samples token v with sequence weight V π_S(v), so the
    loss Σ_v w_v ℓ_v / V is Σ_v π_S(v) ℓ_v."""
    z = student.clone().requires_grad_(True)
    ids = torch.arange(V)
    student_lp = torch.log_softmax(student, -1)
    teacher_lp = torch.log_softmax(teacher, -1)
    batch = {
        "labels": ids[:, None], "loss_mask": torch.ones(V, 1, dtype=torch.float64),
        "correct": torch.zeros(V, dtype=torch.bool),  # SCOPE: every row on the teacher path
        "seq_weights": V * student_lp.exp(),
        "teacher_logits": teacher.expand(V, 1, V), "teacher_log_probs": teacher_lp[ids][:, None],
        "teacher_topk_ids": ids.expand(V, 1, V), "teacher_topk_log_probs": teacher_lp.expand(V, 1, V),
        "teacher_topk_tail_log_mass": torch.full((V, 1), float("-inf"), dtype=torch.float64),  # k = V
        "ref_log_probs": torch.zeros(V, 1, dtype=torch.float64),  # ExOPD at λ = 1 does not read it
        "old_log_probs": student_lp[ids][:, None], "advantages": torch.zeros(V, dtype=torch.float64),
    }
    loss_sum, count, _ = scope_loss_func(config, V, batch, z.expand(V, 1, V))
    (loss_sum / count).backward()
    return z.grad


def _reverse_kl_gradient(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    z = student.clone().requires_grad_(True)
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(teacher, -1)
    (log_p.exp() * (log_p - log_q)).sum().backward()
    return z.grad


CASES = [(algorithm, kl) for algorithm in ("scope", "opd", "tropd") for kl in ("reverse", "k1", "k2", "k3", "topk")]


@pytest.mark.parametrize("algorithm,kl", CASES + [("exopd", "reverse"), ("scope-released", "k1")])
@pytest.mark.parametrize("seed", [0, 1])
def test_expected_gradient_is_the_reverse_kl_gradient(algorithm, kl, seed):
    """scope-released: the released teacher path, k1's advantage through PPO's clipped surrogate, on-policy
    (old log-probs = the student's, ratio 1)."""
    student, teacher = _logits(2 * seed), _logits(2 * seed + 1, scale=3.0)
    released = algorithm == "scope-released"
    config = LossConfig(algorithm="scope" if released else algorithm, kl=kl, topk=V if kl == "topk" else None,
                        teacher_path_loss="ppo" if released else "kl",
                        baselines=BaselineConfig(tropd_delta=1e9, exopd_lambda=1.0))  # TrOPD: every token inside
    expected = _reverse_kl_gradient(student, teacher)
    got = _expected_gradient(config, student, teacher)
    assert expected.abs().max() > 1e-2  # the two distributions are clearly apart
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
