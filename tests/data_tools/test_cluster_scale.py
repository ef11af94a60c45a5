"""Per-cluster datasets and histograms written in blocks (data_tools.per_cluster) give the same
bytes and counts as the straightforward one-window-at-a-time writer they replace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_tools import per_cluster
from data_tools.indexed import DatasetWriter
from data_tools.windows import IndexedTokens, split_windows, window_token_counts

EOD = 1


def random_corpus(root: Path, docs: int = 300, seed: int = 0) -> IndexedTokens:
    """Documents of 0-200 random tokens, most ending with EOD (as preprocess writes them)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 200, size=docs)
    pieces = []
    for length in lengths:
        doc = rng.integers(2, 3000, size=length).astype(np.uint16)
        if length and rng.random() < 0.9:
            doc[-1] = EOD
        pieces.append(doc)
    with DatasetWriter(str(root / "corpus"), np.uint16) as writer:
        writer.add_documents(np.concatenate(pieces), lengths)
    return IndexedTokens(root / "corpus")


def reference_cluster_datasets(data, windows, assignments, k, out_dir: Path) -> list[int]:
    """One window at a time through megatron-core's builder: the writer before blocks."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokens = []
    for c in range(k):
        prefix = str(out_dir / per_cluster.cluster_prefix_name(c))
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=data.dtype.type)
        total = 0
        for row in np.flatnonzero(assignments == c):
            window = np.append(data.window(*windows[row]), np.uint16(EOD))
            builder.add_item(torch.from_numpy(window))
            builder.end_document()
            total += len(window)
        builder.finalize(prefix + ".idx")
        tokens.append(total)
    return tokens


@pytest.mark.parametrize("k,block_tokens", [(7, 300), (7, 1), (1, 10_000), (40, 977)])
def test_block_writer_is_byte_identical_to_the_reference(tmp_path, monkeypatch, k, block_tokens):
    data = random_corpus(tmp_path)
    windows = split_windows(data.content_lengths(EOD), 37)
    rng = np.random.default_rng(k)
    assignments = rng.integers(0, k, size=len(windows)).astype(np.int32)
    if k > 2:
        assignments[assignments == 2] = 0  # an empty cluster must still get an (empty) dataset
    (tmp_path / "new").mkdir()
    (tmp_path / "ref").mkdir()
    monkeypatch.setattr(per_cluster, "BLOCK_TOKENS", block_tokens)
    monkeypatch.setattr(per_cluster, "SCAN_ROWS", 53)  # blocks also cross scan boundaries

    got = per_cluster.write_cluster_datasets(data, windows, assignments, k, EOD, tmp_path / "new")
    want = reference_cluster_datasets(data, windows, assignments, k, tmp_path / "ref")

    assert got.tolist() == want
    for c in range(k):
        name = per_cluster.cluster_prefix_name(c)
        for suffix in (".bin", ".idx"):
            assert (tmp_path / "new" / (name + suffix)).read_bytes() == \
                (tmp_path / "ref" / (name + suffix)).read_bytes(), (name, suffix)
    assert not list((tmp_path / "new").glob("*.tmp"))


def test_histogram_in_blocks_counts_windows_and_tokens(tmp_path, monkeypatch):
    data = random_corpus(tmp_path, seed=3)
    windows = split_windows(data.content_lengths(EOD), 50)
    assignments = np.random.default_rng(1).integers(0, 5, size=len(windows)).astype(np.int32)
    monkeypatch.setattr(per_cluster, "SCAN_ROWS", 17)
    hist = per_cluster.histogram(windows, assignments, 6)
    assert hist["windows"] == np.bincount(assignments, minlength=6).tolist()
    expected = [int((window_token_counts(windows)[assignments == c] + 1).sum()) for c in range(6)]
    assert hist["tokens"] == expected and hist["windows"][5] == 0
    assert hist["num_tokens"] == sum(expected)


def test_too_low_open_file_limit_is_a_clear_error(monkeypatch, tmp_path):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 300))
    data = random_corpus(tmp_path, docs=5)
    windows = split_windows(data.content_lengths(EOD), 37)
    with pytest.raises(ValueError, match="ulimit -n"):
        per_cluster.write_cluster_datasets(data, windows, np.zeros(len(windows), np.int32), 1024,
                                           EOD, tmp_path)


def test_mapped_index_equals_megatron_cores_reader(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = random_corpus(tmp_path, seed=5)
    reference = IndexedDataset(str(tmp_path / "corpus"))
    assert np.array_equal(data.lengths, reference.sequence_lengths)
    docs = np.arange(len(data))
    assert np.array_equal(data.offsets[docs] * 2, reference.index.sequence_pointers)
    for doc in (0, 7, len(data) - 1):
        assert np.array_equal(data.window(doc, 0, data.lengths[doc]), reference[doc])
