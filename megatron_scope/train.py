r"""SCOPE training entry point: `torchrun ... -m megatron_scope.train` (multi-node) or `python -m megatron_scope.train`
(one process on CPU).

The paper's pair, DeepSeek-R1-Distill-Qwen-1.5B distilled from Skywork-OR1-Math-7B (both Qwen2; Qwen3-1.7B
from Qwen3-8B works the same way), on 4 nodes of 8 GPUs:

    torchrun --nproc-per-node 8 --nnodes 4 --rdzv-endpoint HOST:PORT -m megatron_scope.train \
        --student-hf /ckpt/DeepSeek-R1-Distill-Qwen-1.5B --teacher-hf /ckpt/Skywork-OR1-Math-7B \
        --tokenizer /ckpt/DeepSeek-R1-Distill-Qwen-1.5B --teacher-tokenizer /ckpt/Skywork-OR1-Math-7B \
        --prompt-template $'{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.' \
        --apply-chat-template --train-data prompts.jsonl --reward math --bf16 \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --micro-batch-size 4 \
        --prompts-per-step 256 --scope-group-size 8 --max-new-tokens 12288 --rollout-kv-cache-gib 40 \
        --lr 5e-5 --train-iters 200 --save /ckpt/scope --load /ckpt/scope --scope-tau 1.0
    python tools/convert_megatron_to_hf.py --megatron-dir /ckpt/scope --output-dir /ckpt/scope_hf

Flags: `megatron_scope.arguments` (`--help` lists them all); they become one `RunConfig` (megatron_scope.config)
that every component below receives. The student starts from a Hugging Face directory (config.json +
safetensors), which also seeds the vLLM engines (by default one per data-parallel replica, sleeping while its
replica trains: --rollout-placement); a co-located teacher has the student's TP/PP (forward only).

Vocabulary: the tokenizer's (a SentencePiece model file or a Hugging Face tokenizer directory) is the one
distillation works over; each checkpoint may have more embedding rows than it has tokens (151936 rows for
the 1.5B student, 152064 for the 7B teacher, 151665 tokens). Both Megatron models are padded to one
vocabulary (the larger row count, padded for TP) so their vocab-parallel shards line up; the weights synced
to vLLM and exported keep each checkpoint's own row count. Checkpoints under --save carry the student's HF
config and tokenizer files, so tools/convert_megatron_to_hf.py turns them into a Hugging Face model.
"""

from __future__ import annotations

import logging
import math

import torch

from megatron_scope.arguments import parse_run_config
from megatron_scope.config import RunConfig
from megatron_scope.rewards.routing import build_verifier


def read_arch(model_dir: str):
    """The DecoderArch of a Hugging Face model directory (megatron_scope.hf_config reads its config.json)."""
    from megatron_scope.hf_config import read_hf_config
    from megatron_scope.megatron.hf_mapping import arch_from_hf_config

    return arch_from_hf_config(read_hf_config(model_dir))


def load_prompts(data, seed: int = 0, tokenizer=None):
    """The training prompts of `data` (a DataConfig), each `Prompt.answer` the gold its reward's verifier takes.

    The gold is the --label-key column (`DataConfig.dataset_keys`), checked for the verifier of the row's data
    source (--reward-by-source, else --reward). synthetic: the rows' "answer", checked to be an integer.
    synthetic-strict: the rows' reference "solution" ("7+5=12 ; 12-3=9 ; A: 9"), checked to be its prompt's
    left-to-right evaluation, so the verifier grades every written step with only (response, gold) pairs. math:
    the rows' "answer" (math-verify parses it at the first rollout). Bad rows raise DatasetFormatError /
    ValueError naming the file and line or row, or the prompt, before the run starts.
    """
    from megatron_scope.data import synthetic
    from megatron_scope.data.datasets import DatasetFormatError, PromptDataset

    checks = {"synthetic": synthetic.canonical_answer, "synthetic-strict": synthetic.reference_steps}
    reward_of = dict(data.reward_by_source)

    def check_answer(answer: str, source: str | None) -> None:
        check = checks.get(reward_of.get(source, data.reward))
        if check is not None:
            check(answer)

    dataset = PromptDataset.from_file(data.train_data, seed=seed, tokenizer=tokenizer, keys=data.dataset_keys(),
                                       check_answer=check_answer,
                                       prompt_format=data.prompt_format() if tokenizer is not None else None)
    for prompt in dataset.prompts:
        if reward_of.get(prompt.data_source, data.reward) == "synthetic-strict":
            try:
                synthetic.check_solution_of_prompt(prompt.prompt, prompt.answer)
            except ValueError as error:
                raise DatasetFormatError(f"{data.train_data}: prompt {prompt.id!r}: {error}") from None
    return dataset


