"""Checks of the embedded multi-domain corpus (data/corpus, built by
data/build_corpus.py): integrity, format, no generic/domain leakage, size."""

import gzip
import hashlib
import json
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus"
SPLITS = ("train", "valid", "test")
MAX_COMPRESSED_BYTES = 25 * 10**6
MIN_GENERIC_TOKENS = 5_000_000


@pytest.fixture(scope="module")
def manifest():
    return json.loads((CORPUS / "manifest.json").read_text())


@pytest.fixture(scope="module")
def corpus(manifest):
    """{set name: {split: [record, ...]}} for every file of the manifest."""
    sets = {}
    for rel in manifest["files"]:
        name, split = rel.split("/")[0], rel.split("/")[1].split(".")[0]
        with gzip.open(CORPUS / rel, "rt", encoding="utf-8") as f:
            sets.setdefault(name, {})[split] = [json.loads(line) for line in f]
    return sets


def test_manifest_matches_files(manifest):
    on_disk = {p.relative_to(CORPUS).as_posix() for p in CORPUS.glob("*/*.jsonl.gz")}
    assert on_disk == set(manifest["files"])
    for rel, info in manifest["files"].items():
        data = (CORPUS / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], rel
        assert len(data) == info["bytes"], rel


def test_generic_and_four_domains_with_all_splits(corpus):
    assert "generic" in corpus
    assert len(corpus) - 1 >= 4
    for name, splits in corpus.items():
        assert set(splits) == set(SPLITS), name


def test_records_are_well_formed(corpus, manifest):
    for name, splits in corpus.items():
        for split, records in splits.items():
            assert records, (name, split)
            assert len(records) == manifest["files"][f"{name}/{split}.jsonl.gz"]["docs"]
            for rec in records:
                assert set(rec) == {"id", "text", "source"}
                assert isinstance(rec["text"], str) and rec["text"].strip(), rec["id"]
                # Cleaned whitespace: no blank line at either end, no trailing
                # spaces, at most one blank line in a row.
                assert rec["text"].strip("\n") == rec["text"], rec["id"]
                assert " \n" not in rec["text"] + "\n", rec["id"]
                assert "\n\n\n" not in rec["text"], rec["id"]
                assert rec["id"].startswith(rec["source"] + "/"), rec["id"]


def test_ids_are_unique(corpus):
    ids = [rec["id"] for splits in corpus.values()
           for records in splits.values() for rec in records]
    assert len(ids) == len(set(ids))


def _keys(records):
    ids = {rec["id"] for rec in records}
    texts = {hashlib.sha256(rec["text"].encode()).hexdigest() for rec in records}
    return ids, texts


def test_domains_are_disjoint_from_generic(corpus):
    generic = [rec for records in corpus["generic"].values() for rec in records]
    generic_ids, generic_texts = _keys(generic)
    # Sections of one page share the page id before '#': no page is split
    # between generic and a domain either.
    generic_pages = {i.split("#")[0] for i in generic_ids}
    for name, splits in corpus.items():
        if name == "generic":
            continue
        for split, records in splits.items():
            ids, texts = _keys(records)
            assert not ids & generic_ids, (name, split)
            assert not texts & generic_texts, (name, split)
            assert not {i.split("#")[0] for i in ids} & generic_pages, (name, split)


def test_splits_of_a_set_are_disjoint(corpus):
    for name, splits in corpus.items():
        keys = {split: _keys(records) for split, records in splits.items()}
        for a in SPLITS:
            for b in SPLITS:
                if a < b:
                    assert not keys[a][0] & keys[b][0], (name, a, b)
                    assert not keys[a][1] & keys[b][1], (name, a, b)


def test_generic_is_big_enough(manifest):
    assert manifest["files"]["generic/train.jsonl.gz"]["est_tokens"] >= MIN_GENERIC_TOKENS


def test_total_compressed_size():
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total <= MAX_COMPRESSED_BYTES
