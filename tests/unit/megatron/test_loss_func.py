"""scope_loss_func at TP=1 against the paper's loss written directly in float64, its report, and bad input."""

import pytest
import torch

from megatron_scope.losses.scope import scope_sequence_weights
from megatron_scope.config import LossConfig
from megatron_scope.megatron.loss_func import check_batch, reduce_reports, scope_loss_func
from megatron_scope.testing.tiny import TINY_ARCH, split_microbatches, tiny_rollout_batch, tiny_teacher_weight

V = TINY_ARCH.vocab_size


@pytest.fixture
def batch():
    (micro,) = split_microbatches(tiny_rollout_batch(), 1)
    return micro


def student_logits(batch, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return (2 * torch.randn(*batch["labels"].shape, batch["teacher_logits"].shape[-1], generator=g)).to(dtype)


def paper_loss(batch, logits):
    """L = [Σ_{Ω_c} w^stu · MLE(y_i) + Σ_{Ω_w} w^tea · mean_t KL(π_S‖π_T)] / N, float64, full vocabulary."""
    s = torch.log_softmax(logits[..., :V].double(), -1)  # padded entries take no probability
    t = torch.log_softmax(batch["teacher_logits"][..., :V].double(), -1)
    kl = (s.exp() * (s - t)).sum(-1)
    logp = s.gather(-1, batch["labels"][..., None])[..., 0]
    total = 0.0
    for i in range(len(batch["correct"])):
        m = batch["loss_mask"][i].bool()
        if not m.any():
            continue
        per_seq = -logp[i][m].mean() if batch["correct"][i] else kl[i][m].mean()
        total += float(batch["seq_weights"][i]) * float(per_seq)
    return total / len(batch["correct"])


def test_matches_the_paper_in_float64(batch):
    logits = student_logits(batch)
    # weights from the actual student/teacher sequence log-probs, as the trainer computes them
    s = torch.log_softmax(logits[..., :V].double(), -1).gather(-1, batch["labels"][..., None])[..., 0]
    t = torch.log_softmax(batch["teacher_logits"][..., :V].double(), -1).gather(-1, batch["labels"][..., None])[..., 0]
    m = batch["loss_mask"].double()
    mean = lambda x: (x * m).sum(-1) / m.sum(-1).clamp_min(1)  # noqa: E731
    batch["seq_weights"] = scope_sequence_weights(mean(s), mean(t), batch["correct"], batch["group_ids"],
                                                  LossConfig(tau=0.7))
    loss_sum, count, report = scope_loss_func(LossConfig(), V, batch, logits)
    assert int(count) == len(batch["correct"])
    assert float(loss_sum) / int(count) == pytest.approx(paper_loss(batch, logits), rel=1e-5)
    values = reduce_reports([report])
    assert values["loss"] == pytest.approx(paper_loss(batch, logits), rel=1e-5)
    assert values["correct_fraction"] == pytest.approx(batch["correct"].float().mean().item())
    for key in ("correct/mle", "incorrect/kl", "incorrect/teacher_ppl", "correct/student_ppl", "correct/entropy",
                "correct/response_length", "incorrect/weight", "incorrect/weight_max"):
        assert key in values and values[key] == values[key], key  # present and not NaN


def test_srpo_reports_the_teachers_view_over_distilled_responses_only(batch):
    """SRPO's self-teacher gives nothing on responses it does not distil: the KL and teacher perplexity are reported
    over the distilled ones ("distilled/..."), not per verifier path; with every failure distilled they are SCOPE's
    incorrect-path values of the same batch."""
    logits = torch.randn(*batch["labels"].shape, batch["teacher_logits"].shape[-1],
                         generator=torch.Generator().manual_seed(0))
    srpo = reduce_reports([scope_loss_func(LossConfig(algorithm="srpo"), V, batch, logits)[2]])
    scope = reduce_reports([scope_loss_func(LossConfig(), V, batch, logits)[2]])
    assert "incorrect/kl" not in srpo and "correct/teacher_ppl" not in srpo
    assert srpo["distilled/kl"] == pytest.approx(scope["incorrect/kl"], rel=1e-6)
    assert srpo["distilled/teacher_ppl"] == pytest.approx(scope["incorrect/teacher_ppl"], rel=1e-6)


def test_an_empty_path_is_omitted_from_the_report(batch):
    batch["correct"] = torch.ones_like(batch["correct"])  # nothing incorrect: no teacher-path statistics at all
    _, _, report = scope_loss_func(LossConfig(), V, batch, student_logits(batch))
    values = reduce_reports([report])
    assert "correct/weight_max" in values and "correct/mle" in values
    assert not [key for key in values if key.startswith("incorrect/")]


def test_gradient_flows_into_student_logits_only(batch):
    logits = student_logits(batch).requires_grad_(True)
    batch["teacher_logits"].requires_grad_(True)
    loss_sum, _, _ = scope_loss_func(LossConfig(), V, batch, logits)
    loss_sum.backward()
    assert logits.grad is not None and logits.grad[..., V:].abs().max() == 0  # padding gets no gradient
    assert batch["teacher_logits"].grad is None


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b.pop("correct"), r"needs batch keys \['correct'\]"),
        (lambda b: b.update(correct=b["correct"].long()), r"must be bool \(one per response\)"),
        (lambda b: b["teacher_logits"].__setitem__((0, 10, 3), float("nan")), r"batch\['teacher_logits'\] holds NaN"),
        (lambda b: b.update(seq_weights=b["seq_weights"][:-1]), r"batch\['seq_weights'\] has shape \(7,\)"),
        (lambda b: b.update(loss_mask=b["loss_mask"][:, :-2]), r"batch\['loss_mask'\] has shape \(8, 22\)"),
    ],
)
def test_bad_batches_are_named(batch, mutate, match):
    mutate(batch)
    with pytest.raises(ValueError, match=match):
        check_batch(batch, LossConfig())


