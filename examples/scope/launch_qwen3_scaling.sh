#!/usr/bin/env bash
# SCOPE scaling study on Qwen3: a Qwen3 student (STUDENT, default Qwen3-1.7B; Qwen3-0.6B, Qwen3-4B, ...)
# distilled from Qwen3-8B (TEACHER), with the paper's recipe otherwise (G = 8, 256 prompts per step, lr 5e-5,
# responses up to 12288 tokens, tau = 1, bf16, distributed optimizer). Same structure as launch_paper.sh:
# run once per node; tools/check_config.py first (SKIP_CHECK=1 skips it), then torchrun train_scope.py.
#
#   STUDENT=Qwen3-4B NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MODEL_ROOT=/models \
#     TRAIN_DATA=/data/train.jsonl bash examples/scope/launch_qwen3_scaling.sh
#
# Every cluster-specific value is an environment variable (default after ":="):
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

# --- launch geometry (torchrun)
: "${NNODES:=4}"                      # nodes
: "${NPROC_PER_NODE:=8}"              # training GPUs per node
: "${NODE_RANK:=0}"                   # this node's rank, 0 .. NNODES-1
: "${MASTER_ADDR:=127.0.0.1}"         # address of node 0
: "${MASTER_PORT:=29500}"             # a free port on node 0
: "${GPU_MEMORY_GIB:=80}"             # memory of one GPU, for the check
# --- models and data
: "${MODEL_ROOT:=/models}"
: "${STUDENT:=Qwen3-1.7B}"            # directory name under MODEL_ROOT: Qwen3-0.6B, Qwen3-1.7B, Qwen3-4B, ...
: "${TEACHER:=Qwen3-8B}"
: "${STUDENT_HF:=$MODEL_ROOT/$STUDENT}"                        # HF directory: config.json, safetensors, tokenizer
: "${TEACHER_HF:=$MODEL_ROOT/$TEACHER}"                        # HF directory of the co-located teacher
: "${TOKENIZER:=$STUDENT_HF}"                                  # HF tokenizer directory (or SentencePiece file)
: "${TEACHER_TOKENIZER:=$TEACHER_HF}"                          # checked to have the same vocabulary; "" skips
: "${TRAIN_DATA:=$ROOT/data/scope_train.jsonl}"                # JSONL rows {id, prompt, answer}
: "${SAVE_DIR:=$ROOT/outputs/scope_qwen3_${STUDENT}_from_${TEACHER}}"
# --- parallelism and batch (TP: student and teacher share it; Qwen3 up to 8B has 8 key/value heads)
case "$STUDENT" in
  Qwen3-0.6B|Qwen3-1.7B|Qwen3-4B) DEFAULT_TP=2 ;;
  *) DEFAULT_TP=4 ;;
esac
: "${TP:=$DEFAULT_TP}"                # --tensor-model-parallel-size
: "${PP:=1}"                          # --pipeline-model-parallel-size
: "${MICRO_BATCH_SIZE:=1}"            # sequences per microbatch
: "${PROMPTS_PER_STEP:=256}"
: "${GROUP_SIZE:=8}"                  # G
: "${MAX_NEW_TOKENS:=12288}"
: "${LR:=5e-5}"
: "${SCOPE_TAU:=1.0}"
: "${SCOPE_KL:=reverse}"              # full-vocabulary reverse KL; k1/k3 keep no teacher logits
: "${TRAIN_ITERS:=200}"
: "${SAVE_INTERVAL:=10}"
: "${SEED:=1234}"
# --- rollout (one vLLM engine in-process on global rank 0, sharing its GPU)
: "${ROLLOUT_KV_CACHE_GIB:=16}"       # must hold one max_position_embeddings sequence (4.4 GiB for Qwen3-1.7B)
: "${ROLLOUT_TP:=1}"                  # --rollout-tensor-parallel-size
: "${ROLLOUT_ENGINES:=0}"             # 0: vLLM inside global rank 0; N: N engines as Ray actors (--rollout-engines)
: "${RAY_ADDRESS:=}"                  # with ROLLOUT_ENGINES > 0: the Ray cluster (e.g. auto); "" = local Ray
# --- this script
: "${PYTHON:=python}"
: "${TORCHRUN:=torchrun}"
: "${EXTRA_ARGS:=}"                   # more train_scope.py flags (also given to the check)
: "${CHECK_ARGS:=}"                   # check_config.py-only flags, e.g. "--max-prompt-tokens 2048"
: "${SKIP_CHECK:=0}"                  # 1: do not run tools/check_config.py first
: "${ALLOW_OVERCOMMIT:=0}"            # 1: the check only warns when the estimate exceeds GPU_MEMORY_GIB
: "${DRY_RUN:=0}"                     # 1: run the check, print the torchrun command, do not train

PROMPT_TEMPLATE=$'{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.'

ARGS=(
  --student-hf "$STUDENT_HF" --teacher-hf "$TEACHER_HF" --tokenizer "$TOKENIZER"
  --train-data "$TRAIN_DATA" --prompt-template "$PROMPT_TEMPLATE" --apply-chat-template --reward math
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MICRO_BATCH_SIZE" --bf16 --use-distributed-optimizer
  --prompts-per-step "$PROMPTS_PER_STEP" --scope-group-size "$GROUP_SIZE" --max-new-tokens "$MAX_NEW_TOKENS"
  --rollout-temperature 1.0 --rollout-top-p 1.0
  --rollout-kv-cache-gib "$ROLLOUT_KV_CACHE_GIB" --rollout-tensor-parallel-size "$ROLLOUT_TP"
  --rollout-engines "$ROLLOUT_ENGINES"
  --scope-algorithm scope --scope-tau "$SCOPE_TAU" --scope-kl "$SCOPE_KL"
  --lr "$LR" --train-iters "$TRAIN_ITERS" --seed "$SEED"
  --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$SAVE_DIR/tensorboard"
)
if [[ -n "$TEACHER_TOKENIZER" ]]; then
  ARGS+=(--teacher-tokenizer "$TEACHER_TOKENIZER")
fi
if [[ -n "$RAY_ADDRESS" ]]; then
  ARGS+=(--ray-address "$RAY_ADDRESS")
fi
read -r -a EXTRA <<< "$EXTRA_ARGS"
read -r -a CHECK_EXTRA <<< "$CHECK_ARGS"
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})

if [[ "$SKIP_CHECK" != 1 ]]; then
  CHECK=("$PYTHON" "$ROOT/tools/check_config.py" "${ARGS[@]}"
         --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --gpu-memory-gib "$GPU_MEMORY_GIB"
         ${CHECK_EXTRA[@]+"${CHECK_EXTRA[@]}"})
  if [[ "$ALLOW_OVERCOMMIT" == 1 ]]; then
    CHECK+=(--allow-overcommit)
  fi
  "${CHECK[@]}"
fi

LAUNCH=("$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        "$ROOT/examples/scope/train_scope.py" "${ARGS[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf 'DRY_RUN=1, would run:'
  printf ' %q' "${LAUNCH[@]}"
  printf '\n'
  exit 0
fi
exec "${LAUNCH[@]}"
