"""Every flag of a run, as argparse groups (Megatron-LM's names where one exists).

    config = parse_run_config(argv)    # all groups -> megatron_scope.config.RunConfig, built once;
                                       # a bad value or combination exits with argparse's usage error

Each `add_*_args(parser)` adds one group and returns the parser (Megatron's `extra_args_provider` contract), so
the SCOPE flags also plug into Megatron-LM's own `initialize_megatron(extra_args_provider=add_scope_args)`.
Single values are checked while argparse parses (`positive_float`, ...); combinations by `build_config`.
"""

from __future__ import annotations

import argparse

from megatron_scope.config import (
    ALGORITHMS, ATTENTION_BACKENDS, KL_ESTIMATORS, LOSS_AGG_MODES, LR_DECAY_STYLES, REWARDS, ROLLOUT_PLACEMENTS,
    ROLLOUT_IS_LEVELS, ROLLOUT_RS_LEVELS, ROLLOUT_SAMPLERS, ROLLOUT_SCHEDULES, SRPO_REPROMPT_TEMPLATE, SRPO_TEACHERS,
    TEACHER_BACKENDS, TEACHER_PATH_LOSSES, TEACHER_RESIDENCIES, TRANSFORMER_IMPLS, TROPD_OUTLIERS, TROPD_TRUST_REGIONS,
    WEIGHT_NORMS,
    WEIGHT_TRANSFERS,
    RunConfig, build_config,
)
from megatron_scope.data.datasets import PROMPT_PLACEHOLDER
from megatron_scope.eval.benchmarks import BENCHMARK_NAMES
from megatron_scope.rollout.props import PropsSampling


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


def unit_interval_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="distributed")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's sequence parallelism: norms, residuals and the embedding's output are split "
                        "along the sequence over the TP ranks (activation memory / TP outside the tensor-parallel "
                        "regions); widths become multiples of TP. Ignored (with a warning) at TP 1, as Megatron-LM "
                        "does.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard optimizer state over data-parallel ranks (CUDA only).")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="Reduce the data-parallel gradients bucket by bucket during the last microbatch's backward "
                        "(megatron-core DDP), instead of all at once after it.")
    g.add_argument("--ddp-bucket-size", type=positive_int, default=None,
                   help="Parameters per gradient-reduction bucket (default: megatron-core's, max(40M, 1M x DP) "
                        "with --overlap-grad-reduce).")
    g.add_argument("--distributed-timeout-minutes", type=positive_int, default=30,
                   help="Timeout of every process group's collectives (torch.distributed's and megatron-core's), "
                        "e.g. while other ranks wait for leaders that start or compile vLLM engines.")
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="training")
    g.add_argument("--micro-batch-size", type=positive_int, default=4,
                   help="Sequences per microbatch (with --max-tokens-per-microbatch: at most this many).")
    g.add_argument("--max-tokens-per-microbatch", type=positive_int, default=None,
                   help="Token-budget microbatches: whole sequences grouped by length, longest first, each microbatch "
                        "padded only to its own longest and holding at most this many padded tokens (a longer "
                        "sequence goes alone). Loss and gradients do not depend on the grouping. Default: "
                        "--micro-batch-size sequences each, padded to the step's longest."),
    g.add_argument("--train-iters", type=positive_int, default=10)
    g.add_argument("--lr", type=positive_float, default=5e-5)
    g.add_argument("--min-lr", type=nonnegative_float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=nonnegative_int, default=0)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine",
                   help="After warm-up: decay to --min-lr at --train-iters, or constant.")
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    g.add_argument("--adam-beta1", type=open_unit_float, default=0.9)
    g.add_argument("--adam-beta2", type=open_unit_float, default=0.999)
    g.add_argument("--clip-grad", type=nonnegative_float, default=1.0, help="Global gradient-norm clip; 0 disables.")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters (GPU runs).")
    g.add_argument("--exit-on-nonfinite", action="store_true",
                   help="Stop the run when a step's loss or gradient norm is NaN/Inf (default: skip the step).")
    return parser


