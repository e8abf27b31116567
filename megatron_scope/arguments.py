"""SCOPE's command-line flags, as a Megatron `extra_args_provider`.

    from megatron.training import initialize_megatron
    initialize_megatron(extra_args_provider=add_scope_args)
    validate_scope_args(get_args())

or standalone: `parse_scope_args(argv)`. Single-value checks (τ > 0, ...) fail while argparse parses;
combinations (top-k KL without k, ...) fail in `validate_scope_args`, which `parse_scope_args` runs.
"""

from __future__ import annotations

import argparse

ALGORITHMS = ("scope", "opd", "exopd", "srpo", "tropd", "grpo", "sft")
FULL_VOCAB_KL = ("reverse", "forward", "jsd")
SAMPLED_KL = ("k1", "k2", "k3")
KL_KINDS = FULL_VOCAB_KL + SAMPLED_KL + ("topk",)
# Which teacher signal each algorithm reads: a divergence to the teacher, the teacher's entropy.
NEEDS_KL = ("scope", "opd", "srpo", "tropd")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def open_unit_float(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_scope_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `scope` and baseline argument groups to `parser` (Megatron's extra_args_provider contract)."""
    group = parser.add_argument_group(title="scope", description="SCOPE on-policy distillation (arXiv 2604.10688)")
    group.add_argument("--scope-algorithm", choices=ALGORITHMS, default="scope",
                       help="Objective: SCOPE or a baseline.")
    group.add_argument("--scope-tau", type=positive_float, default=1.0,
                       help="Temperature τ of both path weightings (PPL^(±1/τ)).")
    group.add_argument("--scope-weight-norm", choices=("mean", "sum"), default="mean",
                       help="sum: weights sum to 1 per prompt and path (the paper); "
                            "mean: they average 1 (the authors' released runs).")
    group.add_argument("--scope-student-path-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="Student-perplexity weights on correct responses (off: uniform).")
    group.add_argument("--scope-teacher-path-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="Teacher-perplexity weights on incorrect responses (off: uniform).")
    group.add_argument("--scope-seq-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="Sequence-level loss (token mean per response, then weighted mean over responses); "
                            "off: token-level (weighted token sum over all response tokens of the batch).")
    group.add_argument("--scope-kl", choices=KL_KINDS, default="reverse",
                       help="Divergence to the teacher: full-vocabulary reverse/forward/jsd from a co-located "
                            "teacher's sharded logits; k1/k2/k3 estimators from the teacher's sampled-token "
                            "log-probs; topk from a remote teacher's top-k log-probs.")
    group.add_argument("--scope-jsd-beta", type=open_unit_float, default=0.5,
                       help="Mixture weight β of the generalized JSD (--scope-kl jsd).")
    group.add_argument("--scope-topk", type=positive_int, default=None,
                       help="k of the teacher's top-k log-probs (required with --scope-kl topk).")
    group.add_argument("--scope-group-size", type=positive_int, default=8,
                       help="G: responses sampled per prompt.")

    baselines = parser.add_argument_group(title="scope baselines", description="OPD, ExOPD, SRPO, TrOPD, GRPO, SFT")
    baselines.add_argument("--exopd-lambda", type=float, default=1.25,
                           help="ExOPD reward extrapolation λ (1 = OPD).")
    baselines.add_argument("--srpo-beta", type=nonnegative_float, default=1.0,
                           help="SRPO entropy weight: incorrect tokens weighted by exp(-β H_teacher).")
    baselines.add_argument("--tropd-delta", type=positive_float, default=1.0,
                           help="TrOPD trust region: distil where |log π_S - log π_T| <= δ.")
    baselines.add_argument("--tropd-outlier", choices=("mask", "clip", "forward"), default="mask",
                           help="TrOPD outside the region: drop, scale to the edge, or forward KL.")
    baselines.add_argument("--grpo-clip-eps", type=open_unit_float, default=0.2,
                           help="PPO ratio clip ε (GRPO and SRPO's correct path).")
    return parser


def validate_scope_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot mean what the user asked; raises ValueError naming the flags."""
    if args.scope_kl == "topk" and args.scope_topk is None:
        raise ValueError("--scope-kl topk needs --scope-topk K (how many teacher log-probs per token)")
    if args.scope_topk is not None and args.scope_kl != "topk":
        raise ValueError(f"--scope-topk {args.scope_topk} is only used with --scope-kl topk, not {args.scope_kl}")
    if args.scope_algorithm == "srpo" and args.scope_kl not in FULL_VOCAB_KL:
        raise ValueError(
            f"--scope-algorithm srpo weights tokens by the teacher's entropy, which needs its full "
            f"distribution: use --scope-kl {'/'.join(FULL_VOCAB_KL)}, not {args.scope_kl}"
        )
    if args.scope_algorithm == "tropd" and args.tropd_outlier == "forward" and args.scope_kl not in FULL_VOCAB_KL:
        raise ValueError(
            f"--tropd-outlier forward needs full-vocabulary teacher logits: use --scope-kl "
            f"{'/'.join(FULL_VOCAB_KL)}, not {args.scope_kl}"
        )
    if args.scope_algorithm in ("grpo", "sft", "exopd") and args.scope_kl != "reverse":
        raise ValueError(f"--scope-algorithm {args.scope_algorithm} uses no KL term; drop --scope-kl {args.scope_kl}")
    if args.scope_group_size < 2 and args.scope_algorithm in ("grpo", "srpo"):
        raise ValueError(f"--scope-algorithm {args.scope_algorithm} normalises rewards within a group: "
                         f"--scope-group-size must be >= 2, got {args.scope_group_size}")


def parse_scope_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and validate the SCOPE flags; a bad value or combination exits with argparse's usage error."""
    parser = add_scope_args(parser or argparse.ArgumentParser(description="SCOPE flags"))
    args = parser.parse_args(argv)
    try:
        validate_scope_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args
