#!/usr/bin/env bash
# SCOPE scaling study on Qwen3: a Qwen3 student (STUDENT, default Qwen3-1.7B; Qwen3-0.6B, Qwen3-4B, ...)
# distilled from Qwen3-8B (TEACHER), with the paper's recipe otherwise (G = 8, 256 prompts per step, lr 5e-5,
# responses up to 12288 tokens, tau = 1, bf16, distributed optimizer). Same structure as launch_paper.sh:
# run once per node; tools/check_config.py first (SKIP_CHECK=1 skips it), then torchrun -m megatron_scope.train.
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
: "${TEACHERS:=}"                                              # several experts instead: NAME=HF_DIR ... (launch_common.sh)
[[ -n "$TEACHERS" ]] && TEACHER_HF=""                              # (then TEACHER_ROUTE_KEY names each row's expert)
: "${TEACHER_TOKENIZER=$TEACHER_HF}"                           # checked to have the same vocabulary; "" skips
: "${TRAIN_DATA:=$ROOT/data/scope_train.jsonl}"                # JSONL rows {id, prompt, answer}
: "${SAVE_DIR:=$ROOT/outputs/scope_qwen3_${STUDENT}_from_${TEACHER}}"
# --- parallelism and batch (TP: student and teacher share it; Qwen3 up to 8B has 8 key/value heads)
case "$STUDENT" in
  Qwen3-0.6B|Qwen3-1.7B|Qwen3-4B) DEFAULT_TP=2 ;;
  *) DEFAULT_TP=4 ;;
esac
: "${TP:=$DEFAULT_TP}"                # --tensor-model-parallel-size
# Qwen3-8B: with the training state in host memory while the engine generates (OFFLOAD_DURING_ROLLOUT=1), a
# 48 GiB KV cache per engine GPU decodes 97 full-length sequences together (16 GiB: 32); the dry run checks it fits
case "$STUDENT" in
  Qwen3-8B) : "${ROLLOUT_KV_CACHE_GIB:=48}" ;;
esac
source "$HERE/launch_common.sh"
