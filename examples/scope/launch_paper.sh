#!/usr/bin/env bash
# SCOPE in the paper's setting (arXiv 2604.10688): student DeepSeek-R1-Distill-Qwen-1.5B, teacher
# Skywork-OR1-Math-7B, G = 8 responses per prompt, 256 prompts per step, lr 5e-5, responses up to 12288
# tokens, tau = 1, bf16, distributed optimizer. Multi-node torchrun; run this script once on every node
# (NODE_RANK = 0 .. NNODES-1). It first runs tools/check_config.py with the same flags (every node, so that
# all nodes refuse alike), then torchrun -m megatron_scope.train. See examples/scope/README.md.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 STUDENT_HF=/models/DeepSeek-R1-Distill-Qwen-1.5B \
#     TEACHER_HF=/models/Skywork-OR1-Math-7B TRAIN_DATA=/data/train.jsonl bash examples/scope/launch_paper.sh
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
: "${STUDENT_HF:=$MODEL_ROOT/DeepSeek-R1-Distill-Qwen-1.5B}"   # HF directory: config.json, safetensors, tokenizer
: "${TEACHER_HF:=$MODEL_ROOT/Skywork-OR1-Math-7B}"             # HF directory of the co-located teacher
: "${TOKENIZER:=$STUDENT_HF}"                                  # HF tokenizer directory (or SentencePiece file)
: "${TEACHERS:=}"                                              # several experts instead: NAME=HF_DIR ... (launch_common.sh)
[[ -n "$TEACHERS" ]] && TEACHER_HF=""                              # (then TEACHER_ROUTE_KEY names each row's expert)
: "${TEACHER_TOKENIZER=$TEACHER_HF}"                           # checked to have the same vocabulary; "" skips
: "${TRAIN_DATA:=$ROOT/data/scope_train.jsonl}"                # JSONL rows {id, prompt, answer}
: "${SAVE_DIR:=$ROOT/outputs/scope_paper}"                     # checkpoints (--save/--load) and TensorBoard
# --- parallelism and batch
: "${TP:=2}"                          # --tensor-model-parallel-size (student and teacher)
# --- which SCOPE: "paper" (arXiv 2604.10688 as written) or "released" (the authors' run_experiment_distill_1_5b.sh:
# student-path weight PPL_S^(-1/tau), the k1 advantage through PPO's clip and dual clip, token-mean per path,
# rollout and student log-probs at temperature 0.6, constant LR, weight decay 0.01)
: "${RECIPE:=paper}"
case "$RECIPE" in
  paper) RECIPE_ARGS="" ;;
  released)
    : "${SCOPE_KL:=k1}"
    : "${ROLLOUT_TEMPERATURE:=0.6}"
    RECIPE_ARGS="--scope-teacher-path-loss ppo --scope-student-path-exponent -1 --loss-agg-mode scope-released"
    RECIPE_ARGS+=" --logprob-temperature $ROLLOUT_TEMPERATURE --lr-decay-style constant --weight-decay 0.01" ;;
  *) echo "RECIPE must be paper or released, got '$RECIPE'" >&2; exit 2 ;;
esac
EXTRA_ARGS="$RECIPE_ARGS ${EXTRA_ARGS:-}"
source "$HERE/launch_common.sh"
