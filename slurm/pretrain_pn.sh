#!/bin/bash
# Pretrain a projected network (SLM-pn) on one or more nodes, preemption-safe.
#
# usage: sbatch [sbatch options] slurm/pretrain_pn.sh [CONFIG.yaml ...] [section.key=value ...]
#        bash slurm/pretrain_pn.sh --help
#
# Default config: configs/paper/pn32.yaml. Submit from the repository root (or set PN_REPO).
# Every #SBATCH default below is for 8-GPU nodes and can be overridden on the sbatch command
# line, e.g. sbatch --nodes=4 --time=24:00:00 -p gpu -A myproject slurm/pretrain_pn.sh.
# One srun task per node runs torchrun (one process per GPU; on a CPU-only cluster
# --ntasks-per-node=N gloo processes). Before its time limit (train.exit_duration_minutes, then
# SIGUSR1 300 s before it) or on `scancel --signal=USR1 --batch JOB` the trainer saves a
# checkpoint and the job requeues itself; the requeued job resumes from checkpoint.dir. SIGTERM
# (scancel, preemption) saves too; a preempted job is requeued by SLURM. See slurm/README.md.
#
# examples:
#   sbatch --nodes=2 slurm/pretrain_pn.sh configs/paper/pn32.yaml parallel.tensor=2
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 slurm/pretrain_pn.sh configs/tiny/pn.yaml \
#       data.blend_file=data/tiny/clusters/generic_blend.json checkpoint.dir=runs/tiny-pn/ckpt
#SBATCH --job-name=pn-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a copy of this file from its spool directory: find the repository by name.
PN_REPO=${PN_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$PN_REPO/slurm/common.sh" || { echo "pn: submit from the repository or set PN_REPO" >&2; exit 1; }
pn_wants_help "$@" && { pn_usage "$0"; exit 0; }
pn_init

[[ ${1:-} == *.yaml || ${1:-} == *.yml ]] || set -- configs/paper/pn32.yaml "$@"
pn_train_job "$@"
