"""One run's configuration: a frozen tree of dataclasses built once from the parsed flags by `build_config`.

    args = megatron_scope.arguments.parse_args(argv)       # every flag, argparse groups
    config = build_config(args)                            # validated; handed whole to each component

Sections follow the flag groups of `megatron_scope.arguments`: `parallel`, `models`, `data`, `loss` (the SCOPE
group: objective, divergence, path weights, baselines' hyper-parameters), `rollout`, `optimizer`, `loop`.
Each field's docstring names its flag. Single-section rules live in each section's `__post_init__`; rules that
span sections in `RunConfig.__post_init__`; rules that need the data-parallel size in `RunConfig.batch_errors`.
The dry run (tools/check_config.py) builds the same object.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re

# The divergences the ops compute: over the whole vocabulary from a co-located teacher's logits, and the
# single-sample estimators from the teacher's log-prob of the sampled token.
from megatron_scope.ops.token_stats import SAMPLED_KL
from megatron_scope.ops.vocab_parallel import FULL_VOCAB_KL
from megatron_scope.rollout.props import PropsSampling

#: Objectives (--scope-algorithm): SCOPE and the baselines (losses/objectives.py).
ALGORITHMS = ("scope", "opd", "exopd", "srpo", "tropd", "grpo", "sft")
#: Every --scope-kl: full-vocabulary, sampled-token, or the teacher's top-k (ops.topk).
KL_ESTIMATORS = FULL_VOCAB_KL + SAMPLED_KL + ("topk",)
#: Objectives with a divergence to the teacher (--scope-kl applies to them).
KL_ALGORITHMS = ("scope", "opd", "srpo", "tropd")
#: Objectives that never read a teacher.
TEACHER_FREE_ALGORITHMS = ("grpo", "sft")
WEIGHT_NORMS = ("mean", "sum")
TEACHER_BACKENDS = ("megatron", "vllm", "server")
"""--teacher-backend: a co-located Megatron model, a vLLM engine beside the rollout engine, or OpenAI-compatible vLLM
servers at URLs (`teacher.served`)."""
REFERENCE_BACKENDS = ("megatron", "vllm")
TEACHER_RESIDENCIES = ("all", "scoring")
"""--teacher-residency: co-located teachers' weights always on the GPUs, or there for their own scoring passes only."""
URL_SCHEMES = ("http://", "https://")
"""How a served teacher's location starts: its servers' base URLs (`teacher.served`)."""
DEFAULT_TEACHER = "teacher"
"""The name of --teacher-hf's teacher (its metrics, the checkpoint's record of the teacher set)."""
TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")
"""A --teacher NAME."""
#: --rollout-placement: where the vLLM rollout engines live (RolloutConfig.placement).
ROLLOUT_PLACEMENTS = ("colocated", "rank0", "ray")
ROLLOUT_SCHEDULES = ("sync", "one-step-off", "async")
ROLLOUT_SAMPLERS = ("iid", "props")
ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_RS_LEVELS = ("token", "sequence", "geometric")
WEIGHT_TRANSFERS = ("auto", "ipc", "shared_memory", "nccl")
"""--weight-transfer-backend choices (`rollout.vllm_engine.VLLMEngineConfig.weight_transfer`)."""
REWARDS = ("synthetic", "synthetic-strict", "math", "custom")
TROPD_OUTLIERS = ("mask", "clip", "forward")
TROPD_TRUST_REGIONS = ("sampled", "threshold")
#: --srpo-teacher: SRPO's self-teacher (an EMA of the student, or the current student) or an external teacher.
SRPO_TEACHERS = ("ema", "current", "external")
#: SDPO's re-prompt (lasgroup/SDPO, actor.yaml: reprompt_template with its solution_template filled in).
SRPO_REPROMPT_TEMPLATE = "{prompt}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."
#: How per-token losses become the step's loss (verl's names; see losses/objectives.aggregate).
LOSS_AGG_MODES = ("seq-mean-token-mean", "token-mean", "scope-released")
TEACHER_PATH_LOSSES = ("kl", "ppo")
#: --transformer-impl and --attention-backend (megatron/attention.py builds the spec).
TRANSFORMER_IMPLS = ("local", "transformer_engine")
ATTENTION_BACKENDS = ("sdpa", "local")
LR_DECAY_STYLES = ("cosine", "linear", "constant")


def _positive(section: str, **values) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{section}.{name} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Megatron's model parallelism (data parallelism is what the world size leaves)."""

    tensor_model_parallel_size: int = 1
    """--tensor-model-parallel-size (TP)."""
    pipeline_model_parallel_size: int = 1
    """--pipeline-model-parallel-size (PP)."""
    sequence_parallel: bool = False
    """--sequence-parallel: Megatron's sequence parallelism (TP > 1) for every model of the run; each TP rank keeps
    [s/TP, b, hidden] activations between the tensor-parallel regions and 1/TP of a co-located teacher's hidden
    states."""
    distributed_timeout_minutes: int = 30
    """--distributed-timeout-minutes: the timeout of every process group's collectives (init_process_group's and
    megatron-core's groups), Megatron-LM's flag."""

    def __post_init__(self):
        _positive("ParallelConfig", tensor_model_parallel_size=self.tensor_model_parallel_size,
                  pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                  distributed_timeout_minutes=self.distributed_timeout_minutes)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1 (build_config drops it at "
                             "TP 1, as Megatron-LM does)")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


