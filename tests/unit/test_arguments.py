"""The run's flags: defaults, Megatron-style provider use, and parse-time rejection of bad values and
combinations (megatron_scope.arguments -> megatron_scope.config)."""

import argparse

import pytest

from megatron_scope.arguments import add_scope_args, build_parser, parse_run_config
from megatron_scope.config import build_config

REQUIRED = ["--student-hf", "s", "--teacher-hf", "t", "--tokenizer", "t", "--train-data", "d"]
ASYNC_1 = ["--rollout-engines", "1", "--rollout-schedule", "async", "--max-staleness", "1"]


def test_defaults_follow_the_paper_and_released_runs():
    loss = parse_run_config(REQUIRED).loss
    assert loss.algorithm == "scope"
    assert loss.tau == 1.0
    assert loss.weight_norm == "mean"
    assert loss.student_path and loss.student_path_weights and loss.teacher_path_weights and loss.loss_agg_mode == "seq-mean-token-mean"
    assert (loss.student_path_exponent, loss.teacher_path_loss, loss.logprob_temperature) == (1, "kl", 1.0)
    assert loss.kl == "reverse" and loss.topk is None
    assert loss.baselines.exopd_lambda == 1.25


@pytest.mark.parametrize("argv,placement,engines,rollout_tp", [
    ([], "colocated", 0, 1),
    (["--tensor-model-parallel-size", "2"], "colocated", 0, 2),  # an engine spans its replica's first-stage TP group
    (["--tensor-model-parallel-size", "2", "--rollout-tensor-parallel-size", "1"], "colocated", 0, 1),
    (["--tensor-model-parallel-size", "2", "--rollout-placement", "rank0"], "rank0", 0, 1),
    (["--rollout-engines", "4"], "ray", 4, 1),
])
def test_rollout_placement_and_its_defaults(argv, placement, engines, rollout_tp):
    rollout = parse_run_config(REQUIRED + argv).rollout
    assert (rollout.placement, rollout.engines, rollout.tensor_parallel_size) == (placement, engines, rollout_tp)


def test_rollout_correction_flags():
    loss = parse_run_config(REQUIRED).loss
    assert (loss.rollout_is_threshold, loss.rollout_is, loss.rollout_rs) == (None, "token", None)
    loss = parse_run_config(REQUIRED + ["--rollout-is-threshold", "5", "--rollout-is", "sequence", "--rollout-rs",
                                        "geometric", "--rollout-rs-threshold", "1.5"]).loss
    assert (loss.rollout_is_threshold, loss.rollout_is, loss.rollout_rs) == (5.0, "sequence", "geometric")
    assert loss.rejection_band == (1 / 1.5, 1.5)
    assert parse_run_config(REQUIRED + ["--rollout-rs", "token", "--rollout-rs-threshold", "2",
                                        "--rollout-rs-threshold-lower", "0.25"]).loss.rejection_band == (0.25, 2.0)


def test_rollout_schedule():
    assert parse_run_config(REQUIRED).rollout.schedule == "sync"
    assert parse_run_config(REQUIRED + ["--rollout-engines", "2", "--teacher-engines", "3"]).rollout \
        .teacher_engines == 3
    one_step_off = parse_run_config(REQUIRED + ["--rollout-engines", "2", "--rollout-schedule", "one-step-off"]).rollout
    assert (one_step_off.schedule, one_step_off.max_staleness, one_step_off.staleness_bound) == ("one-step-off", None, 1)
    run = parse_run_config(REQUIRED + ["--rollout-engines", "2", "--rollout-schedule", "async", "--max-staleness", "3"])
    assert (run.rollout.schedule, run.rollout.staleness_bound) == ("async", 3)
    assert parse_run_config(REQUIRED).rollout.staleness_bound == 0
    assert run.rollout.partial_rollout_tokens is None
    partial = parse_run_config(REQUIRED + ["--rollout-engines", "1", "--rollout-schedule", "async", "--max-staleness",
                                           "1", "--partial-rollout-tokens", "16"])
    assert partial.rollout.partial_rollout_tokens == 16



def test_rollout_sampler():
    assert parse_run_config(REQUIRED).rollout.props is None
    props = parse_run_config(REQUIRED + ["--rollout-sampler", "props"]).rollout.props
    assert (props.rounds, props.clip) == (2, 0.3)
    props = parse_run_config(REQUIRED + ["--rollout-sampler", "props", "--props-rounds", "8", "--props-clip", "0"]) \
        .rollout.props
    assert (props.rounds, props.clip) == (8, 0.0)

