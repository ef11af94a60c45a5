#!/bin/bash
# Specialize a pretrained projected network to each domain, one array task per domain:
# assign the domain's training set to the generic clusters (pn-data assign), project one
# expert into a dense SLM (pn-project), fine-tune it (pn-train with a fine-tune config:
# lr / 3, early stopping), evaluate it on the held-out set (pn-eval), export it to Hugging
# Face format (pn-export-hf).
#
# usage: sbatch --array=0-D-1 [sbatch options] slurm/specialize.sh --checkpoint PN_CKPT \
#            --clusters CLUSTER_DIR --domains DOMAINS.txt --output DIR [--strategy S] \
#            [--model-config CONFIG.yaml] [--finetune-config CONFIG.yaml] \
#            [--tokenizer HF_TOKENIZER_DIR] [-- pn-train overrides for fine-tuning]
#        bash slurm/specialize.sh --help
#
# DOMAINS.txt: one domain per line, "NAME TRAIN_PREFIX VALID_PREFIX TEST_PREFIX [HISTOGRAM]"
# (indexed datasets tokenized like the generic corpus; # starts a comment); array task i takes
# the i-th domain. HISTOGRAM, a histogram.json of the domain with the PN's clustering (e.g. of
# an earlier `pn-data assign`), replaces the assign step: pn-project gets it as --histogram.
# --strategy: most-frequent (default), best-loss (needs the assign step: no HISTOGRAM),
# histogram (the PN for the domain's cluster histogram) or cluster=I (pn-project).
# Defaults: --model-config configs/paper/slm.yaml (the expert's shape), --finetune-config
# configs/finetune/paper_1m.yaml. Outputs: DIR/NAME/{assign,expert,finetune,eval.json,hf}
# (no assign with a HISTOGRAM).
# Every stage is skipped when its output is complete, and fine-tuning saves and requeues on
# a stop signal like pretraining: a requeued task goes on where it stopped.
#
# example:
#   sbatch --array=0-8 slurm/specialize.sh --checkpoint runs/pn32/checkpoints \
#       --clusters data/generic/clusters_k32 --domains data/domains.txt --output runs/spec
#SBATCH --job-name=pn-specialize
#SBATCH --array=0-8
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

# sbatch runs a copy of this file from its spool directory: find the repository by name.
PN_REPO=${PN_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$PN_REPO/slurm/common.sh" || { echo "pn: submit from the repository or set PN_REPO" >&2; exit 1; }
pn_wants_help "$@" && { pn_usage "$0"; exit 0; }
pn_init

pn_ckpt="" clusters="" domains="" out="" strategy=most-frequent tokenizer=""
model_config=configs/paper/slm.yaml finetune_config=configs/finetune/paper_1m.yaml
while (( $# )); do
    case $1 in
        --checkpoint) pn_ckpt=$2 ;;
        --clusters) clusters=$2 ;;
        --domains) domains=$2 ;;
        --output) out=$2 ;;
        --strategy) strategy=$2 ;;
        --model-config) model_config=$2 ;;
        --finetune-config) finetune_config=$2 ;;
        --tokenizer) tokenizer=$2 ;;
        --) shift; break ;;
        *) pn_die "unknown option $1; see --help" ;;
    esac
    shift 2 || pn_die "option $1 needs a value"
done
overrides=("$@")
[[ -n $pn_ckpt && -n $clusters && -n $domains && -n $out ]] \
    || pn_die "give --checkpoint, --clusters, --domains and --output; see --help"
[[ -f $domains ]] || pn_die "--domains $domains: no such file"
task=${SLURM_ARRAY_TASK_ID:-0}
line=$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$domains" | sed -n "$((task + 1))p")
read -r name train valid test histogram extra <<< "$line"
[[ -n $test && -z $extra ]] || pn_die "$domains: line $((task + 1)) must be" \
    "'NAME TRAIN_PREFIX VALID_PREFIX TEST_PREFIX [HISTOGRAM]'"
dir=$out/$name
pn_log "domain $name (task $task): train $train, valid $valid, test $test -> $dir"

if [[ -n $histogram ]]; then
    [[ -f $histogram ]] || pn_die "$domains: line $((task + 1)): histogram $histogram: no such file"
    spec=(--histogram "$histogram")
else
    pn_stage "assign" "$dir/assign" \
        pn-data assign --data-prefix "$train" --clusters "$clusters" --output "$dir/assign"
    spec=(--spec-data "$dir/assign")
fi
# pn-project's checkpoint is complete once its `latest` marker exists; replace a partial one.
pn_stage "project ($strategy)" "$dir/expert/latest_checkpointed_iteration.txt" \
    pn-project --checkpoint "$pn_ckpt" "${spec[@]}" --strategy "$strategy" \
    --output "$dir/expert" --overwrite
if [[ ! -e $dir/finetune/finished ]]; then
    pn_train_job "$model_config" "$finetune_config" "checkpoint.load=$dir/expert" \
        "data.blend=[$train]" "data.valid_blend=[$valid]" \
        "checkpoint.dir=$dir/finetune/checkpoints" "logging.run_dir=$dir/finetune" \
        "${overrides[@]}" || pn_die "fine-tuning failed"
    touch "$dir/finetune/finished"  # early stopping ends before train.steps: mark it here
fi
pn_stage "eval" "$dir/eval.json" pn-eval --quiet --checkpoint "$dir/finetune/checkpoints" \
    --data "$test" --names "$name" --output "$dir/eval.json"
pn_stage "export-hf" "$dir/hf" pn-export-hf --checkpoint "$dir/finetune/checkpoints" \
    --output "$dir/hf" ${tokenizer:+--tokenizer "$tokenizer"}
pn_log "done: $dir/eval.json, Hugging Face model in $dir/hf"
