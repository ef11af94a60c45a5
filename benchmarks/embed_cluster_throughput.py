"""Throughput of the clustering step: Sentence-BERT windows/s and faiss k-means seconds.

1. Embedding: real text (Debian licences) tokenized with a small SentencePiece model, cut into
   --context-token windows, detokenized and embedded with all-MiniLM-L6-v2 exactly as
   `pn-data embed` does (data_tools.embed.encode_rows), on the current device.
2. k-means: faiss spherical k-means (as `pn-data cluster --metric cosine`) of --points random
   normal float32 vectors of --dim dimensions into --k clusters for --niter iterations, then the
   nearest-centroid assignment of all points. Time per iteration is reported, so a full run
   (25 iterations, the `cluster` default) can be extrapolated.

Usage: python benchmarks/embed_cluster_throughput.py [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SECTION = "## Embedding and clustering throughput"


def licence_text() -> str:
    paths = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())
    return "\n\n".join(p.read_text(errors="replace") for p in paths)


def embedding_windows(context: int, count: int, workdir: Path):
    """`count` windows of `context` tokens of real text, and the SentencePiece model."""
    import sentencepiece as spm

    text = licence_text()
    (workdir / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(workdir / "corpus.txt"),
                                   model_prefix=str(workdir / "tok"), vocab_size=2000,
                                   num_threads=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "tok.model"))
    tokens = np.array(sp.encode(text), dtype=np.int64)
    while len(tokens) < context * count:
        tokens = np.concatenate([tokens, tokens])
    return sp, tokens[: context * count].reshape(count, context)


class Windows:
    """The minimal IndexedTokens interface encode_rows needs: one window per row."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def window(self, doc, start, end):
        return self.rows[doc, start:end]


def bench_embedding(args) -> dict:
    from tqdm import tqdm

    from data_tools.embed import default_model_path, encode_rows, load_sbert, resolve_device

    device = resolve_device(args.device)
    model = load_sbert(default_model_path(), device)
    with tempfile.TemporaryDirectory() as tmp:
        sp, rows = embedding_windows(args.context, args.windows, Path(tmp))
    index = np.stack([np.arange(len(rows)), np.zeros(len(rows), dtype=np.int64),
                      np.full(len(rows), args.context)], axis=1)
    out = np.zeros((len(rows), model.get_embedding_dimension()), dtype=np.float16)

    def write(batch, vectors):
        out[batch] = vectors

    warm = np.arange(min(args.batch_size, len(rows)))
    encode_rows(warm, index, Windows(rows), sp, model, args.batch_size, write, tqdm(disable=True))
    start = time.perf_counter()
    with tqdm(total=len(rows), unit="win", desc="embed") as progress:
        encode_rows(np.arange(len(rows)), index, Windows(rows), sp, model, args.batch_size,
                    write, progress)
    seconds = time.perf_counter() - start
    return {"device": device, "windows": len(rows), "seconds": seconds,
            "windows_per_s": len(rows) / seconds}


def bench_kmeans(args) -> dict:
    import faiss

    from data_tools.cluster import nearest_centroid, train_kmeans

    x = np.random.default_rng(0).standard_normal((args.points, args.dim), dtype=np.float32)
    faiss.normalize_L2(x)
    start = time.perf_counter()
    centroids, _ = train_kmeans(x, args.k, "cosine", seed=1, niter=args.niter, gpu=False)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    nearest_centroid(x, centroids, "cosine")
    assign_s = time.perf_counter() - start
    return {"points": args.points, "dim": args.dim, "k": args.k, "niter": args.niter,
            "train_s": train_s, "per_iter_s": train_s / args.niter, "assign_s": assign_s,
            "threads": faiss.omp_get_max_threads()}


def markdown(emb: dict, km: dict, args, load: tuple[float, float]) -> str:
    full = km["per_iter_s"] * 25 + km["assign_s"]
    sampled = km["per_iter_s"] * 25 * 256 * km["k"] / km["points"] + km["assign_s"]
    return "\n".join([
        SECTION,
        "",
        f"Device: {args.device_label}; date {args.date}; `python "
        f"benchmarks/embed_cluster_throughput.py` (Python {platform.python_version()}). "
        f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (a shared machine: "
        f"above 2 means other jobs took part of the 2 cores, so these are lower bounds).",
        "",
        "| step | setting | result |",
        "|---|---|---|",
        f"| Sentence-BERT embedding (all-MiniLM-L6-v2, {emb['device']}, fp32) | "
        f"{emb['windows']} windows of {args.context} LM tokens (SBERT reads ≤ 256 word "
        f"pieces), batch {args.batch_size} | {emb['windows_per_s']:.1f} windows/s |",
        f"| faiss spherical k-means, train | {km['points']:,} × {km['dim']} float32 random "
        f"normal, k = {km['k']}, {km['niter']} iterations, {km['threads']} threads | "
        f"{km['train_s']:.1f} s ({km['per_iter_s']:.1f} s/iteration) |",
        f"| faiss nearest-centroid assignment | {km['points']:,} points, k = {km['k']} | "
        f"{km['assign_s']:.1f} s |",
        "",
        f"Extrapolated `pn-data cluster --k {km['k']}` on {km['points']:,} windows, 25 "
        f"iterations (the default) plus assignment: about {full / 60:.0f} min training on all "
        f"points, about {sampled / 60:.0f} min with the default training sample of 256·k = "
        f"{256 * km['k']:,} windows. Embedding 1M windows at the measured rate: about "
        f"{1e6 / emb['windows_per_s'] / 3600:.0f} h on this device (a GPU is the place for "
        f"that step).",
        "",
    ])


def append_section(path: Path, text: str, section: str = SECTION) -> None:
    """Add (or replace) a benchmark's section, leaving the other sections as they are."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start = old.find(section)
    if start >= 0:
        end = old.find("\n## ", start + len(section))
        old = old[:start] + (old[end + 1 :] if end >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=256, help="windows to embed")
    parser.add_argument("--context", type=int, default=1024, help="LM tokens per window")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--niter", type=int, default=3, help="k-means iterations (the time "
                        "scales linearly; reported per iteration)")
    parser.add_argument("--device-label", default="2-core CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--append", type=Path, default=None, help="Markdown file to add the "
                        "results section to (e.g. benchmarks/RESULTS.md)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    emb = bench_embedding(args)
    print(emb)
    km = bench_kmeans(args)
    print(km)
    text = markdown(emb, km, args, (load_before, os.getloadavg()[0]))
    print(text)
    if args.append:
        append_section(args.append, text)


if __name__ == "__main__":
    main()
