#!/bin/bash
# Tokenize a corpus into one Megatron indexed dataset with a job array: shard i of N runs
# `pn-data preprocess --shard i/N`, then a merge job (started only when every shard succeeded)
# runs `pn-data merge` into PREFIX.bin/.idx.
#
# usage: bash slurm/preprocess.sh SHARDS [pn-data preprocess options] --output-prefix PREFIX
#        bash slurm/preprocess.sh --help
#
# The sidecar PREFIX.json, written last, marks a finished shard or merge (a rerun skips it).
# Run it on a login node: it submits the array and the dependent merge job (both with
# sbatch; SBATCH_PARTITION / SBATCH_ACCOUNT and PN_SBATCH_ARGS apply to both) and prints
# their ids. Shard i writes PREFIX-shard-IIII-of-NNNN.*; the shards are kept after the merge
# (delete them once PREFIX is checked). pn-data preprocess resumes a killed shard, so the
# shard jobs are requeueable. Shards are byte ranges of the inputs cut at JSONL lines, Parquet
# row groups or whole compressed files: give many .gz/.zst files (or plain JSONL / Parquet) to
# spread the work; a single .gz file all lands in one shard.
#
# example:
#   bash slurm/preprocess.sh 64 --input data/raw/c4 --tokenizer-model data/tokenizer.model \
#       --output-prefix data/generic/generic_text_document
#SBATCH --job-name=pn-preprocess
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append

# sbatch runs a copy of this file from its spool directory: find the repository by name.
PN_REPO=${PN_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$PN_REPO/slurm/common.sh" || { echo "pn: submit from the repository or set PN_REPO" >&2; exit 1; }
pn_wants_help "$@" && { pn_usage "$0"; exit 0; }

stage=submit
if [[ ${1:-} == --stage ]]; then stage=$2; shift 2; fi
shards=${1:-}
[[ $shards =~ ^[1-9][0-9]*$ ]] || pn_die "the first argument is the number of shards; see --help"
shift
args=("$@")
prefix=""
for i in "${!args[@]}"; do
    [[ ${args[i]} == --output-prefix ]] && prefix=${args[i + 1]:-}
    [[ ${args[i]} == --output-prefix=* ]] && prefix=${args[i]#--output-prefix=}
done
[[ -n $prefix ]] || pn_die "give --output-prefix PREFIX"

shard_prefix() { printf '%s-shard-%04d-of-%04d' "$prefix" "$1" "$shards"; }

# pn-data preprocess's options with --output-prefix replaced by shard $1's
shard_args() {
    local out=() skip=0 a
    for a in "${args[@]}"; do
        (( skip )) && { skip=0; continue; }
        case $a in
            --output-prefix) skip=1 ;;
            --output-prefix=*) ;;
            *) out+=("$a") ;;
        esac
    done
    printf '%s\0' "${out[@]}" --output-prefix "$(shard_prefix "$1")"
}

case $stage in
submit)
    # shellcheck disable=SC2206  # a list of sbatch options on purpose
    extra=($PN_SBATCH_ARGS)
    array=$(sbatch --parsable --array=0-$((shards - 1)) --output=%x-%A_%a.out "${extra[@]}" \
        "$0" --stage shard "$shards" "${args[@]}") || pn_die "sbatch of the shard array failed"
    merge=$(sbatch --parsable --dependency=afterok:"${array%%;*}" --job-name=pn-preprocess-merge \
        --output=%x-%j.out "${extra[@]}" "$0" --stage merge "$shards" "${args[@]}") \
        || pn_die "sbatch of the merge job failed"
    echo "submitted shard array $array ($shards tasks) and merge job $merge -> $prefix"
    ;;
shard)
    pn_init
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || pn_die "--stage shard runs as an array task"
    mapfile -d '' cmd < <(shard_args "$SLURM_ARRAY_TASK_ID")
    pn_stage "preprocess shard $SLURM_ARRAY_TASK_ID/$shards" "$(shard_prefix "$SLURM_ARRAY_TASK_ID").json" \
        pn-data preprocess --shard "$SLURM_ARRAY_TASK_ID/$shards" --quiet "${cmd[@]}"
    ;;
merge)
    pn_init
    inputs=()
    for ((i = 0; i < shards; i++)); do inputs+=("$(shard_prefix "$i")"); done
    # The sidecar PREFIX.json is written last: without it, a killed merge's outputs are replaced.
    pn_stage "merge" "$prefix.json" \
        pn-data merge --inputs "${inputs[@]}" --output-prefix "$prefix" --overwrite
    pn_log "merged $shards shards into $prefix; the shards can go: rm $prefix-shard-*"
    ;;
*) pn_die "unknown --stage $stage" ;;
esac
