"""Each objective against a direct per-token transcription of its formula; aggregation and advantages."""

import math

import pytest
import torch

from megatron_scope.config import BaselineConfig, LossConfig
from megatron_scope.losses.objectives import (
    OBJECTIVES,
    TokenStats,
    aggregate,
    group_normalized_advantages,
    rejection_keep_mask,
    rollout_log_ratios,
    srpo_distill_weights,
    truncated_is_weights,
)

B, T = 4, 6


@pytest.fixture
def stats():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, :] = 0  # an empty response
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return TokenStats(
        mask=mask.double(),
        correct=torch.tensor([True, False, True, False]),
        student_log_probs=-3 * rand(B, T),
        kl=rand(B, T),
        teacher_log_probs=-3 * rand(B, T),
        distilled=torch.tensor([False, True, False, False]),  # response 3 failed without a demonstration: GRPO
        distill_weights=2 * rand(B, T),
        forward_kl=rand(B, T),
        old_log_probs=-3 * rand(B, T),
        ref_log_probs=-3 * rand(B, T),
        advantages=torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64),
        trust_uniform=rand(B, T),
    )


def reference_token_loss(name, s, cfg, i, t):
    """ℓ_{i,t} written out as scalars."""
    lp, kl, tlp = float(s.student_log_probs[i, t]), float(s.kl[i, t]), float(s.teacher_log_probs[i, t])
    correct = bool(s.correct[i])
    ratio = math.exp(lp - float(s.old_log_probs[i, t]))
    adv = float(s.advantages[i])
    ppo = -min(ratio * adv, min(max(ratio, 1 - cfg.clip_eps), 1 + cfg.clip_eps) * adv)
    if name == "scope":
        return -lp if correct else kl
    if name == "scope-no-student-path":  # the ablation: correct responses get no loss
        return 0.0 if correct else kl
    if name == "scope-ppo":  # the released teacher path: k1 advantage through PPO's clip and dual clip
        advantage = tlp - float(s.old_log_probs[i, t])
        loss = -min(ratio * advantage, min(max(ratio, 1 - cfg.clip_eps), 1 + cfg.clip_eps) * advantage)
        if advantage < 0:
            loss = min(loss, -cfg.clip_ratio_c * advantage)
        return -lp if correct else loss
    if name == "opd":
        return kl
    if name == "exopd":
        ref = float(s.ref_log_probs[i, t])
        reward = -((lp - ref) - cfg.exopd_lambda * (tlp - ref))
        return -reward * lp
    if name == "srpo":  # routed: distilled responses get w_t KL, every other one GRPO's surrogate
        return float(s.distill_weights[i, t]) * kl if bool(s.distilled[i]) else ppo
    if name == "tropd-guided":  # the teacher's prefix tokens: forward KL's k1 on the teacher's samples
        if bool(s.prefix[i, t]):
            return cfg.tropd_prefix_beta * (tlp - lp)
        name = "tropd"
    if name == "tropd":
        gap = abs(lp - tlp)
        if cfg.tropd_trust_region == "sampled":  # accepted with probability min(π_T / π_S_old, 1)
            inside = float(s.trust_uniform[i, t]) < min(math.exp(tlp - float(s.old_log_probs[i, t])), 1.0)
        else:
            inside = gap <= cfg.tropd_delta
        if inside:
            return kl
        return {"mask": 0.0, "clip": kl * cfg.tropd_delta / max(gap, cfg.tropd_delta), "forward": float(s.forward_kl[i, t])}[cfg.tropd_outlier]
    if name == "grpo":
        return ppo
    if name == "sft":
        return -lp if correct else 0.0
    raise AssertionError(name)


CASES = [(name, BaselineConfig()) for name in OBJECTIVES] + [
    ("tropd", BaselineConfig(tropd_trust_region=region, tropd_delta=0.7, tropd_outlier=outlier))
    for region in ("sampled", "threshold") for outlier in ("mask", "clip", "forward")
] + [("exopd", BaselineConfig(exopd_lambda=1.0)), ("srpo", BaselineConfig(srpo_beta=0.3, clip_eps=0.1))] + [
    ("scope-ppo", BaselineConfig(clip_eps=0.2, clip_ratio_c=3.0)), ("scope-ppo", BaselineConfig(clip_eps=0.05,
                                                                                                 clip_ratio_c=1.2)),
    ("scope-no-student-path", BaselineConfig())] + [
    ("tropd-guided", BaselineConfig(tropd_prefix_beta=0.3, tropd_trust_region=region, tropd_delta=0.7,
                                    tropd_outlier="clip")) for region in ("sampled", "threshold")]


