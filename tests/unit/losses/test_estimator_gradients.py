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
                        baselines=BaselineConfig(tropd_trust_region="threshold", tropd_delta=1e9, tropd_outlier="mask",
                                                 exopd_lambda=1.0))  # TrOPD: every token inside, no outlier
    expected = _reverse_kl_gradient(student, teacher)
    got = _expected_gradient(config, student, teacher)
    assert expected.abs().max() > 1e-2  # the two distributions are clearly apart
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("outlier", ["mask", "forward"])
@pytest.mark.parametrize("seed", [0, 1])
def test_tropd_sampled_trust_region_expected_gradient(outlier, seed):
    """TrOPD's sampled trust region (k1 inside, outliers masked or given the top-k forward KL at k = V): over the
    token y ~ π_S and the acceptance draw u, E[∇ℓ] = Σ_y π_S(y) [a(y) (log π_S(y) - log π_T(y)) ∇ log π_S(y)
    + (1 - a(y)) ∇ℓ_out], a(y) = min(π_T(y) / π_S(y), 1). Exact: each token appears twice, with u = 0 (always
    inside) weighted by a(y) and with u = 1 (never inside) weighted by 1 - a(y)."""
    student, teacher = _logits(2 * seed), _logits(2 * seed + 1, scale=3.0)
    config = LossConfig(algorithm="tropd", kl="k1", topk=V if outlier == "forward" else None,
                        baselines=BaselineConfig(tropd_trust_region="sampled", tropd_outlier=outlier))
    s, t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    accept = torch.exp((t - s).clamp_max(0))
    ids = torch.arange(V).repeat(2)
    rows = 2 * V
    z = student.clone().requires_grad_(True)
    batch = {
        "labels": ids[:, None], "loss_mask": torch.ones(rows, 1, dtype=torch.float64),
        "correct": torch.zeros(rows, dtype=torch.bool),
        "seq_weights": rows * s.exp()[ids] * torch.cat([accept, 1 - accept]),
        "trust_uniform": torch.cat([torch.zeros(V), torch.ones(V)]).double()[:, None],
        "teacher_log_probs": t[ids][:, None], "old_log_probs": s[ids][:, None],
        "teacher_topk_ids": torch.arange(V).expand(rows, 1, V), "teacher_topk_log_probs": t.expand(rows, 1, V),
        "teacher_topk_tail_log_mass": torch.full((rows, 1), float("-inf"), dtype=torch.float64),
    }
    loss_sum, count, _ = scope_loss_func(config, V, batch, z.expand(rows, 1, V))
    (loss_sum / count).backward()

    leaf = student.clone().requires_grad_(True)
    w = torch.log_softmax(leaf, -1)
    inside = (s.exp() * accept * (s - t)).detach() @ w  # Σ_y π_S a (log π_S - log π_T) · log π_S(y), sg on the factor
    outside = 0.0
    if outlier == "forward":
        outside = (s.exp() * (1 - accept)).sum().detach() * (t.exp() * (t - w)).sum()
    (expected,) = torch.autograd.grad(inside + outside, leaf)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(z.grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_tropd_guidance_prefix_expected_gradient_is_the_forward_kl_gradient(seed):
    """TrOPD's guidance prefix: tokens the teacher wrote (y ~ π_T, each row weighted by π_T(y)) get
    β (sg(log π_T) - log π_S) through the loss function Megatron calls; E[∇ℓ] = β ∇ KL(π_T ‖ π_S). The rollout IS
    correction leaves them alone (the sampler log-probs there are the teacher's, far from the student's)."""
    beta = 0.25
    student, teacher = _logits(2 * seed), _logits(2 * seed + 1, scale=3.0)
    s, t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    config = LossConfig(algorithm="tropd", kl="k1", rollout_is_threshold=1.5,
                        baselines=BaselineConfig(tropd_prefix_fraction=0.5, tropd_prefix_beta=beta,
                                                 tropd_outlier="mask"))  # every token is a prefix token
    ids = torch.arange(V)
    z = student.clone().requires_grad_(True)
    batch = {
        "labels": ids[:, None], "loss_mask": torch.ones(V, 1, dtype=torch.float64),
        "correct": torch.zeros(V, dtype=torch.bool), "seq_weights": V * t.exp(),
        "teacher_log_probs": t[ids][:, None], "old_log_probs": s[ids][:, None], "rollout_log_probs": t[ids][:, None],
        "trust_uniform": torch.zeros(V, 1, dtype=torch.float64), "prefix_mask": torch.ones(V, 1, dtype=torch.bool),
    }
    loss_sum, count, report = scope_loss_func(config, V, batch, z.expand(V, 1, V))
    (loss_sum / count).backward()

    leaf = student.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(beta * (t.exp() * (t - torch.log_softmax(leaf, -1))).sum(), leaf)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(z.grad, expected, rtol=1e-9, atol=1e-12)
    assert float(report["prefix_token_fraction"][0]) == V and float(report["prefix_forward_kl_k1"][1]) == V
    assert float(report["prefix_teacher_logprob_abs_diff"][0]) == 0  # the sampler's log-probs are the teacher's


@pytest.mark.parametrize("algorithm", ["grpo", "opd"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_level_is_gives_a_stale_samplers_expected_gradient_the_on_policy_one(algorithm, seed):
    """Two-token responses over a vocabulary of 4, every response a row weighted by the probability of sampling it.
    Sampled from a stale μ ≠ π_S, the loss with --rollout-is sequence (C large enough never to cut) has exactly the
    on-policy expected gradient (responses drawn from π_S, no correction): E_μ[Π_t π_S/μ · ℓ] = E_π_S[ℓ] for GRPO's
    surrogate (fixed advantages, at θ = θ_old) and OPD's k1. Token-level weights correct each token's draw but not the
    stale first token its second is conditioned on, and neither does no correction."""
    vocab = 4
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(vocab, generator=g, dtype=torch.float64), torch.randn(vocab, vocab, generator=g,
                                                                                dtype=torch.float64)
    sampler = [z1 + 0.8 * torch.randn(vocab, generator=g, dtype=torch.float64),
               z2 + 0.8 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64)]
    teacher = [torch.randn(vocab, generator=g, dtype=torch.float64),
               torch.randn(vocab, vocab, generator=g, dtype=torch.float64)]
    advantages = torch.randn(vocab * vocab, generator=g, dtype=torch.float64)
    first, second = torch.arange(vocab).repeat_interleave(vocab), torch.arange(vocab).repeat(vocab)
    labels = torch.stack([first, second], 1)

    def token_log_probs(logits1, logits2):
        """[V², 2]: log p(y_1), log p(y_2 | y_1) of every response."""
        return torch.stack([torch.log_softmax(logits1, -1)[first], torch.log_softmax(logits2, -1)[first, second]], 1)

    student_lp = token_log_probs(z1, z2)

    def expected_gradient(sampler_lp, level):
        params = [z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)]
        output = torch.stack([params[0].expand(vocab * vocab, vocab), params[1][first]], 1)
        batch = {"labels": labels, "loss_mask": torch.ones(vocab * vocab, 2, dtype=torch.float64),
                 "correct": torch.zeros(vocab * vocab, dtype=torch.bool),
                 "seq_weights": vocab * vocab * sampler_lp.sum(-1).exp(),  # row y drawn with probability q(y)
                 "old_log_probs": student_lp, "rollout_log_probs": sampler_lp, "advantages": advantages,
                 "teacher_log_probs": token_log_probs(*teacher)}
        config = LossConfig(algorithm=algorithm, kl="k1" if algorithm == "opd" else "reverse",
                            rollout_is_threshold=None if level is None else 1e30, rollout_is=level or "token")
        loss_sum, count, _ = scope_loss_func(config, vocab, batch, output)
        (loss_sum / count).backward()
        return torch.cat([p.grad.flatten() for p in params])

    on_policy = expected_gradient(student_lp, None)
    stale = token_log_probs(*sampler)
    torch.testing.assert_close(expected_gradient(stale, "sequence"), on_policy, rtol=1e-9, atol=1e-12)
    for level in ("token", None):
        assert (expected_gradient(stale, level) - on_policy).abs().max() > 1e-3, level