@dataclasses.dataclass(frozen=True)
class ModelsConfig:
    """The student, the teacher and their shared tokenizer."""

    student_hf: str
    """--student-hf: the student's initial weights, a Hugging Face directory (also seeds the rollout engine)."""
    tokenizer: str
    """--tokenizer: a SentencePiece model file or a Hugging Face tokenizer directory, shared by both models."""
    teacher_hf: str | None = None
    """--teacher-hf: the teacher's Hugging Face directory (the one-teacher form of `teachers`)."""
    teachers: tuple[tuple[str, str], ...] = ()
    """--teacher NAME=HF_DIR, repeatable: named teachers (e.g. per-domain experts), each prompt routed to one by its
    --teacher-route-key column."""
    teacher_tokenizers: tuple[tuple[str, str], ...] = ()
    """--teacher-tokenizer, by teacher name: each a tokenizer checked to have the same vocabulary as --tokenizer
    (--teacher-hf's teacher: PATH, named "teacher"; --teacher's: NAME=PATH, one per teacher at most)."""
    reference_hf: str | None = None
    """--exopd-reference-hf: ExOPD's reference π_ref, a frozen co-located model (G-OPD's reward correction: the
    teacher's base model before its RL); None: the initial student (--student-hf)."""
    teacher_backend: str = "megatron"
    """--teacher-backend: "megatron" (co-located forward-only Megatron model, the student's TP/PP), "vllm" (a vLLM
    engine placed like the rollout engine that scores the responses) or "server" (`vllm serve` servers elsewhere,
    at the URLs --teacher-hf holds)."""
    teacher_residency: str = "all"
    """--teacher-residency: "all" (every co-located teacher's weights stay on the GPU) or "scoring" (a teacher's
    weights are on the GPU only for its own scoring pass, so several teachers take turns; its output layer stays,
    the step's fused KL applies it)."""
    teacher_timeout_s: float = 600.0
    """--teacher-timeout: with --teacher-backend server, seconds one scoring request may take."""
    teacher_retries: int = 3
    """--teacher-retries: with --teacher-backend server, further tries of a failed request (each on the next
    server; then the run stops naming the servers and the error)."""
    reference_backend: str = "megatron"
    """--exopd-reference-backend: ExOPD's reference as a co-located Megatron model ("megatron") or a vLLM engine
    beside the rollout engine that scores the responses ("vllm"; ExOPD reads only its sampled-token log-probs)."""
    bf16: bool = False
    """--bf16: bf16 parameters (GPU runs)."""
    transformer_impl: str = "local"
    """--transformer-impl: "local" (megatron-core's own modules) or "transformer_engine" (TE's layer spec)."""
    attention_backend: str = "sdpa"
    """--attention-backend (local impl): "sdpa" (torch scaled_dot_product_attention: flash or memory-efficient
    kernels, no stored s^2 scores) or "local" (megatron-core's DotProductAttention, which stores them)."""
    recompute_granularity: str | None = None
    """--recompute-granularity: None, "full" (recompute whole layers in backward) or "selective" (core
    attention only)."""
    recompute_method: str | None = None
    """--recompute-method (full): "uniform" or "block" (Megatron-LM's meanings)."""
    recompute_num_layers: int | None = None
    """--recompute-num-layers (full): layers per recompute unit (uniform) or recomputed per stage (block)."""

    def __post_init__(self):
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        full = self.recompute_granularity == "full"
        if full != (self.recompute_method is not None) or full != (self.recompute_num_layers is not None):
            raise ValueError("--recompute-granularity full needs --recompute-method and --recompute-num-layers, and "
                             "only it takes them (selective recomputes core attention in every layer)")
        if self.recompute_method not in (None, "uniform", "block"):
            raise ValueError(f"--recompute-method must be uniform or block, got {self.recompute_method!r}")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise ValueError(f"--recompute-num-layers must be >= 1, got {self.recompute_num_layers}")
        if self.teacher_backend not in TEACHER_BACKENDS:
            raise ValueError(f"--teacher-backend must be one of {TEACHER_BACKENDS}, got {self.teacher_backend!r}")
        if self.teacher_residency not in TEACHER_RESIDENCIES:
            raise ValueError(f"--teacher-residency must be one of {TEACHER_RESIDENCIES}, got "
                             f"{self.teacher_residency!r}")
        if self.reference_backend not in REFERENCE_BACKENDS:
            raise ValueError(f"--exopd-reference-backend must be one of {REFERENCE_BACKENDS}, got "
                             f"{self.reference_backend!r}")
        if self.teachers and self.teacher_hf:
            raise ValueError("--teacher-hf and --teacher both name teachers: give --teacher-hf for one teacher, or "
                             "--teacher NAME=HF_DIR for each of several")
        names = [name for name, _ in self.teachers]
        for name in names:
            if not TEACHER_NAME.fullmatch(name):
                raise ValueError(f"--teacher {name}=...: a teacher's name is letters, digits, '_', '-' or '.' (it names "
                                 "its metrics, teacher/NAME/...)")
        if len(set(names)) != len(names):
            raise ValueError(f"--teacher names {names} repeat a name")
        if self.teacher_backend in ("vllm", "server") and not self.teacher_dirs:
            where = "HF directory" if self.teacher_backend == "vllm" else "servers' URLs, comma-separated"
            raise ValueError(f"--teacher-backend {self.teacher_backend} needs --teacher-hf (the teacher's {where})")
        tokenizer_names = [name for name, _ in self.teacher_tokenizers]
        if len(set(tokenizer_names)) != len(tokenizer_names):
            raise ValueError(f"--teacher-tokenizer gives teacher {tokenizer_names} tokenizers: one per teacher at most")
        for name in tokenizer_names:
            if name not in self.teacher_dirs:
                raise ValueError(f"--teacher-tokenizer: the tokenizer of {self.teacher_label(name)}, but "
                                 + (f"the teachers are {', '.join(self.teacher_dirs)} (--teacher)" if self.teachers
                                    else "no --teacher-hf or --teacher names a teacher"))
        for name, location in self.teacher_dirs.items():
            urls = [url.startswith(URL_SCHEMES) for url in location.split(",")]
            if (self.teacher_backend == "server" and not all(urls)) or any(urls) != all(urls):
                raise ValueError(f"teacher {name} at {location!r}: a served teacher is its servers' http(s) base URLs "
                                 "(comma-separated; all with --teacher-backend server), any other an HF directory")

    @property
    def teacher_backends(self) -> dict[str, str]:
        """Every teacher's backend by name: "server" for one given as URLs (with any --teacher-backend: served
        teachers mix with co-located or vLLM ones), else --teacher-backend."""
        return {name: "server" if location.startswith(URL_SCHEMES) else self.teacher_backend
                for name, location in self.teacher_dirs.items()}

    @property
    def teacher_model_dirs(self) -> dict[str, str]:
        """The HF directories of the teachers that are not served (their config.json is here), by name."""
        return {name: location for name, location in self.teacher_dirs.items()
                if self.teacher_backends[name] != "server"}

    @property
    def teacher_dirs(self) -> dict[str, str]:
        """Every teacher's HF directory (a served one's comma-separated URLs) by name, in flag order: --teacher's, or
        {"teacher": --teacher-hf}."""
        if self.teachers:
            return dict(self.teachers)
        return {DEFAULT_TEACHER: self.teacher_hf} if self.teacher_hf else {}

    def teacher_label(self, name: str) -> str:
        """How messages name the teacher `name`: "teacher" (--teacher-hf) or "teacher NAME" (--teacher)."""
        return f"teacher {name}" if self.teachers else "teacher"

    @property
    def stores_attention_scores(self) -> bool:
        """Attention keeps [b, heads, s, s] scores for backward (megatron-core's DotProductAttention)."""
        return self.transformer_impl == "local" and self.attention_backend == "local"

    @property
    def layer_spec_options(self) -> dict:
        """`build_gpt_model` keyword arguments of the layer spec (every model of the run, forward-only ones too)."""
        return dict(transformer_impl=self.transformer_impl, attention_backend=self.attention_backend)

    @property
    def model_options(self) -> dict:
        """`build_gpt_model` keyword arguments of the trained model: the layer spec and TransformerConfig's
        recompute fields."""
        options = self.layer_spec_options
        if self.recompute_granularity:
            options.update(recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                           recompute_num_layers=self.recompute_num_layers)
        return options


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompts and their verifier."""

    train_data: str | None
    """--train-data (None in tools/eval.py): rows {id, prompt, answer} (and solution, with --reward synthetic-strict)
    of a JSONL file, a parquet file or a Hugging Face `datasets` directory (`data.datasets.read_rows`)."""
    input_key: str = "prompt"
    """--input-key: the column holding the prompt text."""
    label_key: str | None = None
    """--label-key: the column holding the gold the verifier takes; None: "answer" ("solution" for --reward
    synthetic-strict, whose gold is the reference working)."""
    id_key: str | None = "id"
    """--id-key: the column holding each row's unique id; None (--id-key ''): rows are numbered (line-<n>, row-<n>)."""
    teacher_route_key: str | None = None
    """--teacher-route-key: the column naming each row's teacher (a --teacher NAME; verl's teacher_key); None: every
    row goes to the one teacher."""
    data_source_key: str | None = None
    """--data-source-key: the column naming each row's data source (verl's data_source), reported per source; None:
    one source."""
    prompt_template: str = "{prompt}"
    """--prompt-template: rollout prompt text with exactly one {prompt}."""
    apply_chat_template: bool = False
    """--apply-chat-template: wrap the templated prompt as one user turn (Hugging Face tokenizers)."""
    reward: str = "math"
    """--reward: "synthetic" (the demo task's final "A: <int>"), "synthetic-strict" (the demo task's working too:
    every step of the left-to-right evaluation, right and in order, graded against the rows' "solution" column)
    or "math" (math-verify on the last \\boxed{}), or "custom" (--custom-reward-function)."""
    custom_reward_function: str | None = None
    """--custom-reward-function: with --reward custom, the grading function "module:function" or "file.py:function"
    (`rewards.custom`)."""
    verifier_workers: int = 1
    """--verifier-workers: worker processes of the math and custom verifiers (`rewards.workers.GradingPool`)."""
    verifier_timeout: float = 10.0
    """--verifier-timeout: hard seconds per graded answer in those workers."""
    reward_by_source: tuple[tuple[str, str], ...] = ()
    """--reward-by-source SOURCE=VERIFIER (repeatable): the verifier (a --reward name) of the responses to one data
    source's prompts (the --data-source-key column of a training row; an --eval-data set's NAME); others get
    --reward's. Every verifier reads the same gold column."""
    max_verifier_error_fraction: float = 0.05
    """--max-verifier-error-fraction: the run stops with an error naming the verifier and its first message when
    more than this share of a step's responses ended in the verifier's own error (STATUS_VERIFIER_ERROR), which
    would otherwise count as incorrect answers."""

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"--reward must be one of {REWARDS}, got {self.reward!r}")
        _positive("DataConfig", verifier_workers=self.verifier_workers)
        if not self.verifier_timeout > 0:
            raise ValueError(f"--verifier-timeout must be > 0, got {self.verifier_timeout}")
        sources = [source for source, _ in self.reward_by_source]
        if len(set(sources)) != len(sources):
            raise ValueError(f"--reward-by-source names a data source twice: {sources}")
        for source, reward in self.reward_by_source:
            if not source or reward not in REWARDS:
                raise ValueError(f"--reward-by-source {source}={reward}: expected SOURCE=VERIFIER with VERIFIER one of "
                                 f"{REWARDS}")
        if ("custom" in self.rewards) != (self.custom_reward_function is not None):
            raise ValueError("--reward custom (or --reward-by-source SOURCE=custom) and --custom-reward-function go "
                             "together: the function is the verifier")
        if not 0 <= self.max_verifier_error_fraction <= 1:
            raise ValueError(f"--max-verifier-error-fraction must lie in [0, 1], got {self.max_verifier_error_fraction}")
        try:
            self.prompt_format()
        except ValueError as error:  # a template without exactly one {prompt}
            raise ValueError(f"--prompt-template: {error}") from None

    @property
    def rewards(self) -> tuple[str, ...]:
        """Every verifier the run grades with: --reward's, then --reward-by-source's."""
        return tuple(dict.fromkeys([self.reward, *(reward for _, reward in self.reward_by_source)]))

    def prompt_format(self):
        from megatron_scope.data.datasets import PromptFormat

        return PromptFormat(self.prompt_template, self.apply_chat_template)

    def dataset_keys(self) -> dict[str, str | None]:
        """`PromptDataset.from_file`'s keys: each field's column."""
        from megatron_scope.rewards.synthetic import GOLD_COLUMNS

        gold = self.label_key or GOLD_COLUMNS.get(self.reward, "answer")
        return {"id": self.id_key, "prompt": self.input_key, "answer": gold,
                "data_source": self.data_source_key, "teacher": self.teacher_route_key}


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Hyper-parameters of the baselines (see each objective in losses/objectives.py for its formula)."""

    clip_eps: float = 0.2
    """--grpo-clip-eps: PPO ratio clip ε (GRPO, SRPO's correct path, SCOPE's released teacher path)."""
    clip_ratio_c: float = 3.0
    """--clip-ratio-c: PPO dual clip (Ye et al. 2020): a negative advantage's loss is at most -c A (c > 1)."""
    exopd_lambda: float = 1.25
    """--exopd-lambda: ExOPD reward-extrapolation λ (1 = OPD)."""
    srpo_beta: float = 1.0
    """--srpo-beta: SRPO teacher-entropy temperature β."""
    srpo_teacher: str = "ema"
    """--srpo-teacher: whom SRPO's failed samples are distilled toward. "ema" (SDPO's default) and "current": the
    self-teacher, the student (an EMA copy of it, or itself) re-prompted with a successful sibling; "external": the
    --teacher-hf model on the original prompt (not SRPO's method; kept as a distillation variant)."""
    srpo_ema_rate: float = 0.05
    """--srpo-ema-rate: the EMA self-teacher's update rate r, θ_T <- (1 - r) θ_T + r θ_S after each step (SDPO's
    teacher_update_rate)."""
    srpo_reprompt_template: str = SRPO_REPROMPT_TEMPLATE
    """--srpo-reprompt-template: the self-teacher's prompt, with {prompt} (the rollout prompt's text, after
    --prompt-template) and {solution} (the sibling's response text)."""
    tropd_trust_region: str = "sampled"
    """--tropd-trust-region: "sampled" (the TrOPD paper's: token y_t is inside with probability min(π_T(y_t) /
    π_S(y_t), 1), one draw per token, as speculative decoding accepts a draft token) or "threshold" (inside iff
    |log π_S - log π_T| <= δ, a fixed two-sided test)."""
    tropd_delta: float = 1.0
    """--tropd-delta: δ of the threshold trust region and of the clip outliers' scaling."""
    tropd_outlier: str = "forward"
    """--tropd-outlier: what TrOPD does outside the region: forward (the paper's TrOPD: KL(π_T‖π_S), over the
    vocabulary with a full-vocabulary --scope-kl, else over the teacher's top-k), mask or clip (its ablations)."""
    tropd_prefix_fraction: float = 0.0
    """--tropd-prefix-fraction: TrOPD's off-policy guidance, the fraction of each step's prompts whose responses
    continue a teacher-written prefix (`rollout.guidance`); 0: off."""
    tropd_prefix_beta: float = 0.001
    """--tropd-prefix-beta: β of the forward-KL imitation of the teacher's prefix tokens (the paper's 0.001)."""

    def __post_init__(self):
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"--grpo-clip-eps must be in (0, 1), got {self.clip_eps}")
        if not self.clip_ratio_c > 1:
            raise ValueError(f"--clip-ratio-c must be > 1, got {self.clip_ratio_c}")
        if self.srpo_beta < 0 or not self.tropd_delta > 0:
            raise ValueError(f"need --srpo-beta >= 0 and --tropd-delta > 0, got {self.srpo_beta}, {self.tropd_delta}")
        if self.tropd_trust_region not in TROPD_TRUST_REGIONS:
            raise ValueError(f"--tropd-trust-region must be one of {TROPD_TRUST_REGIONS}, "
                             f"got {self.tropd_trust_region!r}")
        if self.tropd_outlier not in TROPD_OUTLIERS:
            raise ValueError(f"--tropd-outlier must be one of {TROPD_OUTLIERS}, got {self.tropd_outlier!r}")
        if not 0 <= self.tropd_prefix_fraction <= 1 or self.tropd_prefix_beta < 0:
            raise ValueError(f"need --tropd-prefix-fraction in [0, 1] and --tropd-prefix-beta >= 0, got "
                             f"{self.tropd_prefix_fraction}, {self.tropd_prefix_beta}")
        if self.srpo_teacher not in SRPO_TEACHERS:
            raise ValueError(f"--srpo-teacher must be one of {SRPO_TEACHERS}, got {self.srpo_teacher!r}")
        if not 0 < self.srpo_ema_rate < 1:
            raise ValueError(f"--srpo-ema-rate must be in (0, 1), got {self.srpo_ema_rate}")
        for placeholder in ("{prompt}", "{solution}"):
            if placeholder not in self.srpo_reprompt_template:
                raise ValueError(f"--srpo-reprompt-template must contain {placeholder}, got "
                                 f"{self.srpo_reprompt_template!r}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The SCOPE group (--scope-*): what the loss computes and how SCOPE weights its two paths. The loss function
    (megatron/loss_func.py) and `losses.scope.scope_sequence_weights` receive it whole."""

    algorithm: str = "scope"
    """--scope-algorithm: SCOPE or a baseline (a key of losses.objectives.OBJECTIVES)."""
    kl: str = "reverse"
    """--scope-kl: divergence to the teacher (reverse, forward, jsd, k1, k2, k3 or topk)."""
    jsd_beta: float = 0.5
    """--scope-jsd-beta: mixture weight β of the generalized JSD."""
    topk: int | None = None
    """--scope-topk: k of the teacher's top-k log-probs, with --scope-kl topk only."""
    topk_renormalize: bool = False
    """--scope-topk-renormalize: KL between the two distributions renormalised over the teacher's k ids (NeMo-RL's
    and the SCOPE authors' convention), instead of k + 1 outcomes with the rest of the vocabulary as a tail."""
    fused_kl: bool = True
    """--scope-fused-kl: a full-vocabulary KL from hidden states (ops.linear_kl) where the objective allows, see
    `fuses_student_logits`; off: both models' logits per microbatch."""
    loss_agg_mode: str = "seq-mean-token-mean"
    """--loss-agg-mode: "seq-mean-token-mean" (token mean per response, then the weighted mean over responses:
    the paper's per-sequence losses), "token-mean" (weighted token sum over all response tokens of the global
    batch), or "scope-released" (the SCOPE authors' released code: token-mean, the teacher path over all response
    tokens and the student path's MLE over correct-response tokens only)."""
    teacher_path_loss: str = "kl"
    """--scope-teacher-path-loss: "kl" (the per-token divergence of --scope-kl) or "ppo" (the released code: PPO's
    clipped surrogate, with dual clip, of the per-token advantage log π_T - log π_old; needs --scope-kl k1)."""
    student_path_exponent: int = 1
    """--scope-student-path-exponent: w_stu ∝ PPL_S^(exponent/τ); +1 the paper (favours high-perplexity correct
    responses), -1 the released code (favours confident ones)."""
    logprob_temperature: float = 1.0
    """--logprob-temperature: the student's log-probs in the loss and before the step come from logits / T (the
    released code uses the rollout temperature); the teacher's stay at temperature 1."""
    tau: float = 1.0
    """--scope-tau: temperature τ of both path weightings, PPL^(±1/τ)."""
    weight_norm: str = "mean"
    """--scope-weight-norm: "sum" (weights sum to 1 per prompt and path, the paper) or "mean" (they average 1,
    the authors' released runs)."""
    student_path: bool = True
    """--[no-]scope-student-path: SCOPE's MLE on correct responses (off: they get no loss, an ablation that keeps only
    the teacher path)."""
    student_path_weights: bool = True
    """--[no-]scope-student-path-weights: student-perplexity weights on correct responses (off: uniform)."""
    teacher_path_weights: bool = True
    """--[no-]scope-teacher-path-weights: teacher-perplexity weights on incorrect responses (off: uniform)."""
    rollout_is_threshold: float | None = None
    """--rollout-is-threshold C: truncated importance sampling (at the token level, verl's rollout_is=token, as the
    G-OPD code runs it): each token's loss times sg(min(π_S(y_t) / μ(y_t), C)), μ the distribution the engine sampled
    from (`rollout_is`: the level). None: off."""
    rollout_is: str = "token"
    """--rollout-is: the level of --rollout-is-threshold's weights (verl's rollout_is): "token", each token's own
    ratio; "sequence", the product of the ratios of its response's sampled tokens, which also corrects which
    prefixes a stale sampler visits."""
    rollout_rs: str | None = None
    """--rollout-rs: rejection of tokens whose ratio π_S / μ lies outside [--rollout-rs-threshold-lower,
    --rollout-rs-threshold] (verl's rollout_rs): "token", per token; "sequence", the whole response by the product of
    its ratios; "geometric", by their geometric mean. Rejected tokens leave the loss and its normaliser. None: off."""
    rollout_rs_threshold: float | None = None
    """--rollout-rs-threshold: the band's upper end (> 1)."""
    rollout_rs_threshold_lower: float | None = None
    """--rollout-rs-threshold-lower: the band's lower end, in (0, 1) (None: 1 / the upper end, verl's default)."""
    baselines: BaselineConfig = BaselineConfig()
    """The baselines' hyper-parameters."""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {self.algorithm!r}")
        if self.kl not in KL_ESTIMATORS:
            raise ValueError(f"--scope-kl must be one of {KL_ESTIMATORS}, got {self.kl!r}")
        if not self.tau > 0:
            raise ValueError(f"--scope-tau must be > 0, got {self.tau}")
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"--scope-weight-norm must be one of {WEIGHT_NORMS}, got {self.weight_norm!r}")
        if not 0 < self.jsd_beta < 1:
            raise ValueError(f"--scope-jsd-beta must be in (0, 1), got {self.jsd_beta}")
        if self.kl == "topk" and self.topk is None:
            raise ValueError("--scope-kl topk needs --scope-topk K (how many teacher log-probs per token)")
        topk_outliers = self.tropd_forward_outliers and self.kl not in FULL_VOCAB_KL
        if self.topk is not None and self.kl != "topk" and not topk_outliers:
            raise ValueError(f"--scope-topk {self.topk} is only used with --scope-kl topk (or by --tropd-outlier "
                             f"forward without a full-vocabulary --scope-kl), not {self.kl}")
        if self.topk_renormalize and self.topk is None:
            raise ValueError(f"--scope-topk-renormalize is only used with --scope-kl topk, not {self.kl}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"--scope-topk must be >= 1, got {self.topk}")
        if self.algorithm == "srpo" and self.kl not in FULL_VOCAB_KL:
            raise ValueError(
                f"--scope-algorithm srpo weights tokens by the teacher's entropy, which needs its full "
                f"distribution: use --scope-kl {'/'.join(FULL_VOCAB_KL)}, not {self.kl}")
        if self.tropd_forward_outliers and self.kl not in FULL_VOCAB_KL and self.topk is None:
            raise ValueError(
                f"--tropd-outlier forward needs the teacher's distribution: full-vocabulary logits (--scope-kl "
                f"{'/'.join(FULL_VOCAB_KL)}) or its top-k (--scope-topk K, the paper's K = 64), not --scope-kl "
                f"{self.kl} alone (or --tropd-outlier mask/clip, the paper's ablations)")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"--loss-agg-mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.teacher_path_loss not in TEACHER_PATH_LOSSES:
            raise ValueError(f"--scope-teacher-path-loss must be one of {TEACHER_PATH_LOSSES}, "
                             f"got {self.teacher_path_loss!r}")
        if self.teacher_path_loss == "ppo" and (self.algorithm != "scope" or self.kl != "k1"):
            raise ValueError("--scope-teacher-path-loss ppo is SCOPE's released teacher path, a policy gradient of the "
                             f"k1 advantage: use --scope-algorithm scope --scope-kl k1, not {self.algorithm}/{self.kl}")
        if self.rollout_is_threshold is not None and not self.rollout_is_threshold > 0:
            raise ValueError(f"--rollout-is-threshold must be > 0, got {self.rollout_is_threshold}")
        if self.rollout_is not in ROLLOUT_IS_LEVELS:
            raise ValueError(f"--rollout-is must be one of {ROLLOUT_IS_LEVELS}, got {self.rollout_is!r}")
        if self.rollout_is != "token" and self.rollout_is_threshold is None:
            raise ValueError(f"--rollout-is {self.rollout_is} sets the level of --rollout-is-threshold's weights: "
                             "give --rollout-is-threshold C")
        if self.rollout_rs is not None and self.rollout_rs not in ROLLOUT_RS_LEVELS:
            raise ValueError(f"--rollout-rs must be one of {ROLLOUT_RS_LEVELS}, got {self.rollout_rs!r}")
        if (self.rollout_rs is None) != (self.rollout_rs_threshold is None) or (
                self.rollout_rs is None and self.rollout_rs_threshold_lower is not None):
            raise ValueError("--rollout-rs LEVEL and --rollout-rs-threshold go together (--rollout-rs-threshold-lower "
                             "only with them)")
        if self.rollout_rs is not None and not (0 < self.rejection_band[0] < 1 < self.rejection_band[1]):
            raise ValueError(f"the rejection band [--rollout-rs-threshold-lower, --rollout-rs-threshold] must hold 1 "
                             f"inside and have a lower end > 0, got {list(self.rejection_band)}")
        if not self.student_path and self.algorithm != "scope":
            raise ValueError(f"--no-scope-student-path turns off SCOPE's correct-response MLE; --scope-algorithm "
                             f"{self.algorithm} has no such path")
        if self.student_path_exponent not in (1, -1):
            raise ValueError(f"--scope-student-path-exponent must be 1 or -1, got {self.student_path_exponent}")
        if not self.logprob_temperature > 0:
            raise ValueError(f"--logprob-temperature must be > 0, got {self.logprob_temperature}")
        if self.baselines.tropd_prefix_fraction and self.algorithm != "tropd":
            raise ValueError(f"--tropd-prefix-fraction is TrOPD's off-policy guidance; --scope-algorithm "
                             f"{self.algorithm} has none")
        if self.algorithm in ("grpo", "sft", "exopd") and self.kl != "reverse":
            raise ValueError(f"--scope-algorithm {self.algorithm} uses no KL term; drop --scope-kl {self.kl}")

    @property
    def uses_kl(self) -> bool:
        """The objective has a divergence to the teacher."""
        return self.algorithm in KL_ALGORITHMS

    @property
    def self_teacher(self) -> bool:
        """SRPO distils toward the student itself (or its EMA) re-prompted with a successful sibling."""
        return self.algorithm == "srpo" and self.baselines.srpo_teacher != "external"

    @property
    def ema_teacher(self) -> bool:
        """SRPO's self-teacher is an EMA copy of the student (--srpo-teacher ema), a model the run keeps and saves."""
        return self.self_teacher and self.baselines.srpo_teacher == "ema"

    @property
    def needs_teacher(self) -> bool:
        """The objective reads an external teacher (its logits, top-k or log-probs; SCOPE's teacher-path weights
        too)."""
        return self.algorithm not in TEACHER_FREE_ALGORITHMS and not self.self_teacher

    @property
    def rejection_band(self) -> tuple[float, float]:
        """(lower, upper) of --rollout-rs's band of π_S / μ."""
        lower = self.rollout_rs_threshold_lower
        return (1 / self.rollout_rs_threshold if lower is None else lower), self.rollout_rs_threshold

    @property
    def needs_teacher_logits(self) -> bool:
        """The loss reads the (self-)teacher's whole distribution: a full-vocabulary KL, or SRPO's teacher entropy."""
        return (self.uses_kl and self.kl in FULL_VOCAB_KL) or self.algorithm == "srpo"

    @property
    def fuses_student_logits(self) -> bool:
        """The loss reads the student only through a full-vocabulary KL, log π_S(y_t) and its entropy (SCOPE,
        OPD): with a co-located teacher, `ops.linear_kl` computes them from the student's last hidden states and
        the teacher's, and neither model's logits exist beyond one chunk."""
        return self.fused_kl and self.uses_kl and self.kl in FULL_VOCAB_KL and self.algorithm in ("scope", "opd")

    @property
    def tropd_sampled_trust_region(self) -> bool:
        """TrOPD with the paper's sampled trust region (the trainer draws one U(0, 1) per token for it)."""
        return self.algorithm == "tropd" and self.baselines.tropd_trust_region == "sampled"

    @property
    def tropd_forward_outliers(self) -> bool:
        """TrOPD with forward-KL outliers."""
        return self.algorithm == "tropd" and self.baselines.tropd_outlier == "forward"

    @property
    def tropd_guidance(self) -> bool:
        """TrOPD's off-policy guidance: some responses continue teacher-written prefixes (a teacher engine writes them)."""
        return self.algorithm == "tropd" and self.baselines.tropd_prefix_fraction > 0

    @property
    def teacher_topk(self) -> int:
        """k of the teacher's top-k the loss reads (0: none): the top-k KL's, or TrOPD's top-k forward-KL outliers'."""
        return (self.topk or 0) if self.uses_kl and (self.kl == "topk" or self.tropd_forward_outliers) else 0


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling G responses per prompt with vLLM engines."""

    prompts_per_step: int = 8
    """--prompts-per-step: prompts per step over all data-parallel ranks."""
    group_size: int = 8
    """--scope-group-size: G, responses sampled per prompt."""
    max_new_tokens: int = 256
    """--max-new-tokens: response length cap."""
    temperature: float = 1.0
    """--rollout-temperature."""
    top_p: float = 1.0
    """--rollout-top-p."""
    kv_cache_gib: float = 1.0
    """--rollout-kv-cache-gib: KV cache of each vLLM engine (GiB)."""
    gpu_memory_utilization: float | None = None
    """--rollout-gpu-memory-utilization: vLLM's `gpu_memory_utilization`, which with a given KV cache only sets its
    start-up check (free device memory >= total x this). None: on CUDA, the share free when the engine starts, less
    a margin for its own CUDA contexts (`train.engine_memory_utilization`), so it starts beside the trainer."""
    weight_transfer_backend: str = "auto"
    """--weight-transfer-backend: "ipc" (vLLM's CUDA IPC backend), "shared_memory" (/dev/shm files), "nccl" (vLLM's
    NCCL backend, Ray engines only) or "auto" (on CUDA nccl for Ray engines and ipc otherwise, else shared_memory);
    see `rollout.vllm_weight_transfer`."""
    weight_transfer_bucket_mib: int = 512
    """--weight-transfer-bucket-mib: bytes per refit bucket into a vLLM engine (MiB): a device buffer of max(this,
    the largest tensor) on each of the engine's GPUs (ipc), or a file in /dev/shm, which must hold about twice
    max(this, the largest tensor) (shared_memory; `rollout.shared_memory`)."""
    offload_optimizer: bool = False
    """--rl-offload-optimizer-during-inference (Megatron-LM's flag): the optimizer's state and fp32 main parameters
    wait in host memory, and the gradient buffers are freed, while the engines generate (`megatron.offload`)."""
    offload_teacher: bool = False
    """--rl-offload-teacher-during-inference: the forward-only models on the training GPUs (a co-located teacher,
    ExOPD's reference, SRPO's EMA teacher) wait in pinned host memory while the engines generate."""
    tensor_parallel_size: int = 1
    """--rollout-tensor-parallel-size: vLLM's tensor parallelism (default: the training TP when co-located)."""
    placement: str = "colocated"
    """--rollout-placement: "colocated", one engine per data-parallel replica, driven by the replica's first
    rank; "rank0", one engine inside global rank 0 for the whole step; "ray", --rollout-engines Ray actors."""
    engines: int = 0
    """--rollout-engines: the number of Ray actors with --rollout-placement ray (0 otherwise)."""
    teacher_engines: int = 1
    """--teacher-engines: with --rollout-placement ray, the Ray actors that serve a vLLM teacher (and ExOPD's vLLM
    reference), each scoring a shard of every step's responses."""
    ray_address: str | None = None
    """--ray-address: the Ray cluster to join with --rollout-engines (None: RAY_ADDRESS, else a local Ray)."""
    gpus_per_engine: float | None = None
    """--rollout-gpus-per-engine: GPUs Ray reserves per engine (None: the engine's TP with CUDA, 0 without)."""
    vllm_log_level: str | None = None
    """--vllm-log-level: vLLM's logging level (None: VLLM_LOGGING_LEVEL if set, else WARNING)."""
    schedule: str = "sync"
    """--rollout-schedule: "sync", each step trains on responses the engines sample from its own weights (generate,
    then train, then refit); "one-step-off", the engines sample step k+1's responses from the weights before step k
    while step k trains, so generation overlaps training and every response is one optimizer step stale (verl's
    one-step-off trainer); "async", the engines produce each step's rollout as soon as --max-staleness admits it
    (`rollout/producer.py`). The last two need engines with devices of their own (--rollout-placement ray)."""
    max_staleness: int | None = None
    """--max-staleness η: with --rollout-schedule async, the most optimizer steps a response may lag the weights that
    train on it (None with the other schedules, whose bound is fixed: `staleness_bound`)."""
    props: PropsSampling | None = None
    """--rollout-sampler props with --props-rounds and --props-clip (`rollout.props`); None: --rollout-sampler iid."""
    partial_rollout_tokens: int | None = None
    """--partial-rollout-tokens L: with --rollout-schedule async, rollouts are drawn in segments of at most L tokens and
    a refit or a validation waits for the segment in progress, not the rollout; unfinished responses continue under
    the new weights, each token stamped with its version (`rollout.partial`). None: whole rollouts."""

    def __post_init__(self):
        _positive("RolloutConfig", prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                  max_new_tokens=self.max_new_tokens, tensor_parallel_size=self.tensor_parallel_size)
        if self.placement not in ROLLOUT_PLACEMENTS:
            raise ValueError(f"--rollout-placement must be one of {ROLLOUT_PLACEMENTS}, got {self.placement!r}")
        if (self.engines > 0) != (self.placement == "ray"):
            raise ValueError(f"--rollout-engines {self.engines} with --rollout-placement {self.placement}: Ray engines "
                             "(--rollout-engines N >= 1) go with --rollout-placement ray and only with it")
        if self.teacher_engines < 1 or (self.teacher_engines > 1 and self.placement != "ray"):
            raise ValueError(f"--teacher-engines {self.teacher_engines}: N >= 1 Ray actors of a vLLM teacher go with "
                             f"--rollout-placement ray (got {self.placement}); other placements put one beside each "
                             "rollout engine")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"--rollout-kv-cache-gib must be > 0, got {self.kv_cache_gib}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--rollout-gpu-memory-utilization must lie in (0, 1], got {self.gpu_memory_utilization}")
        if self.weight_transfer_backend not in WEIGHT_TRANSFERS:
            raise ValueError(f"--weight-transfer-backend must be one of {WEIGHT_TRANSFERS}, got "
                             f"{self.weight_transfer_backend!r}")
        if self.weight_transfer_backend == "nccl" and self.placement != "ray":
            raise ValueError(f"--weight-transfer-backend nccl broadcasts to Ray engines on GPUs of their own "
                             f"(--rollout-placement ray), not to an engine in this process (--rollout-placement "
                             f"{self.placement}: use ipc)")
        if self.weight_transfer_bucket_mib < 1:
            raise ValueError(f"--weight-transfer-bucket-mib must be >= 1, got {self.weight_transfer_bucket_mib}")
        if self.schedule not in ROLLOUT_SCHEDULES:
            raise ValueError(f"--rollout-schedule must be one of {ROLLOUT_SCHEDULES}, got {self.schedule!r}")
        if (self.max_staleness is None) == (self.schedule == "async"):
            raise ValueError(f"--max-staleness {self.max_staleness} with --rollout-schedule {self.schedule}: "
                             "--rollout-schedule async needs --max-staleness η and only it takes one (sync's bound is 0, "
                             "one-step-off's 1)")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"--max-staleness must be >= 0, got {self.max_staleness}")
        if self.schedule != "sync" and self.placement != "ray":
            raise ValueError(f"--rollout-schedule {self.schedule} generates while the trainer trains, which needs engines "
                             f"on devices of their own (--rollout-placement ray with --rollout-engines N); "
                             f"--rollout-placement {self.placement} engines share the trainer's GPUs")
        if self.props is not None and (self.temperature == 0 or self.top_p < 1 or self.props.rounds > self.group_size):
            raise ValueError(f"--rollout-sampler props draws each group's --scope-group-size {self.group_size} "
                             f"responses in --props-rounds {self.props.rounds} rounds (at most G), from a behaviour policy whose "
                             f"band holds on the sampling distribution: it needs --rollout-temperature > 0 (got "
                             f"{self.temperature}) and --rollout-top-p 1 (got {self.top_p})")
        if self.partial_rollout_tokens is not None and (
                self.schedule != "async" or self.props is not None
                or not 1 <= self.partial_rollout_tokens < self.max_new_tokens):
            raise ValueError(f"--partial-rollout-tokens {self.partial_rollout_tokens} lets a refit come between two "
                             f"segments of a rollout: it needs --rollout-schedule async (got {self.schedule}; sync "
                             "refits between rollouts, one-step-off keeps each rollout's version fixed), "
                             "--rollout-sampler iid (PROPS draws whole responses in rounds) and a segment in "
                             f"[1, --max-new-tokens {self.max_new_tokens})")
        if self.schedule != "sync" and (self.offload_optimizer or self.offload_teacher):
            raise ValueError(f"--rollout-schedule {self.schedule} trains while the engines generate: the training state "
                             "cannot wait in host memory meanwhile (drop --rl-offload-optimizer-during-inference and "
                             "--rl-offload-teacher-during-inference; the engines have devices of their own)")

    @property
    def sequences_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def staleness_bound(self) -> int:
        """η: the most optimizer steps a response may lag the weights that train on it under the schedule."""
        return {"sync": 0, "one-step-off": 1}.get(self.schedule, self.max_staleness)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam with linear warm-up then cosine decay (Megatron-LM's flags of the same names)."""

    lr: float = 5e-5
    """--lr: peak learning rate."""
    min_lr: float = 0.0
    """--min-lr: final learning rate."""
    lr_warmup_iters: int = 0
    """--lr-warmup-iters: linear warm-up steps."""
    weight_decay: float = 0.0
    """--weight-decay: decoupled weight decay."""
    adam_beta1: float = 0.9
    """--adam-beta1."""
    adam_beta2: float = 0.999
    """--adam-beta2."""
    clip_grad: float = 1.0
    """--clip-grad: global gradient-norm clip; 0 disables."""
    lr_decay_style: str = "cosine"
    """--lr-decay-style: after warm-up, cosine or linear decay to --min-lr at --train-iters, or constant."""
    use_distributed_optimizer: bool = False
    """--use-distributed-optimizer: shard optimizer state over data-parallel ranks (needs CUDA)."""
    overlap_grad_reduce: bool = False
    """--overlap-grad-reduce (Megatron-LM's flag): the data-parallel gradient reduction runs bucket by bucket during
    the last microbatch's backward instead of after it (megatron-core DDP's `overlap_grad_reduce`)."""
    ddp_bucket_size: int | None = None
    """--ddp-bucket-size (Megatron-LM's flag): parameters per gradient-reduction bucket (None: megatron-core's
    default)."""

    def __post_init__(self):
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {self.clip_grad}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop: its length, micro-batches, checkpoints and logs (Megatron-LM's flag names)."""

    train_iters: int = 10
    """--train-iters: optimizer steps to run in total (also the LR decay horizon)."""
    micro_batch_size: int = 4
    """--micro-batch-size: sequences per micro-batch (with --max-tokens-per-microbatch: at most this many)."""
    max_tokens_per_microbatch: int | None = None
    """--max-tokens-per-microbatch: micro-batches of whole sequences grouped by length, longest first, each padded
    only to its own longest and holding at most this many padded tokens (a longer sequence goes alone); None:
    --micro-batch-size sequences each, padded to the step's longest."""
    seed: int = 1234
    """--seed: the run's seed; every draw's seed is a hash of it and of what the draw is (`rollout.seeds`), so a
    resumed run rolls out the same responses."""
    save: str | None = None
    """--save: checkpoint root; None disables saving."""
    load: str | None = None
    """--load: resume from the latest complete checkpoint under this root."""
    save_interval: int = 0
    """--save-interval: save every this many iterations (and at the end); 0, only at the end."""
    save_hf: bool = False
    """--save-hf: each checkpoint also holds the student as a Hugging Face model (iter_XXXXXXX/hf_model)."""
    exit_interval: int = 0
    """--exit-interval: save and stop once the iteration is a multiple of this; 0, run to train_iters."""
    log_interval: int = 1
    """--log-interval: one log line every this many iterations."""
    tensorboard_dir: str | None = None
    """--tensorboard-dir: TensorBoard event directory."""
    wandb_project: str | None = None
    """--wandb-project: log every scalar TensorBoard gets, and this RunConfig as the run's config, to Weights &
    Biases (the logging rank; WANDB_MODE=offline writes the run to disk only). None: no W&B."""
    wandb_exp_name: str | None = None
    """--wandb-exp-name: the W&B run's name (required with --wandb-project, as in Megatron-LM)."""
    wandb_save_dir: str | None = None
    """--wandb-save-dir: where W&B writes the run; None: <--save>/wandb."""
    exit_on_nonfinite: bool = False
    """--exit-on-nonfinite: stop the run (instead of skipping the step) on a NaN/Inf loss or gradient norm."""
    progress_bar: bool = True
    """--[no-]progress-bar: a tqdm bar with ETA on the logging rank."""
    weight_sync_bucket_mib: int = 256
    """--weight-sync-bucket-mib: bucket size of the Megatron -> engine weight stream."""

    def __post_init__(self):
        _positive("LoopConfig", train_iters=self.train_iters, micro_batch_size=self.micro_batch_size,
                  log_interval=self.log_interval, weight_sync_bucket_mib=self.weight_sync_bucket_mib)
        if self.max_tokens_per_microbatch is not None:
            _positive("LoopConfig", max_tokens_per_microbatch=self.max_tokens_per_microbatch)
        if self.save_interval < 0 or self.exit_interval < 0:
            raise ValueError(f"save_interval and exit_interval must be >= 0, got {self.save_interval}, "
                             f"{self.exit_interval}")
        if self.save_hf and not self.save:
            raise ValueError("--save-hf writes a Hugging Face model into each checkpoint: give --save")
        if self.wandb_project is None and (self.wandb_exp_name or self.wandb_save_dir):
            raise ValueError("--wandb-exp-name/--wandb-save-dir configure the W&B run of --wandb-project: give it")
        if self.wandb_project is not None and not self.wandb_exp_name:
            raise ValueError("--wandb-project needs --wandb-exp-name (the run's name)")
        if self.wandb_project is not None and not (self.wandb_save_dir or self.save):
            raise ValueError("--wandb-project needs --wandb-save-dir, or --save (its default is <--save>/wandb)")


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Held-out evaluation during training (Megatron-LM's --eval-interval): the student's engines sample
    --eval-samples-per-prompt responses per problem of each --eval-data set, graded by the set's verifier, and Avg@n
    and unbiased Pass@k per set are logged (`eval.runner`); tools/eval.py reads the same flags."""

    data: tuple[tuple[str, str], ...] = ()
    """--eval-data NAME=PATH (repeatable): a benchmark of `eval.benchmarks.BENCHMARK_NAMES` in its known layouts, or
    any other NAME for a file read with the key flags (--input-key, --label-key, --id-key). NAME is the set's data
    source (--reward-by-source) and its metrics' prefix, eval/NAME/."""
    interval: int = 0
    """--eval-interval: evaluate every this many iterations (and after the last); 0: after the last only."""
    at_start: bool = False
    """--eval-at-start: also evaluate before the first step (at the resumed iteration when resuming)."""
    samples_per_prompt: int = 1
    """--eval-samples-per-prompt: n, the responses sampled per problem."""
    temperature: float = 1.0
    """--eval-temperature (default: --rollout-temperature)."""
    top_p: float = 1.0
    """--eval-top-p (default: --rollout-top-p)."""
    max_new_tokens: int = 256
    """--eval-max-new-tokens (default: --max-new-tokens)."""

    def __post_init__(self):
        names = [name for name, _ in self.data]
        if len(set(names)) != len(names):
            raise ValueError(f"--eval-data names a set twice: {names}")
        for name, path in self.data:
            if not name or not path or "/" in name:
                raise ValueError(f"--eval-data {name}={path}: expected NAME=PATH, NAME without '/'")
        if self.interval < 0:
            raise ValueError(f"--eval-interval must be >= 0, got {self.interval}")
        if (self.interval or self.at_start) and not self.data:
            raise ValueError("--eval-interval/--eval-at-start evaluate the --eval-data sets: give at least one")
        _positive("ValidationConfig", samples_per_prompt=self.samples_per_prompt, max_new_tokens=self.max_new_tokens)
        self.sampling_params()  # temperature, top_p

    @property
    def ks(self) -> tuple[int, ...]:
        """The k of each reported Pass@k: the powers of two below n, and n."""
        n = self.samples_per_prompt
        return tuple(sorted({1 << i for i in range(n.bit_length()) if 1 << i < n} | {n}))

    def sampling_params(self):
        """The engine's sampling settings (the runner adds the stop tokens and the vocabulary bound)."""
        from megatron_scope.rollout.engine import SamplingParams

        return SamplingParams(n=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_p=self.top_p)

    def due(self, iteration: int, train_iters: int) -> bool:
        """Whether the run evaluates after `iteration`."""
        return bool(self.data) and (iteration == train_iters or bool(self.interval) and iteration % self.interval == 0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of one run; built once by `build_config` and handed whole to the trainer and the dry run."""

    models: ModelsConfig
    data: DataConfig
    parallel: ParallelConfig = ParallelConfig()
    loss: LossConfig = LossConfig()
    rollout: RolloutConfig = RolloutConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loop: LoopConfig = LoopConfig()
    validation: ValidationConfig = ValidationConfig()

    def __post_init__(self):
        if self.optimizer.lr_warmup_iters >= self.loop.train_iters:
            raise ValueError(f"need --lr-warmup-iters < --train-iters (Megatron's scheduler decays after warm-up), "
                             f"got {self.optimizer.lr_warmup_iters} >= {self.loop.train_iters}")
        if self.rollout.group_size < 2 and self.loss.algorithm in ("grpo", "srpo"):
            raise ValueError(f"--scope-algorithm {self.loss.algorithm} normalises rewards within a group: "
                             f"--scope-group-size must be >= 2, got {self.rollout.group_size}")
        if (self.models.reference_hf or self.models.reference_backend != "megatron") and self.loss.algorithm != "exopd":
            raise ValueError(f"--exopd-reference-hf/--exopd-reference-backend name ExOPD's reference model; "
                             f"--scope-algorithm {self.loss.algorithm} reads none")
        teachers = self.models.teacher_dirs
        if self.loss.needs_teacher and not teachers:
            raise ValueError(f"--scope-algorithm {self.loss.algorithm} reads the teacher: give --teacher-hf (or "
                             "--teacher NAME=HF_DIR per teacher)")
        if self.loss.self_teacher and (teachers or self.models.teacher_backend != "megatron"):
            raise ValueError(f"--srpo-teacher {self.loss.baselines.srpo_teacher} distils toward the student itself "
                             "and reads no external teacher: drop --teacher-hf/--teacher/--teacher-backend, or use "
                             "--srpo-teacher external")
        route_key = self.data.teacher_route_key
        if route_key is not None and not self.loss.needs_teacher:
            srpo = f" with --srpo-teacher {self.loss.baselines.srpo_teacher}" if self.loss.self_teacher else ""
            raise ValueError(f"--teacher-route-key {route_key} routes prompts to teachers; --scope-algorithm "
                             f"{self.loss.algorithm}{srpo} reads none")
        if route_key is not None and not self.models.teachers:
            raise ValueError(f"--teacher-route-key {route_key} names each row's teacher by its --teacher NAME: give "
                             "--teacher NAME=HF_DIR for each (not --teacher-hf)")
        if len(teachers) > 1 and self.loss.needs_teacher:
            if route_key is None:
                raise ValueError(f"--teacher names {len(teachers)} teachers ({', '.join(teachers)}): give "
                                 "--teacher-route-key COLUMN, the data column naming each row's teacher")
            group, micro = self.rollout.group_size, self.loop.micro_batch_size
            if self.loop.max_tokens_per_microbatch is None and group % micro:
                raise ValueError(f"with several teachers a microbatch holds one teacher's prompt groups: "
                                 f"--scope-group-size {group} must be a multiple of --micro-batch-size {micro} "
                                 "(or give --max-tokens-per-microbatch)")
        if self.rollout.props is not None and self.loss.tropd_guidance:
            raise ValueError("--rollout-sampler props draws a group's responses from the student's shared prefixes; "
                             "--tropd-prefix-fraction starts some of them from a teacher's prefix: use one of the two")
        if self.rollout.partial_rollout_tokens is not None and self.loss.tropd_guidance:
            raise ValueError("--partial-rollout-tokens draws the student's responses in segments; "
                             "--tropd-prefix-fraction has some start from a teacher's prefix, drawn whole: use one of "
                             "the two")
        if self.served_teacher and self.loss.tropd_guidance:
            raise ValueError("--tropd-prefix-fraction: TrOPD's guidance has a vLLM engine of the teacher write "
                             "prefixes from its HF directory; --teacher-backend server scores through URLs only")
        if self.remote_teacher and self.loss.needs_teacher_logits:
            remote = [f"{self.models.teacher_label(name)}: {backend}"
                      for name, backend in self.models.teacher_backends.items() if backend != "megatron"]
            raise ValueError(f"--scope-algorithm {self.loss.algorithm} with --scope-kl {self.loss.kl} needs the "
                             f"teacher's logits over the vocabulary; a vLLM teacher ({', '.join(remote)}) gives the "
                             "log-probs of the sampled tokens and a top-k: use --scope-kl k1, k2, k3 or topk, or a "
                             "co-located teacher")
        if self.models.teacher_residency != "all" and not self.colocated_teacher:
            raise ValueError(f"--teacher-residency {self.models.teacher_residency} moves co-located teachers' weights; "
                             f"this run has none (--teacher-backend {self.models.teacher_backend}, --scope-algorithm "
                             f"{self.loss.algorithm})")
        if self.rollout.offload_teacher and not self.frozen_models_on_training_gpus:
            raise ValueError(f"--rl-offload-teacher-during-inference: --scope-algorithm {self.loss.algorithm} keeps no "
                             "forward-only model on the training GPUs (a co-located teacher or reference, SRPO's EMA "
                             "teacher) to offload")
        rtp, tp = self.rollout.tensor_parallel_size, self.parallel.tensor_model_parallel_size
        if self.rollout.placement == "colocated" and rtp > tp:
            raise ValueError(f"--rollout-placement colocated runs each replica's engine on its first stage's "
                             f"--tensor-model-parallel-size {tp} GPUs: --rollout-tensor-parallel-size {rtp} exceeds it")

    @property
    def frozen_models_on_training_gpus(self) -> bool:
        """A co-located teacher or reference, or SRPO's EMA teacher, lives on every training rank."""
        return self.colocated_teacher or self.colocated_reference or self.loss.ema_teacher

    def teachers_on(self, *backends: str) -> list[str]:
        """The names of the teachers the objective reads whose backend is one of `backends`, in flag order."""
        if not self.loss.needs_teacher:
            return []
        return [name for name, backend in self.models.teacher_backends.items() if backend in backends]

    @property
    def remote_teacher(self) -> bool:
        """A teacher is a vLLM engine beside the rollout engine or vLLM servers elsewhere (no Megatron model of it on
        the training ranks): its prompts' responses are scored by the rollout leader."""
        return bool(self.teachers_on("vllm", "server"))

    @property
    def served_teacher(self) -> bool:
        """A teacher is served by OpenAI-compatible vLLM servers at URLs (`teacher.served`)."""
        return bool(self.teachers_on("server"))

    @property
    def colocated_teacher(self) -> bool:
        """A teacher is a forward-only Megatron model on every training rank."""
        return bool(self.teachers_on("megatron"))

    @property
    def remote_reference(self) -> bool:
        """ExOPD's reference is a vLLM engine beside the rollout engine (no Megatron model of it)."""
        return self.loss.algorithm == "exopd" and self.models.reference_backend == "vllm"

    @property
    def colocated_reference(self) -> bool:
        """ExOPD's reference is a forward-only Megatron model on every training rank."""
        return self.loss.algorithm == "exopd" and self.models.reference_backend == "megatron"

    @property
    def teacher_engine(self) -> bool:
        """A vLLM engine of a teacher lives beside each rollout engine: it scores its prompts' responses (a vLLM
        teacher) or writes their TrOPD guidance prefixes (then every teacher has one, co-located ones too)."""
        return bool(self.engine_teachers)

    @property
    def engine_teachers(self) -> list[str]:
        """The teachers with a vLLM engine beside each rollout engine (`teacher_engine`)."""
        return self.teachers_on("megatron", "vllm") if self.loss.tropd_guidance else self.teachers_on("vllm")

    def local_sequences(self, data_parallel_size: int) -> int:
        """n = prompts_per_step / D x G: the sequences one data-parallel rank trains on per step."""
        return self.rollout.prompts_per_step // data_parallel_size * self.rollout.group_size

    def batch_errors(self, data_parallel_size: int) -> list[str]:
        """Why a step cannot be split over `data_parallel_size` ranks and micro-batches ([] when it can): each rank
        takes whole prompt groups, and its sequences split into micro-batches of --micro-batch-size."""
        prompts, dp = self.rollout.prompts_per_step, data_parallel_size
        if prompts % dp:
            return [f"--prompts-per-step {prompts} is not divisible by the data-parallel size {dp}: each "
                    "data-parallel rank takes whole prompt groups"]
        local, micro = self.local_sequences(dp), self.loop.micro_batch_size
        if local % micro and self.loop.max_tokens_per_microbatch is None:
            return [f"{local} sequences per data-parallel rank (--prompts-per-step {prompts} / DP {dp} x "
                    f"--scope-group-size {self.rollout.group_size}) do not split into --micro-batch-size {micro}"]
        return []


def _sequence_parallel(args: argparse.Namespace) -> bool:
    """--sequence-parallel where TP > 1; at TP 1 it is dropped with a warning, as Megatron-LM's arguments do (there
    is nothing to split the sequence over, and launch scripts pass it at every TP)."""
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        logging.getLogger(__name__).warning("--sequence-parallel is ignored at --tensor-model-parallel-size 1")
        return False
    return args.sequence_parallel


def named_values(flag: str, values) -> tuple[tuple[str, str], ...]:
    """NAME=VALUE strings of a repeatable flag as (name, value) pairs; ValueError naming the flag for another form."""
    pairs = []
    for text in values or ():
        name, separator, value = text.partition("=")
        if not separator or not name or not value:
            raise ValueError(f"{flag} {text!r}: expected NAME=VALUE")
        pairs.append((name, value))
    return tuple(pairs)


def build_validation_config(args: argparse.Namespace) -> ValidationConfig:
    """The --eval-* flags (tools/eval.py parses the same ones); unset sampling flags take the rollout's."""
    def given(value, default):
        return default if value is None else value

    return ValidationConfig(data=named_values("--eval-data", args.eval_data), interval=args.eval_interval,
                            at_start=args.eval_at_start, samples_per_prompt=args.eval_samples_per_prompt,
                            temperature=given(args.eval_temperature, args.rollout_temperature),
                            top_p=given(args.eval_top_p, args.rollout_top_p),
                            max_new_tokens=given(args.eval_max_new_tokens, args.max_new_tokens))


def build_data_config(args: argparse.Namespace, train_data: str | None) -> DataConfig:
    """The data flags' section (tools/eval.py builds it too, without training data)."""
    return DataConfig(train_data=train_data, input_key=args.input_key, label_key=args.label_key,
                      id_key=args.id_key or None, data_source_key=args.data_source_key,
                      prompt_template=args.prompt_template, apply_chat_template=args.apply_chat_template,
                      reward=args.reward, custom_reward_function=args.custom_reward_function,
                      verifier_workers=args.verifier_workers, verifier_timeout=args.verifier_timeout,
                      reward_by_source=named_values("--reward-by-source", args.reward_by_source),
                      max_verifier_error_fraction=args.max_verifier_error_fraction)


def teacher_tokenizers(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """--teacher-tokenizer's values by teacher name: NAME=PATH with --teacher, one PATH with --teacher-hf."""
    values = args.teacher_tokenizer or []
    if args.teacher:
        return named_values("--teacher-tokenizer", values)
    if len(values) > 1:
        raise ValueError(f"--teacher-tokenizer is given {len(values)} times for --teacher-hf's one teacher")
    return tuple((DEFAULT_TEACHER, path) for path in values)


def props_sampling(args) -> PropsSampling | None:
    """--rollout-sampler props's parameters (defaults: `PropsSampling`'s); None for iid, which refuses them."""
    given = {flag: value for flag, value in (("--props-rounds", args.props_rounds), ("--props-clip", args.props_clip))
             if value is not None}
    if args.rollout_sampler != "props":
        if given:
            raise ValueError(f"{', '.join(given)} set PROPS's sampler: give --rollout-sampler props with them")
        return None
    defaults = PropsSampling()
    return PropsSampling(rounds=given.get("--props-rounds", defaults.rounds),
                         clip=given.get("--props-clip", defaults.clip))


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from `megatron_scope.arguments.parse_args`'s namespace (ValueError names the flag)."""
    placement = args.rollout_placement or ("ray" if args.rollout_engines else "colocated")
    return RunConfig(
        models=ModelsConfig(student_hf=args.student_hf, tokenizer=args.tokenizer, teacher_hf=args.teacher_hf,
                            teachers=named_values("--teacher", args.teacher),
                            teacher_tokenizers=teacher_tokenizers(args), teacher_backend=args.teacher_backend,
                            teacher_residency=args.teacher_residency,
                            teacher_timeout_s=args.teacher_timeout, teacher_retries=args.teacher_retries,
                            reference_hf=args.exopd_reference_hf, reference_backend=args.exopd_reference_backend,
                            bf16=args.bf16, transformer_impl=args.transformer_impl,
                            attention_backend=args.attention_backend, recompute_granularity=args.recompute_granularity,
                            recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers),
        data=dataclasses.replace(build_data_config(args, args.train_data), teacher_route_key=args.teacher_route_key),
        parallel=ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                sequence_parallel=_sequence_parallel(args),
                                distributed_timeout_minutes=args.distributed_timeout_minutes),
        loss=LossConfig(
            algorithm=args.scope_algorithm, kl=args.scope_kl, jsd_beta=args.scope_jsd_beta, topk=args.scope_topk,
            topk_renormalize=args.scope_topk_renormalize, fused_kl=args.scope_fused_kl,
            loss_agg_mode=args.loss_agg_mode, teacher_path_loss=args.scope_teacher_path_loss,
            student_path_exponent=args.scope_student_path_exponent, logprob_temperature=args.logprob_temperature,
            tau=args.scope_tau, weight_norm=args.scope_weight_norm,
            student_path=args.scope_student_path, student_path_weights=args.scope_student_path_weights,
            rollout_is_threshold=args.rollout_is_threshold, rollout_is=args.rollout_is, rollout_rs=args.rollout_rs,
            rollout_rs_threshold=args.rollout_rs_threshold, rollout_rs_threshold_lower=args.rollout_rs_threshold_lower,
            teacher_path_weights=args.scope_teacher_path_weights,
            baselines=BaselineConfig(clip_eps=args.grpo_clip_eps, clip_ratio_c=args.clip_ratio_c,
                                     exopd_lambda=args.exopd_lambda,
                                     srpo_beta=args.srpo_beta, srpo_teacher=args.srpo_teacher,
                                     srpo_ema_rate=args.srpo_ema_rate,
                                     srpo_reprompt_template=args.srpo_reprompt_template, tropd_delta=args.tropd_delta,
                                     tropd_trust_region=args.tropd_trust_region, tropd_outlier=args.tropd_outlier,
                                     tropd_prefix_fraction=args.tropd_prefix_fraction,
                                     tropd_prefix_beta=args.tropd_prefix_beta)),
        rollout=RolloutConfig(
            prompts_per_step=args.prompts_per_step, group_size=args.scope_group_size,
            max_new_tokens=args.max_new_tokens, temperature=args.rollout_temperature, top_p=args.rollout_top_p,
            kv_cache_gib=args.rollout_kv_cache_gib, gpu_memory_utilization=args.rollout_gpu_memory_utilization,
            weight_transfer_backend=args.weight_transfer_backend,
            weight_transfer_bucket_mib=args.weight_transfer_bucket_mib, placement=placement,
            offload_optimizer=args.rl_offload_optimizer_during_inference,
            offload_teacher=args.rl_offload_teacher_during_inference,
            tensor_parallel_size=args.rollout_tensor_parallel_size or (
                args.tensor_model_parallel_size if placement == "colocated" else 1),
            engines=args.rollout_engines, teacher_engines=args.teacher_engines, ray_address=args.ray_address,
            gpus_per_engine=args.rollout_gpus_per_engine, vllm_log_level=args.vllm_log_level,
            schedule=args.rollout_schedule, max_staleness=args.max_staleness, props=props_sampling(args),
            partial_rollout_tokens=args.partial_rollout_tokens),
        optimizer=OptimizerConfig(
            lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
            lr_decay_style=args.lr_decay_style, use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=args.overlap_grad_reduce, ddp_bucket_size=args.ddp_bucket_size),
        loop=LoopConfig(
            train_iters=args.train_iters, micro_batch_size=args.micro_batch_size,
            max_tokens_per_microbatch=args.max_tokens_per_microbatch, seed=args.seed, save=args.save,
            load=args.load, save_interval=args.save_interval, save_hf=args.save_hf, exit_interval=args.exit_interval,
            log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project,
            wandb_exp_name=args.wandb_exp_name, wandb_save_dir=args.wandb_save_dir,
            exit_on_nonfinite=args.exit_on_nonfinite, progress_bar=args.progress_bar,
            weight_sync_bucket_mib=args.weight_sync_bucket_mib),
        validation=build_validation_config(args),
    )