def test_nan_teacher_log_probs_on_response_tokens_are_rejected(batch):
    config = LossConfig(kl="k3")
    check_batch(batch, config)
    prompt_position = (batch["loss_mask"] == 0).nonzero()[0]
    batch["teacher_log_probs"][tuple(prompt_position)] = float("nan")  # outside the response: ignored
    check_batch(batch, config)
    response_position = batch["loss_mask"].nonzero()[0]
    batch["teacher_log_probs"][tuple(response_position)] = float("nan")
    with pytest.raises(ValueError, match=r"batch\['teacher_log_probs'\] holds NaN or Inf on response tokens"):
        check_batch(batch, config)


def test_a_steps_checks_read_once_raise_the_first_failing_microbatchs_error():
    """`schedule._check_microbatches`: every microbatch's value checks in one read; the first failing one (microbatch,
    then key order) raises check_batch's own error; NaN outside the responses passes."""
    from megatron_scope.megatron.schedule import _check_microbatches

    config = LossConfig(kl="k3")
    first, second, third, _ = split_microbatches(tiny_rollout_batch(), 4)
    first["teacher_log_probs"][tuple((first["loss_mask"] == 0).nonzero()[0])] = float("nan")  # a prompt position
    _check_microbatches([first, second, third], config)
    third["seq_weights"][0] = float("inf")
    second["teacher_log_probs"][tuple(second["loss_mask"].nonzero()[0])] = float("nan")
    with pytest.raises(ValueError, match=r"batch\['teacher_log_probs'\] holds NaN or Inf on response tokens"):
        _check_microbatches([first, second, third], config)
    with pytest.raises(ValueError, match=r"batch\['seq_weights'\] holds NaN or Inf"):
        _check_microbatches([first, third], config)


def test_a_steps_checks_cover_the_teachers_top_k_given_the_vocabulary():
    """With the vocabulary, the step's one read also checks the top-k (ids in range and distinct, log-probs <= 0,
    head mass <= 1), so the loss (`checked=True`) reads nothing of it again; the op alone still checks by default."""
    from megatron_scope.megatron.schedule import _check_microbatches
    from megatron_scope.ops.topk import vocab_parallel_topk_kl

    config = LossConfig(kl="topk", topk=8)
    first, second = split_microbatches(tiny_rollout_batch(topk=8), 2)
    _check_microbatches([first, second], config, vocab_size=V)
    second["teacher_topk_ids"][1, 2, 0] = V  # outside the tokenizer's vocabulary
    _check_microbatches([first, second], config)  # without the vocabulary: the loss's op checks it
    with pytest.raises(ValueError, match=rf"teacher_topk_ids holds vocabulary id {V}, outside \[0, {V}\)"):
        _check_microbatches([first, second], config, vocab_size=V)
    logits = torch.zeros(*second["labels"].shape, 512)
    with pytest.raises(ValueError, match=rf"teacher_topk_ids holds vocabulary id {V}"):
        vocab_parallel_topk_kl(logits, second["teacher_topk_ids"], second["teacher_topk_log_probs"], vocab_size=V)
    second["teacher_topk_ids"][1, 2, 0] = second["teacher_topk_ids"][1, 2, 1]
    with pytest.raises(ValueError, match="repeats an id"):
        _check_microbatches([first, second], config, vocab_size=V)


