#!/bin/bash
# Pretrain SLM-mix: one dense SLM per cluster, one array task per expert
# (data.expert=$SLURM_ARRAY_TASK_ID; run and checkpoint dirs get /expert_NNNN appended).
#
# usage: sbatch [--array=0-K-1] [sbatch options] slurm/pretrain_mix.sh [CONFIG.yaml ...] \
#            [section.key=value ...]
#        bash slurm/pretrain_mix.sh --help
#
# Default config: configs/paper/mix16.yaml with --array=0-15 (one task per expert; match the
# array to model.num_experts). Each task is preemption-safe like slurm/pretrain_pn.sh and
# requeues on its own. Submit from the repository root (or set PN_REPO).
#
# examples:
#   sbatch slurm/pretrain_mix.sh
#   sbatch --array=0-3 --gpus-per-node=0 --ntasks-per-node=1 slurm/pretrain_mix.sh \
#       configs/tiny/mix.yaml checkpoint.dir=runs/tiny-mix/ckpt
#SBATCH --job-name=pn-pretrain-mix
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

# sbatch runs a copy of this file from its spool directory: find the repository by name.
PN_REPO=${PN_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$PN_REPO/slurm/common.sh" || { echo "pn: submit from the repository or set PN_REPO" >&2; exit 1; }
pn_wants_help "$@" && { pn_usage "$0"; exit 0; }
pn_init

[[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || pn_die "submit as an array, one task per expert: --array=0-K-1"
[[ ${1:-} == *.yaml || ${1:-} == *.yml ]] || set -- configs/paper/mix16.yaml "$@"
pn_train_job "$@" "data.expert=$SLURM_ARRAY_TASK_ID"