ENGINE_CONTEXT_MARGIN_BYTES = 2 << 30
"""Device memory `engine_memory_utilization` leaves for the CUDA contexts vLLM's processes create at start."""


def engine_memory_utilization(rollout, on_these_gpus: bool) -> float | None:
    """vLLM's `gpu_memory_utilization` for an engine: --rollout-gpu-memory-utilization when given; else, for an
    engine on this process's GPUs, the share of this GPU's memory free now less ENGINE_CONTEXT_MARGIN_BYTES, so
    vLLM's start-up check (free >= total x utilization) passes beside what the trainer holds (with a given KV cache
    the utilization sets nothing else); else None (vLLM's default). ValueError when nothing would be left."""
    if rollout.gpu_memory_utilization is not None or not on_these_gpus:
        return rollout.gpu_memory_utilization
    free, total = torch.cuda.mem_get_info()
    share = (free - ENGINE_CONTEXT_MARGIN_BYTES) / total
    if share <= 0:
        raise ValueError(f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB of GPU memory are free: no room to start a "
                         "vLLM engine (give --rollout-gpu-memory-utilization to override)")
    return math.floor(share * 1e4) / 1e4  # rounded down: the check must pass


def start_engine(config: RunConfig, model_dir: str, num_ray_engines: int, max_logprobs: int = 0,
                 residency=None, name: str = "rollout"):
    """A vLLM engine of `model_dir` for a rollout leader: in this process (num_ray_engines 0), or that many Ray
    actors anywhere in the cluster; `max_logprobs`: the top-k a teacher engine must give.

    An engine in this process shares the training GPUs: it sleeps while they train (vLLM sleep mode, CUDA only),
    runs on this rank's GPU and the next `--rollout-tensor-parallel-size - 1` (the first stage's TP group of the
    replica under Megatron's rank order), and shares `residency` with this leader's other engines (at most one
    awake)."""
    from megatron_scope.rollout.vllm_engine import (
        VLLMEngineConfig,
        VLLMRolloutEngine,
        check_refit_shared_memory,
        resolve_weight_transfer,
    )

    rollout = config.rollout
    cuda = torch.cuda.is_available()
    devices = None
    if cuda and not num_ray_engines:
        first = torch.cuda.current_device()
        devices = tuple(range(first, first + rollout.tensor_parallel_size))
    weight_transfer = rollout.weight_transfer_backend
    if weight_transfer == "auto" and cuda and num_ray_engines:  # GPU to GPU: vLLM's NCCL broadcast (ray_engine)
        weight_transfer = "nccl"
    engine_config = VLLMEngineConfig(model_dir, kv_cache_bytes=int(rollout.kv_cache_gib * (1 << 30)),
                                     gpu_memory_utilization=engine_memory_utilization(rollout, on_these_gpus=devices
                                                                                      is not None),
                                     tensor_parallel_size=rollout.tensor_parallel_size, seed=config.loop.seed,
                                     max_logprobs=max_logprobs, enable_sleep_mode=cuda and not num_ray_engines,
                                     devices=devices, weight_transfer=weight_transfer,
                                     weight_bucket_bytes=rollout.weight_transfer_bucket_mib << 20,
                                     props=name == "rollout" and rollout.props is not None)
    if name == "rollout" and not num_ray_engines and resolve_weight_transfer(engine_config) == "shared_memory":
        check_refit_shared_memory(engine_config)  # every step refits it through this node's /dev/shm: checked before
        # it starts (a Ray actor checks its own node's per refit)
    if not num_ray_engines:
        return VLLMRolloutEngine(engine_config, residency=residency, name=name)
    import ray

    from megatron_scope.rollout.ray_engine import RayRolloutEngine

    if not ray.is_initialized():
        ray.init(address=rollout.ray_address, include_dashboard=False, log_to_driver=False)
    gpus = rollout.gpus_per_engine
    if gpus is None:
        gpus = rollout.tensor_parallel_size if torch.cuda.is_available() else 0
    return RayRolloutEngine(engine_config, num_engines=num_ray_engines, actor_options={"num_gpus": gpus})


