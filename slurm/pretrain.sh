#!/bin/bash
# Pretrain a dense model: the SLM, the LLM, or SLM-is (an SLM on a resampled generic set),
# on one or more nodes, preemption-safe.
#
# usage: sbatch [sbatch options] slurm/pretrain.sh [CONFIG.yaml ...] [section.key=value ...]
#        bash slurm/pretrain.sh --help
#
# Default config: configs/paper/slm.yaml. Submit from the repository root (or set PN_REPO).
# Same launch, signals and requeue as slurm/pretrain_pn.sh; see slurm/README.md.
#
# examples:
#   sbatch slurm/pretrain.sh configs/paper/slm.yaml
#   sbatch --nodes=4 slurm/pretrain.sh configs/paper/llm.yaml parallel.tensor=2
#   # SLM-is for one domain: the blend file of `pn-data importance` replaces the generic data
#   sbatch -J slm-is-arxiv slurm/pretrain.sh configs/paper/slm.yaml \
#       data.blend_file=runs/is/arxiv_blend.json logging.run_dir=runs/is/arxiv \
#       checkpoint.dir=runs/is/arxiv/checkpoints
#SBATCH --job-name=pn-pretrain-dense
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

[[ ${1:-} == *.yaml || ${1:-} == *.yml ]] || set -- configs/paper/slm.yaml "$@"
pn_train_job "$@"