@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_objective_matches_formula(stats, name, cfg):
    if name == "scope-ppo":
        loss = OBJECTIVES["scope"](stats, LossConfig(kl="k1", teacher_path_loss="ppo", baselines=cfg))
    elif name == "scope-no-student-path":
        loss = OBJECTIVES["scope"](stats, LossConfig(student_path=False, baselines=cfg))
    elif name == "tropd-guided":  # rows 0 and 1 start with 2 and 3 teacher-written tokens
        stats.prefix = torch.zeros(B, T, dtype=torch.bool)
        stats.prefix[0, :2], stats.prefix[1, :3] = True, True
        loss = OBJECTIVES["tropd"](stats, LossConfig(algorithm="tropd", baselines=cfg))
    else:
        loss = OBJECTIVES[name](stats, LossConfig(baselines=cfg))
    expected = torch.tensor([[reference_token_loss(name, stats, cfg, i, t) for t in range(T)] for i in range(B)], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_exopd_gradient_is_reinforce(stats):
    student = stats.student_log_probs.clone().requires_grad_(True)
    stats.student_log_probs = student
    cfg = BaselineConfig()
    OBJECTIVES["exopd"](stats, LossConfig(baselines=cfg)).sum().backward()
    reward = -((student - stats.ref_log_probs) - cfg.exopd_lambda * (stats.teacher_log_probs - stats.ref_log_probs))
    torch.testing.assert_close(student.grad, -reward.detach())  # d/dlogp of -sg(r) logp


def test_tropd_separates_inside_and_outside(stats):
    cfg = BaselineConfig(tropd_trust_region="threshold", tropd_delta=0.5, tropd_outlier="mask")
    gap = (stats.student_log_probs - stats.teacher_log_probs).abs()
    loss = OBJECTIVES["tropd"](stats, LossConfig(baselines=cfg))
    assert (gap > 0.5).any() and (gap <= 0.5).any()
    assert torch.equal(loss[gap > 0.5], torch.zeros_like(loss[gap > 0.5]))
    assert torch.equal(loss[gap <= 0.5], stats.kl[gap <= 0.5])
    accept = torch.exp((stats.teacher_log_probs - stats.old_log_probs).clamp_max(0))
    inside = stats.trust_uniform < accept
    loss = OBJECTIVES["tropd"](stats, LossConfig())  # the paper's: sampled region, forward KL on the outliers
    assert inside.any() and (~inside).any()
    assert torch.equal(loss[~inside], stats.forward_kl[~inside]) and torch.equal(loss[inside], stats.kl[inside])


def test_missing_statistics_are_named(stats):
    stats.kl = None
    with pytest.raises(ValueError, match=r"scope needs \['kl'\]"):
        OBJECTIVES["scope"](stats, LossConfig())


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_aggregate(stats, mode):
    token_loss = stats.kl
    weights = torch.tensor([0.5, 2.0, 1.5, 3.0], dtype=torch.float64)
    total, count = aggregate(token_loss, stats.mask, weights, mode)
    if mode == "seq-mean-token-mean":
        per_seq = [
            sum(float(token_loss[i, t]) for t in range(T) if stats.mask[i, t]) / max(1, int(stats.mask[i].sum()))
            for i in range(B)
        ]
        assert float(total) == pytest.approx(sum(w * l for w, l in zip(weights.tolist(), per_seq)), rel=1e-12)
        assert int(count) == B  # the empty response counts as a response with loss 0
    else:
        expected = sum(float(weights[i] * token_loss[i, t]) for i in range(B) for t in range(T) if stats.mask[i, t])
        assert float(total) == pytest.approx(expected, rel=1e-12)
        assert int(count) == int(stats.mask.sum()) == 6 + 4 + 6


def test_group_normalized_advantages():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 5.0, 0.0, 0.0])
    groups = torch.tensor([9, 9, 9, 2, 2, 4, 6, 6])  # group 4 has one member, group 6 all equal
    adv = group_normalized_advantages(rewards, groups)
    g9 = torch.tensor([1.0, 0.0, 1.0])
    expected_g9 = (g9 - g9.mean()) / (g9.std() + 1e-6)
    torch.testing.assert_close(adv[:3], expected_g9)
    torch.testing.assert_close(adv[3:5], torch.tensor([1.0, -1.0]) / (math.sqrt(0.5) + 1e-6) * 0.5)
    assert adv[5:].tolist() == [0.0, 0.0, 0.0]


