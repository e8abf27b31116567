"""Per-token objectives of SCOPE and its baselines, and how they are summed over a batch.

Every algorithm maps per-token statistics of a microbatch of responses ([B, T], response tokens only,
`mask` marking them) to a per-token loss ℓ_{i,t}; sequences carry weights w_i (SCOPE's path weights,
computed over whole prompt groups before the step by `scope_sequence_weights`; 1 otherwise). The batch loss
is aggregated one of two ways (`LossConfig.loss_agg_mode`, --loss-agg-mode, verl's names):

  seq-mean-token-mean: L = Σ_i w_i · (1/|y_i|) Σ_t ℓ_{i,t}  / N_seq     (the paper's per-sequence losses)
  token-mean:          L = Σ_i w_i · Σ_t ℓ_{i,t}            / N_tok
  scope-released:      token-mean, with the correct responses' weights scaled by N_tok / N_tok,correct (set by
                       `megatron.loss_func.add_group_inputs`): the MLE is a mean over correct-response tokens,
                       the teacher path a mean over all response tokens, as the authors' released code computes

N_seq / N_tok count the whole global batch (all microbatches and data-parallel ranks), so the result does not
depend on how the batch is split. `aggregate` returns the numerator and this microbatch's share of the
denominator; Megatron's `calculate_per_token_loss` path divides by the all-reduced sum.

Group-level quantities (SCOPE weights, GRPO advantages) are computed over the whole batch first, since a
prompt's group may be spread over microbatches and ranks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from megatron_scope.ops.token_stats import sequence_mean_log_prob


@dataclasses.dataclass
class TokenStats:
    """Per-token inputs of the objectives for one microbatch; [B, T] unless noted. None where unused."""

    mask: torch.Tensor
    """1 on response tokens, 0 on prompt and padding."""
    correct: torch.Tensor
    """[B] bool verifier outcome."""
    student_log_probs: torch.Tensor
    """log π_S(y_t) at temperature 1, with gradient."""
    kl: torch.Tensor | None = None
    """Per-token divergence to the teacher (--scope-kl), with gradient into the student."""
    teacher_log_probs: torch.Tensor | None = None
    """log π_T(y_t) of the sampled token, no gradient."""
    distilled: torch.Tensor | None = None
    """[B] bool: the response is distilled (SRPO's routing; the rest get GRPO's surrogate)."""
    distill_weights: torch.Tensor | None = None
    """SRPO's entropy-aware per-token weights on distilled responses, no gradient (`srpo_distill_weights`)."""
    forward_kl: torch.Tensor | None = None
    """KL(π_T ‖ π_S) per token, with gradient (TrOPD's forward-KL outliers)."""
    old_log_probs: torch.Tensor | None = None
    """log π_S_old(y_t) of the policy that sampled, no gradient (PPO ratio)."""
    ref_log_probs: torch.Tensor | None = None
    """log π_ref(y_t) of the reference (the initial student), no gradient (ExOPD)."""
    advantages: torch.Tensor | None = None
    """[B] group-normalised outcome advantages (GRPO, SRPO's correct path)."""
    trust_uniform: torch.Tensor | None = None
    """U(0, 1) draws, one per token, no gradient (TrOPD's sampled trust region)."""
    prefix: torch.Tensor | None = None
    """bool: the token was written by the teacher (TrOPD's off-policy guidance, `rollout.guidance`)."""


def _require(stats: TokenStats, algorithm: str, *names: str) -> None:
    missing = [name for name in names if getattr(stats, name) is None]
    if missing:
        raise ValueError(f"{algorithm} needs {missing} in its token statistics")


def _ppo_clipped(stats: TokenStats, advantage: torch.Tensor, clip_eps: float, clip_ratio_c: float | None = None):
    """PPO's clipped surrogate -min(r A, clip(r, 1-ε, 1+ε) A), r = exp(log π_S - log π_old) (Schulman et al. 2017);
    with `clip_ratio_c`, dual clip (Ye et al. 2020): where A < 0 the loss is at most -c A. `advantage` broadcasts
    to [B, T] and carries no gradient."""
    ratio = torch.exp(stats.student_log_probs - stats.old_log_probs)
    advantage = advantage.to(ratio.dtype)
    loss = -torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantage)
    if clip_ratio_c is not None:
        loss = torch.where(advantage < 0, torch.minimum(loss, -clip_ratio_c * advantage), loss)
    return loss