def test_the_report_counts_response_tokens_whose_loss_is_not_finite(batch):
    """A teacher top-k whose tail is exactly 0 where the student's is not makes that token's reverse KL +inf
    (the true value): the step's loss is non-finite (the optimizer guard skips it) and the report says which
    fraction of response tokens caused it."""
    config = LossConfig(kl="topk", topk=8)
    _, _, report = scope_loss_func(config, V, batch, student_logits(batch))
    assert reduce_reports([report])["nonfinite_token_fraction"] == 0
    incorrect = ((~batch["correct"]) & (batch["loss_mask"].sum(-1) > 0)).nonzero()[0, 0]  # the KL path
    position = batch["loss_mask"][incorrect].nonzero()[0, 0]
    batch["teacher_topk_tail_log_mass"][incorrect, position] = float("-inf")
    check_batch(batch, config)  # legal input: an empty tail
    loss_sum, _, report = scope_loss_func(config, V, batch, student_logits(batch))
    values = reduce_reports([report])
    assert not torch.isfinite(loss_sum)
    assert values["nonfinite_token_fraction"] == pytest.approx(1 / float(batch["loss_mask"].sum()))


def test_scope_released_aggregation_means_the_mle_over_correct_tokens(batch):
    """--loss-agg-mode scope-released: the loss is Σ_incorrect w ℓ / N_tok + Σ_correct w (-log π) / N_tok,correct,
    the released code's two token means, whatever the microbatching (add_group_inputs scales the correct rows)."""
    from megatron_scope.megatron.loss_func import add_group_inputs

    config = LossConfig(loss_agg_mode="scope-released")
    batch["old_log_probs"] = batch["teacher_log_probs"] - 0.2
    logits = student_logits(batch)
    add_group_inputs([batch], config)
    loss_sum, count, _ = scope_loss_func(config, V, batch, logits)
    s = torch.log_softmax(logits[..., :V].double(), -1)
    t = torch.log_softmax(batch["teacher_logits"][..., :V].double(), -1)
    kl = (s.exp() * (s - t)).sum(-1)
    logp = s.gather(-1, batch["labels"][..., None])[..., 0]
    mask, correct = batch["loss_mask"].double(), batch["correct"]
    unscaled = scope_sequence_weights(  # the path weights themselves, before the released scaling
        *(((x * mask).sum(-1) / mask.sum(-1).clamp_min(1)) for x in (batch["old_log_probs"].double(),
                                                                   batch["teacher_log_probs"].double())),
        correct, batch["group_ids"], config).double()
    teacher_path = (unscaled[~correct, None] * kl[~correct] * mask[~correct]).sum() / mask.sum()
    student_path = (unscaled[correct, None] * -logp[correct] * mask[correct]).sum() / mask[correct].sum()
    assert int(count) == int(mask.sum())
    assert float(loss_sum) / int(count) == pytest.approx(float(teacher_path + student_path), rel=1e-5)


def test_logprob_temperature_scales_the_students_logits(batch):
    """--logprob-temperature T: the loss of logits z is the temperature-1 loss of z / T."""
    logits = student_logits(batch)
    hot, _, _ = scope_loss_func(LossConfig(logprob_temperature=0.6), V, batch, logits)
    cold, _, _ = scope_loss_func(LossConfig(), V, batch, logits / 0.6)
    assert float(hot) == pytest.approx(float(cold), rel=1e-6)