def add_checkpointing_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="checkpointing and logging")
    g.add_argument("--save", default=None, help="Checkpoint root (Megatron-LM's iter_XXXXXXX layout).")
    g.add_argument("--load", default=None, help="Resume from the latest complete checkpoint under this root.")
    g.add_argument("--save-interval", type=nonnegative_int, default=0)
    g.add_argument("--save-hf", action="store_true",
                   help="Each checkpoint also holds the student as a Hugging Face model (iter_XXXXXXX/hf_model: "
                        "safetensors, config.json, tokenizer), loadable by transformers and vLLM.")
    g.add_argument("--exit-interval", type=nonnegative_int, default=0, help="Save and exit after this many iterations.")
    g.add_argument("--log-interval", type=positive_int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None,
                   help="Weights & Biases project: every scalar TensorBoard gets and the run's whole configuration "
                        "(WANDB_MODE=offline: written to disk only).")
    g.add_argument("--wandb-exp-name", default=None, help="The W&B run's name (required with --wandb-project).")
    g.add_argument("--wandb-save-dir", default=None, help="Where W&B writes the run (default: <--save>/wandb).")
    g.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True,
                   help="A progress bar with ETA on the logging rank.")
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="models")
    g.add_argument("--student-hf", required=True, help="Student's initial weights: HF directory.")
    g.add_argument("--teacher-hf", default=None,
                   help="Teacher: HF directory; with --teacher-backend server, the base URLs of OpenAI-compatible vLLM "
                        "servers of it, comma-separated (e.g. http://node7:8000,http://node8:8000: balanced, each "
                        "failed request retried on the next; an API key from the SCOPE_TEACHER_API_KEY variable).")
    g.add_argument("--teacher-timeout", type=positive_float, default=600.0,
                   help="--teacher-backend server: seconds one scoring request may take.")
    g.add_argument("--teacher-retries", type=nonnegative_int, default=3,
                   help="--teacher-backend server: further tries of a failed scoring request, each on the next "
                        "server (after 1, 2, 4, ... s); then the run stops, naming the servers and the last error.")
    g.add_argument("--teacher", action="append", default=[], metavar="NAME=HF_DIR",
                   help="A named teacher (e.g. a domain expert), instead of --teacher-hf; repeat for several, each "
                        "prompt distilled from the one its --teacher-route-key column names. HF_DIR: a model of "
                        "--teacher-backend; http(s) URLs (comma-separated): `vllm serve` servers of it, which mix "
                        "with co-located or vLLM teachers.")
    g.add_argument("--teacher-route-key", default=None, metavar="COLUMN",
                   help="The training data's column naming each row's teacher (a --teacher NAME), as verl's "
                        "teacher_key: needed with several --teacher; an unknown name fails before any rollout.")
    g.add_argument("--teacher-residency", choices=TEACHER_RESIDENCIES, default="all",
                   help="Co-located teachers' weights on the GPUs: all (always resident) or scoring (each teacher's "
                        "copied from pinned host memory for its own scoring pass and freed after it, so several "
                        "teachers take turns and none holds memory during the training step; each keeps its output "
                        "layer, which the loss applies).")
    g.add_argument("--teacher-backend", choices=TEACHER_BACKENDS, default="megatron",
                   help="megatron: the teacher is co-located, a forward-only Megatron model with the student's TP/PP "
                        "(full-vocabulary, top-k or sampled-token KL). vllm: the teacher is a vLLM engine placed like "
                        "the rollout engine (beside each co-located engine, inside global rank 0, or one Ray actor) that "
                        "scores the responses: sampled-token log-probs and, with --scope-kl topk, its top-k (for "
                        "--scope-kl k1/k2/k3/topk). server: the same from `vllm serve` servers at --teacher-hf's URLs "
                        "(their prompt log-probs; top-k needs their --max-logprobs >= --scope-topk).")
    g.add_argument("--tokenizer", required=True,
                   help="Tokenizer shared by student and teacher: a SentencePiece model file or a Hugging Face "
                        "tokenizer directory (e.g. the student's HF directory).")
    g.add_argument("--teacher-tokenizer", action="append", default=[], metavar="[NAME=]PATH",
                   help="The teacher's tokenizer (same kinds as --tokenizer): checked to have the same vocabulary. "
                        "With --teacher, NAME=PATH for the teacher NAME; repeat for each teacher to check.")
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="local",
                   help="local: megatron-core's own modules; transformer_engine: TE's layer spec (TE installed).")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="sdpa",
                   help="With --transformer-impl local: sdpa (torch scaled_dot_product_attention, flash or "
                        "memory-efficient kernels, no stored s^2 scores) or local (megatron-core's "
                        "DotProductAttention, which stores them).")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="Activation recompute: full layers, or core attention only (selective).")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="With --recompute-granularity full: uniform or block (Megatron-LM's meanings).")
    g.add_argument("--recompute-num-layers", type=positive_int, default=None,
                   help="With --recompute-granularity full: layers per unit (uniform) or per stage (block).")
    return parser


