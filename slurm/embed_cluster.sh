#!/bin/bash
# Embed the generic corpus with Sentence-BERT on GPUS GPUs (a job array, one task per GPU:
# `pn-data embed --shard i/GPUS`), then, in a job started only when every shard succeeded,
# join the shards (`pn-data merge-embeddings` -> DIR/embeddings) and run k-means for each k
# (`pn-data cluster` -> DIR/clusters_kK).
#
# usage: bash slurm/embed_cluster.sh GPUS --data-prefix PREFIX --tokenizer-model MODEL \
#            --output DIR --k K[,K...] [--context N]
#        bash slurm/embed_cluster.sh --help
#
# Run it on a login node: it submits the array and the dependent merge+cluster job (sbatch;
# SBATCH_PARTITION / SBATCH_ACCOUNT and PN_SBATCH_ARGS apply to both) and prints their ids.
# Each array task asks for one GPU (PN_GPU_GRES, default gpu:1) and PN_SHARD_CPUS CPUs
# (default 8), so SLURM packs several tasks on one multi-GPU node. Shard i writes
# DIR/embeddings.shards/IIII; the shards are kept after the merge (delete them once
# DIR/embeddings is checked). The paper's k: 1024 for importance sampling (SLM-is), 32 for
# SLM-pn, 16 for SLM-mix. Every stage's output appears only when complete and `pn-data embed`
# resumes a killed shard, so the jobs are requeueable: a rerun skips finished stages. Extra
# options for the tools: PN_EMBED_ARGS, PN_CLUSTER_ARGS (e.g. "--batch-size 256",
# "--sample 2000000"). Windows are embedded longest first (batches of similar length) and in
# fp16 on a GPU.
#
# example (64 GPUs, e.g. 8 nodes of 8):
#   bash slurm/embed_cluster.sh 64 --data-prefix data/generic/generic_text_document \
#       --tokenizer-model data/tokenizer.model --output data/generic --k 16,32,1024
#SBATCH --job-name=pn-embed-cluster
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append

# sbatch runs a copy of this file from its spool directory: find the repository by name.
PN_REPO=${PN_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$PN_REPO/slurm/common.sh" || { echo "pn: submit from the repository or set PN_REPO" >&2; exit 1; }
pn_wants_help "$@" && { pn_usage "$0"; exit 0; }

stage=submit
if [[ ${1:-} == --stage ]]; then stage=$2; shift 2; fi
shards=${1:-}
[[ $shards =~ ^[1-9][0-9]*$ ]] || pn_die "the first argument is the number of GPUs (shards); see --help"
shift
args=("$@")

prefix="" tokenizer="" out="" ks="" context=1024
while (( $# )); do
    case $1 in
        --data-prefix) prefix=$2 ;;
        --tokenizer-model) tokenizer=$2 ;;
        --output) out=$2 ;;
        --k) ks=$2 ;;
        --context) context=$2 ;;
        *) pn_die "unknown option $1; see --help" ;;
    esac
    shift 2 || pn_die "option $1 needs a value"
done
[[ -n $prefix && -n $tokenizer && -n $out && -n $ks ]] \
    || pn_die "give --data-prefix, --tokenizer-model, --output and --k; see --help"

shard_dir() { printf '%s/embeddings.shards/%04d' "$out" "$1"; }

case $stage in
submit)
    # shellcheck disable=SC2206  # a list of sbatch options on purpose
    extra=($PN_SBATCH_ARGS)
    array=$(sbatch --parsable --array=0-$((shards - 1)) --job-name=pn-embed \
        --gres="${PN_GPU_GRES:-gpu:1}" --cpus-per-task="${PN_SHARD_CPUS:-8}" \
        --output=%x-%A_%a.out "${extra[@]}" "$0" --stage shard "$shards" "${args[@]}") \
        || pn_die "sbatch of the embedding array failed"
    cluster=$(sbatch --parsable --dependency=afterok:"${array%%;*}" --job-name=pn-cluster \
        --output=%x-%j.out "${extra[@]}" "$0" --stage cluster "$shards" "${args[@]}") \
        || pn_die "sbatch of the merge+cluster job failed"
    echo "submitted embedding array $array ($shards GPU tasks) and merge+cluster job $cluster -> $out"
    ;;
shard)
    pn_init
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || pn_die "--stage shard runs as an array task"
    i=$SLURM_ARRAY_TASK_ID
    # shellcheck disable=SC2086  # PN_EMBED_ARGS is a list of words on purpose
    pn_stage "embed shard $i/$shards" "$(shard_dir "$i")" pn-data embed --shard "$i/$shards" \
        --data-prefix "$prefix" --tokenizer-model "$tokenizer" --output "$(shard_dir "$i")" \
        --context "$context" $PN_EMBED_ARGS
    ;;
cluster)
    pn_init
    inputs=()
    for ((i = 0; i < shards; i++)); do inputs+=("$(shard_dir "$i")"); done
    pn_stage "merge $shards shards" "$out/embeddings" pn-data merge-embeddings \
        --inputs "${inputs[@]}" --output "$out/embeddings"
    IFS=, read -ra k_list <<< "$ks"
    for k in "${k_list[@]}"; do
        # shellcheck disable=SC2086
        pn_stage "cluster k=$k" "$out/clusters_k$k" pn-data cluster --embeddings "$out/embeddings" \
            --k "$k" --output "$out/clusters_k$k" $PN_CLUSTER_ARGS
    done
    pn_log "done: $out/clusters_k{$ks}/generic_blend.json; the shards can go: rm -r $out/embeddings.shards"
    ;;
*) pn_die "unknown --stage $stage" ;;
esac