def test_provider_adds_to_an_existing_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    args = add_scope_args(parser).parse_args(
        ["--tensor-model-parallel-size", "2", "--scope-algorithm", "tropd", "--tropd-outlier", "clip",
         "--no-scope-teacher-path-weights", "--scope-kl", "topk", "--scope-topk", "20"]
    )
    assert (args.tensor_model_parallel_size, args.scope_algorithm, args.tropd_outlier) == (2, "tropd", "clip")
    assert args.scope_teacher_path_weights is False and args.scope_topk == 20
    loss = build_config(build_parser().parse_args(REQUIRED + ["--scope-algorithm", "tropd", "--tropd-outlier",
                                                              "clip", "--scope-kl", "topk", "--scope-topk", "20"])).loss
    assert (loss.algorithm, loss.baselines.tropd_outlier, loss.teacher_topk) == ("tropd", "clip", 20)


def test_weight_transfer_and_gradient_reduction_flags():
    run = parse_run_config(REQUIRED)
    assert run.rollout.weight_transfer_backend == "auto"
    assert not run.optimizer.overlap_grad_reduce and run.optimizer.ddp_bucket_size is None
    run = parse_run_config(REQUIRED + ["--weight-transfer-backend", "nccl", "--rollout-engines", "2",
                                       "--overlap-grad-reduce", "--ddp-bucket-size", "40000000"])
    assert run.rollout.weight_transfer_backend == "nccl"
    assert run.optimizer.overlap_grad_reduce and run.optimizer.ddp_bucket_size == 40_000_000


