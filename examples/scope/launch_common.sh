# Shared by launch_paper.sh and launch_qwen3_scaling.sh (sourced after they set their model-specific
# defaults: HERE, ROOT, the launch geometry, STUDENT_HF, TEACHER_HF, TOKENIZER, TEACHER_TOKENIZER,
# TRAIN_DATA, SAVE_DIR, TP). Every value below is an environment variable too (default after ":=").
# Builds the training flags, runs tools/check_config.py with them, then torchrun -m megatron_scope.train (or prints it).
: "${PP:=1}"                          # --pipeline-model-parallel-size
: "${SEQUENCE_PARALLEL:=1}"           # 1: --sequence-parallel (norm and residual activations / TP; ignored at TP 1)
: "${PROMPTS_PER_STEP:=256}"          # the paper's recipe: 256 prompts x G=8, lr 5e-5, 12288 tokens, tau 1
: "${GROUP_SIZE:=8}"                  # G
: "${MAX_NEW_TOKENS:=12288}"
: "${MICRO_BATCH_SIZE:=8}"            # at most this many sequences per microbatch
: "${MAX_TOKENS_PER_MICROBATCH=$MAX_NEW_TOKENS}"  # token-budget microbatches: longest rows first, each microbatch
                                      # padded only to its own longest row and within this many padded tokens (a
                                      # longer row goes alone); set it empty for MICRO_BATCH_SIZE rows each, padded
                                      # to the replica's longest response (about half of a step's tokens at the
                                      # paper's length distribution: the step's tokens/padding_fraction says)
: "${LR:=5e-5}"
: "${ALGORITHM:=scope}"                # --scope-algorithm: scope, or a baseline (opd, exopd, ...)
: "${SCOPE_TAU:=1.0}"
: "${SCOPE_KL:=reverse}"              # full-vocabulary reverse KL (fused with both output layers); topk (+ --scope-topk K), k1/k2/k3
: "${TEACHER_BACKEND:=megatron}"      # megatron: co-located teacher; vllm: a teacher engine (SCOPE_KL=topk best, or k1/k2/k3)
: "${TEACHERS:=}"                     # several co-located experts instead of TEACHER_HF: space-separated NAME=HF_DIR
                                      # (--teacher each), e.g. "math=/models/math-rl code=/models/code-rl"
: "${TEACHER_ROUTE_KEY:=}"            # with TEACHERS: the data column naming each row's expert (--teacher-route-key)
: "${TEACHER_RESIDENCY:=all}"          # co-located teachers' weights: all resident, or "scoring" (each on the GPU for
                                      # its own scoring pass only: several experts take turns; --teacher-residency)
: "${TEACHER_TOKENIZERS=$TEACHERS}"   # with TEACHERS: NAME=TOKENIZER each, checked to share --tokenizer's vocabulary
                                      # (by default each expert's HF directory); "" skips
: "${TRAIN_ITERS:=200}"
: "${SAVE_INTERVAL:=10}"
: "${SEED:=1234}"
# --- rollout (by default one vLLM engine per data-parallel replica on the replica's GPUs, asleep while it trains)
: "${ROLLOUT_PLACEMENT:=colocated}"   # --rollout-placement: colocated, rank0, or ray (with ROLLOUT_ENGINES)
: "${ROLLOUT_KV_CACHE_GIB:=16}"       # must hold one max_position_embeddings sequence (4.4 GiB for Qwen3-1.7B)
: "${OFFLOAD_DURING_ROLLOUT:=1}"      # 1: optimizer state, gradient buffers and the teacher wait in host memory
                                      # while the engines generate (--rl-offload-*-during-inference): KV cache room
: "${ATTENTION_BACKEND:=sdpa}"        # --attention-backend: sdpa (no stored s^2 scores) or local
: "${RECOMPUTE:=auto}"                # auto: the least that fits GPU_MEMORY_GIB (tools/check_config.py
                                      # --print-least-recompute: none, selective, or full recompute of the fewest
                                      # layers); full (every layer), selective (core attention) or none
: "${ROLLOUT_TEMPERATURE:=1.0}"       # --rollout-temperature
: "${ROLLOUT_TP:=}"                   # --rollout-tensor-parallel-size; "" = TP when colocated, else 1
: "${ROLLOUT_ENGINES:=0}"             # with ROLLOUT_PLACEMENT=ray: N engines as Ray actors (--rollout-engines)
: "${RAY_ADDRESS:=}"                  # with ROLLOUT_PLACEMENT=ray: the Ray cluster (e.g. auto); "" = local Ray
# --- validation during training (the SCOPE authors validate on AIME as they train)
: "${EVAL_DATA:=}"                    # space-separated NAME=PATH (--eval-data each), e.g. "aime24=/data/aime24.jsonl
                                      # math500=/data/math500.parquet"; "" = no validation
: "${EVAL_INTERVAL:=10}"              # --eval-interval (and after the last iteration)
: "${EVAL_SAMPLES:=16}"               # --eval-samples-per-prompt: Avg@16 and Pass@1..16
# --- this script
: "${PYTHON:=python}"
: "${TORCHRUN:=torchrun}"
: "${EXTRA_ARGS:=}"                   # more training flags (also given to the check)
: "${CHECK_ARGS:=}"                   # check_config.py-only flags, e.g. "--max-prompt-tokens 2048"
: "${HOST_MEMORY_GIB:=1024}"          # host memory of one node: the check fails when the pinned host memory a node
                                      # holds (teacher hidden states, offloaded state, level-1 engines) exceeds it
