"""`pn-data embed`, `cluster`, `assign` on a tiny real-text corpus (Debian licences/changelogs).

The corpus and tokenizer are built here with sentencepiece and megatron-core's
IndexedDatasetBuilder so these tests do not depend on the preprocess step.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools import embed as embed_mod
from data_tools.cli import main
from data_tools.windows import IndexedTokens, split_windows

CONTEXT = 128  # small LM context: many windows from little text, short SBERT inputs
LICENSES = Path("/usr/share/common-licenses")
DOCS = Path("/usr/share/doc")


def licence_texts(max_chars: int = 5000) -> list[str]:
    return [p.read_text(errors="replace")[:max_chars] for p in sorted(LICENSES.iterdir())
            if p.is_file()]


def changelog_texts(count: int, skip: int = 0, max_chars: int = 2500) -> list[str]:
    paths = sorted(DOCS.glob("*/changelog.Debian.gz"))[skip : skip + count]
    return [gzip.open(p, "rt", errors="replace").read()[:max_chars] for p in paths]


def train_tokenizer(texts: list[str], out: Path) -> Path:
    import sentencepiece as spm

    corpus = out / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(line for t in texts for line in t.splitlines() if line.strip()))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tok"),
                                   vocab_size=400, model_type="unigram", num_threads=2,
                                   minloglevel=2)
    return out / "tok.model"


def build_dataset(texts: list[str], tokenizer: Path, prefix: Path, sidecar: bool = True) -> Path:
    """One document per text, EOD appended — what `pn-data preprocess` writes."""
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for text in texts:
        builder.add_item(torch.tensor(sp.encode(text) + [sp.eos_id()]))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    if sidecar:
        from pn_base.fileio import file_sha256

        sidecar = {"tokenizer": {"path": str(tokenizer), "sha256": file_sha256(tokenizer)}}
        Path(f"{prefix}.json").write_text(json.dumps(sidecar))
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    # ~80 windows: SBERT on 2 busy CPU cores manages ~10-100 windows/s
    generic_texts = licence_texts(1200) + changelog_texts(6, max_chars=1000)
    spec_texts = changelog_texts(4, skip=40, max_chars=800)
    tokenizer = train_tokenizer(licence_texts() + changelog_texts(60), root)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "generic": build_dataset(generic_texts, tokenizer, root / "generic"),
        "spec": build_dataset(spec_texts, tokenizer, root / "spec"),
        "empty": build_dataset([], tokenizer, root / "empty"),
    }


def run_embed(corpus, output: Path, *extra: str) -> int:
    return main(["embed", "--data-prefix", str(corpus["generic"]), "--tokenizer-model",
                 str(corpus["tokenizer"]), "--output", str(output), "--context", str(CONTEXT),
                 "--batch-size", "32", "--device", "cpu", *extra])


def run_cluster(embeddings: Path, output: Path, k: int = 4, *extra: str) -> int:
    return main(["cluster", "--embeddings", str(embeddings), "--k", str(k), "--output",
                 str(output), "--seed", "7", "--niter", "10", *extra])


@pytest.fixture(scope="module")
def embedded(corpus):
    out = corpus["root"] / "emb"
    assert run_embed(corpus, out) == 0
    return out


@pytest.fixture(scope="module")
def clustered(corpus, embedded):
    out = corpus["root"] / "clusters"
    assert run_cluster(embedded, out) == 0
    return out


# ---------------------------------------------------------------- windowing


def test_long_document_splits_into_exact_non_overlapping_windows():
    lengths = np.array([2500, 1024, 1, 0, 1025, 3000])
    windows = split_windows(lengths, 1024)
    for doc, n in enumerate(lengths):
        mine = windows[windows[:, 0] == doc]
        assert len(mine) == -(-n // 1024)
        if n:
            assert mine[0, 1] == 0 and mine[-1, 2] == n
            assert np.all(mine[1:, 1] == mine[:-1, 2])  # contiguous, no overlap
            assert np.all(mine[:, 2] - mine[:, 1] <= 1024)


def test_windows_exclude_eod_and_cover_document_tokens(corpus, embedded):
    meta, _, windows = embed_mod.load_embeddings(embedded)
    data = IndexedTokens(corpus["generic"])
    assert meta["shape"][0] == len(windows) and meta["eod_id"] == 2
    for doc in range(len(data)):
        mine = windows[windows[:, 0] == doc]
        rebuilt = np.concatenate([data.window(*w) for w in mine])
        full = data.window(doc, 0, data.lengths[doc])
        assert np.array_equal(rebuilt, full[:-1]) and full[-1] == meta["eod_id"]
        assert len(mine) == -(-(data.lengths[doc] - 1) // CONTEXT)


# ---------------------------------------------------------------- embed


def test_embed_resumes_after_a_kill_and_matches_a_clean_run(corpus, embedded, monkeypatch):
    out = corpus["root"] / "emb_resumed"
    monkeypatch.setattr(embed_mod, "CHUNK_WINDOWS", 32)
    real_encode, calls = embed_mod.encode_rows, []

    def dying_encode(rows, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(len(rows))
        real_encode(rows, *args)

    monkeypatch.setattr(embed_mod, "encode_rows", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        run_embed(corpus, out)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(list((partial / "chunks_done").iterdir())) == 3

    calls.clear()
    monkeypatch.setattr(embed_mod, "encode_rows", lambda rows, *a: (calls.append(1),
                                                                     real_encode(rows, *a)))
    assert run_embed(corpus, out) == 0
    total_chunks = -(-json.loads((out / "meta.json").read_text())["num_windows"] // 32)
    assert len(calls) == total_chunks - 3  # the three finished chunks were not redone
    assert not partial.exists()
    _, first, w1 = embed_mod.load_embeddings(embedded)
    _, second, w2 = embed_mod.load_embeddings(out)
    assert np.array_equal(w1, w2)
    assert np.array_equal(np.asarray(first), np.asarray(second))  # deterministic, bit for bit
    assert np.all(np.isfinite(np.asarray(first, dtype=np.float32)))


def test_embed_refuses_to_overwrite(corpus, embedded, capsys):
    assert run_embed(corpus, embedded) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_missing_model_path_is_a_clear_error(corpus, capsys):
    out = corpus["root"] / "emb_missing_model"
    assert run_embed(corpus, out, "--model", str(corpus["root"] / "no_such_model")) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err and "--model" in err and not out.exists()


# ---------------------------------------------------------------- cluster


def test_cluster_outputs_are_consistent(corpus, clustered):
    manifest = json.loads((clustered / "clusters.json").read_text())
    params = json.loads((clustered / "params.json").read_text())
    assignments = np.load(clustered / "assignments.npy")
    windows = np.load(clustered / "windows.npy")
    assert assignments.dtype == np.int32 and len(assignments) == len(windows)
    assert manifest["k"] == params["k"] == 4 and len(manifest["prefixes"]) == 4
    assert np.load(clustered / "centroids.npy").shape == (4, 384)
    assert manifest["windows"] == np.bincount(assignments, minlength=4).tolist()
    assert params["tokenizer_sha256"] == manifest["tokenizer_sha256"]

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedTokens(corpus["generic"])
    for c, prefix in enumerate(manifest["prefixes"]):
        assert prefix == str(clustered / manifest["names"][c])
        cluster_data = IndexedDataset(prefix)
        rows = np.flatnonzero(assignments == c)
        assert len(cluster_data) == len(rows)
        assert int(cluster_data.sequence_lengths.sum()) == manifest["tokens"][c]
        for i, row in enumerate(rows[:5]):
            expected = np.append(data.window(*windows[row]), 2)
            assert np.array_equal(cluster_data[i], expected)

    blend = json.loads((clustered / "generic_blend.json").read_text())
    assert abs(sum(w for w, _ in blend["blend"]) - 1) < 1e-9


def test_cluster_is_deterministic_for_a_seed(corpus, embedded, clustered):
    again = corpus["root"] / "clusters_again"
    assert run_cluster(embedded, again) == 0
    for name in ("centroids.npy", "assignments.npy"):
        assert np.array_equal(np.load(clustered / name), np.load(again / name))


def test_cluster_l2_metric_and_sample(corpus, embedded):
    out = corpus["root"] / "clusters_l2"
    assert run_cluster(embedded, out, 3, "--metric", "l2", "--sample", "60") == 0
    params = json.loads((out / "params.json").read_text())
    assert params["metric"] == "l2" and params["sample"] == 60


def test_k_larger_than_windows_is_an_error(corpus, embedded, capsys):
    out = corpus["root"] / "clusters_big_k"
    assert run_cluster(embedded, out, 100000) == 2
    err = capsys.readouterr().err
    assert "--k 100000" in err and str(embedded) in err and not out.exists()


def test_window_index_not_matching_dataset_is_an_error(corpus, embedded, capsys):
    tampered = corpus["root"] / "emb_tampered"
    shutil.copytree(embedded, tampered)
    windows = np.load(tampered / "windows.npy")
    windows[-1, 2] += 10_000
    np.save(tampered / "windows.npy", windows)
    assert run_cluster(tampered, corpus["root"] / "clusters_tampered") == 2
    err = capsys.readouterr().err
    assert "windows.npy" in err and "pn-data embed" in err


def test_truncated_embeddings_are_an_error(corpus, embedded, capsys):
    tampered = corpus["root"] / "emb_truncated"
    shutil.copytree(embedded, tampered)
    with open(tampered / "embeddings.f16", "r+b") as f:
        f.truncate(100)
    assert run_cluster(tampered, corpus["root"] / "clusters_truncated") == 2
    assert "embeddings.f16" in capsys.readouterr().err


def test_cluster_refuses_to_overwrite(corpus, embedded, clustered, capsys):
    before = (clustered / "centroids.npy").read_bytes()
    assert run_cluster(embedded, clustered) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (clustered / "centroids.npy").read_bytes() == before


# ---------------------------------------------------------------- assign


def run_assign(corpus, clusters: Path, prefix: Path, output: Path, *extra: str) -> int:
    return main(["assign", "--data-prefix", str(prefix), "--clusters", str(clusters),
                 "--output", str(output), "--device", "cpu", *extra])


def test_assign_specialization_set(corpus, clustered):
    out = corpus["root"] / "spec_assign"
    assert run_assign(corpus, clustered, corpus["spec"], out, "--write-datasets") == 0
    hist = json.loads((out / "histogram.json").read_text())
    assignments = np.load(out / "assignments.npy")
    windows = np.load(out / "windows.npy")
    assert len(assignments) == len(windows) == hist["num_windows"]
    assert hist["k"] == 4 and sum(hist["windows"]) == len(windows)
    assert hist["centroids_sha256"] == json.loads(
        (clustered / "params.json").read_text())["centroids_sha256"]
    assert (out / "cluster_0000.idx").is_file() and (out / "clusters.json").is_file()

    # assigning the generic corpus itself reproduces the clustering's own assignments
    again = corpus["root"] / "generic_assign"
    assert run_assign(corpus, clustered, corpus["generic"], again) == 0
    assert np.array_equal(np.load(again / "assignments.npy"),
                          np.load(clustered / "assignments.npy"))


def test_assign_refuses_to_overwrite(corpus, clustered, capsys):
    out = corpus["root"] / "existing_assign"
    out.mkdir()
    assert run_assign(corpus, clustered, corpus["spec"], out) == 2
    assert "--overwrite" in capsys.readouterr().err and not any(out.iterdir())


def test_assign_empty_specialization_set_is_an_error(corpus, clustered, capsys):
    out = corpus["root"] / "empty_assign"
    assert run_assign(corpus, clustered, corpus["empty"], out) == 2
    err = capsys.readouterr().err
    assert "empty.idx" in err and "no documents" in err and not out.exists()


def test_assign_tokenizer_mismatch_is_an_error(corpus, clustered, capsys):
    other_dir = corpus["root"] / "other_tok"
    other_dir.mkdir()
    other = train_tokenizer(changelog_texts(20, skip=100), other_dir)
    prefix = build_dataset(changelog_texts(3, skip=200), other, other_dir / "spec")
    out = corpus["root"] / "mismatch_assign"

    assert run_assign(corpus, clustered, prefix, out, "--tokenizer-model", str(other)) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and str(other) in err

    # the clustering's tokenizer, but the dataset's sidecar says it was made with another one
    assert run_assign(corpus, clustered, prefix, out) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and "spec.json" in err and not out.exists()


# ---------------------------------------------------------------- shards and their merge


def merge_embeddings(output: Path, *inputs: Path) -> int:
    return main(["merge-embeddings", "--inputs", *map(str, inputs), "--output", str(output)])


@pytest.fixture(scope="module")
def shards(corpus):
    out = [corpus["root"] / "emb_shards" / f"{i:04d}" for i in range(2)]
    for i, directory in enumerate(out):
        assert run_embed(corpus, directory, "--shard", f"{i}/2") == 0
    return out


def test_two_shards_merged_equal_the_one_process_run(corpus, embedded, shards):
    metas = [json.loads((s / "meta.json").read_text()) for s in shards]
    assert metas[0]["window_range"][1] == metas[1]["window_range"][0] > 0
    merged = corpus["root"] / "emb_merged"
    assert merge_embeddings(merged, shards[1], shards[0]) == 0  # any order
    meta_one, one, windows_one = embed_mod.load_embeddings(embedded)
    meta, got, windows = embed_mod.load_embeddings(merged)
    assert np.array_equal(windows, windows_one)
    # batches differ between the runs, so values may differ by fp16 rounding, no more
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(one, np.float32),
                               atol=2e-3, rtol=0)
    assert {k: v for k, v in meta.items() if k != "merged_from"} == meta_one

    # the merged output clusters like the one-process output
    assert run_cluster(merged, corpus["root"] / "clusters_of_merged") == 0


def test_a_killed_shard_resumes_on_its_own(corpus, shards, monkeypatch):
    out = corpus["root"] / "emb_shard_resumed"
    monkeypatch.setattr(embed_mod, "CHUNK_WINDOWS", 16)
    real_encode, calls = embed_mod.encode_rows, []

    def encode_then_die(rows, *args):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(len(rows))
        real_encode(rows, *args)

    monkeypatch.setattr(embed_mod, "encode_rows", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_embed(corpus, out, "--shard", "1/2")
    monkeypatch.setattr(embed_mod, "encode_rows", lambda rows, *a: (calls.append(len(rows)),
                                                                     real_encode(rows, *a)))
    assert run_embed(corpus, out, "--shard", "1/2") == 0
    meta, got, _ = embed_mod.load_embeddings(out)
    assert sum(calls) == meta["num_windows"]  # the finished chunk was not embedded again
    _, want, _ = embed_mod.load_embeddings(shards[1])
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-3, rtol=0)


def test_merge_refuses_a_missing_or_duplicated_shard(corpus, shards, capsys):
    out = corpus["root"] / "emb_bad_merge"
    assert merge_embeddings(out, shards[0]) == 2
    err = capsys.readouterr().err
    assert "shard(s) 1 of 2 missing" in err and err.count("\n") == 1
    assert merge_embeddings(out, shards[0], shards[0], shards[1]) == 2
    err = capsys.readouterr().err
    assert "shard 0/2 is given twice" in err and str(shards[0]) in err
    assert not out.exists()
    assert run_cluster(shards[0], corpus["root"] / "clusters_of_a_shard") == 2
    assert "merge-embeddings" in capsys.readouterr().err


def test_merge_refuses_a_shard_of_another_context(corpus, shards, embedded, capsys):
    other = corpus["root"] / "emb_shard_ctx64"
    assert run_embed(corpus, other, "--shard", "1/2", "--context", "64") == 0
    capsys.readouterr()
    assert merge_embeddings(corpus["root"] / "emb_ctx_merge", shards[0], other) == 2
    err = capsys.readouterr().err
    assert f"{other}/meta.json: context is 64 but" in err and err.count("\n") == 1
    assert merge_embeddings(corpus["root"] / "emb_not_shard", shards[0], embedded) == 2
    assert "not a shard" in capsys.readouterr().err


def test_too_many_shards_is_a_clear_error(corpus, capsys):
    out = corpus["root"] / "emb_empty_shard"
    assert run_embed(corpus, out, "--shard", "0/100000") == 2
    assert "would be empty" in capsys.readouterr().err and not out.exists()


def test_sample_smaller_than_k_is_an_error(corpus, embedded, capsys):
    out = corpus["root"] / "clusters_small_sample"
    assert run_cluster(embedded, out, 8, "--sample", "5") == 2
    err = capsys.readouterr().err
    assert "--sample 5 is smaller than --k 8" in err and err.count("\n") == 1


def test_embeddings_of_another_tokenizer_are_an_error(corpus, embedded, capsys):
    tampered = corpus["root"] / "emb_other_tokenizer"
    shutil.copytree(embedded, tampered)
    meta = json.loads((tampered / "meta.json").read_text())
    meta["tokenizer_sha256"] = "0" * 64
    (tampered / "meta.json").write_text(json.dumps(meta))
    assert run_cluster(tampered, corpus["root"] / "clusters_other_tok") == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and "emb_other_tokenizer/meta.json" in err
