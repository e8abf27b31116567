"""The iteration log line: Megatron-LM's layout, the skipped steps and non-finite tokens a user must see, and the
method's routing numbers where the run has them."""

from megatron_scope.trainer import log_line

BASE = {"time/iteration_s": 1.5, "optimizer/lr": 5e-5, "loss/loss": 0.25, "rollout/accuracy": 0.5,
        "rollout/response_length": 12.5, "rollout/response_length_min": 3.0, "rollout/response_length_max": 40.0,
        "optimizer/grad_norm": 2.0, "loss/nonfinite_token_fraction": 0.125, "optimizer/skipped_total": 3.0}
LENGTHS = " response length min/mean/max: 3/12.5/40 |"


def test_log_line_layout():
    assert log_line(7, 100, BASE) == (
        " iteration        7/     100 | elapsed time per iteration (ms): 1500.0 | learning rate: 5.000E-05 |"
        " loss: 2.500000E-01 | rollout accuracy: 0.5000 | response length min/mean/max: 3/12.5/40 |"
        " grad norm: 2.0000 | non-finite tokens: 0.1250 | number of skipped iterations: 3 |")


def test_log_line_shows_the_methods_routing_and_a_loss_no_token_reached():
    metrics = {**BASE, "srpo/distilled_fraction": 0.375, "tropd/guided_fraction": 0.5,
               "loss/tropd_outlier_fraction": 0.25, "loss/is_truncated_fraction": 0.0625}
    del metrics["loss/loss"]
    line = log_line(1, 2, metrics)
    assert " loss: NAN |" in line
    assert (" rollout accuracy: 0.5000 |" + LENGTHS + " SRPO distilled fraction: 0.3750 | TrOPD guided fraction: 0.5000 |"
            " TrOPD outlier fraction: 0.2500 | IS truncated fraction: 0.0625 | grad norm:") in line


def test_log_line_shows_the_verdicts_other_than_correct_that_occurred():
    metrics = {**BASE, "verifier/correct": 50.0, "verifier/wrong": 40.0, "verifier/no_answer": 0.0,
               "verifier/verifier_error": 1.0}
    assert " rollout accuracy: 0.5000 |" + LENGTHS + " verdicts: wrong 40, verifier_error 1 | grad norm:" in \
        log_line(1, 2, metrics)
    all_correct = {**BASE, "verifier/correct": 91.0, "verifier/wrong": 0.0}
    assert " rollout accuracy: 0.5000 |" + LENGTHS + " grad norm:" in log_line(1, 2, all_correct)


def test_log_line_shows_the_steps_padding_where_known():
    line = log_line(1, 2, {**BASE, "tokens/padding_fraction": 0.4375})
    assert " rollout accuracy: 0.5000 |" + LENGTHS + " padded token fraction: 0.4375 | grad norm:" in line


def test_log_line_shows_the_accuracy_per_data_source():
    line = log_line(1, 2, {**BASE, "rollout/accuracy/aime": 0.25, "rollout/accuracy/gsm8k": 0.75})
    assert " rollout accuracy: 0.5000 | accuracy/aime: 0.2500 | accuracy/gsm8k: 0.7500 |" + LENGTHS in line
