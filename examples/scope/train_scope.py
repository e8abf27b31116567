r"""SCOPE training entry point: torchrun (multi-node) or plain python (one process on CPU).

The paper's pair, DeepSeek-R1-Distill-Qwen-1.5B distilled from Skywork-OR1-Math-7B (both Qwen2; Qwen3-1.7B
from Qwen3-8B works the same way), on 4 nodes of 8 GPUs:

    torchrun --nproc-per-node 8 --nnodes 4 --rdzv-endpoint HOST:PORT examples/scope/train_scope.py \
        --student-hf /ckpt/DeepSeek-R1-Distill-Qwen-1.5B --teacher-hf /ckpt/Skywork-OR1-Math-7B \
        --tokenizer /ckpt/DeepSeek-R1-Distill-Qwen-1.5B --teacher-tokenizer /ckpt/Skywork-OR1-Math-7B \
        --prompt-template $'{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.' \
        --apply-chat-template --train-data prompts.jsonl --reward math --bf16 \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --micro-batch-size 4 \
        --prompts-per-step 256 --scope-group-size 8 --max-new-tokens 12288 --rollout-kv-cache-gib 40 \
        --lr 5e-5 --train-iters 200 --save /ckpt/scope --load /ckpt/scope --scope-tau 1.0
    python tools/convert_megatron_to_hf.py --megatron-dir /ckpt/scope --output-dir /ckpt/scope_hf

Flags: Megatron-LM's names for parallelism, optimisation, checkpointing and logging; `--scope-*` and the
baselines' flags from megatron_scope.arguments; rollout flags below. The student starts from a Hugging Face
directory (config.json + safetensors), which also seeds the vLLM engine on global rank 0; the teacher is
co-located (same TP/PP as the student, forward only).

Vocabulary: the tokenizer's (a SentencePiece model file or a Hugging Face tokenizer directory) is the one
distillation works over; each checkpoint may have more embedding rows than it has tokens (151936 rows for
the 1.5B student, 152064 for the 7B teacher, 151665 tokens). Both Megatron models are padded to one
vocabulary (the larger row count, padded for TP) so their vocab-parallel shards line up; the weights synced
to vLLM and exported keep each checkpoint's own row count. Checkpoints under --save carry the student's HF
config and tokenizer files, so tools/convert_megatron_to_hf.py turns them into a Hugging Face model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_scope.arguments import parse_scope_args  # noqa: E402
from megatron_scope.data.datasets import PROMPT_PLACEHOLDER, PromptFormat  # noqa: E402


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Megatron-LM flags this trainer reads (same names and meanings as megatron/training/arguments.py)."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4, help="Sequences per microbatch.")
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters (GPU runs)")
    g.add_argument("--exit-on-nonfinite", action="store_true",
                   help="Stop the run when a step's loss or gradient norm is NaN/Inf (default: skip the step).")
    g = parser.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--exit-interval", type=int, default=0, help="Save and exit after this many iterations.")
    g.add_argument("--tensorboard-dir", default=None)
    g = parser.add_argument_group("models and data")
    g.add_argument("--student-hf", required=True, help="Student's initial weights: HF directory.")
    g.add_argument("--teacher-hf", default=None, help="Teacher: HF directory.")
    g.add_argument("--teacher-backend", choices=("megatron", "vllm"), default="megatron",
                   help="megatron: the teacher is co-located, a forward-only Megatron model with the student's TP/PP "
                        "(full-vocabulary, top-k or sampled-token KL). vllm: the teacher is a vLLM engine placed like "
                        "the rollout engine (inside global rank 0, or one Ray actor with --rollout-engines) that "
                        "scores the responses: sampled-token log-probs and, with --scope-kl topk, its top-k (for "
                        "--scope-kl k1/k2/k3/topk).")
    g.add_argument("--tokenizer", required=True,
                   help="Tokenizer shared by student and teacher: a SentencePiece model file or a Hugging Face "
                        "tokenizer directory (e.g. the student's HF directory).")
    g.add_argument("--teacher-tokenizer", default=None,
                   help="The teacher's tokenizer (same kinds as --tokenizer): checked to have the same vocabulary.")
    g.add_argument("--train-data", required=True, help="JSONL rows {id, prompt, answer}.")
    g.add_argument("--prompt-template", default=PROMPT_PLACEHOLDER,
                   help="Rollout prompt text with exactly one {prompt}, replaced by the row's prompt, e.g. (bash) "
                        "$'{prompt}\\nPlease reason step by step, and put your final answer within \\\\boxed{}.'")
    g.add_argument("--apply-chat-template", action="store_true",
                   help="Wrap the templated prompt as one user turn with the tokenizer's chat template and the "
                        "assistant's generation prompt (Hugging Face tokenizers only).")
    g.add_argument("--reward", choices=("synthetic", "math"), default="math",
                   help="Verifier: the synthetic arithmetic checker or math-verify (last \\boxed{}).")
    g = parser.add_argument_group("rollout")
    g.add_argument("--prompts-per-step", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-kv-cache-gib", type=float, default=1.0,
                   help="KV cache of the vLLM engine (GiB).")
    g.add_argument("--rollout-tensor-parallel-size", type=int, default=1)
    g.add_argument("--rollout-engines", type=int, default=0,
                   help="0: one vLLM engine inside global rank 0. N >= 1: N engines as Ray actors, placed by Ray on "
                        "any node of the cluster (rollout/ray_engine.py); prompts are split over them.")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join with --rollout-engines (e.g. auto, or HOST:6379); default: RAY_ADDRESS "
                        "if set, else a local Ray started by rank 0.")
    g.add_argument("--rollout-gpus-per-engine", type=float, default=None,
                   help="GPUs Ray reserves per engine (default: --rollout-tensor-parallel-size with CUDA, 0 without).")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Training flags + SCOPE flags, validated (a bad value or combination exits with argparse's usage error)."""
    parser = add_training_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = parse_scope_args(argv, parser)
    try:
        PromptFormat(args.prompt_template, args.apply_chat_template)
    except ValueError as error:
        parser.error(f"--prompt-template: {error}")
    if args.rollout_engines < 0:
        parser.error(f"--rollout-engines must be >= 0, got {args.rollout_engines}")
    if args.teacher_backend == "vllm" and not args.teacher_hf:
        parser.error("--teacher-backend vllm needs --teacher-hf (the teacher's HF directory)")
    return args