: "${SKIP_CHECK:=0}"                  # 1: do not run tools/check_config.py first
: "${ALLOW_OVERCOMMIT:=0}"            # 1: the check only warns when the estimate exceeds GPU_MEMORY_GIB
: "${DRY_RUN:=0}"                     # 1: run the check, print the torchrun command, do not train

PROMPT_TEMPLATE=$'{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.'

ARGS=(
  --student-hf "$STUDENT_HF" --tokenizer "$TOKENIZER"
  --train-data "$TRAIN_DATA" --prompt-template "$PROMPT_TEMPLATE" --apply-chat-template --reward math
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MICRO_BATCH_SIZE" --bf16 --use-distributed-optimizer --attention-backend "$ATTENTION_BACKEND"
  --prompts-per-step "$PROMPTS_PER_STEP" --scope-group-size "$GROUP_SIZE" --max-new-tokens "$MAX_NEW_TOKENS"
  --rollout-temperature "$ROLLOUT_TEMPERATURE" --rollout-top-p 1.0
  --rollout-kv-cache-gib "$ROLLOUT_KV_CACHE_GIB" --rollout-placement "$ROLLOUT_PLACEMENT"
  --scope-algorithm "$ALGORITHM" --scope-tau "$SCOPE_TAU" --scope-kl "$SCOPE_KL" --teacher-backend "$TEACHER_BACKEND"
  --lr "$LR" --train-iters "$TRAIN_ITERS" --seed "$SEED"
  --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$SAVE_DIR/tensorboard"
)
if [[ -n "$TEACHERS" ]]; then
  for teacher in $TEACHERS; do
    ARGS+=(--teacher "$teacher")
  done
  if [[ -n "$TEACHER_ROUTE_KEY" ]]; then
    ARGS+=(--teacher-route-key "$TEACHER_ROUTE_KEY")
  fi
  for tokenizer in $TEACHER_TOKENIZERS; do
    ARGS+=(--teacher-tokenizer "$tokenizer")
  done
else
  ARGS+=(--teacher-hf "$TEACHER_HF")
fi
if [[ "$TEACHER_RESIDENCY" != all ]]; then
  ARGS+=(--teacher-residency "$TEACHER_RESIDENCY")
fi
if [[ "$SEQUENCE_PARALLEL" == 1 ]]; then
  ARGS+=(--sequence-parallel)
fi
if [[ "$OFFLOAD_DURING_ROLLOUT" == 1 ]]; then
  ARGS+=(--rl-offload-optimizer-during-inference)
  if [[ "$TEACHER_BACKEND" == megatron ]]; then
    ARGS+=(--rl-offload-teacher-during-inference)
  fi
fi
if [[ -n "$TEACHER_TOKENIZER" ]]; then
  ARGS+=(--teacher-tokenizer "$TEACHER_TOKENIZER")
fi
if [[ -n "$MAX_TOKENS_PER_MICROBATCH" ]]; then
  ARGS+=(--max-tokens-per-microbatch "$MAX_TOKENS_PER_MICROBATCH")
fi
if [[ -n "$ROLLOUT_TP" ]]; then
  ARGS+=(--rollout-tensor-parallel-size "$ROLLOUT_TP")
fi
if [[ -n "$EVAL_DATA" ]]; then
  for eval_set in $EVAL_DATA; do
    ARGS+=(--eval-data "$eval_set")
  done
  ARGS+=(--eval-interval "$EVAL_INTERVAL" --eval-samples-per-prompt "$EVAL_SAMPLES")
fi
if [[ "$ROLLOUT_ENGINES" != 0 ]]; then
  ARGS+=(--rollout-engines "$ROLLOUT_ENGINES")
fi
if [[ -n "$RAY_ADDRESS" ]]; then
  ARGS+=(--ray-address "$RAY_ADDRESS")
fi
read -r -a EXTRA <<< "$EXTRA_ARGS"
read -r -a CHECK_EXTRA <<< "$CHECK_ARGS"
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
GEOMETRY=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --gpu-memory-gib "$GPU_MEMORY_GIB"
          --host-memory-gib "$HOST_MEMORY_GIB" ${CHECK_EXTRA[@]+"${CHECK_EXTRA[@]}"})

case "$RECOMPUTE" in
  auto) # the dry run's search (config.json files only; also with SKIP_CHECK=1); nothing fits: its report, exit 1
        LEAST=$("$PYTHON" "$ROOT/tools/check_config.py" "${ARGS[@]}" "${GEOMETRY[@]}" --print-least-recompute)
        read -r -a RECOMPUTE_FLAGS <<< "$LEAST"
        ARGS+=(${RECOMPUTE_FLAGS[@]+"${RECOMPUTE_FLAGS[@]}"}) ;;
  full) ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
  selective) ARGS+=(--recompute-granularity selective) ;;
  none) ;;
  *) echo "RECOMPUTE must be auto, full, selective or none, got '$RECOMPUTE'" >&2; exit 2 ;;
esac

if [[ "$SKIP_CHECK" != 1 ]]; then
  CHECK=("$PYTHON" "$ROOT/tools/check_config.py" "${ARGS[@]}" "${GEOMETRY[@]}")
  if [[ "$ALLOW_OVERCOMMIT" == 1 ]]; then
    CHECK+=(--allow-overcommit)
  fi
  "${CHECK[@]}"
fi

LAUNCH=("$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        -m megatron_scope.train "${ARGS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf 'DRY_RUN=1, would run:'
  printf ' %q' "${LAUNCH[@]}"
  printf '\n'
  exit 0
fi
exec "${LAUNCH[@]}"