def add_row_args(g) -> None:
    """How rows become prompts and how responses are graded: the flags training and tools/eval.py share."""
    g.add_argument("--input-key", default="prompt", help="The column holding the prompt text.")
    g.add_argument("--label-key", default=None,
                   help="The column holding the verifier's gold (default: answer; solution for --reward "
                        "synthetic-strict).")
    g.add_argument("--id-key", default="id", help="The column of each row's unique id ('': rows are numbered).")
    g.add_argument("--prompt-template", default=PROMPT_PLACEHOLDER,
                   help="Rollout prompt text with exactly one {prompt}, replaced by the row's prompt, e.g. (bash) "
                        "$'{prompt}\\nPlease reason step by step, and put your final answer within \\\\boxed{}.'")
    g.add_argument("--apply-chat-template", action="store_true",
                   help="Wrap the templated prompt as one user turn with the tokenizer's chat template and the "
                        "assistant's generation prompt (Hugging Face tokenizers only).")
    g.add_argument("--reward", choices=REWARDS, default="math",
                   help="Verifier: synthetic (the arithmetic task's final 'A: <int>' against the rows' answer), "
                        "synthetic-strict (also every written step, which must be the prompt's left-to-right "
                        "evaluation, against the rows' solution; a right answer with wrong working is wrong), or "
                        "math (math-verify on the last \\boxed{}), or custom (--custom-reward-function).")
    g.add_argument("--custom-reward-function", default=None, metavar="MODULE:FUNCTION",
                   help="With --reward custom: function(response_text, gold_answer) -> True, False or a status it "
                        "declares in its `statuses` attribute; 'module:function' or 'file.py:function'. It runs in "
                        "worker processes with a deadline per answer (megatron_scope/rewards/custom.py).")
    g.add_argument("--verifier-workers", type=positive_int, default=1,
                   help="Worker processes grading in parallel (math and custom verifiers; the synthetic ones grade "
                        "in-process).")
    g.add_argument("--verifier-timeout", type=positive_float, default=10.0,
                   help="Hard seconds per graded answer (math and custom verifiers): past it the worker is killed "
                        "and the answer counts wrong, with status timeout.")
    g.add_argument("--reward-by-source", action="append", default=[], metavar="SOURCE=VERIFIER",
                   help="The verifier (a --reward choice) of one data source's responses: a training row's "
                        "--data-source-key value or an --eval-data set's NAME; repeat for several. Others get --reward's.")


