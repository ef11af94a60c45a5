"""`pn-data cluster` (k-means on window embeddings) and `pn-data assign` (nearest centroid).

`cluster` output directory:
  centroids.npy        float32 (k, dim); unit-norm rows for --metric cosine
  params.json          k, metric, seed, niter, sample, embedding model, tokenizer sha256, source
                       prefix, centroids_sha256 (identifies this clustering), ...
  windows.npy          int64 (n, 3) window index (doc, start, end), copied from the embeddings
  assignments.npy      int32 (n,): cluster id of window i — the sidecar the trainer reads
  histogram.json       per-cluster "windows" and "tokens" (window tokens + 1 EOD per window)
  cluster_CCCC.bin/.idx one Megatron indexed dataset per cluster: each window's tokens + EOD as
                       one document (empty clusters give an empty dataset, so prefix i = cluster i)
  clusters.json        manifest: k, prefixes, windows, tokens (same counts as histogram.json)...
  generic_blend.json   blend of all non-empty clusters by their token counts (the generic
                       distribution), with the cluster id of each entry

Paths in the JSON files are recorded as given on the command line (relative to the working
directory of the run, as the trainer's config paths are); "names" in clusters.json are the
prefixes relative to the cluster directory, for tools that get the directory elsewhere.
With megatron-core's BlendedDataset over these prefixes the dataset_id of a sample is the index
of its blend entry; `cluster_ids` maps it back to the cluster id.

`assign` output directory: assignments.npy, windows.npy, histogram.json (same keys), and with
--write-datasets the per-cluster datasets and clusters.json as above.

Scale. k-means trains on a sample (256*k windows by default), whatever the corpus size. The
assignment reads the embeddings ASSIGN_BATCH rows at a time and writes assignments.npy in place;
the histogram and the cluster datasets are written in blocks (data_tools.per_cluster, whose
docstring states the memory bound). `assign` embeds and assigns chunk by chunk, keeping no
embedding matrix. Measured rates: benchmarks/RESULTS.md ("Data steps at scale").
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from data_tools.embed import (
    add_model_options,
    chunks_longest_first,
    encode_rows,
    eod_id_of,
    load_embeddings,
    load_sbert,
    resolve_device,
    windows_of,
)
from data_tools.per_cluster import (
    TOKENS_NOTE,
    cluster_prefix_name,
    histogram,
    write_cluster_datasets,
)
from data_tools.tokenizer import load_sentencepiece
from data_tools.windows import (
    IndexedTokens,
    check_tokenizer_matches,
    check_windows_fit,
)
from pn_base.fileio import atomic_path, atomic_write_json, check_writable, file_sha256
from pn_base.outputs import HISTOGRAM

ASSIGN_BATCH = 65536  # rows converted to float32 at a time when assigning


# ---------------------------------------------------------------- k-means and assignment


def as_float32(rows: np.ndarray, metric: str) -> np.ndarray:
    """float32 copy; unit-normalized for cosine (spherical k-means, inner product search)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if metric == "cosine":
        import faiss

        faiss.normalize_L2(x)
    return x


def sample_rows(num_rows: int, sample: int, seed: int) -> np.ndarray:
    """Sorted row ids of a uniform sample without replacement (sorted: sequential memmap reads)."""
    if sample >= num_rows:
        return np.arange(num_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, size=sample, replace=False))