def check_teacher_routes(dataset, config: RunConfig) -> None:
    """Every training prompt routes to a teacher the run has (its --teacher-route-key value names a --teacher), or
    ValueError naming the first that does not, before any engine starts."""
    route_key, names = config.data.teacher_route_key, list(config.models.teacher_dirs)
    if route_key is None:
        return
    for prompt in dataset.prompts:
        if prompt.teacher not in names:
            raise ValueError(f"prompt {prompt.id!r} ({dataset.source}) routes to teacher {prompt.teacher!r} (its "
                             f"--teacher-route-key {route_key!r} column), which no --teacher names: the teachers are "
                             f"{names}")


def start_engines(config: RunConfig, reference_hf: str):
    """(rollout engine, {teacher name: its engine or servers}, reference engine) of a rollout leader (None, {} and
    None elsewhere, and where the run needs none); the vLLM engines asleep once started, sharing one `DeviceResidency`
    (at most one awake on this leader's GPUs)."""
    import torch.distributed as dist

    from megatron_scope.rollout.engine import DeviceResidency, close_engines
    from megatron_scope.trainer import rollout_group

    models, engines = config.models, [None, {}, None]
    if dist.get_rank() != rollout_group(config.rollout.placement)[1]:  # not a leader
        return engines
    residency = DeviceResidency()
    ray_teacher_engines = config.rollout.teacher_engines if config.rollout.engines else 0  # 0: in this process
    try:
        engines[0] = start_engine(config, models.student_hf, config.rollout.engines, residency=residency)
        engines[0].sleep(level=2)
        scorers, served = config.teachers_on("vllm"), config.teachers_on("server")
        for name, location in models.teacher_dirs.items():  # in flag order
            if name in config.engine_teachers:  # a vLLM teacher, or the writer of its prompts' guidance prefixes
                engines[1][name] = start_engine(config, location, ray_teacher_engines,
                                                max_logprobs=config.loss.teacher_topk if name in scorers else 0,
                                                residency=residency, name=models.teacher_label(name))
                engines[1][name].sleep(level=1)
            elif name in served:  # vLLM servers elsewhere, each checked to answer (one model) before any rollout
                from megatron_scope.teacher.served import ServedTeacher, ServedTeacherConfig

                engines[1][name] = ServedTeacher(ServedTeacherConfig(
                    tuple(location.split(",")), timeout_s=models.teacher_timeout_s, retries=models.teacher_retries))
        if config.remote_reference:  # ExOPD's reference served by vLLM
            engines[2] = start_engine(config, reference_hf, ray_teacher_engines, residency=residency,
                                      name="reference")
            engines[2].sleep(level=1)
    except BaseException:
        close_engines((engines[0], *engines[1].values(), engines[2]))
        raise
    return engines