def add_validation_args(parser: argparse.ArgumentParser, training: bool = True) -> argparse.ArgumentParser:
    """--eval-*: held-out sets and how they are sampled (training's validation; tools/eval.py with training=False,
    where the sets are required and the sampling flags default to the rollout flags' defaults)."""
    g = parser.add_argument_group(title="validation")
    g.add_argument("--eval-data", action="append", default=[], required=not training, metavar="NAME=PATH",
                   help="A held-out set; repeat for several. NAME one of " + ", ".join(BENCHMARK_NAMES) + " reads its "
                        "known layouts; any other NAME reads a JSONL/parquet/datasets file with the key flags. NAME is "
                        "the set's data source (--reward-by-source) and its metrics' prefix (eval/NAME/avg@n).")
    g.add_argument("--eval-samples-per-prompt", type=positive_int, default=1,
                   help="n responses per problem: Avg@n and unbiased Pass@k for k = 1, 2, 4, ... and n.")
    g.add_argument("--eval-temperature", type=nonnegative_float, default=None,
                   help="Default: --rollout-temperature." if training else "Default: 1.0.")
    g.add_argument("--eval-top-p", type=positive_float, default=None,
                   help="Default: --rollout-top-p." if training else "Default: 1.0.")
    g.add_argument("--eval-max-new-tokens", type=positive_int, default=None,
                   help="Default: --max-new-tokens." if training else "Default: 256.")
    if training:
        g.add_argument("--eval-interval", type=nonnegative_int, default=0,
                       help="Evaluate every this many iterations with the student's engines (every replica's, the "
                            "problems split across them); 0: after the last iteration only. Evaluation after the "
                            "last iteration always runs when --eval-data is given.")
        g.add_argument("--eval-at-start", action="store_true", help="Also evaluate before the first step.")
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="data")
    g.add_argument("--train-data", required=True,
                   help="Rows {id, prompt, answer} (and solution, with --reward synthetic-strict) of a JSONL file, a "
                        "parquet file or a Hugging Face datasets directory (save_to_disk; a DatasetDict's split "
                        "directory); the key flags name other columns.")
    add_row_args(g)
    g.add_argument("--data-source-key", default=None,
                   help="The column naming each row's data source; rollout accuracy is then reported per source and "
                        "--reward-by-source picks its verifier.")
    g.add_argument("--max-verifier-error-fraction", type=float, default=0.05,
                   help="Stop the run, naming the verifier and its first error, when more than this share of a "
                        "step's responses end in the verifier's own error (counted as verifier/verifier_error).")
    return parser


