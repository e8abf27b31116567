"""The --scope-* flags: defaults, Megatron-style provider use, and parse-time rejection of bad values."""

import argparse

import pytest

from megatron_scope.arguments import add_scope_args, parse_scope_args, validate_scope_args


def test_defaults_follow_the_paper_and_released_runs():
    args = parse_scope_args([])
    assert args.scope_algorithm == "scope"
    assert args.scope_tau == 1.0
    assert args.scope_weight_norm == "mean"
    assert args.scope_student_path_weights and args.scope_teacher_path_weights and args.scope_seq_weights
    assert args.scope_kl == "reverse" and args.scope_topk is None
    assert args.exopd_lambda == 1.25


def test_provider_adds_to_an_existing_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    args = add_scope_args(parser).parse_args(
        ["--tensor-model-parallel-size", "2", "--scope-algorithm", "tropd", "--tropd-outlier", "clip",
         "--no-scope-teacher-path-weights", "--scope-kl", "topk", "--scope-topk", "20"]
    )
    validate_scope_args(args)
    assert (args.tensor_model_parallel_size, args.scope_algorithm, args.tropd_outlier) == (2, "tropd", "clip")
    assert args.scope_teacher_path_weights is False and args.scope_topk == 20


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--scope-tau", "0"], "--scope-tau: must be > 0, got 0"),
        (["--scope-tau", "-1"], "--scope-tau: must be > 0"),
        (["--scope-weight-norm", "max"], "invalid choice: 'max'"),
        (["--scope-kl", "topk"], "--scope-kl topk needs --scope-topk"),
        (["--scope-topk", "5"], "--scope-topk 5 is only used with --scope-kl topk"),
        (["--scope-topk", "0", "--scope-kl", "topk"], "--scope-topk: must be >= 1"),
        (["--scope-algorithm", "srpo", "--scope-kl", "k1"], "srpo weights tokens by the teacher's entropy"),
        (["--scope-algorithm", "tropd", "--tropd-outlier", "forward", "--scope-kl", "k3"], "--tropd-outlier forward"),
        (["--scope-algorithm", "grpo", "--scope-kl", "jsd"], "grpo uses no KL term"),
        (["--scope-algorithm", "grpo", "--scope-group-size", "1"], "--scope-group-size must be >= 2"),
        (["--scope-jsd-beta", "1.0"], "--scope-jsd-beta: must be in (0, 1)"),
        (["--srpo-beta", "-0.1"], "--srpo-beta: must be >= 0"),
    ],
)
def test_bad_values_and_combinations_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_scope_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