def test_truncated_is_weights():
    """w = min(exp(clamp(log π_S - log μ, ±20)), C), finite for any gap (verl's token-level TIS)."""
    old = torch.tensor([-1.0, -1.0, -1.0, -60.0, -1.0, -1.0])
    rollout = torch.tensor([-1.0, -1.5, -0.2, -1.0, -80.0, -1.0 + 1e-8])
    weights = truncated_is_weights(rollout_log_ratios(old, rollout, torch.ones(6)), threshold=2.0)
    expected = [1.0, math.exp(0.5), math.exp(-0.8), math.exp(-20.0), 2.0, 1.0]
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=0)


def test_rollout_log_ratios_at_each_level_and_the_rejection_band():
    """log π_S / μ per token, summed over the sampled tokens of each response ("sequence"), or averaged
    ("geometric"); 0 off the sampled tokens, even where a padding position's log-prob is -inf. The rejection band
    keeps its ends."""
    old = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")], [-1.0, -1.0, -3.0, -2.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.2, -1.0, -1.0, -2.0]])
    sampled = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # row 0's last: padding; row 1's first: a teacher's prefix
    token = rollout_log_ratios(old, rollout, sampled)
    assert token.tolist() == [[0.5, -1.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]]
    assert rollout_log_ratios(old, rollout, sampled, "sequence").tolist() == [[-0.5] * 3 + [0.0], [0.0] + [-2.0] * 3]
    geometric = rollout_log_ratios(old, rollout, sampled, "geometric")
    torch.testing.assert_close(geometric, torch.tensor([[-0.5 / 3] * 3 + [0.0], [0.0] + [-2.0 / 3] * 3]))
    with pytest.raises(ValueError, match="level must be"):
        rollout_log_ratios(old, rollout, sampled, "prefix")
    log_ratios = torch.tensor([math.log(0.4), math.log(0.5), 0.0, math.log(2.0), math.log(2.1)])
    assert rejection_keep_mask(log_ratios, (0.5, 2.0)).tolist() == [False, True, True, True, False]


def test_srpo_distill_weights_are_exp_minus_beta_entropy_with_mean_one_over_distilled_tokens():
    """w_t = exp(-β H_t) / mean over the step's distilled tokens (all microbatches), 0 elsewhere; H may be as large
    as log V or 0 (a one-hot teacher)."""
    g = torch.Generator().manual_seed(1)
    entropies = [torch.rand(3, 5, generator=g) * 12, torch.rand(2, 7, generator=g) * 12]
    entropies[0][0, 0] = 0.0
    masks = [(torch.rand(3, 5, generator=g) < 0.6).float(), (torch.rand(2, 7, generator=g) < 0.6).float()]
    weights = srpo_distill_weights(entropies, masks, beta=0.7)
    raw = [torch.exp(-0.7 * h.double()) * m for h, m in zip(entropies, masks)]
    mean = sum(r.sum() for r in raw) / sum(m.sum() for m in masks)
    for w, r in zip(weights, raw):
        torch.testing.assert_close(w.double(), r / mean, rtol=1e-6, atol=0)
    distilled = torch.cat([w[m > 0] for w, m in zip(weights, masks)])
    assert distilled.double().mean().item() == pytest.approx(1.0, rel=1e-6)
    assert all((w[m == 0] == 0).all() for w, m in zip(weights, masks))
    nothing = srpo_distill_weights(entropies, [torch.zeros_like(m) for m in masks], beta=0.7)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in nothing)  # no distilled token: 0, not NaN