def add_rollout_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="rollout")
    g.add_argument("--prompts-per-step", type=positive_int, default=8,
                   help="Prompts per step over all data-parallel ranks; each yields --scope-group-size responses.")
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--rollout-temperature", type=nonnegative_float, default=1.0)
    g.add_argument("--rollout-top-p", type=positive_float, default=1.0)
    g.add_argument("--rollout-kv-cache-gib", type=positive_float, default=1.0, help="KV cache of the vLLM engine (GiB).")
    g.add_argument("--rollout-gpu-memory-utilization", type=positive_float, default=None,
                   help="vLLM's gpu_memory_utilization; with --rollout-kv-cache-gib it only sets vLLM's start-up check "
                        "(free device memory >= total x this). Default on CUDA: the share free when the engine "
                        "starts, less 2 GiB for its CUDA contexts.")
    g.add_argument("--rl-offload-optimizer-during-inference", action="store_true",
                   help="While the engines generate, keep the optimizer's state and fp32 main parameters in host "
                        "memory and free the gradient buffers (megatron-core's offload), for a larger KV cache.")
    g.add_argument("--rl-offload-teacher-during-inference", action="store_true",
                   help="While the engines generate, keep the forward-only models on the training GPUs (a co-located "
                        "teacher, ExOPD's reference, SRPO's EMA teacher) in pinned host memory.")
    g.add_argument("--weight-transfer-backend", choices=WEIGHT_TRANSFERS, default="auto",
                   help="How a refit reaches a vLLM engine's workers: ipc, vLLM's CUDA IPC backend (device buffers on "
                        "the engine's GPUs, no host copy); nccl, vLLM's NCCL backend, a broadcast from the rollout "
                        "leader's GPU to Ray engines (--rollout-placement ray); shared_memory, files in /dev/shm "
                        "(CPU, or the fallback); auto: on CUDA nccl for Ray engines and ipc otherwise, else "
                        "shared_memory.")
    g.add_argument("--weight-transfer-bucket-mib", type=positive_int, default=512,
                   help="MiB per refit bucket into a vLLM engine: a device buffer of max(this, the largest tensor) on "
                        "each of the engine's GPUs (ipc), or a file in /dev/shm, which must then hold about twice "
                        "max(this, the model's largest tensor), checked before the first refit (shared_memory).")
    g.add_argument("--rollout-tensor-parallel-size", type=positive_int, default=None,
                   help="vLLM's tensor parallelism (default: --tensor-model-parallel-size with --rollout-placement "
                        "colocated, else 1).")
    g.add_argument("--rollout-placement", choices=ROLLOUT_PLACEMENTS, default=None,
                   help="colocated: one vLLM engine per data-parallel replica on the replica's own GPUs, driven by its "
                        "first rank; it generates exactly the prompts its replica trains on, is refit from the "
                        "replica's own shards and sleeps (CUDA) while the replica trains. rank0: one engine inside "
                        "global rank 0 generates the whole step and every rank receives it. ray: --rollout-engines "
                        "Ray actors anywhere in the cluster, each given its share of the step's prompts at once. Default: ray with --rollout-engines, "
                        "else colocated.")
    g.add_argument("--rollout-schedule", choices=ROLLOUT_SCHEDULES, default="sync",
                   help="sync: generate, train, refit, in series. one-step-off: the engines sample step k+1's "
                        "responses from the weights before step k while step k trains (each response one optimizer "
                        "step stale; --rollout-is-threshold corrects for it). async: the engines produce each step's "
                        "rollout as soon as --max-staleness admits it, up to η steps ahead of training. The last two "
                        "need --rollout-placement ray.")
    g.add_argument("--max-staleness", type=nonnegative_int, default=None,
                   help="With --rollout-schedule async: η, the most optimizer steps a response may lag the weights "
                        "that train on it (0: the sync schedule's order; 1: one-step-off's bound, reached greedily).")
    g.add_argument("--partial-rollout-tokens", type=positive_int, default=None, metavar="L",
                   help="With --rollout-schedule async: draw each rollout in segments of at most L tokens, so a refit "
                        "(or a validation) waits for the segment in progress instead of the step's slowest response; "
                        "the unfinished responses go on under the new weights (prompt + tokens so far, reseeded), each "
                        "token's sampler log-prob that of the weights that drew it (rollout/partial.py). Default: "
                        "whole rollouts.")
    g.add_argument("--rollout-sampler", choices=ROLLOUT_SAMPLERS, default="iid",
                   help="iid: each prompt's G responses are independent samples of the student. props: PROPS "
                        "(arXiv 2311.08290) for prompt groups: the G responses are drawn in --props-rounds rounds, and "
                        "at a prefix the earlier rounds drew at, the student's engine samples from a behaviour policy "
                        "that favours the tokens they under-sampled, within π_b/π in [1 - ε, 1 + ε] (rollout/props.py);"
                        " the sampler log-probs recorded are the behaviour policy's.")
    g.add_argument("--props-rounds", type=positive_int, default=None,
                   help=f"With --rollout-sampler props: the rounds each group is drawn in, 1..G (default "
                        f"{PropsSampling.rounds}).")
    g.add_argument("--props-clip", type=nonnegative_float, default=None,
                   help=f"With --rollout-sampler props: ε, PROPS's clip on π_b/π, in [0, 1) (default "
                        f"{PropsSampling.clip}; 0 samples as iid).")
    g.add_argument("--rollout-engines", type=nonnegative_int, default=0,
                   help="With --rollout-placement ray: N >= 1 engines as Ray actors, placed by Ray on any node of the "
                        "cluster (rollout/ray_engine.py); each gets its share of every step's prompt groups in one call.")
    g.add_argument("--teacher-engines", type=positive_int, default=1,
                   help="With --rollout-placement ray: N Ray actors serving a vLLM teacher (--teacher-backend vllm, "
                        "TrOPD's guidance) and ExOPD's vLLM reference, each scoring a shard of about equal tokens of "
                        "every step's responses (default 1).")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join with --rollout-engines (e.g. auto, or HOST:6379); default: RAY_ADDRESS "
                        "if set, else a local Ray started by rank 0.")
    g.add_argument("--rollout-gpus-per-engine", type=nonnegative_float, default=None,
                   help="GPUs Ray reserves per engine (default: --rollout-tensor-parallel-size with CUDA, 0 without).")
    g.add_argument("--weight-sync-bucket-mib", type=positive_int, default=256,
                   help="Bucket size of the Megatron -> vLLM weight stream (MiB).")
    g.add_argument("--vllm-log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=None,
                   help="vLLM's log level (default: VLLM_LOGGING_LEVEL if set, else WARNING).")
    return parser


