"""Windows/s and peak memory of the data steps after embedding, at corpus scale, on synthetic
windows: nearest-centroid assignment, histogram + per-cluster indexed datasets (for each k),
and the importance-resampled blend's sample index.

Synthetic input (built first, not timed): documents of 1-8 windows of --window-tokens random
uint16 tokens (the last window of a document partial), EOD-terminated, written as a Megatron
indexed dataset; one random --dim float16 embedding per window (noise around 64 random
directions), written as `pn-data embed` writes embeddings.f16. Every step then runs the
project's own code (data_tools.cluster / data_tools.per_cluster / data_tools.importance and
megatron-core's blending index), each in a fresh Python process so that its peak RSS
(VmHWM: resident pages, memory-mapped file pages included) is its own:

  assign k     nearest_centroid over all embeddings (read by pread) into assignments.npy;
               centroids are k random embeddings (k-means training runs on a fixed sample of
               256*k windows whatever the corpus size: benchmarked in embed_cluster_throughput)
  write k      histogram + write_cluster_datasets: one cluster_CCCC.bin/.idx per cluster
  resample     importance weights of a concentrated specialization histogram against the
               largest k, then megatron-core's build_blending_indices for a resampled set of
               as many sequences as windows (what BlendedDataset does when training starts)

    python benchmarks/data_scale.py --windows 20000000 --workdir /tmp/data_scale \\
        [--append benchmarks/RESULTS.md]
    python benchmarks/data_scale.py --windows 5000 --dim 16 --ks 4,8   # seconds: a smoke run

The work directory needs about (2.2 * window tokens + 2 * dim + 40) bytes per window (20M
windows of 64 tokens, 384-d: ~19 GB); it is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SECTION = "## Data steps at scale (synthetic windows)"
EOD = 1
VOCAB = 32000
WRITE_DOCS = 1 << 20  # documents generated per write (bounds the set-up's memory)
INPUT_FILE = "input.json"  # what build_input made, for --reuse-input


# -------------------------------------------------------------------------- synthetic input


def document_lengths(windows: int, window_tokens: int, rng) -> np.ndarray:
    """Content lengths (EOD excluded) of documents of 1-8 windows, `windows` windows in all."""
    per_doc = rng.integers(1, 9, size=windows // 4 + 8)
    per_doc = per_doc[: np.searchsorted(np.cumsum(per_doc), windows) + 1]
    per_doc[-1] -= per_doc.sum() - windows
    per_doc = per_doc[per_doc > 0]
    last = rng.integers(1, window_tokens + 1, size=len(per_doc))
    return (per_doc - 1) * window_tokens + last


def write_corpus(prefix: Path, lengths: np.ndarray, rng) -> None:
    from data_tools.indexed import write_index

    with open(f"{prefix}.bin", "wb") as f:
        for start in range(0, len(lengths), WRITE_DOCS):
            part = lengths[start : start + WRITE_DOCS] + 1
            tokens = rng.integers(EOD + 1, VOCAB, size=int(part.sum()), dtype=np.uint16)
            tokens[np.cumsum(part) - 1] = EOD
            f.write(tokens.tobytes())
    write_index(f"{prefix}.idx", np.uint16, lengths + 1)


def write_embeddings(directory: Path, prefix: Path, windows: np.ndarray, dim: int, rng) -> None:
    """embeddings.f16 + windows.npy + meta.json, as `pn-data embed` writes them."""
    from data_tools.embed import EMBEDDINGS_FILE, META_FILE, WINDOWS_FILE
    from pn_base.fileio import atomic_write_json

    directory.mkdir(parents=True)
    centers = rng.standard_normal((64, dim), dtype=np.float32)
    rows = 1 << 18
    with open(directory / EMBEDDINGS_FILE, "wb") as f:
        for start in range(0, len(windows), rows):
            count = min(rows, len(windows) - start)
            x = rng.standard_normal((count, dim), dtype=np.float32)
            x += centers[rng.integers(0, len(centers), size=count)]
            f.write(x.astype(np.float16).tobytes())
    np.save(directory / WINDOWS_FILE, windows)
    atomic_write_json(directory / META_FILE, {
        "shape": [len(windows), dim], "dtype": "float16", "embeddings_file": EMBEDDINGS_FILE,
        "windows_file": WINDOWS_FILE, "data_prefix": str(prefix), "eod_id": EOD,
        "model_name": "synthetic", "context": int(windows[:, 2].max()),
        "tokenizer_sha256": "synthetic",
    })


def build_input(args) -> dict:
    from data_tools.windows import split_windows

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    lengths = document_lengths(args.windows, args.window_tokens, rng)
    prefix = args.workdir / "corpus"
    write_corpus(prefix, lengths, rng)
    windows = split_windows(lengths, args.window_tokens)
    write_embeddings(args.workdir / "embeddings", prefix, windows, args.dim, rng)
    built = {"documents": len(lengths), "windows": len(windows),
             "tokens": int(lengths.sum() + len(lengths)), "seconds": time.perf_counter() - start}
    (args.workdir / INPUT_FILE).write_text(json.dumps(built))
    return built


def reuse_input(args) -> dict:
    """The input a --keep run left in --workdir (it must be of --windows windows)."""
    built = json.loads((args.workdir / INPUT_FILE).read_text())
    if built["windows"] != args.windows:
        raise SystemExit(f"{args.workdir} holds {built['windows']} windows, not {args.windows}")
    return built


# -------------------------------------------------------------------------- steps


def step_assign(args) -> None:
    from data_tools.cluster import nearest_centroid
    from data_tools.embed import load_embeddings

    _, embeddings, _ = load_embeddings(args.workdir / "embeddings")
    rng = np.random.default_rng(args.k)
    centroids = embeddings[np.sort(rng.choice(len(embeddings), args.k, replace=False))]
    centroids = centroids.astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    out_dir = args.workdir / f"k{args.k}"
    out_dir.mkdir(exist_ok=True)
    assignments = np.lib.format.open_memmap(out_dir / "assignments.npy", mode="w+",
                                            dtype=np.int32, shape=(len(embeddings),))
    nearest_centroid(embeddings, centroids, "cosine", out=assignments)
    assignments.flush()


def step_write(args) -> None:
    from tqdm import tqdm

    from data_tools.embed import load_embeddings
    from data_tools.per_cluster import histogram, write_cluster_datasets
    from data_tools.windows import IndexedTokens
    from pn_base.fileio import atomic_write_json
    from pn_base.outputs import HISTOGRAM

    meta, _, windows = load_embeddings(args.workdir / "embeddings")
    out_dir = args.workdir / f"k{args.k}"
    assignments = np.load(out_dir / "assignments.npy", mmap_mode="r")
    atomic_write_json(out_dir / HISTOGRAM, histogram(windows, assignments, args.k))
    data = IndexedTokens(meta["data_prefix"])
    with tqdm(total=len(windows), unit="win", desc=f"cluster datasets k={args.k}") as progress:
        write_cluster_datasets(data, windows, assignments, args.k, EOD, out_dir, progress)


def step_resample(args) -> None:
    """Importance weights against the generic histogram of k, then the blending index."""
    from data_tools.importance import importance_weights
    from data_tools.indexed import megatron_indexed_dataset
    from pn_base.outputs import HISTOGRAM

    megatron_indexed_dataset()  # megatron-core's import, as the trainer pays it, before helpers
    from megatron.core.datasets import helpers

    generic = json.loads((args.workdir / f"k{args.k}" / HISTOGRAM).read_text())
    generic_tokens = np.asarray(generic["tokens"], dtype=np.float64)
    spec = np.random.default_rng(0).dirichlet(np.full(args.k, 0.05)) * 1e6  # concentrated
    share = importance_weights(generic_tokens, spec)["target_share"]
    weights = share[share > 0]
    size = generic["num_windows"]
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, sample_index, weights, len(weights), size,
                                   False)
    drawn = np.bincount(dataset_index, minlength=len(weights)) / size
    assert np.abs(drawn - weights / weights.sum()).max() < 1e-3


STEPS = {"assign": step_assign, "write": step_write, "resample": step_resample}


def run_step(args, step: str, k: int) -> dict:
    """One step in a fresh process (its own peak RSS), or here with --in-process."""
    if args.in_process:
        result = timed(STEPS[step], argparse.Namespace(**{**vars(args), "k": k}))
    else:
        command = [sys.executable, __file__, "--step", step, "--k", str(k),
                   "--workdir", str(args.workdir)]
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    return {"step": step, "k": k, "seconds": result["seconds"],
            "cpu_seconds": result["cpu_seconds"],
            "windows_per_s": args.windows / result["seconds"],
            "windows_per_cpu_s": args.windows / result["cpu_seconds"],
            "peak_rss_gib": result["peak_rss"] / 2**30}


def timed(function, args) -> dict:
    """Wall and CPU seconds (user + system, this process's threads) of function(args), and
    the peak RSS after it. CPU time does not depend on what else shares the machine."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    function(args)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu_start,
            "peak_rss": peak_rss_bytes()}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's over exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child_main(args) -> None:
    print(json.dumps(timed(STEPS[args.step], args)))


