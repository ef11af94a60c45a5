"""Hugging Face `datasets` inputs: a `save_to_disk` directory and a Hub-layout folder of
parquet/jsonl shards, built here with `datasets` itself (no network), read like any other input:
the indexed dataset is byte-identical to the one made from the same texts as JSONL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_tools import readers
from data_tools.cli import main
from data_tools.preprocess import run_merge, run_preprocess

datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
datasets.disable_progress_bars()


def hf_dataset(texts: list[str]):
    return datasets.Dataset.from_dict({"id": list(range(len(texts))), "content": texts})


def preprocess(inputs, tokenizer, prefix: Path, **options) -> bytes:
    run_preprocess([str(i) for i in inputs], str(tokenizer.model), str(prefix), workers=0,
                   quiet=True, text_field="content", **options)
    return Path(f"{prefix}.bin").read_bytes() + Path(f"{prefix}.idx").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, real_texts, small_tokenizer, jsonl_writer):
    root = tmp_path_factory.mktemp("hf_reference")
    jsonl = jsonl_writer(root / "docs.jsonl", real_texts, field="content")
    return preprocess([jsonl], small_tokenizer, root / "reference")


def test_saved_dataset_directory_is_read_lazily_and_sharded(tmp_path, real_texts,
                                                            small_tokenizer, reference):
    saved = tmp_path / "saved"
    hf_dataset(real_texts).save_to_disk(str(saved), num_shards=3)
    sources = readers.discover([saved], "content")
    assert [type(s).__name__ for s in sources] == ["ArrowStreamSource"] * 3
    assert sum(sum(s.group_rows) for s in sources) == len(real_texts)
    assert preprocess([saved], small_tokenizer, tmp_path / "one") == reference

    shards = []
    for i in range(3):
        prefix = tmp_path / f"shard{i}"
        preprocess([saved], small_tokenizer, prefix, shard=f"{i}/3")
        shards.append(str(prefix))
    run_merge(shards, str(tmp_path / "merged"))
    merged = tmp_path / "merged"
    assert Path(f"{merged}.bin").read_bytes() + Path(f"{merged}.idx").read_bytes() == reference


def test_arrow_record_batches_are_cut_points(tmp_path, real_texts):
    saved = tmp_path / "saved"
    hf_dataset(real_texts).save_to_disk(str(saved), num_shards=1)
    (source,) = readers.discover([saved], "content")
    # datasets writes record batches of writer_batch_size rows: more than one here, or a
    # single one when the corpus is small; either way reading from any batch start works
    starts = source.group_starts
    texts = [value for start, stop in zip(starts, starts[1:] + [source.size])
             for value, _ in source.records(start, stop)]
    assert texts == real_texts


def test_hub_layout_folder_of_parquet_and_jsonl_shards(tmp_path, real_texts, small_tokenizer,
                                                        reference):
    half = len(real_texts) // 2
    hub = tmp_path / "hub"
    hf_dataset(real_texts[:half]).to_parquet(str(hub / "data" / "train-00000-of-00002.parquet"))
    hf_dataset(real_texts[half:]).to_json(str(hub / "data" / "train-00001-of-00002.jsonl"))
    (hub / "README.md").write_text("---\nconfigs: []\n---\n")
    (hub / ".cache" / "huggingface").mkdir(parents=True)
    (hub / ".cache" / "huggingface" / "x.json").write_text("{}")  # hidden: never read
    assert preprocess([hub], small_tokenizer, tmp_path / "hub_out") == reference


def test_several_splits_or_a_dataset_dict_are_refused_by_name(tmp_path, real_texts,
                                                              small_tokenizer, capsys):
    hub = tmp_path / "hub"
    hf_dataset(real_texts[:5]).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    hf_dataset(real_texts[5:9]).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": hf_dataset(real_texts[:5]),
                          "validation": hf_dataset(real_texts[5:9])}).save_to_disk(str(saved))
    for path, words in ((hub, ["test, train", "/data/test-*"]),
                        (saved, ["DatasetDict", "train, validation", str(saved / "train")])):
        argv = ["preprocess", "--input", str(path), "--tokenizer-model",
                str(small_tokenizer.model), "--output-prefix", str(tmp_path / "out"),
                "--text-field", "content"]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err
        assert all(word in err for word in words), err

    good = tmp_path / "good"
    hf_dataset(real_texts[:5]).save_to_disk(str(good))
    capsys.readouterr()
    assert main(argv[:2] + [str(good)] + argv[3:-1] + ["body"]) == 2
    err = capsys.readouterr().err
    assert "no column 'body'" in err and "data-00000-of-00001.arrow" in err