def _read_arch(hf_dir: str):
    from megatron_scope.megatron.hf_mapping import arch_from_hf_config

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --student-hf/--teacher-hf must be a Hugging Face model directory")
    with open(path) as handle:
        return arch_from_hf_config(json.load(handle))


def _verifier(kind: str):
    """The reward's verifier: `verify_batch(response_texts, gold_answers) -> list[bool]`."""
    if kind == "synthetic":
        from megatron_scope.rewards.synthetic import SyntheticTaskVerifier

        return SyntheticTaskVerifier()
    from megatron_scope.rewards.math_verifier import MathVerifier

    return MathVerifier()


def _start_engine(args: argparse.Namespace, model_dir: str, num_ray_engines: int, max_logprobs: int = 0):
    """A vLLM engine of `model_dir` for global rank 0: in this process (num_ray_engines 0), or that many Ray
    actors anywhere in the cluster; `max_logprobs`: the top-k a teacher engine must give."""
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    config = VLLMEngineConfig(model_dir, kv_cache_bytes=int(args.rollout_kv_cache_gib * (1 << 30)),
                              tensor_parallel_size=args.rollout_tensor_parallel_size, seed=args.seed,
                              max_logprobs=max_logprobs)
    if not num_ray_engines:
        return VLLMRolloutEngine(config)
    import ray

    from megatron_scope.rollout.ray_engine import RayRolloutEngine

    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    gpus = args.rollout_gpus_per_engine
    if gpus is None:
        gpus = args.rollout_tensor_parallel_size if torch.cuda.is_available() else 0
    return RayRolloutEngine(config, num_engines=num_ray_engines, actor_options={"num_gpus": gpus})