def build_trainer(config: RunConfig):
    """Everything a SCOPE run needs, checked before the first rollout; returns the ScopeTrainer."""
    import torch.distributed as dist

    from megatron_scope.data.tokenizer import check_same_tokenizer, load_tokenizer
    from megatron_scope.eval.benchmarks import load_eval_sets
    from megatron_scope.eval.runner import prepare_sets
    from megatron_scope.megatron.checkpointing import stage_hf_files
    from megatron_scope.megatron.arch import common_padded_vocab
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import init_distributed, initialize_model_parallel
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, load_hf_weights
    from megatron_scope.rollout.engine import close_engines
    from megatron_scope.rollout.vllm_engine import set_vllm_log_level
    from megatron_scope.teacher.self_teacher import EmaTeacher
    from megatron_scope.trainer import ScopeTrainer

    models, parallel, seed = config.models, config.parallel, config.loop.seed
    set_vllm_log_level(config.rollout.vllm_log_level)
    init_distributed(timeout_minutes=parallel.distributed_timeout_minutes)
    initialize_model_parallel(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, seed=seed,
                              timeout_minutes=parallel.distributed_timeout_minutes)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if models.bf16 else torch.float32

    tokenizer = load_tokenizer(models.tokenizer)
    for name, path in models.teacher_tokenizers:
        try:
            check_same_tokenizer(load_tokenizer(path), tokenizer)
        except ValueError as error:
            raise ValueError(f"{models.teacher_label(name)}: {error}") from error
    student_arch = read_arch(models.student_hf)
    teacher_archs = {name: read_arch(hf_dir) for name, hf_dir in models.teacher_model_dirs.items()}
    reference_hf = models.reference_hf or models.student_hf  # ExOPD's π_ref: G-OPD's reward correction, or the student
    reference_arch = read_arch(reference_hf) if config.loss.algorithm == "exopd" else None
    for name, arch, hf_dir in (("student", student_arch, models.student_hf),
                               *((models.teacher_label(name), arch, models.teacher_dirs[name])
                                 for name, arch in teacher_archs.items()),
                               ("reference", reference_arch, reference_hf)):
        if arch is not None and arch.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the {name} ({hf_dir}) has {arch.vocab_size} embedding rows, fewer than the "
                             f"{tokenizer.vocab_size} tokens of the tokenizer {models.tokenizer}: distillation needs "
                             "one shared vocabulary")
    padded_vocab = common_padded_vocab([a for a in (student_arch, *teacher_archs.values(), reference_arch)
                                        if a is not None], parallel.tensor_model_parallel_size)
    dataset = load_prompts(config.data, seed=seed, tokenizer=tokenizer)
    check_teacher_routes(dataset, config)
    verifier = build_verifier(config.data)
    try:  # the held-out sets, checked (gold answers by their verifiers) and encoded before any engine starts
        eval_sets = prepare_sets(load_eval_sets(config.validation.data, config.data), tokenizer,
                                 config.data.prompt_format(), verifier) if config.validation.data else []
    except BaseException:
        verifier.close()
        raise

    # vLLM's GPU worker starts only where free memory >= total x gpu_memory_utilization: the engines start before
    # Megatron allocates, one at a time, each asleep before the next starts (the rollout engine at level 2: the
    # first weight sync refits it from the student's, possibly resumed, weights)
    try:
        engine, teacher_engines, reference_engine = start_engines(config, reference_hf)
    except BaseException:
        verifier.close()
        raise
    try:
        def load_model(arch, hf_dir, params_dtype=dtype, **config_overrides):
            model = build_gpt_model(arch, params_dtype=params_dtype, padded_vocab=padded_vocab, **config_overrides,
                                    variable_seq_lengths=config.loop.max_tokens_per_microbatch is not None,
                                    sequence_parallel=parallel.sequence_parallel)
            load_hf_weights(model, arch, SafetensorsCheckpoint(hf_dir))
            return model

        student = wrap_with_ddp(load_model(student_arch, models.student_hf, calculate_per_token_loss=True,
                                           **models.model_options),
                                use_distributed_optimizer=config.optimizer.use_distributed_optimizer,
                                overlap_grad_reduce=config.optimizer.overlap_grad_reduce,
                                bucket_size=config.optimizer.ddp_bucket_size)
        teachers, reference = {}, None
        for name in config.teachers_on("megatron"):
            teachers[name] = load_model(teacher_archs[name], models.teacher_dirs[name], **models.layer_spec_options)
            teachers[name].eval().requires_grad_(False)
        if config.colocated_reference:
            reference = load_model(reference_arch, reference_hf, **models.layer_spec_options)
            reference.eval().requires_grad_(False)
        ema_teacher = None
        if config.loss.ema_teacher:  # SRPO's EMA self-teacher, fp32
            ema_teacher = EmaTeacher(load_model(student_arch, models.student_hf, params_dtype=torch.float32,
                                                **models.layer_spec_options).eval().requires_grad_(False),
                                     config.loss.baselines.srpo_ema_rate)
        optimizer, scheduler = build_optimizer(student, config.optimizer, config.loop.train_iters)

        trainer = ScopeTrainer(config, student, student_arch, optimizer, scheduler, dataset, tokenizer,
                               verifier, engine=engine, teachers=teachers, reference=reference,
                               teacher_engines=teacher_engines, ema_teacher=ema_teacher,
                               reference_engine=reference_engine, eval_sets=eval_sets)
        if config.loop.save and dist.get_rank() == 0:  # config and tokenizer files for converting checkpoints to HF
            stage_hf_files(config.loop.save, models.student_hf)
    except BaseException:  # the trainer closes the engines and the verifier from here on; until then, this does
        close_engines((engine, *teacher_engines.values(), reference_engine))
        verifier.close()
        raise
    return trainer


def main(argv=None):
    from megatron_scope.quiet import quiet_python_warnings

    quiet_python_warnings()  # before megatron-core's import-time fallback warnings
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    trainer = build_trainer(parse_run_config(argv))
    try:
        history = trainer.train()
    finally:
        trainer.close()
    return trainer, history


if __name__ == "__main__":
    main()