@pytest.mark.parametrize("config", [LossConfig(), LossConfig(kl="jsd", logprob_temperature=0.6),
                                    LossConfig(algorithm="opd", kl="forward", loss_agg_mode="token-mean"),
                                    LossConfig(loss_agg_mode="scope-released"),
                                    LossConfig(algorithm="opd", rollout_is_threshold=1.3),
                                    LossConfig(rollout_is_threshold=3.0, rollout_is="sequence", rollout_rs="token",
                                               rollout_rs_threshold=1.5)],
                         ids=["scope-reverse", "scope-jsd-T0.6", "opd-forward", "scope-released", "opd-rollout-is",
                              "scope-sequence-is-token-rs"])
@pytest.mark.parametrize("layout", ["every-position", "response-positions", "teacher-response-rows"])
def test_the_fused_kl_from_hidden_states_equals_the_loss_on_logits(config, layout):
    """Student hidden states + output layer and the teacher's (ops.linear_kl, its gradient taken in the forward pass
    with the coefficients the loss itself gives), over every position or (`response_positions`, as
    `schedule.forward_backward` sets them) the response positions only, the teacher's hidden states [b, s, H] or
    only their response rows [m, H] (as the scoring pass keeps them): the loss, report and gradients of the
    student's logits path with the teacher's logits."""
    from megatron_scope.megatron.loss_func import response_positions

    (with_logits,) = split_microbatches(tiny_rollout_batch(), 1)
    (with_hidden,) = split_microbatches(tiny_rollout_batch(teacher_hidden=True), 1)
    if layout != "every-position":
        (with_hidden["response_positions"],) = response_positions([with_hidden])
        assert 0 < len(with_hidden["response_positions"]) == int(with_hidden["loss_mask"].sum())
    if layout == "teacher-response-rows":
        with_hidden["teacher_hidden"] = with_hidden["teacher_hidden"].flatten(0, 1)[with_hidden["response_positions"]]
    assert config.fuses_student_logits
    g = torch.Generator().manual_seed(5)
    if config.rollout_is_threshold is not None:  # IS weights and rejection: per-token coefficients of the batch
        old = with_logits["teacher_log_probs"] - 0.2
        rollout = old + 0.5 * torch.randn(old.shape, generator=g)
        for b in (with_logits, with_hidden):
            b["old_log_probs"], b["rollout_log_probs"] = old, rollout
    hidden = torch.randn(*with_logits["labels"].shape, 16, generator=g, requires_grad=True)
    weight = (torch.randn(with_logits["teacher_logits"].shape[-1], 16, generator=g) / 2).requires_grad_()
    logits_loss, count, logits_report = scope_loss_func(config, V, with_logits, hidden @ weight.t())
    fused_loss, fused_count, fused_report = scope_loss_func(config, V, with_hidden, hidden, student_weight=weight,
                                                            teacher_weight=tiny_teacher_weight())
    assert int(fused_count) == int(count) and float(fused_loss) == pytest.approx(float(logits_loss), rel=1e-5)
    expected = reduce_reports([logits_report])
    for key, value in reduce_reports([fused_report]).items():
        assert value == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    for mine, theirs in zip(torch.autograd.grad(fused_loss, (hidden, weight)),
                            torch.autograd.grad(logits_loss, (hidden, weight))):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_teacher_hidden_states_without_their_output_layer_are_rejected():
    (with_hidden,) = split_microbatches(tiny_rollout_batch(teacher_hidden=True), 1)
    logits = torch.randn(*with_hidden["labels"].shape, tiny_teacher_weight().shape[0])
    with pytest.raises(ValueError, match="needs teacher_weight"):
        scope_loss_func(LossConfig(), V, with_hidden, logits)
    with pytest.raises(ValueError, match="fuses_student_logits"):  # SRPO reads the teacher's entropy: not fused
        scope_loss_func(LossConfig(algorithm="srpo"), V, with_hidden, logits[..., :8],
                        student_weight=torch.zeros(logits.shape[-1], 8), teacher_weight=tiny_teacher_weight())
    check_batch(with_hidden, LossConfig())  # teacher_hidden stands for teacher_logits
    del with_hidden["teacher_hidden"]
    with pytest.raises(ValueError, match="teacher_logits"):
        check_batch(with_hidden, LossConfig())


