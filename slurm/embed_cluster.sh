#!/bin/bash
# Embed the generic corpus (Sentence-BERT, one GPU) and cluster it with k-means for each k:
# pn-data embed -> DIR/embeddings, then pn-data cluster -> DIR/clusters_kK per k.
#
# usage: sbatch [sbatch options] slurm/embed_cluster.sh --data-prefix PREFIX \
#            --tokenizer-model MODEL --output DIR --k K[,K...] [--context N]
#        bash slurm/embed_cluster.sh --help
#
# The paper's k: 1024 for importance sampling (SLM-is), 32 for SLM-pn, 16 for SLM-mix. Each
# stage's output appears only when complete and `pn-data embed` resumes a killed run, so the
# job is requeueable: a requeued job skips finished stages. Extra options for the tools:
# PN_EMBED_ARGS, PN_CLUSTER_ARGS (e.g. "--batch-size 256", "--sample 2000000").
#
# example:
#   sbatch slurm/embed_cluster.sh --data-prefix data/generic/generic_text_document \
#       --tokenizer-model data/tokenizer.model --output data/generic --k 16,32,1024
#SBATCH --job-name=pn-embed-cluster
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a copy of this file from its spool directory: find the repository by name.
PN_REPO=${PN_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$PN_REPO/slurm/common.sh" || { echo "pn: submit from the repository or set PN_REPO" >&2; exit 1; }
pn_wants_help "$@" && { pn_usage "$0"; exit 0; }
pn_init

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

# shellcheck disable=SC2086  # PN_*_ARGS are lists of words on purpose
pn_stage "embed" "$out/embeddings" pn-data embed --data-prefix "$prefix" \
    --tokenizer-model "$tokenizer" --output "$out/embeddings" --context "$context" $PN_EMBED_ARGS
IFS=, read -ra k_list <<< "$ks"
for k in "${k_list[@]}"; do
    # shellcheck disable=SC2086
    pn_stage "cluster k=$k" "$out/clusters_k$k" pn-data cluster --embeddings "$out/embeddings" \
        --k "$k" --output "$out/clusters_k$k" $PN_CLUSTER_ARGS
done
pn_log "done: $out/clusters_k{$ks}/generic_blend.json"