def scope_objective(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """SCOPE (arXiv 2604.10688, Eq. for L): MLE -log π_S(y_t) on correct responses, a divergence to the teacher
    on incorrect ones: the per-token KL (--scope-teacher-path-loss kl), or, as the authors' released code does,
    PPO's dual-clipped surrogate of the per-token advantage sg(log π_T - log π_old) (ppo; its gradient at
    r = 1 is (log π_S - log π_T) ∇ log π_S, k1's reverse-KL gradient). `student_path` False (an ablation) drops the
    MLE: correct responses get no loss."""
    if config.teacher_path_loss == "ppo":
        _require(stats, "scope (teacher path ppo)", "teacher_log_probs", "old_log_probs")
        advantage = (stats.teacher_log_probs - stats.old_log_probs).detach()
        teacher_path = _ppo_clipped(stats, advantage, config.baselines.clip_eps, config.baselines.clip_ratio_c)
    else:
        _require(stats, "scope", "kl")
        teacher_path = stats.kl
    student_path = -stats.student_log_probs if config.student_path else torch.zeros_like(stats.student_log_probs)
    return torch.where(stats.correct[:, None], student_path, teacher_path)


def opd_objective(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """OPD (Agarwal et al. 2024, GKD; Thinking Machines 2025): the per-token KL to the teacher on every response."""
    _require(stats, "opd", "kl")
    return stats.kl


def exopd_objective(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """ExOPD / G-OPD reward extrapolation, policy-gradient form.

    r_t = -[(log π_S - log π_ref) - λ (log π_T - log π_ref)], a per-token reward (λ = 1 is OPD's
    -(log π_S - log π_T)); ℓ_t = -sg(r_t) log π_S(y_t), whose gradient is the REINFORCE estimate.
    """
    _require(stats, "exopd", "teacher_log_probs", "ref_log_probs")
    student = stats.student_log_probs
    reward = -((student - stats.ref_log_probs) - config.baselines.exopd_lambda * (stats.teacher_log_probs - stats.ref_log_probs))
    return -reward.detach() * student


def srpo_objective(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """SRPO (Li et al. 2026, arXiv 2604.02288), sample routing: a `distilled` response (a failed one; with the
    self-teacher, a failed one with a successful sibling) gets the divergence to the teacher's distribution (--scope-kl;
    SDPO's is a JSD) times the entropy-aware weight w_t (`srpo_distill_weights`); every other response (the correct
    ones, and failures with nothing to distil from) GRPO's clipped surrogate with its group advantage."""
    _require(stats, "srpo", "kl", "distilled", "distill_weights", "old_log_probs", "advantages")
    grpo = _ppo_clipped(stats, stats.advantages[:, None], config.baselines.clip_eps)
    return torch.where(stats.distilled[:, None], stats.distill_weights * stats.kl, grpo)


@torch.no_grad()
def srpo_distill_weights(teacher_entropy: list[torch.Tensor], distilled_tokens: list[torch.Tensor], beta: float,
                         group=None) -> list[torch.Tensor]:
    """SRPO's entropy-aware dynamic weights, per microbatch: w_t = exp(-β H_t) / mean_u exp(-β H_u), H_t the
    (self-)teacher's entropy at token t in nats and u over the distilled response tokens of the whole step (all
    microbatches; an all-reduce of two floats over `group`, the data-parallel group): confident targets weigh more,
    and the distilled tokens' weights average 1. `distilled_tokens[i]` [B, T] marks them; weights are 0 elsewhere."""
    masks = [m.to(torch.float64) for m in distilled_tokens]
    raw = [torch.exp(-beta * h.double()) * m for h, m in zip(teacher_entropy, masks)]
    totals = torch.stack([sum(r.sum() for r in raw), sum(m.sum() for m in masks)])
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(totals, group=group)
    scale = (totals[1] / totals[0]).nan_to_num(0.0)  # no distilled token anywhere: every weight is 0 anyway
    return [(r * scale).float() for r in raw]


def tropd_inside(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """TrOPD's trust region (bool per token; `tropd_objective` says which test)."""
    if config.baselines.tropd_trust_region == "sampled":
        _require(stats, "tropd (sampled trust region)", "trust_uniform", "old_log_probs")
        acceptance = torch.exp((stats.teacher_log_probs - stats.old_log_probs).clamp_max(0))
        return stats.trust_uniform < acceptance
    gap = (stats.student_log_probs - stats.teacher_log_probs).detach().abs()
    return gap <= config.baselines.tropd_delta


def tropd_objective(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """TrOPD (Xing et al. 2026, arXiv 2606.01249): the on-policy divergence (--scope-kl; the paper's is k1)
    only inside a trust region, another loss on the outliers.

    Trust region (`tropd_trust_region`): "sampled", the paper's §3.2 acceptance test, M_t ~ Bernoulli(min(
    π_T(y_t) / π_S(y_t), 1)) with π_S the policy that sampled (old log-probs), drawn as u_t < min(...) from the
    trainer's `trust_uniform`: a token the teacher finds at least as likely is always inside, and one it finds
    r times less likely is inside with probability 1/r. "threshold": inside iff |log π_S - log π_T| <= δ.
    Outliers (`tropd_outlier`): "forward", the paper's §3.3 outlier estimation, uses the forward KL(π_T‖π_S)
    there instead (`stats.forward_kl`; the paper's over the teacher's top-k with K = 64); its ablations: "mask"
    drops the token, "clip" scales its KL by δ / max(|Δ_t|, δ), Δ_t = log π_S - log π_T (as if it sat no farther
    than δ).
    Off-policy guidance (`stats.prefix`, the teacher-written first tokens of a guided response): forward KL by
    its k1 estimate on the teacher's own samples, β (sg(log π_T(y_t)) - log π_S(y_t)) (--tropd-prefix-beta); its
    gradient -β ∇ log π_S(y_t) has expectation β ∇ KL(π_T ‖ π_S) over y_t ~ π_T (the teacher sampled at
    temperature 1). The continuation after the prefix gets the on-policy loss above.
    """
    _require(stats, "tropd", "kl", "teacher_log_probs")
    inside = tropd_inside(stats, config)
    if config.baselines.tropd_outlier == "mask":
        outlier_loss = torch.zeros_like(stats.kl)
    elif config.baselines.tropd_outlier == "clip":
        gap = (stats.student_log_probs - stats.teacher_log_probs).detach().abs()
        outlier_loss = stats.kl * (config.baselines.tropd_delta / gap.clamp_min(config.baselines.tropd_delta))
    elif config.baselines.tropd_outlier == "forward":
        _require(stats, "tropd (outlier=forward)", "forward_kl")
        outlier_loss = stats.forward_kl
    else:
        raise ValueError(f"tropd_outlier must be mask, clip or forward, got {config.baselines.tropd_outlier!r}")
    loss = torch.where(inside, stats.kl, outlier_loss)
    if stats.prefix is not None:
        imitation = config.baselines.tropd_prefix_beta * (stats.teacher_log_probs.detach() - stats.student_log_probs)
        loss = torch.where(stats.prefix, imitation, loss)
    return loss


def grpo_objective(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """GRPO (Shao et al. 2024): PPO's clipped surrogate with the group-normalised outcome advantage."""
    _require(stats, "grpo", "old_log_probs", "advantages")
    return _ppo_clipped(stats, stats.advantages[:, None], config.baselines.clip_eps)


def sft_objective(stats: TokenStats, config: LossConfig) -> torch.Tensor:
    """SFT on the student's own correct responses (rejection sampling): -log π_S(y_t), incorrect ones dropped."""
    return torch.where(stats.correct[:, None], -stats.student_log_probs, torch.zeros_like(stats.student_log_probs))


OBJECTIVES: dict[str, Callable[[TokenStats, LossConfig], torch.Tensor]] = {
    "scope": scope_objective,
    "opd": opd_objective,
    "exopd": exopd_objective,
    "srpo": srpo_objective,
    "tropd": tropd_objective,
    "grpo": grpo_objective,
    "sft": sft_objective,
}


IS_LOG_RATIO_BOUND = 20.0
"""|log π_S - log μ| is clamped here before exp (verl's SAFETY_BOUND), so a weight never overflows."""


@torch.no_grad()
def rollout_log_ratios(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, sampled: torch.Tensor,
                       level: str = "token") -> torch.Tensor:
    """log(π_S / μ) on each token of [n, s] responses, π_S the trained policy before the step (`old_log_probs`), μ the
    distribution the rollout engine sampled from (they differ by the engine's numerics, bf16 kernels, or a stale
    engine), at verl's levels: "token", log π_S(y_t) - log μ(y_t); "sequence", their sum over the response's
    `sampled` tokens, log Π_t π_S(y_t) / μ(y_t), on every token of it; "geometric", their mean. 0 where `sampled` is
    0 (padding, tokens another model wrote)."""
    sampled = sampled.bool()
    per_token = torch.where(sampled, old_log_probs - rollout_log_probs, 0.0)
    if level == "token":
        return per_token
    total = per_token.sum(-1, keepdim=True)
    if level == "geometric":
        total = total / sampled.sum(-1, keepdim=True).clamp_min(1)
    elif level != "sequence":
        raise ValueError(f"level must be token, sequence or geometric, got {level!r}")
    return torch.where(sampled, total, 0.0)


@torch.no_grad()
def truncated_is_weights(log_ratios: torch.Tensor, threshold: float) -> torch.Tensor:
    """Truncated importance weights (verl's rollout_is; the G-OPD recipe's at the token level):
    w = min(exp(clamp(log π_S / μ, ±20)), C) of `rollout_log_ratios`. No gradient; the objective's per-token loss is
    multiplied by it. At the sequence level and C = ∞, E_μ[w ℓ_t] = E_π_S[ℓ_t] for any per-token loss ℓ_t of the
    response's tokens (the future ratios average to 1), so a stale sampler's prefixes are corrected too."""
    return torch.exp(log_ratios.clamp(-IS_LOG_RATIO_BOUND, IS_LOG_RATIO_BOUND)).clamp_max(threshold)


@torch.no_grad()
def rejection_keep_mask(log_ratios: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """verl's rollout_rs: True where π_S / μ of `rollout_log_ratios` lies inside band = (lower, upper), compared in
    log space (a token with ratio 0, log-ratio 0 outside the sampled tokens, is kept)."""
    lower, upper = band
    return (log_ratios >= math.log(lower)) & (log_ratios <= math.log(upper))


@torch.no_grad()
def group_normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage A_i = (r_i - mean_g r) / (std_g r + ε) within each prompt group (unbiased std;
    a group of one, or one where all rewards agree, gets A = 0)."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    values = rewards.double()
    count = torch.bincount(group, minlength=num_groups).double()
    mean = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add(0, group, values) / count
    centered = values - mean[group]
    var = torch.zeros_like(mean).index_add(0, group, centered**2) / (count - 1).clamp_min(1)
    return (centered / (var.sqrt()[group] + eps)).float()


def aggregate(
    token_loss: torch.Tensor, mask: torch.Tensor, sequence_weights: torch.Tensor, loss_agg_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i w_i · seq-or-token sum of ℓ, this microbatch's count of sequences or tokens) — see the module doc."""
    mask = mask.to(token_loss.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        per_sequence = sequence_mean_log_prob(token_loss, mask)  # a masked mean over tokens; 0 when empty
        return ((sequence_weights.to(token_loss.dtype) * per_sequence).sum(),
                torch.tensor(token_loss.shape[0], device=token_loss.device))
    weighted = (token_loss * mask).sum(-1) * sequence_weights.to(token_loss.dtype)
    return weighted.sum(), mask.sum().to(torch.long)