@pytest.mark.parametrize("is_level,rs_level", [("sequence", None), (None, "token"), (None, "sequence"),
                                               ("token", "geometric")])
def test_sequence_level_weights_and_rejection(batch, is_level, rs_level):
    """--rollout-is sequence: every token of a response times sg(min(Π_t π_S / μ, C)) over its loss tokens;
    --rollout-rs LEVEL: tokens (token), or whole responses by the product (sequence) or geometric mean (geometric)
    of their ratios, outside [1/C, C] leave the loss sum and the token count (C = 1.6; 1.1 for the geometric mean,
    which averages the noise away); the rejected share is reported."""
    g = torch.Generator().manual_seed(5)
    band = 1.1 if rs_level == "geometric" else 1.6
    batch["old_log_probs"] = batch["teacher_log_probs"] - 0.2
    batch["rollout_log_probs"] = batch["old_log_probs"] + 0.3 * torch.randn(batch["old_log_probs"].shape, generator=g)
    config = LossConfig(algorithm="opd", loss_agg_mode="token-mean", rollout_is_threshold=None if is_level is None
                        else 3.0, rollout_is=is_level or "token", rollout_rs=rs_level,
                        rollout_rs_threshold=None if rs_level is None else band)
    logits = student_logits(batch)
    loss_sum, count, report = scope_loss_func(config, V, batch, logits)
    s = torch.log_softmax(logits[..., :V].double(), -1)
    t = torch.log_softmax(batch["teacher_logits"][..., :V].double(), -1)
    kl = (s.exp() * (s - t)).sum(-1)
    mask = batch["loss_mask"].double()
    log_ratio = (batch["old_log_probs"].double() - batch["rollout_log_probs"].double()) * mask
    per_sequence = {"sequence": log_ratio.sum(-1, keepdim=True),
                    "geometric": log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)}
    weights = torch.ones_like(mask)
    if is_level is not None:
        weights = torch.exp(per_sequence.get(is_level, log_ratio)).clamp_max(3.0).expand_as(mask)
    keep = torch.ones_like(mask)
    if rs_level is not None:
        ratio = torch.exp(per_sequence.get(rs_level, log_ratio)).expand_as(mask)
        keep = ((ratio >= 1 / band) & (ratio <= band)).double()
        rejected = float(((1 - keep) * mask).sum() / mask.sum())
        assert 0 < rejected < 1 and reduce_reports([report])["rs_rejected_fraction"] == pytest.approx(rejected)
    expected = (batch["seq_weights"].double()[:, None] * weights * kl * mask * keep).sum()
    assert float(loss_sum) == pytest.approx(float(expected), rel=1e-5) and int(count) == int((mask * keep).sum())


@pytest.mark.parametrize("algorithm", ["scope", "opd", "exopd", "srpo", "tropd", "grpo", "sft"])
def test_every_objective_reduces_to_its_uncorrected_form_when_the_sampler_is_the_learner(batch, algorithm):
    """μ = π_S (a fresh, exact sampler): sequence-level IS and any rejection band change neither the loss nor its
    gradient, for every objective (issue 29's "each loss path reduces to its sync form")."""
    batch["rollout_log_probs"] = batch["old_log_probs"].clone()
    batch["trust_uniform"] = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(0))  # TrOPD
    plain = LossConfig(algorithm=algorithm)
    corrected = LossConfig(algorithm=algorithm, rollout_is_threshold=2.0, rollout_is="sequence",
                           rollout_rs="sequence", rollout_rs_threshold=1.01)
    results = []
    for config in (plain, corrected):
        logits = student_logits(batch).requires_grad_(True)
        loss_sum, count, report = scope_loss_func(config, V, batch, logits)
        results.append((float(loss_sum), int(count), torch.autograd.grad(loss_sum, logits)[0]))
    assert results[0][:2] == pytest.approx(results[1][:2], rel=1e-6)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-6, atol=1e-9)
    assert reduce_reports([report])["rs_rejected_fraction"] == 0 and reduce_reports([report])["is_weight"] == 1


