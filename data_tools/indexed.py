"""Megatron indexed datasets (PREFIX.bin + PREFIX.idx), written with megatron-core's
`IndexedDatasetBuilder` so that megatron-core's `IndexedDataset` (and every Megatron-LM tool)
reads them. One document is one sequence, as in Megatron-LM's tools/preprocess_data.py without
--split-sentences: `sequence_lengths[i]` is the length of document i (its EOD included) and
`document_indices` is 0, 1, ..., N.

megatron-core is imported lazily: importing it costs seconds (it pulls in torch), which the
`pn-data --help` path and the tokenizer workers should not pay.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import struct
import warnings
from pathlib import Path

import numpy as np

from megatron_pn.fileio import atomic_path

_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # the .idx header, then version (u64) and dtype code (u8)


def megatron_indexed_dataset():
    """The megatron-core module, imported without its "Apex/TE not installed" warnings."""
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
    dtype = megatron_indexed_dataset().DType.dtype_from_code(code)
    return dtype, sequences, document_indices - 1


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


def write_index(idx_path: str | Path, dtype: type[np.number], lengths: np.ndarray) -> None:
    """PREFIX.idx of a text dataset whose documents are one sequence each (document_indices
    0..n), written by megatron-core's own index writer (a test pins the bytes against
    `IndexedDatasetBuilder`)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    with _numpy_index_writer()(str(idx_path), dtype) as writer:
        writer.write(lengths, None, np.arange(len(lengths) + 1, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _numpy_index_writer():
    """megatron-core's `_IndexWriter` with its per-sequence Python loop over the pointers
    replaced by a cumulative sum: ~1 µs per sequence, minutes for 100M windows, otherwise."""

    class NumpyPointersIndexWriter(megatron_indexed_dataset()._IndexWriter):
        def _sequence_pointers(self, sequence_lengths):
            itemsize = np.dtype(self.dtype).itemsize
            pointers = np.zeros(len(sequence_lengths), dtype=np.int64)
            np.cumsum(np.asarray(sequence_lengths[:-1], dtype=np.int64) * itemsize,
                      out=pointers[1:])
            return pointers

    return NumpyPointersIndexWriter


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
        builder_class = megatron_indexed_dataset().IndexedDatasetBuilder
        self._builder = builder_class(str(self._tmp_bin), dtype=self.dtype)
        return self

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each.

        One write per call into the builder's own data file and lists, instead of
        `IndexedDatasetBuilder.add_document` per document: that costs ~6 µs per document in the
        (serial) main process, its largest cost on short documents. The bytes are the same
        (test_preprocess pins it against add_document for the supported megatron-core).
        """
        builder = self._builder
        if builder.multimodal or len(tokens) != int(lengths.sum()):
            raise ValueError("add_documents: flat tokens must match the lengths (text only)")
        builder.data_file.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        first = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths.tolist())
        builder.document_indices.extend(range(first + 1, first + len(lengths) + 1))
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def add_dataset(self, prefix: str) -> None:
        """Append every document of the indexed dataset at `prefix`."""
        dtype, _, documents = read_index_header(prefix)
        if dtype != self.dtype:
            raise ValueError(f"{prefix}.idx holds {dtype.__name__} tokens, expected {self.dtype.__name__}")
        self._builder.add_index(prefix)
        self.documents += documents

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._builder.finalize(str(self._tmp_idx))
        else:
            self._builder.data_file.close()
        return self._stack.__exit__(exc_type, exc, tb)


def concat_datasets(prefixes: list[str], output_prefix: str, overwrite: bool) -> tuple[int, int]:
    """Concatenate indexed datasets in order into `output_prefix`; returns (documents, bytes)."""
    if not prefixes:
        raise ValueError("nothing to concatenate")
    dtype = read_index_header(prefixes[0])[0]
    # megatron-core's add_index runs gc.collect() per dataset, which walks every object of this
    # process (torch's included: ~0.3 s each); freezing them first makes it nearly free.
    gc.freeze()
    try:
        with DatasetWriter(output_prefix, dtype, overwrite) as writer:
            for prefix in prefixes:
                writer.add_dataset(prefix)
    finally:
        gc.unfreeze()
    return writer.documents, Path(output_prefix + ".bin").stat().st_size