def train_kmeans(x: np.ndarray, k: int, metric: str, seed: int, niter: int, gpu: bool):
    """faiss k-means on the (already normalized for cosine) sample; returns (centroids, obj)."""
    import faiss

    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=(metric == "cosine"), gpu=gpu,
        verbose=True,
        max_points_per_centroid=max(1, -(-len(x) // k)),  # we sampled already: use all of it
        min_points_per_centroid=1,
    )
    kmeans.train(x)
    return kmeans.centroids.copy(), float(kmeans.obj[-1]) if len(kmeans.obj) else float("nan")


def centroid_index(centroids: np.ndarray, metric: str):
    """faiss exact search over the centroids (inner product for cosine, else L2)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1]) if metric == "cosine" else \
        faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest(index, rows: np.ndarray, metric: str) -> np.ndarray:
    """int32 id of the nearest centroid of each row."""
    _, ids = index.search(as_float32(rows, metric), 1)
    return ids[:, 0].astype(np.int32)


def nearest_centroid(embeddings, centroids: np.ndarray, metric: str, out=None) -> np.ndarray:
    """int32 cluster id of every row, ASSIGN_BATCH rows at a time (into `out` if given, e.g.
    a memory-mapped .npy: then memory does not grow with the number of rows)."""
    from tqdm import tqdm

    index = centroid_index(centroids, metric)
    out = np.empty(len(embeddings), dtype=np.int32) if out is None else out
    with tqdm(total=len(embeddings), unit="win", desc="assign") as progress:
        for i in range(0, len(embeddings), ASSIGN_BATCH):
            x = embeddings[i : i + ASSIGN_BATCH]
            out[i : i + len(x)] = nearest(index, x, metric)
            progress.update(len(x))
    return out


def check_gpu_faiss() -> None:
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise ValueError("--gpu needs faiss built with GPU support and a visible GPU; this "
                         "faiss has none (faiss-cpu): drop --gpu")


# ---------------------------------------------------------------- per-cluster outputs


def manifest(k, hist, dataset_tokens, params, prefix_root) -> dict:
    names = [cluster_prefix_name(c) for c in range(k)]
    return {
        "k": k,
        "prefixes": [str(Path(prefix_root) / name) for name in names],
        "names": names,
        "windows": hist["windows"],
        "tokens": dataset_tokens.astype(int).tolist(),
        "tokens_note": TOKENS_NOTE,
        "centroids": "centroids.npy",
        "assignments": "assignments.npy",
        "centroids_sha256": params["centroids_sha256"],
        "tokenizer_sha256": params["tokenizer_sha256"],
        "embedding_model": params["embedding_model"],
        "metric": params["metric"],
        "source_prefix": params["source_prefix"],
        "eod_id": params["eod_id"],
    }


def generic_blend(manifest_: dict) -> dict:
    """Blend of every non-empty cluster weighted by its tokens: the generic distribution."""
    ids = [c for c in range(manifest_["k"]) if manifest_["windows"][c] > 0]
    total = sum(manifest_["tokens"][c] for c in ids)
    return {
        "blend": [[manifest_["tokens"][c] / total, manifest_["prefixes"][c]] for c in ids],
        "cluster_ids": ids,
        "target_tokens": total,
    }


def write_per_cluster(out_dir: Path, data, windows, assignments, params, prefix_root) -> list:
    """histogram.json, cluster datasets, clusters.json and generic_blend.json in out_dir, whose
    final name (it may be a temporary directory now) is prefix_root; returns windows per
    cluster."""
    k = params["k"]
    hist = histogram(windows, assignments, k)
    hist.update(centroids_sha256=params["centroids_sha256"], source_prefix=params["source_prefix"])
    atomic_write_json(out_dir / HISTOGRAM, hist)
    from tqdm import tqdm

    with tqdm(total=len(assignments), unit="win", desc="cluster datasets") as progress:
        dataset_tokens = write_cluster_datasets(data, windows, assignments, k,
                                                params["eod_id"], out_dir, progress)
    manifest_ = manifest(k, hist, dataset_tokens, params, prefix_root)
    atomic_write_json(out_dir / "clusters.json", manifest_)
    atomic_write_json(out_dir / "generic_blend.json", generic_blend(manifest_))
    return hist["windows"]


def load_clustering(directory: str | Path):
    """(params, centroids) of a `cluster` output directory."""
    directory = Path(directory)
    params_path = directory / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} not found: --clusters must be a directory "
                                f"written by `pn-data cluster`")
    params = json.loads(params_path.read_text())
    centroids = np.load(directory / "centroids.npy")
    return params, centroids


# ---------------------------------------------------------------- cluster command


def checked_sample_size(args, num: int) -> int:
    """The k-means sample size, checked against k and the windows there are."""
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    if args.k > num:
        raise ValueError(f"--k {args.k} exceeds the {num} windows in {args.embeddings}; use a "
                         f"smaller k or embed more data")
    sample = min(num, args.sample if args.sample else 256 * args.k)
    if sample < args.k:
        raise ValueError(f"--sample {sample} is smaller than --k {args.k}; k-means needs at "
                         f"least one point per centroid: pass --sample of at least {args.k} "
                         f"(default 256*k)")
    return sample


def load_checked_embeddings(args):
    """(meta, embeddings, windows, data) of --embeddings, checked against the dataset."""
    meta, embeddings, windows = load_embeddings(args.embeddings)
    if meta.get("num_windows_total", meta["num_windows"]) != meta["num_windows"]:
        raise ValueError(f"{Path(args.embeddings) / 'meta.json'} is shard {meta['shard']} of "
                         f"a sharded embedding: join the shards first with `pn-data "
                         f"merge-embeddings` and cluster the merged directory")
    data = IndexedTokens(meta["data_prefix"])
    check_tokenizer_matches(meta["data_prefix"], meta["tokenizer_sha256"],
                            f"{Path(args.embeddings) / 'meta.json'}")
    check_windows_fit(windows, data, Path(args.embeddings) / meta["windows_file"])
    return meta, embeddings, windows, data


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (c4's window index is 4 GB per clustering;
    the tools replace files, never rewrite them in place), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def run_cluster(args) -> int:
    check_writable(args.output, args.overwrite)
    if args.gpu:
        check_gpu_faiss()
    meta, embeddings, windows, data = load_checked_embeddings(args)
    num = len(windows)
    sample = checked_sample_size(args, num)

    start = time.time()
    x = as_float32(embeddings[sample_rows(num, sample, args.seed)], args.metric)
    print(f"k-means: {len(x)} x {x.shape[1]} sample, k={args.k}, {args.metric}, "
          f"{args.niter} iterations")
    centroids, objective = train_kmeans(x, args.k, args.metric, args.seed, args.niter, args.gpu)
    del x
    print(f"k-means done in {time.time() - start:.1f}s")

    params = {
        "k": args.k, "metric": args.metric, "seed": args.seed, "niter": args.niter,
        "sample": sample, "objective": objective, "dim": int(centroids.shape[1]),
        "embedding_model": meta["model_name"], "embedding_model_path": meta["model"],
        "tokenizer_model": meta["tokenizer_model"], "tokenizer_sha256": meta["tokenizer_sha256"],
        "source_prefix": meta["data_prefix"], "embeddings": str(args.embeddings),
        "context": meta["context"], "eod_id": meta["eod_id"], "num_windows": num,
    }
    with atomic_path(args.output, args.overwrite) as tmp:
        tmp.mkdir()
        np.save(tmp / "centroids.npy", centroids)
        params["centroids_sha256"] = file_sha256(tmp / "centroids.npy")
        atomic_write_json(tmp / "params.json", params)
        link_or_copy(Path(args.embeddings) / meta["windows_file"], tmp / "windows.npy")
        # written in place, batch by batch: memory stays flat however many windows there are
        assignments = np.lib.format.open_memmap(tmp / "assignments.npy", mode="w+",
                                                dtype=np.int32, shape=(num,))
        nearest_centroid(embeddings, centroids, args.metric, out=assignments)
        assignments.flush()
        sizes = write_per_cluster(tmp, data, windows, assignments, params, args.output)
        del assignments
    print(f"wrote {args.k} clusters to {args.output} (windows per cluster: min {min(sizes)}, "
          f"max {max(sizes)}, empty {sizes.count(0)})")
    return 0


# ---------------------------------------------------------------- assign command


def tokenizer_for_assign(args, params) -> tuple[str, str]:
    """The tokenizer model to detokenize with, checked against the clustering's."""
    model = args.tokenizer_model or params["tokenizer_model"]
    if not Path(model).is_file():
        raise FileNotFoundError(f"tokenizer model {model} (recorded in {args.clusters}/params."
                                f"json) not found: pass --tokenizer-model")
    sha = file_sha256(model)
    if sha != params["tokenizer_sha256"]:
        raise ValueError(f"tokenizer mismatch: {model} (sha256 {sha[:12]}…) is not the tokenizer "
                         f"of the clustering in {args.clusters} ({params['tokenizer_sha256'][:12]}"
                         f"…). Use the tokenizer the generic corpus was preprocessed with.")
    check_tokenizer_matches(args.data_prefix, sha, f"{args.clusters}/params.json")
    return model, sha


def embed_and_assign(data, windows, sp, model, batch_size, centroids, metric) -> np.ndarray:
    """Cluster id of every window, each batch assigned as soon as it is embedded: no
    embedding matrix is kept, so a large corpus costs 4 bytes per window here."""
    from tqdm import tqdm

    index = centroid_index(centroids, metric)
    out = np.empty(len(windows), dtype=np.int32)

    def assign(rows, vectors):
        out[rows] = nearest(index, vectors, metric)

    with tqdm(total=len(windows), unit="win", desc="embed+assign", smoothing=0.1) as progress:
        for rows in chunks_longest_first(windows):
            encode_rows(rows, windows, data, sp, model, batch_size, assign, progress)
    return out


def run_assign(args) -> int:
    check_writable(args.output, args.overwrite)
    params, centroids = load_clustering(args.clusters)
    tokenizer_model, _ = tokenizer_for_assign(args, params)
    sp = load_sentencepiece(tokenizer_model)
    data = IndexedTokens(args.data_prefix)
    windows = windows_of(data, eod_id_of(sp), params["context"])
    if len(windows) == 0:
        raise ValueError(f"{args.data_prefix}.idx holds no documents with tokens: a "
                         f"specialization set needs at least one; check the preprocess step")
    model_path = args.model or params["embedding_model_path"]
    model = load_sbert(model_path, resolve_device(args.device))
    if model.get_embedding_dimension() != centroids.shape[1]:
        raise ValueError(f"--model {model_path} gives {model.get_embedding_dimension()}-d "
                         f"embeddings but {args.clusters}/centroids.npy is "
                         f"{centroids.shape[1]}-d; use the clustering's embedding model")
    assignments = embed_and_assign(data, windows, sp, model, args.batch_size, centroids,
                                   params["metric"])

    hist = histogram(windows, assignments, params["k"])
    hist.update(centroids_sha256=params["centroids_sha256"], source_prefix=str(args.data_prefix),
                clusters_dir=str(args.clusters), tokenizer_sha256=params["tokenizer_sha256"],
                embedding_model=params["embedding_model"], num_docs=len(data))
    with atomic_path(args.output, args.overwrite) as tmp:
        tmp.mkdir()
        np.save(tmp / "windows.npy", windows)
        np.save(tmp / "assignments.npy", assignments)
        if args.write_datasets:
            write_per_cluster(tmp, data, windows, assignments,
                              dict(params, source_prefix=str(args.data_prefix)), args.output)
        atomic_write_json(tmp / HISTOGRAM, hist)
    top = int(np.argmax(hist["tokens"]))
    print(f"assigned {len(windows)} windows to {params['k']} clusters; most frequent cluster "
          f"{top} holds {hist['tokens'][top] / max(hist['num_tokens'], 1):.3f} of the tokens")
    return 0


def register(subparsers) -> None:
    cluster = subparsers.add_parser(
        "cluster",
        help="k-means on window embeddings; per-cluster Megatron datasets",
        description="Train faiss k-means on a sample of the embeddings from `pn-data embed`, "
        "assign every window to its nearest centroid (assignments.npy, int32, aligned with "
        "windows.npy) and write one indexed dataset per cluster (cluster_CCCC.bin/.idx) with "
        "a clusters.json manifest, so training can blend any subset of clusters.",
    )
    cluster.add_argument("--embeddings", required=True, help="directory from `pn-data embed`")
    cluster.add_argument("--k", type=int, required=True, help="number of clusters (paper: 1024 "
                         "for importance sampling, 16-64 for PN and the mixture)")
    cluster.add_argument("--output", required=True, help="output directory")
    cluster.add_argument("--sample", type=int, default=0, help="windows to train k-means on, "
                         "drawn uniformly with --seed (default: min(all, 256*k))")
    cluster.add_argument("--seed", type=int, default=1234, help="seed of the sample and of "
                         "k-means initialization; same seed, same clusters (default: 1234)")
    cluster.add_argument("--metric", choices=["cosine", "l2"], default="cosine",
                         help="cosine (default): L2-normalize and spherical k-means; l2: plain")
    cluster.add_argument("--niter", type=int, default=25, help="k-means iterations (default: 25)")
    cluster.add_argument("--gpu", action="store_true", help="train on GPU (needs faiss-gpu)")
    cluster.add_argument("--overwrite", action="store_true", help="replace an existing output")
    cluster.set_defaults(func=run_cluster)

    assign = subparsers.add_parser(
        "assign",
        help="assign a new corpus (a specialization set) to existing clusters",
        description="Window and embed a corpus the same way as the clustered one, assign each "
        "window to its nearest centroid and write assignments.npy, windows.npy and "
        "histogram.json (per-cluster windows and tokens). The corpus must be preprocessed with "
        "the clustering's tokenizer (checked by sha256).",
    )
    assign.add_argument("--data-prefix", required=True, help="indexed dataset prefix of the "
                        "corpus to assign")
    assign.add_argument("--clusters", required=True, help="directory from `pn-data cluster`")
    assign.add_argument("--output", required=True, help="output directory")
    assign.add_argument("--tokenizer-model", default=None, help="SentencePiece .model (default: "
                        "the one recorded by the clustering; must have the same sha256)")
    assign.add_argument("--write-datasets", action="store_true", help="also write one indexed "
                        "dataset per cluster and clusters.json, as `cluster` does")
    add_model_options(assign, "the model the clustering was embedded with; another one must "
                      "give the same embeddings")
    assign.add_argument("--overwrite", action="store_true", help="replace an existing output")
    assign.set_defaults(func=run_assign)