def test_sequence_parallel_needs_tensor_parallelism(caplog):
    from megatron_scope.config import ParallelConfig

    assert not parse_run_config(REQUIRED).parallel.sequence_parallel
    assert parse_run_config(REQUIRED + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]).parallel \
        .sequence_parallel
    with caplog.at_level("WARNING"):  # dropped at TP 1, as Megatron-LM drops it, and said
        assert not parse_run_config(REQUIRED + ["--sequence-parallel"]).parallel.sequence_parallel
    assert "--sequence-parallel is ignored" in caplog.text
    with pytest.raises(ValueError, match="--sequence-parallel needs --tensor-model-parallel-size > 1"):
        ParallelConfig(sequence_parallel=True)


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["--help"])
    out = capsys.readouterr().out
    for flag in ("--tensor-model-parallel-size", "--micro-batch-size", "--save", "--student-hf", "--teacher-backend",
                 "--train-data", "--rollout-engines", "--vllm-log-level", "--scope-tau", "--grpo-clip-eps",
                 "--wandb-project", "--wandb-exp-name", "--wandb-save-dir"):
        assert flag in out, flag


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
        (["--scope-teacher-path-loss", "ppo"], "--scope-teacher-path-loss ppo is SCOPE's released teacher path"),
        (["--scope-topk-renormalize"], "--scope-topk-renormalize is only used with --scope-kl topk"),
        (["--scope-student-path-exponent", "2"], "invalid choice: 2"),
        (["--scope-algorithm", "opd", "--no-scope-student-path"], "--scope-algorithm opd has no such path"),
        (["--exopd-reference-hf", "base"], "--exopd-reference-hf/--exopd-reference-backend name ExOPD's reference model; --scope-algorithm scope"),
        (["--rollout-is-threshold", "0"], "--rollout-is-threshold: must be > 0"),
        (["--tropd-prefix-fraction", "0.5"], "--tropd-prefix-fraction is TrOPD's off-policy guidance; --scope-algorithm"),
        (["--scope-algorithm", "tropd", "--tropd-prefix-fraction", "1.5"], "--tropd-prefix-fraction: must be in [0, 1]"),
        (["--clip-ratio-c", "1.0"], "--clip-ratio-c must be > 1"),
        (["--lr-decay-style", "step"], "invalid choice: 'step'"),
        (["--rollout-placement", "colocated", "--rollout-engines", "2"],
         "--rollout-engines 2 with --rollout-placement colocated: Ray engines"),
        (["--rollout-placement", "ray"], "--rollout-engines 0 with --rollout-placement ray"),
        (["--rollout-tensor-parallel-size", "2"],
         "--tensor-model-parallel-size 1 GPUs: --rollout-tensor-parallel-size 2 exceeds it"),
        (["--weight-transfer-backend", "nccl"], "--weight-transfer-backend nccl broadcasts to Ray engines"),
        (["--weight-transfer-backend", "gloo"], "invalid choice: 'gloo'"),
        (["--rollout-schedule", "one-step-off"], "--rollout-schedule one-step-off generates while the trainer trains, "
         "which needs engines on devices of their own (--rollout-placement ray with --rollout-engines N); "
         "--rollout-placement colocated engines share"),
        (["--rollout-schedule", "one-step-off", "--rollout-placement", "rank0"], "--rollout-placement rank0 engines"),
        (["--rollout-schedule", "one-step-off", "--rollout-engines", "1", "--rl-offload-optimizer-during-inference"],
         "the training state cannot wait in host memory meanwhile"),
        (["--rollout-schedule", "asynchronous"], "invalid choice: 'asynchronous'"),
        (["--rollout-schedule", "async", "--rollout-engines", "1"], "--max-staleness None with --rollout-schedule "
         "async: --rollout-schedule async needs --max-staleness η and only it takes one"),
        (["--rollout-schedule", "one-step-off", "--rollout-engines", "1", "--max-staleness", "2"],
         "--max-staleness 2 with --rollout-schedule one-step-off"),
        (["--rollout-schedule", "async", "--rollout-engines", "1", "--max-staleness", "-1"], "--max-staleness"),
        (["--teacher-engines", "2"], "--teacher-engines 2: N >= 1 Ray actors of a vLLM teacher go with"),
        (["--rollout-schedule", "one-step-off", "--rollout-engines", "1", "--partial-rollout-tokens", "8"],
         "--partial-rollout-tokens 8 lets a refit come between two segments of a rollout: it needs --rollout-schedule "
         "async (got one-step-off;"),
        (["--partial-rollout-tokens", "8"], "it needs --rollout-schedule async (got sync;"),
        (ASYNC_1 + ["--partial-rollout-tokens", "0"], "--partial-rollout-tokens: must be >= 1"),
        (ASYNC_1 + ["--partial-rollout-tokens", "256"], "a segment in [1, --max-new-tokens 256)"),
        (ASYNC_1 + ["--partial-rollout-tokens", "8", "--rollout-sampler", "props"], "PROPS draws whole responses"),
        (ASYNC_1 + ["--partial-rollout-tokens", "8", "--scope-algorithm", "tropd", "--tropd-prefix-fraction", "0.5"],
         "--tropd-prefix-fraction has some start from a teacher's prefix, drawn whole"),
        (["--props-rounds", "2"], "--props-rounds set PROPS's sampler: give --rollout-sampler props with them"),
        (["--rollout-sampler", "props", "--props-rounds", "9"], "--scope-group-size 8 responses in --props-rounds 9"),
        (["--rollout-sampler", "props", "--rollout-top-p", "0.9"], "and --rollout-top-p 1 (got 0.9)"),
        (["--rollout-sampler", "props", "--rollout-temperature", "0"], "it needs --rollout-temperature > 0 (got 0.0)"),
        (["--rollout-sampler", "props", "--props-clip", "1"], "--props-clip must lie in [0, 1)"),
        (["--rollout-sampler", "props", "--scope-algorithm", "tropd", "--tropd-prefix-fraction", "0.5"],
         "--tropd-prefix-fraction starts some of them from a teacher's prefix: use one of the two"),
        (["--rollout-is", "sequence"], "--rollout-is sequence sets the level of --rollout-is-threshold's weights"),
        (["--rollout-rs", "token"], "--rollout-rs LEVEL and --rollout-rs-threshold go together"),
        (["--rollout-rs-threshold", "2"], "--rollout-rs LEVEL and --rollout-rs-threshold go together"),
        (["--rollout-rs", "sequence", "--rollout-rs-threshold", "0.5"], "must hold 1 inside"),
        (["--rollout-rs", "sequence", "--rollout-rs-threshold", "2", "--rollout-rs-threshold-lower", "1.5"],
         "must hold 1 inside and have a lower end > 0, got [1.5, 2.0]"),
        (["--ddp-bucket-size", "0"], "--ddp-bucket-size: must be >= 1"),
        (["--reward", "custom"], "and --custom-reward-function go together"),
        (["--custom-reward-function", "m:f"], "and --custom-reward-function go together"),
        (["--reward-by-source", "gsm8k=custom"], "and --custom-reward-function go together"),
        (["--reward-by-source", "gsm8k"], "--reward-by-source 'gsm8k': expected NAME=VALUE"),
        (["--reward-by-source", "gsm8k=exact"], "expected SOURCE=VERIFIER with VERIFIER one of"),
        (["--reward-by-source", "a=math", "--reward-by-source", "a=synthetic"], "names a data source twice"),
        (["--eval-data", "a=x.jsonl", "--eval-data", "a=y.jsonl"], "--eval-data names a set twice"),
        (["--eval-data", "a/b=x.jsonl"], "NAME without '/'"),
        (["--eval-interval", "5"], "--eval-interval/--eval-at-start evaluate the --eval-data sets"),
        (["--eval-at-start"], "--eval-interval/--eval-at-start evaluate the --eval-data sets"),
        (["--save-hf"], "--save-hf writes a Hugging Face model into each checkpoint: give --save"),
        (["--wandb-exp-name", "run"], "--wandb-exp-name/--wandb-save-dir configure the W&B run of --wandb-project"),
        (["--wandb-project", "p", "--save", "s"], "--wandb-project needs --wandb-exp-name"),
        (["--wandb-project", "p", "--wandb-exp-name", "run"], "--wandb-project needs --wandb-save-dir, or --save"),
    ],
)
def test_bad_values_and_combinations_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_run_config(REQUIRED + argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
