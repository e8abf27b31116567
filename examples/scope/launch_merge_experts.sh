#!/usr/bin/env bash
# G-OPD's merge setting (ExOPD, a seed of this project): a student distilled from domain experts, each expert the
# student after that domain's RL, every prompt routed to its domain's expert by a data column; ExOPD's reward
# extrapolation (lambda 1.25, its reference the student's initial weights) lets the merged student pass each expert.
# Qwen3 models through launch_qwen3_scaling.sh (its recipe and geometry), the experts co-located and taking turns
# on the GPUs (TEACHER_RESIDENCY=scoring). ALGORITHM=scope routes SCOPE's teacher path the same way; opd: plain OPD.
#
#   TEACHERS="math=/models/Qwen3-4B-RL-Math code=/models/Qwen3-4B-RL-Code" STUDENT=Qwen3-4B \
#     TRAIN_DATA=/data/math_and_code.jsonl NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/scope/launch_merge_experts.sh
#
# TRAIN_DATA's rows carry the TEACHER_ROUTE_KEY column (default "domain") naming their expert. The CPU miniature
# of the same merge is examples/scope/merge_experts.py. Every variable of launch_qwen3_scaling.sh and
# launch_common.sh applies (default after ":="):
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${MODEL_ROOT:=/models}"
: "${STUDENT:=Qwen3-4B}"
: "${TEACHERS:=math=$MODEL_ROOT/$STUDENT-RL-Math code=$MODEL_ROOT/$STUDENT-RL-Code}"   # NAME=HF_DIR per expert
: "${TEACHER_ROUTE_KEY:=domain}"      # the data column naming each row's expert
: "${TEACHER_RESIDENCY:=scoring}"     # the experts take turns on the GPUs (all: every expert resident)
: "${ALGORITHM:=exopd}"               # exopd (G-OPD's merge), scope or opd
: "${EXOPD_LAMBDA:=1.25}"             # ExOPD's reward scale (1 = OPD)
: "${SAVE_DIR:=$HERE/../../outputs/merge_${STUDENT}_$ALGORITHM}"
if [[ "$ALGORITHM" == exopd ]]; then
  EXTRA_ARGS="--exopd-lambda $EXOPD_LAMBDA ${EXTRA_ARGS:-}"
fi
export MODEL_ROOT STUDENT TEACHERS TEACHER_ROUTE_KEY TEACHER_RESIDENCY ALGORITHM SAVE_DIR EXTRA_ARGS
exec bash "$HERE/launch_qwen3_scaling.sh"