def add_scope_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `scope` and baseline groups (Megatron's extra_args_provider contract)."""
    group = parser.add_argument_group(title="scope", description="SCOPE on-policy distillation (arXiv 2604.10688)")
    group.add_argument("--scope-algorithm", choices=ALGORITHMS, default="scope",
                       help="Objective: SCOPE or a baseline.")
    group.add_argument("--scope-tau", type=positive_float, default=1.0,
                       help="Temperature τ of both path weightings (PPL^(±1/τ)).")
    group.add_argument("--scope-weight-norm", choices=WEIGHT_NORMS, default="mean",
                       help="sum: weights sum to 1 per prompt and path (the paper); "
                            "mean: they average 1 (the authors' released runs).")
    group.add_argument("--scope-student-path", action=argparse.BooleanOptionalAction, default=True,
                       help="MLE on correct responses (--no-scope-student-path: they get no loss; an ablation).")
    group.add_argument("--scope-student-path-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="Student-perplexity weights on correct responses (off: uniform).")
    group.add_argument("--scope-teacher-path-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="Teacher-perplexity weights on incorrect responses (off: uniform).")
    group.add_argument("--scope-student-path-exponent", type=int, choices=(1, -1), default=1,
                       help="w_stu ∝ PPL_S^(exponent/τ): 1 the paper, -1 the authors' released code.")
    group.add_argument("--scope-teacher-path-loss", choices=TEACHER_PATH_LOSSES, default="kl",
                       help="kl: the per-token divergence of --scope-kl; ppo: the released code's PPO clipped "
                            "surrogate (dual clip) of the advantage log π_T - log π_old (with --scope-kl k1).")
    group.add_argument("--loss-agg-mode", choices=LOSS_AGG_MODES, default="seq-mean-token-mean",
                       help="seq-mean-token-mean: token mean per response, then the weighted mean over responses (the "
                            "paper); token-mean: over all response tokens of the batch; scope-released: the released "
                            "code's token-mean, the MLE over correct-response tokens only.")
    group.add_argument("--logprob-temperature", type=positive_float, default=1.0,
                       help="The student's log-probs in the loss from logits / T (the released code: the rollout "
                            "temperature, 0.6); the teacher's stay at temperature 1.")
    group.add_argument("--scope-kl", choices=KL_ESTIMATORS, default="reverse",
                       help="Divergence to the teacher: full-vocabulary reverse/forward/jsd from a co-located "
                            "teacher's sharded logits; k1/k2/k3 estimators of the reverse KL from the teacher's "
                            "sampled-token log-probs (each with the reverse KL's gradient in expectation); topk, the "
                            "reverse KL against the teacher's top-k and tail (the best with a vLLM teacher).")
    group.add_argument("--scope-jsd-beta", type=open_unit_float, default=0.5,
                       help="Mixture weight β of the generalized JSD (--scope-kl jsd).")
    group.add_argument("--scope-topk", type=positive_int, default=None,
                       help="k of the teacher's top-k log-probs (required with --scope-kl topk).")
    group.add_argument("--scope-topk-renormalize", action="store_true",
                       help="With --scope-kl topk: renormalise both distributions over the teacher's k ids (NeMo-RL's "
                            "and the SCOPE authors' convention) instead of lumping the rest of the vocabulary into "
                            "a tail outcome (default; equals the full KL at k = V).")
    group.add_argument("--scope-fused-kl", action=argparse.BooleanOptionalAction, default=True,
                       help="A full-vocabulary KL (reverse/forward/jsd) with a co-located teacher is computed from both "
                            "models' last hidden states and output-layer shards, one token chunk of logits at a time "
                            "(ops.linear_kl), so neither model's [tokens, V/TP] logits are kept (SCOPE and OPD; the "
                            "other objectives keep the student's logits and build one microbatch of the teacher's). "
                            "--no-scope-fused-kl: materialise both models' logits per microbatch.")
    group.add_argument("--rollout-is-threshold", type=positive_float, default=None,
                       help="Token-level truncated importance sampling (verl's rollout_is=token; the G-OPD code uses "
                            "5): each token's loss times min(π_S(y_t) / μ(y_t), C), μ the distribution the rollout "
                            "engine sampled from. Default: off.")
    group.add_argument("--rollout-is", choices=ROLLOUT_IS_LEVELS, default="token",
                       help="The level of --rollout-is-threshold's weights (verl's rollout_is): token, each token's "
                            "own ratio; sequence, the product of its response's ratios (also corrects which prefixes a "
                            "stale sampler visits; higher variance).")
    group.add_argument("--rollout-rs", choices=ROLLOUT_RS_LEVELS, default=None,
                       help="Rejection (verl's rollout_rs): tokens whose ratio π_S / μ lies outside "
                            "[--rollout-rs-threshold-lower, --rollout-rs-threshold] leave the loss and its normaliser; "
                            "token: per token; sequence: the whole response by the product of its ratios; geometric: by "
                            "their geometric mean. Default: off.")
    group.add_argument("--rollout-rs-threshold", type=positive_float, default=None,
                       help="The rejection band's upper end (> 1), with --rollout-rs.")
    group.add_argument("--rollout-rs-threshold-lower", type=positive_float, default=None,
                       help="The rejection band's lower end (< 1); default: 1 / --rollout-rs-threshold.")
    group.add_argument("--scope-group-size", type=positive_int, default=8,
                       help="G: responses sampled per prompt.")

    baselines = parser.add_argument_group(title="scope baselines", description="OPD, ExOPD, SRPO, TrOPD, GRPO, SFT")
    baselines.add_argument("--exopd-lambda", type=float, default=1.25,
                           help="ExOPD reward extrapolation λ (1 = OPD).")
    baselines.add_argument("--exopd-reference-hf", default=None,
                           help="ExOPD's reference model π_ref, a HF directory loaded frozen beside the student (G-OPD's "
                                "reward correction: the teacher's base model before its RL). Default: the initial "
                                "student (--student-hf).")
    baselines.add_argument("--exopd-reference-backend", choices=TEACHER_BACKENDS, default="megatron",
                           help="ExOPD's reference as a co-located forward-only Megatron model (megatron) or a vLLM "
                                "engine placed like --teacher-backend vllm's that scores the responses (vllm: no "
                                "training-GPU memory for it; ExOPD reads only its sampled-token log-probs).")
    baselines.add_argument("--srpo-beta", type=nonnegative_float, default=1.0,
                           help="SRPO's entropy-aware weight: a distilled token weighs exp(-β H_teacher), normalised to "
                                "mean 1 over the step's distilled tokens.")
    baselines.add_argument("--srpo-teacher", choices=SRPO_TEACHERS, default="ema",
                           help="SRPO's teacher for failed samples: ema (an EMA copy of the student, SDPO's default) or "
                                "current (the student itself), re-prompted with a successful sibling (SRPO/SDPO's "
                                "self-teacher); external: the --teacher-hf model on the original prompt.")
    baselines.add_argument("--srpo-ema-rate", type=open_unit_float, default=0.05,
                           help="The EMA self-teacher's update rate r: θ_T <- (1 - r) θ_T + r θ_S after each step.")
    baselines.add_argument("--srpo-reprompt-template", default=SRPO_REPROMPT_TEMPLATE,
                           help="The self-teacher's prompt, with {prompt} (the rollout prompt's text after "
                                "--prompt-template) and {solution} (a successful sibling's response); it is "
                                "then formatted as a rollout prompt (BOS, or --apply-chat-template). Default: SDPO's.")
    baselines.add_argument("--tropd-trust-region", choices=TROPD_TRUST_REGIONS, default="sampled",
                           help="TrOPD's trust region: sampled (the paper's: token y is inside with probability "
                                "min(π_T(y)/π_S(y), 1), one draw per token) or threshold (|log π_S - log π_T| <= δ).")
    baselines.add_argument("--tropd-delta", type=positive_float, default=1.0,
                           help="δ of the threshold trust region and of the clip outliers.")
    baselines.add_argument("--tropd-outlier", choices=TROPD_OUTLIERS, default="forward",
                           help="TrOPD outside the region: forward (the paper's: KL(π_T‖π_S), over the vocabulary "
                                "with a full --scope-kl, else over the teacher's top-k with --scope-topk K, the "
                                "paper's K = 64), or its ablations mask (no loss) and clip (the KL scaled by "
                                "δ / max(|log π_S - log π_T|, δ)).")
    baselines.add_argument("--tropd-prefix-fraction", type=unit_interval_float, default=0.0,
                           help="TrOPD's off-policy guidance: the fraction of each step's prompts whose G responses "
                                "continue teacher-written prefixes (a vLLM engine of --teacher-hf writes G responses; "
                                "each keeps its first floor(α L) tokens, α annealed from 1 to 0 by a cosine over "
                                "--train-iters); prefix tokens are imitated with forward KL. 0: off.")
    baselines.add_argument("--tropd-prefix-beta", type=nonnegative_float, default=0.001,
                           help="β of the forward-KL imitation of the teacher's prefix tokens (the paper's 0.001).")
    baselines.add_argument("--grpo-clip-eps", type=open_unit_float, default=0.2,
                           help="PPO ratio clip ε (GRPO, SRPO's correct path, --scope-teacher-path-loss ppo).")
    baselines.add_argument("--clip-ratio-c", type=positive_float, default=3.0,
                           help="PPO dual clip c > 1: a negative advantage's loss is at most -c A.")
    return parser


ARG_GROUPS = (add_distributed_args, add_training_args, add_checkpointing_args, add_model_args, add_data_args,
              add_validation_args, add_rollout_args, add_scope_args)


def build_parser(description: str = "SCOPE on-policy distillation with Megatron-core and vLLM") -> argparse.ArgumentParser:
    """A parser with every group of `ARG_GROUPS`."""
    parser = argparse.ArgumentParser(description=description)
    for add_group in ARG_GROUPS:
        add_group(parser)
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, RunConfig]:
    """Parse `argv` with `parser` and build the run's configuration; a bad value or combination exits with
    argparse's usage error naming it."""
    args = parser.parse_args(argv)
    try:
        return args, build_config(args)
    except ValueError as error:
        parser.error(str(error))


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    """The run's configuration from the command line (every flag of `build_parser`)."""
    return parse_config(build_parser(), argv)[1]