def test_rollout_is_weights_multiply_each_tokens_loss(batch):
    """--rollout-is-threshold C: each token's loss times sg(min(π_S / μ, C)) (token-mean over OPD's full KL, so
    the loss is Σ_i s_i Σ_t w_t KL_t / N_tok with s_i the sequence weights), the weights' mean and truncated fraction reported, no gradient through w."""
    threshold = 1.3
    g = torch.Generator().manual_seed(3)
    batch["old_log_probs"] = batch["teacher_log_probs"] - 0.2
    batch["rollout_log_probs"] = batch["old_log_probs"] + 0.5 * torch.randn(batch["old_log_probs"].shape, generator=g)
    config = LossConfig(algorithm="opd", loss_agg_mode="token-mean", rollout_is_threshold=threshold)
    logits = student_logits(batch).requires_grad_(True)
    loss_sum, count, report = scope_loss_func(config, V, batch, logits)
    s = torch.log_softmax(logits[..., :V].double(), -1)
    t = torch.log_softmax(batch["teacher_logits"][..., :V].double(), -1)
    kl = (s.exp() * (s - t)).sum(-1)
    mask = batch["loss_mask"].double()
    weights = torch.exp(batch["old_log_probs"].double() - batch["rollout_log_probs"].double()).clamp_max(threshold)
    expected = (batch["seq_weights"].double()[:, None] * weights * kl * mask).sum()
    assert float(loss_sum) == pytest.approx(float(expected), rel=1e-5) and int(count) == int(mask.sum())
    values = reduce_reports([report])
    assert values["is_weight"] == pytest.approx(float((weights * mask).sum() / mask.sum()), rel=1e-6)
    truncated = float(((weights == threshold).double() * mask).sum() / mask.sum())
    assert values["is_truncated_fraction"] == pytest.approx(truncated) and 0 < truncated < 1
    (grad,) = torch.autograd.grad(loss_sum, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"needs batch keys \['rollout_log_probs'\]"):
        check_batch({k: v for k, v in batch.items() if k != "rollout_log_probs"}, config)


@pytest.mark.parametrize("loss_agg_mode", ["seq-mean-token-mean", "token-mean"])
def test_tropd_guidance_keeps_the_aggregations_count_and_loss(batch, loss_agg_mode):
    """A guided batch (row 0 starts with 2 teacher-written tokens) is normalised like any other: by its sequences
    (seq-mean-token-mean) or its response tokens (token-mean), never by its prefix tokens; the prefix tokens'
    loss is β (sg(log π_T) - log π_S), the others' the trust region's (every token inside: the reverse KL)."""
    from megatron_scope.config import BaselineConfig

    beta = 0.5
    config = LossConfig(algorithm="tropd", loss_agg_mode=loss_agg_mode,
                        baselines=BaselineConfig(tropd_prefix_fraction=0.5, tropd_prefix_beta=beta,
                                                 tropd_trust_region="threshold", tropd_delta=1e9))
    prefix = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
    first = batch["loss_mask"][0].nonzero()[:2, 0]
    prefix[0, first] = True
    batch.update(prefix_mask=prefix, old_log_probs=batch["teacher_log_probs"].clone(),
                 rollout_log_probs=batch["teacher_log_probs"].clone(),
                 trust_uniform=torch.zeros_like(batch["teacher_log_probs"]))
    logits = student_logits(batch)
    loss_sum, count, report = scope_loss_func(config, V, batch, logits)
    mask = batch["loss_mask"].double()
    s = torch.log_softmax(logits[..., :V].double(), -1)
    t = torch.log_softmax(batch["teacher_logits"][..., :V].double(), -1)
    kl = (s.exp() * (s - t)).sum(-1)
    logp = s.gather(-1, batch["labels"][..., None])[..., 0]
    token_loss = torch.where(prefix, beta * (batch["teacher_log_probs"].double() - logp), kl) * mask
    weights = batch["seq_weights"].double()
    if loss_agg_mode == "token-mean":
        expected_count, expected = int(mask.sum()), float((weights[:, None] * token_loss).sum())
    else:
        expected_count = len(batch["correct"])
        expected = float((weights * token_loss.sum(-1) / mask.sum(-1).clamp_min(1)).sum())
    assert int(count) == expected_count and int(prefix.sum()) == 2
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
    values = reduce_reports([report])
    assert values["loss"] == pytest.approx(expected / expected_count, rel=1e-5)
    assert values["prefix_token_fraction"] == pytest.approx(2 / float(mask.sum()))


