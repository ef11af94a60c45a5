"""Context windows over a Megatron indexed dataset, shared by `embed`, `cluster` and `assign`.

A "document" is one sequence of the indexed dataset (what `IndexedDataset[i]` returns and what
megatron-core's GPTDataset treats as a document); `preprocess` writes one per input document,
with the EOD token appended. Documents longer than the LM context are split into
non-overlapping windows of at most `context` tokens, EOD excluded, so that every generic example
the LM trains on has one cluster id. The window index is an int64 array of shape (n, 3) with
columns (doc, start, end): token offsets [start, end) inside document `doc`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.indexed import map_index
from pn_base.tokenizer_identity import Fingerprint, dataset_fingerprint, require_same

WINDOW_COLUMNS = ["doc", "start", "end"]
DEFAULT_CONTEXT = 1024
CHECK_ROWS = 1 << 20  # window rows checked at a time


class IndexedTokens:
    """Read-only view of an indexed dataset: per-document lengths and a flat token memmap.

    Maps the .idx arrays (megatron-core's layout; a test pins them against its reader) and the
    .bin file once, so that gathering millions of windows needs no per-document Python call
    into IndexedDataset and no per-document copy.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: --data-prefix must name a Megatron indexed dataset "
                    f"(PREFIX.bin + PREFIX.idx, as written by `pn-data preprocess`)"
                )
        dtype, self.lengths, byte_pointers = map_index(self.prefix)  # memory-mapped, int32
        self.dtype = np.dtype(dtype)
        self.offsets = _TokenOffsets(byte_pointers, self.dtype.itemsize)
        self.tokens = _map_tokens(bin_path, self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the .bin file, read (a copy), not mapped: passes over a
        whole corpus then hold one block at a time, not the file's pages."""
        return np.fromfile(self.prefix + ".bin", dtype=self.dtype, count=stop - start,
                           offset=start * self.dtype.itemsize)

    def window(self, doc: int, start: int, end: int) -> np.ndarray:
        base = self.offsets[doc]
        return self.tokens[base + start : base + end]

    def content_lengths(self, eod_id: int) -> np.ndarray:
        """Tokens per document without its trailing EOD (if the document ends with one)."""
        lengths = self.lengths.astype(np.int64)
        nonempty = lengths > 0
        last = self.tokens[self.offsets[nonempty] + lengths[nonempty] - 1]
        lengths[np.flatnonzero(nonempty)[last == eod_id]] -= 1
        return lengths


class _TokenOffsets:
    """offsets[docs]: token offset of documents in the .bin, from the index's byte pointers."""

    def __init__(self, byte_pointers: np.ndarray, itemsize: int):
        self.byte_pointers, self.itemsize = byte_pointers, itemsize

    def __getitem__(self, docs):
        return self.byte_pointers[docs] // self.itemsize


def _map_tokens(bin_path: Path, dtype: np.dtype) -> np.ndarray:
    if bin_path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_path, dtype=dtype, mode="r")


def split_windows(doc_lengths: np.ndarray, context: int) -> np.ndarray:
    """Non-overlapping windows of at most `context` tokens covering each document exactly.

    A document of n > 0 tokens gives ceil(n / context) windows; empty documents give none.
    Returns int64 (num_windows, 3): doc, start, end — ordered by document, then start.
    """
    if context < 1:
        raise ValueError(f"--context must be a positive number of tokens, got {context}")
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    counts = -(-doc_lengths // context)  # ceil division; 0 for empty documents
    docs = np.repeat(np.arange(len(doc_lengths), dtype=np.int64), counts)
    first_window = np.cumsum(counts) - counts
    rank_in_doc = np.arange(len(docs), dtype=np.int64) - np.repeat(first_window, counts)
    starts = rank_in_doc * context
    ends = np.minimum(starts + context, doc_lengths[docs])
    return np.stack([docs, starts, ends], axis=1)


def window_token_counts(windows: np.ndarray) -> np.ndarray:
    return windows[:, 2] - windows[:, 1]


def check_windows_fit(windows: np.ndarray, data: IndexedTokens, windows_path: str | Path) -> None:
    """The window index must describe this dataset (it is a sidecar: same docs, same lengths).
    Checked in blocks: `windows` may be a memory-mapped corpus-sized index."""
    for start in range(0, len(windows), CHECK_ROWS):
        block = np.asarray(windows[start : start + CHECK_ROWS])
        if block[:, 0].max() >= len(data) or np.any(block[:, 2] > data.lengths[block[:, 0]]):
            raise ValueError(
                f"{windows_path} does not match {data.prefix}.idx ({len(data)} documents): a "
                f"window points past the end of a document. The dataset changed after "
                f"embedding; rerun `pn-data embed` on it (with --overwrite)."
            )


def check_tokenizer_matches(prefix: str | Path, expected_sha256: str, expected_from: str) -> None:
    """Fail if PREFIX.json says the dataset was tokenized with another tokenizer than the one
    `expected_from` (a .model, or a file recording one) names: the comparison every command
    makes (pn_base/tokenizer_identity.py)."""
    kind = "tokenizer" if str(expected_from).endswith(".model") else "data"
    require_same(dataset_fingerprint(prefix), Fingerprint(expected_sha256, str(expected_from),
                                                          kind=kind),
                 allow=False, override=None,
                 fix="preprocess the data with the SentencePiece model that the clustering used "
                     "(or pass that model)")