def build_trainer(args: argparse.Namespace):
    """Everything a SCOPE run needs, checked before the first rollout; returns the ScopeTrainer."""
    import torch.distributed as dist

    from megatron_scope.data.datasets import PromptDataset
    from megatron_scope.data.tokenizer import check_same_tokenizer, load_tokenizer
    from megatron_scope.megatron.checkpointing import stage_hf_files
    from megatron_scope.megatron.loss_func import ScopeLossConfig, check_teacher_engine_objective
    from megatron_scope.megatron.model import build_gpt_model, padded_vocab_size, wrap_with_ddp
    from megatron_scope.megatron.optimizer import OptimizerSettings, build_optimizer
    from megatron_scope.megatron.parallel import init_distributed, initialize_model_parallel
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, load_hf_weights
    from megatron_scope.trainer import ScopeTrainer, TrainerSettings

    init_distributed()
    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    tokenizer = load_tokenizer(args.tokenizer)
    if args.teacher_tokenizer:
        check_same_tokenizer(load_tokenizer(args.teacher_tokenizer), tokenizer)
    student_arch = _read_arch(args.student_hf)
    teacher_arch = _read_arch(args.teacher_hf) if args.teacher_hf else None
    for name, arch, hf_dir in (("student", student_arch, args.student_hf), ("teacher", teacher_arch, args.teacher_hf)):
        if arch is not None and arch.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the {name} ({hf_dir}) has {arch.vocab_size} embedding rows, fewer than the "
                             f"{tokenizer.vocab_size} tokens of the tokenizer {args.tokenizer}: distillation needs "
                             "one shared vocabulary")
    # One padded vocabulary for every co-located model: their logits' vocab shards line up on each TP rank.
    rows = max(arch.vocab_size for arch in (student_arch, teacher_arch) if arch is not None)
    padded_vocab = padded_vocab_size(rows, args.tensor_model_parallel_size)
    dataset = PromptDataset.from_jsonl(args.train_data, seed=args.seed, tokenizer=tokenizer,
                                       prompt_format=PromptFormat(args.prompt_template, args.apply_chat_template))

    def load_model(arch, hf_dir, **config_overrides):
        model = build_gpt_model(arch, params_dtype=dtype, padded_vocab=padded_vocab, **config_overrides)
        load_hf_weights(model, arch, SafetensorsCheckpoint(hf_dir))
        return model

    student = wrap_with_ddp(load_model(student_arch, args.student_hf, calculate_per_token_loss=True),
                            use_distributed_optimizer=args.use_distributed_optimizer)
    teacher = reference = None
    if teacher_arch is not None and args.teacher_backend == "megatron":
        teacher = load_model(teacher_arch, args.teacher_hf).eval().requires_grad_(False)
    if args.scope_algorithm == "exopd":  # the reference is the initial student
        reference = load_model(student_arch, args.student_hf).eval().requires_grad_(False)
    optimizer, scheduler = build_optimizer(student, OptimizerSettings(
        lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters, train_iters=args.train_iters,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        clip_grad=args.clip_grad, use_distributed_optimizer=args.use_distributed_optimizer))

    loss_config = ScopeLossConfig.from_args(args, vocab_size=tokenizer.vocab_size)
    if args.teacher_backend == "vllm":
        check_teacher_engine_objective(loss_config)  # before any engine starts
    engine = teacher_engine = None
    if dist.get_rank() == 0:
        engine = _start_engine(args, args.student_hf, args.rollout_engines)
        if teacher_arch is not None and args.teacher_backend == "vllm":
            topk = args.scope_topk if args.scope_kl == "topk" else 0
            teacher_engine = _start_engine(args, args.teacher_hf, min(args.rollout_engines, 1), max_logprobs=topk)
    settings = TrainerSettings(
        train_iters=args.train_iters, prompts_per_step=args.prompts_per_step, group_size=args.scope_group_size,
        micro_batch_size=args.micro_batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.rollout_temperature, top_p=args.rollout_top_p, seed=args.seed, save=args.save,
        save_interval=args.save_interval, load=args.load, log_interval=args.log_interval, exit_interval=args.exit_interval,
        tensorboard_dir=args.tensorboard_dir, exit_on_nonfinite=args.exit_on_nonfinite, scope_tau=args.scope_tau,
        scope_weight_norm=args.scope_weight_norm, use_student_weights=args.scope_student_path_weights,
        use_teacher_weights=args.scope_teacher_path_weights)
    trainer = ScopeTrainer(settings, loss_config, student,
                           student_arch, optimizer, scheduler, dataset, tokenizer, _verifier(args.reward).verify_batch,
                           engine=engine, teacher=teacher, reference=reference, teacher_engine=teacher_engine)
    if args.save and dist.get_rank() == 0:  # config and tokenizer files for converting checkpoints to HF
        stage_hf_files(args.save, args.student_hf)
    return trainer


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    trainer = build_trainer(parse_args(argv))
    try:
        history = trainer.train()
    finally:
        trainer.close()
    return trainer, history


if __name__ == "__main__":
    main()