def test_tropd_reports_the_share_of_tokens_outside_its_trust_region(batch):
    """The threshold region |log π_S - log π_T| <= δ: the reported outlier fraction is the share of response tokens
    outside it, and those tokens' loss is the forward KL (the default outliers)."""
    from megatron_scope.config import BaselineConfig

    config = LossConfig(algorithm="tropd", loss_agg_mode="token-mean",
                        baselines=BaselineConfig(tropd_trust_region="threshold", tropd_delta=0.5))
    logits = student_logits(batch)
    loss_sum, count, report = scope_loss_func(config, V, batch, logits)
    s = torch.log_softmax(logits[..., :V].double(), -1)
    t = torch.log_softmax(batch["teacher_logits"][..., :V].double(), -1)
    mask = batch["loss_mask"].double()
    gap = (s.gather(-1, batch["labels"][..., None])[..., 0] - batch["teacher_log_probs"].double()).abs()
    outside = (gap > 0.5).double() * mask
    assert 0 < float(outside.sum()) < float(mask.sum())
    assert reduce_reports([report])["tropd_outlier_fraction"] == pytest.approx(float(outside.sum() / mask.sum()))
    reverse, forward = (s.exp() * (s - t)).sum(-1), (t.exp() * (t - s)).sum(-1)
    token_loss = torch.where(gap > 0.5, forward, reverse) * mask
    expected = float((batch["seq_weights"].double()[:, None] * token_loss).sum())
    assert int(count) == int(mask.sum()) and float(loss_sum) == pytest.approx(expected, rel=1e-5)


def test_teacher_hidden_states_are_checked_through_their_per_sequence_flags():
    """check_batch reads the scoring pass's `teacher_hidden_nonfinite` [b] flags and never teacher_hidden's values:
    hidden states full of NaN with no flag set pass; a flag names its sequences."""
    (batch,) = split_microbatches(tiny_rollout_batch(teacher_hidden=True), 1)
    n = len(batch["labels"])
    batch["teacher_hidden"] = torch.full_like(batch["teacher_hidden"], float("nan"))
    batch["teacher_hidden_nonfinite"] = torch.zeros(n, dtype=torch.bool)
    check_batch(batch, LossConfig())
    batch["teacher_hidden_nonfinite"][[2, 5]] = True
    with pytest.raises(ValueError, match=r"batch\['teacher_hidden'\] holds NaN or Inf on response tokens of "
                                         r"sequences \[2, 5\] \(of 8"):
        check_batch(batch, LossConfig())
    batch["teacher_hidden_nonfinite"] = torch.zeros(n - 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"batch\['teacher_hidden_nonfinite'\] has shape \(7,\), expected \(8,\)"):
        check_batch(batch, LossConfig())


def test_nonfinite_sequences_look_at_response_positions_only():
    """The scoring pass's check (and check_batch's own where a batch has no flags): NaN or Inf in any hidden unit
    at a response position flags its sequence; at a prompt or padding position it does not."""
    from megatron_scope.megatron.loss_func import nonfinite_sequences

    (batch,) = split_microbatches(tiny_rollout_batch(teacher_hidden=True), 1)
    hidden, mask = batch["teacher_hidden"], batch["loss_mask"]
    assert not nonfinite_sequences(hidden, mask).any()
    row = 2
    assert mask[row].any() and not mask[1].any() and not mask[0, 0]
    hidden[0, 0, 1] = float("nan")  # row 0's prompt
    hidden[1, 5, 0] = float("inf")  # row 1 has no response: padding
    last = int(mask[3].nonzero()[-1, 0])
    hidden[3, last + 1:, 2] = float("-inf")  # row 3 after its response
    check_batch(batch, LossConfig())  # no flags: scanned, and nothing on response tokens
    assert not nonfinite_sequences(hidden, mask).any()
    hidden[row, int(mask[row].nonzero()[0, 0]), -1] = float("nan")
    assert nonfinite_sequences(hidden, mask).nonzero().flatten().tolist() == [row]
    with pytest.raises(ValueError, match=r"batch\['teacher_hidden'\] holds NaN or Inf on response tokens of "
                                         r"sequences \[2\]"):
        check_batch(batch, LossConfig())


