"""Megatron indexed datasets (PREFIX.bin + PREFIX.idx) in megatron-core's format, so that
megatron-core's `IndexedDataset` (and every Megatron-LM tool) reads them. One document is one
sequence, as in Megatron-LM's tools/preprocess_data.py without --split-sentences:
`sequence_lengths[i]` is the length of document i (its EOD included) and `document_indices` is
0, 1, ..., N.

The format is small (a header, then the sequence lengths, their byte offsets and the document
indices as flat arrays) and written here with NumPy: the data steps (`pn-data preprocess`,
`merge`, `cluster`, `assign`, `stats`) do not import megatron-core, which costs seconds of CPU
(torch, torch.compile's inductor, wandb). Tests pin the bytes against megatron-core's
`IndexedDatasetBuilder` and the dtype codes against its `DType` for the supported version.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np

from pn_base.fileio import atomic_path

_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # the .idx header, then version (u64) and dtype code (u8)
_INDEX_VERSION = 1
# megatron-core's indexed_dataset.DType: the code of each token dtype in the .idx header
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}


def megatron_indexed_dataset():
    """The megatron-core module (for readers and tests), imported without its "Apex/TE not
    installed" warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type[np.number]:
    """Token dtype chosen like Megatron (`DType.optimal_dtype`): uint16 below 65500 ids, else
    int32. Kept here so workers need not import megatron-core (a test pins the equality)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def read_index_header(prefix: str) -> tuple[type[np.number], int, int]:
    """(token dtype, sequence count, document count) from PREFIX.idx, without loading it all.
    The header is the magic, version (u64), dtype code (u8), sequence and document-index
    counts (u64 each); the document-index count is documents + 1."""
    path = Path(prefix + ".idx")
    size = INDEX_HEADER_BYTES
    with open(path, "rb") as f:
        header = f.read(size)
    if len(header) < size or not header.startswith(_INDEX_MAGIC):
        raise ValueError(f"{path} is not a Megatron indexed dataset index")
    code, sequences, document_indices = struct.unpack("<BQQ", header[len(_INDEX_MAGIC) + 8 :])
    if code not in DTYPE_CODES:
        raise ValueError(f"{path}: unknown token dtype code {code}")
    return DTYPE_CODES[code], sequences, document_indices - 1


INDEX_HEADER_BYTES = len(_INDEX_MAGIC) + 8 + 1 + 8 + 8


def map_index(prefix: str) -> tuple[type[np.number], np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths (int32), sequence byte pointers (int64)) of PREFIX.idx,
    memory-mapped in megatron-core's layout (header, lengths, pointers, document indices): c4's
    365M documents cost no copy. The arrays keep their mapping alive."""
    dtype, sequences, _ = read_index_header(prefix)
    if sequences == 0:
        return dtype, np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    path = prefix + ".idx"
    lengths = np.memmap(path, dtype=np.int32, mode="r", offset=INDEX_HEADER_BYTES,
                        shape=(sequences,))
    pointers = np.memmap(path, dtype=np.int64, mode="r", offset=INDEX_HEADER_BYTES + 4 * sequences,
                         shape=(sequences,))
    return dtype, lengths, pointers


def write_index(idx_path: str | Path, dtype: type[np.number], lengths: np.ndarray,
                document_indices: np.ndarray | None = None) -> None:
    """PREFIX.idx of a text dataset: header, sequence lengths (int32), their byte offsets in
    the .bin (int64, a cumulative sum) and the document indices (int64; default 0..n, one
    document per sequence), as megatron-core's `_IndexWriter` writes them."""
    lengths = np.asarray(lengths, dtype=np.int32)
    if document_indices is None:
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    code = {np.dtype(v): k for k, v in DTYPE_CODES.items()}[np.dtype(dtype)]
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(_INDEX_MAGIC + struct.pack("<QB", _INDEX_VERSION, code))
        f.write(struct.pack("<QQ", len(lengths), len(document_indices)))
        for array in (lengths, pointers, np.asarray(document_indices, dtype=np.int64)):
            f.write(array.tobytes(order="C"))


def document_indices(prefix: str) -> np.ndarray:
    """The document indices of PREFIX.idx (after the lengths and pointers), memory-mapped."""
    _, sequences, documents = read_index_header(prefix)
    return np.memmap(prefix + ".idx", dtype=np.int64, mode="r",
                     offset=INDEX_HEADER_BYTES + 12 * sequences, shape=(documents + 1,))


def dataset_paths(prefix: str) -> tuple[Path, Path]:
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class DatasetWriter:
    """Writes one indexed dataset atomically: PREFIX.bin/.idx appear only when the `with`
    block ends without an exception (temp files beside them are renamed into place)."""

    def __init__(self, prefix: str, dtype: type[np.number], overwrite: bool = False):
        self.prefix = prefix
        self.dtype = dtype
        self.overwrite = overwrite
        self.documents = 0
        self.tokens = 0

    def __enter__(self) -> "DatasetWriter":
        bin_path, idx_path = dataset_paths(self.prefix)
        self._stack = contextlib.ExitStack()
        self._tmp_bin = self._stack.enter_context(atomic_path(bin_path, self.overwrite))
        self._tmp_idx = self._stack.enter_context(atomic_path(idx_path, self.overwrite))
        self._data = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self._document_ends: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._sequences = 0
        return self

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each (one
        sequence per document), in one write."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(tokens) != int(lengths.sum()):
            raise ValueError("add_documents: flat tokens must match the lengths (text only)")
        self._data.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self._lengths.append(lengths.astype(np.int32))
        self._document_ends.append(self._sequences + 1 + np.arange(len(lengths), dtype=np.int64))
        self._sequences += len(lengths)
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def add_dataset(self, prefix: str) -> None:
        """Append every document of the indexed dataset at `prefix` (as megatron-core's
        `IndexedDatasetBuilder.add_index`: its sequences, then its document boundaries)."""
        dtype, lengths, _ = map_index(prefix)
        if dtype != self.dtype:
            raise ValueError(f"{prefix}.idx holds {dtype.__name__} tokens, expected {self.dtype.__name__}")
        ends = np.asarray(document_indices(prefix)[1:]) + self._sequences
        self._lengths.append(np.array(lengths, dtype=np.int32))
        self._document_ends.append(ends)
        self._sequences += len(lengths)
        self.documents += len(ends)
        self.tokens += int(np.asarray(lengths, dtype=np.int64).sum())
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._data)

    def __exit__(self, exc_type, exc, tb):
        self._data.close()
        if exc_type is None:
            write_index(self._tmp_idx, self.dtype,
                        np.concatenate([np.zeros(0, dtype=np.int32), *self._lengths]),
                        np.concatenate(self._document_ends))
        return self._stack.__exit__(exc_type, exc, tb)


def concat_datasets(prefixes: list[str], output_prefix: str, overwrite: bool) -> tuple[int, int]:
    """Concatenate indexed datasets in order into `output_prefix`; returns (documents, bytes)."""
    if not prefixes:
        raise ValueError("nothing to concatenate")
    dtype = read_index_header(prefixes[0])[0]
    with DatasetWriter(output_prefix, dtype, overwrite) as writer:
        for prefix in prefixes:
            writer.add_dataset(prefix)
    return writer.documents, Path(output_prefix + ".bin").stat().st_size
