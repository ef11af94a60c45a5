"""Per-cluster outputs at corpus scale: the cluster histogram and one Megatron indexed dataset
per cluster (each window's tokens + EOD as one document, windows in corpus order), written in
blocks of consecutive windows so that time is a few numpy passes per token and memory does
not grow with the corpus.

Memory bound (what one process holds, whatever the corpus size and k):
  - one block of at most BLOCK_TOKENS tokens: the contiguous token span it covers (2-4 bytes
    per token), the int64 gather index (8) and the gathered tokens (2-4): ~20 bytes per token,
    about 320 MiB at the default 16M tokens;
  - the window index and the assignments are read block by block from their .npy files;
  - per-cluster sequence lengths are appended to temporary files beside the datasets, so the
    only per-cluster array in memory is the one whose .idx is being written (20 bytes per
    window of that cluster).
Each block is gathered in cluster order (stable) and appended to the k open .bin files, so the
bytes equal writing the clusters one by one with `IndexedDatasetBuilder` (a test pins it). The
writer keeps 2k files open and raises the soft open-file limit when it must.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path
from typing import Iterator

import numpy as np

from data_tools.indexed import write_index
from data_tools.windows import IndexedTokens, window_token_counts

BLOCK_TOKENS = 1 << 24  # window tokens gathered at a time (the memory bound above)
SCAN_ROWS = 1 << 20  # window rows read at a time when only counting
TOKENS_NOTE = "training tokens: each window's tokens plus its EOD, as in the cluster datasets"


def cluster_prefix_name(cluster: int) -> str:
    return f"cluster_{cluster:04d}"


def row_ranges(num_rows: int, step: int = SCAN_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


def histogram(windows: np.ndarray, assignments: np.ndarray, k: int) -> dict:
    """Per-cluster window and token counts, read in blocks (arrays may be memory-mapped).

    Tokens count one EOD per window, so that they equal what each cluster dataset holds and
    what the LM trains on: histograms, blend weights and repeat factors share one unit.
    """
    counts = np.zeros(k, dtype=np.int64)
    tokens = np.zeros(k, dtype=np.int64)
    for start, stop in row_ranges(len(assignments)):
        ids = np.asarray(assignments[start:stop])
        counts += np.bincount(ids, minlength=k)
        tokens += np.bincount(ids, weights=window_token_counts(np.asarray(windows[start:stop])) + 1,
                              minlength=k).astype(np.int64)
    return {
        "k": k,
        "windows": counts.tolist(),
        "tokens": tokens.tolist(),
        "num_windows": int(counts.sum()),
        "num_tokens": int(tokens.sum()),
        "tokens_note": TOKENS_NOTE,
    }


def token_blocks(windows: np.ndarray, block_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges of at most `block_tokens` tokens (+1 EOD per window; at least
    one row each)."""
    for scan_start, scan_stop in row_ranges(len(windows)):
        ends = np.cumsum(window_token_counts(np.asarray(windows[scan_start:scan_stop])) + 1)
        start = 0
        while start < len(ends):
            before = ends[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, before + block_tokens, side="right")))
            yield scan_start + start, scan_start + stop
            start = stop


def gather_with_eod(data: IndexedTokens, windows: np.ndarray, eod_id: int):
    """(tokens, lengths): the windows' tokens, each followed by EOD, in the order given.

    Reads the one contiguous token span the windows cover (consecutive windows of the corpus
    cover a span of about their own size) and gathers from it with one index array.
    """
    counts = window_token_counts(windows)
    lengths = counts + 1
    starts = data.offsets[windows[:, 0]] + windows[:, 1]
    low = int(starts.min())
    high = min(int((starts + counts).max()) + 1, data.num_tokens)
    span = data.read(low, high)
    out_starts = np.cumsum(lengths) - lengths
    index = np.repeat(starts - low - out_starts, lengths)
    index += np.arange(len(index), dtype=np.int64)
    np.minimum(index, len(span) - 1, out=index)  # the EOD slot past the span's end, if any
    tokens = span[index]
    tokens[out_starts + counts] = eod_id
    return tokens, lengths


@contextlib.contextmanager
def open_files_limit(needed: int):
    """Raise the soft limit on open files to `needed` (+ margin) for the block, if it must."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise ValueError(f"writing the cluster datasets keeps {needed} files open but the "
                             f"open-file limit is {hard}: raise it (`ulimit -n {want}`)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def write_cluster_datasets(data: IndexedTokens, windows, assignments, k, eod_id, out_dir,
                           progress=None) -> np.ndarray:
    """cluster_CCCC.bin/.idx in out_dir for c < k (empty clusters: empty datasets); returns
    the tokens of each (EOD included). See the module docstring for the memory bound."""
    out_dir = Path(out_dir)
    prefixes = [str(out_dir / cluster_prefix_name(c)) for c in range(k)]
    dataset_tokens = np.zeros(k, dtype=np.int64)
    with open_files_limit(2 * k), contextlib.ExitStack() as stack:
        bins = [stack.enter_context(open(p + ".bin", "wb")) for p in prefixes]
        lens = [stack.enter_context(open(p + ".lengths.tmp", "wb")) for p in prefixes]
        for start, stop in token_blocks(windows, BLOCK_TOKENS):
            ids = np.asarray(assignments[start:stop])
            order = np.argsort(ids, kind="stable")
            tokens, lengths = gather_with_eod(data, np.asarray(windows[start:stop])[order],
                                              eod_id)
            bounds = np.searchsorted(ids[order], np.arange(k + 1))
            token_bounds = np.concatenate([[0], np.cumsum(lengths)])[bounds]
            for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
                bins[c].write(tokens[token_bounds[c] : token_bounds[c + 1]].tobytes())
                lens[c].write(lengths[bounds[c] : bounds[c + 1]].astype(np.int32).tobytes())
            dataset_tokens += np.diff(token_bounds)
            if progress is not None:
                progress.update(stop - start)
    for prefix in prefixes:
        lengths_file = Path(prefix + ".lengths.tmp")
        write_index(prefix + ".idx", data.dtype.type, np.fromfile(lengths_file, dtype=np.int32))
        os.unlink(lengths_file)
    return dataset_tokens