def test_teacher_hidden_states_at_the_response_rows_are_checked_as_one_ranks_share():
    """teacher_hidden [c, H]: one of `row_shares` (TP) equal shares of the m response rows, c = ceil(m / TP), checked
    on the device with the scoring pass's flags (required: the rows alone cannot name their sequences); a row count
    that is no share is named."""
    from megatron_scope.megatron.loss_func import batch_value_checks, response_positions, row_share

    (batch,) = split_microbatches(tiny_rollout_batch(teacher_hidden=True), 1)
    (positions,) = response_positions([batch])
    rows = batch["teacher_hidden"].flatten(0, 1)[positions]
    m = len(rows)
    flags = torch.zeros(len(batch["labels"]), dtype=torch.bool)
    for shares in (1, 2, 3):
        c = row_share(m, shares)
        share = {**batch, "teacher_hidden": rows[:c], "teacher_hidden_nonfinite": flags}
        assert not any(bool(bad) for bad, _ in batch_value_checks(share, LossConfig(), row_shares=shares))
        wrong = {**share, "teacher_hidden": rows[:c - 1]}
        failed = [message() for bad, message in batch_value_checks(wrong, LossConfig(), row_shares=shares) if bad]
        assert failed == [f"batch['teacher_hidden'] has {len(wrong['teacher_hidden'])} rows, not "
                          f"{'one share' if shares > 1 else 'the count'} of the microbatch's {m} response positions "
                          "(loss_mask > 0)" + (f" split over {shares} tensor-parallel ranks" if shares > 1 else "")]
    flags[3] = True
    with pytest.raises(ValueError, match=r"NaN or Inf on response tokens of sequences \[3\]"):
        check_batch({**batch, "teacher_hidden": rows, "teacher_hidden_nonfinite": flags}, LossConfig())
    with pytest.raises(ValueError, match=r"as response rows \[m, H\] needs batch\['teacher_hidden_nonfinite'\]"):
        check_batch({**batch, "teacher_hidden": rows}, LossConfig())


def test_teacher_hidden_response_rows_on_the_logits_path_equal_the_full_states():
    """Without the fused KL the teacher's logits come from its hidden states: the response rows [m, H] alone give the
    loss, report and gradients of [b, s, H] (off the response nothing reads them)."""
    from megatron_scope.megatron.loss_func import response_positions

    config = LossConfig(fused_kl=False)
    (full,) = split_microbatches(tiny_rollout_batch(teacher_hidden=True), 1)
    (positions,) = response_positions([full])
    rows = {**full, "teacher_hidden": full["teacher_hidden"].flatten(0, 1)[positions]}
    logits = torch.randn(*full["labels"].shape, tiny_teacher_weight().shape[0], requires_grad=True)
    results = [scope_loss_func(config, V, batch, logits, teacher_weight=tiny_teacher_weight()) for batch in (full, rows)]
    (full_loss, full_count, full_report), (rows_loss, rows_count, rows_report) = results
    assert int(rows_count) == int(full_count) and float(rows_loss) == pytest.approx(float(full_loss), rel=1e-6)
    expected = reduce_reports([full_report])
    for key, value in reduce_reports([rows_report]).items():
        assert value == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(torch.autograd.grad(rows_loss, logits)[0], torch.autograd.grad(full_loss, logits)[0])


def test_the_fused_kl_on_a_microbatch_without_response_tokens_runs_one_row_of_zero_weight():
    """`response_positions` of a microbatch with no response token is position 0 (coefficient 0): the fused op still
    runs (on every TP rank alike) and the loss and its gradients are 0."""
    from megatron_scope.megatron.loss_func import response_positions

    (batch,) = split_microbatches(tiny_rollout_batch(teacher_hidden=True), 1)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    (batch["response_positions"],) = response_positions([batch])
    assert batch["response_positions"].tolist() == [0]
    hidden = torch.randn(*batch["labels"].shape, 16, requires_grad=True)
    weight = torch.randn(512, 16, requires_grad=True)
    loss, _, _ = scope_loss_func(LossConfig(), V, batch, hidden, student_weight=weight,
                                 teacher_weight=tiny_teacher_weight())
    loss.backward()
    assert float(loss) == 0 and not hidden.grad.any() and not weight.grad.any()