# -------------------------------------------------------------------------- report


def markdown(args, built: dict, results: list[dict], load: tuple[float, float]) -> str:
    total = sum(r["seconds"] for r in results)
    peak = max(r["peak_rss_gib"] for r in results)
    lines = [
        SECTION, "",
        f"`python benchmarks/data_scale.py --windows {args.windows} --window-tokens "
        f"{args.window_tokens} --dim {args.dim} --ks {','.join(map(str, args.ks))}`; "
        f"{args.device_label}; date {args.date}; Python {platform.python_version()}. "
        f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (a shared machine: "
        f"above 2, other jobs held part of the cores). Input: {built['windows']:,} windows, "
        f"{built['documents']:,} documents, {built['tokens']:,} tokens (EOD included), "
        f"{args.dim}-d float16 embeddings; built in {built['seconds']:.0f} s (not counted).",
        "",
        "| step | k | wall s | windows/s | CPU s | windows/CPU-s | peak RSS (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['step']} | {r['k']} | {r['seconds']:.1f} | {r['windows_per_s']:,.0f} | "
              f"{r['cpu_seconds']:.1f} | {r['windows_per_cpu_s']:,.0f} | "
              f"{r['peak_rss_gib']:.2f} |" for r in results]
    cpu = sum(r["cpu_seconds"] for r in results)
    lines += ["", f"All steps: {total / 60:.1f} min wall, {cpu / 60:.1f} CPU-min (on 2 idle "
              f"cores the wall time would lie between {cpu / 120:.1f} and {cpu / 60:.1f} min: "
              f"assignment uses both cores, the writers one), peak RSS {peak:.2f} GiB (goal "
              f"for 20M windows on 2 cores: <= 15 min, <= 4 GiB).", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20_000_000)
    parser.add_argument("--window-tokens", type=int, default=64)
    parser.add_argument("--dim", type=int, default=384, help="embedding size (all-MiniLM: 384)")
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")], default=[32, 1024])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pn_data_scale"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--reuse-input", action="store_true", help="reuse the input a --keep "
                        "run left in --workdir instead of building it")
    parser.add_argument("--in-process", action="store_true", help="run the steps in this "
                        "process (fast start; peak RSS is then cumulative)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--append", type=Path, help="Markdown file to add the section to")
    parser.add_argument("--device-label", default="2-core CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.step:
        return child_main(args)
    if args.workdir.exists() != args.reuse_input:
        raise SystemExit(f"{args.workdir} exists; remove it or pass another --workdir" if
                         args.workdir.exists() else f"{args.workdir} does not exist to reuse")
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        load_before = os.getloadavg()[0]
        built = reuse_input(args) if args.reuse_input else build_input(args)
        print(f"built input: {built}", flush=True)
        results = []
        for k in args.ks:
            for step in ("assign", "write"):
                results.append(run_step(args, step, k))
                print(results[-1], flush=True)
        results.append(run_step(args, "resample", max(args.ks)))
        print(results[-1], flush=True)
        text = markdown(args, built, results, (load_before, os.getloadavg()[0]))
        print(text)
        if args.json:
            args.json.write_text(json.dumps({"input": built, "steps": results}, indent=2))
        if args.append:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from embed_cluster_throughput import append_section

            append_section(args.append, text, SECTION)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
