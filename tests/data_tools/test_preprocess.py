"""`pn-data preprocess` / `merge` on real text: token equality, shards, resume, bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools import readers
from data_tools.cli import main
from data_tools.indexed import megatron_indexed_dataset, token_dtype
from data_tools.preprocess import run_merge, run_preprocess

REPO = Path(__file__).resolve().parents[2]


def read_dataset(prefix) -> list[list[int]]:
    dataset = megatron_indexed_dataset().IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def files_of(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def sp_model(path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def write_mixed_inputs(root: Path, texts: list[str], jsonl_writer) -> list[str]:
    """The same kind of real text in every supported format, in one input list."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    quarter = len(texts) // 4
    plain = jsonl_writer(root / "a.jsonl", texts[:quarter])
    gz = jsonl_writer(root / "b.jsonl.gz", texts[quarter : 2 * quarter])
    zst = root / "c.jsonl.zst"
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[2 * quarter : 3 * quarter])
    zst.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    parquet = root / "d.parquet"
    rest = texts[3 * quarter :]
    pq.write_table(pa.table({"text": rest[: len(rest) // 2]}), parquet, row_group_size=7)
    text_dir = root / "e_txt"
    text_dir.mkdir()
    for number, text in enumerate(rest[len(rest) // 2 :]):
        (text_dir / f"{number:04d}.txt").write_text(text, encoding="utf-8")
    return [str(p) for p in (plain, gz, zst, parquet, text_dir)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, real_texts, jsonl_writer, small_tokenizer):
    root = tmp_path_factory.mktemp("mixed")
    texts = real_texts[:120]
    inputs = write_mixed_inputs(root, texts, jsonl_writer)
    one_run = root / "one"
    run_preprocess(inputs, str(small_tokenizer.model), str(one_run), workers=2, quiet=True)
    return {"root": root, "inputs": inputs, "texts": texts, "one_run": one_run}


# --------------------------------------------------------------------------------------------


def test_tokens_equal_sentencepiece_plus_eod(small_dataset):
    sp = sp_model(small_dataset.tokenizer.model)
    eod = sp.eos_id()
    expected = [ids + [eod] for ids in sp.encode(small_dataset.texts)]
    assert read_dataset(small_dataset.prefix) == expected
    dataset = megatron_indexed_dataset().IndexedDataset(str(small_dataset.prefix))
    assert dataset.index.dtype == np.uint16
    assert dataset.document_indices.tolist() == list(range(len(expected) + 1))
    sidecar = small_dataset.sidecar
    assert sidecar["documents"] == len(expected)
    assert sidecar["tokens"] == sum(map(len, expected))
    assert sidecar["eod_id"] == eod and sidecar["dtype"] == "uint16"
    assert sidecar["tokenizer"]["sha256"] == small_dataset.tokenizer.metadata["sha256"]
    assert not Path(f"{small_dataset.prefix}.parts").exists()  # work dir removed when done


def test_token_dtype_is_megatrons_choice():
    optimal = megatron_indexed_dataset().DType.optimal_dtype
    for vocab in (1000, 32000, 65499, 65500, 128256):
        assert token_dtype(vocab) == optimal(vocab)


def test_every_format_is_read(mixed, small_tokenizer):
    sp = sp_model(small_tokenizer.model)
    assert list(readers.iter_texts(mixed["inputs"])) == mixed["texts"]
    expected = [ids + [sp.eos_id()] for ids in sp.encode(mixed["texts"])]
    assert read_dataset(mixed["one_run"]) == expected


def test_shards_then_merge_equal_one_run(mixed, small_tokenizer):
    root, model = mixed["root"], str(small_tokenizer.model)
    shards = [str(root / f"shard{i}") for i in range(4)]
    for i, prefix in enumerate(shards):
        run_preprocess(mixed["inputs"], model, prefix, shard=f"{i}/4", workers=0, quiet=True)
    counts = [json.loads(Path(p + ".json").read_text())["documents"] for p in shards]
    assert sum(counts) == len(mixed["texts"]) and sum(c > 0 for c in counts) >= 3
    run_merge(shards, str(root / "merged"))
    assert files_of(root / "merged") == files_of(mixed["one_run"])
    merged = json.loads((root / "merged.json").read_text())
    assert merged["documents"] == len(mixed["texts"])
    # shards given in any order (a shell glob) are put in shard order
    run_merge([shards[2], shards[0], shards[3], shards[1]], str(root / "shuffled"))
    assert files_of(root / "shuffled") == files_of(mixed["one_run"])
    with pytest.raises(ValueError, match=r"shard\(s\) 1 are missing"):
        run_merge([shards[0], *shards[2:]], str(root / "incomplete"))


def test_resume_after_crash_redoes_only_unfinished_parts(mixed, small_tokenizer):
    prefix = str(mixed["root"] / "crashy")
    written = []

    def crash_after_three_parts(marker):
        written.append(marker)
        if len(written) == 3:
            raise KeyboardInterrupt  # like Ctrl-C between two parts

    common = dict(workers=2, part_tokens=3000, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(mixed["inputs"], str(small_tokenizer.model), prefix,
                       on_part_written=crash_after_three_parts, **common)  # fmt: skip
    assert not Path(prefix + ".bin").exists()
    done_records = sum(m["records"] for m in written)
    result = run_preprocess(mixed["inputs"], str(small_tokenizer.model), prefix, **common)
    run = result["this_run"]
    assert run["parts_reused"] == 3
    assert run["records_encoded"] == result["records"] - done_records
    assert files_of(prefix) == files_of(mixed["one_run"])


def test_resume_after_sigkill(tmp_path, real_texts, jsonl_writer, small_tokenizer):
    corpus = jsonl_writer(tmp_path / "docs.jsonl", real_texts * 3)
    prefix = tmp_path / "killed"
    args = ["--input", str(corpus), "--tokenizer-model", str(small_tokenizer.model),
            "--output-prefix", str(prefix), "--workers", "1", "--part-tokens", "4000", "--quiet"]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "data_tools", "preprocess", *args],
                               cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    parts = Path(f"{prefix}.parts")
    try:
        deadline = time.monotonic() + 60
        while len(list(parts.glob("s*.json"))) < 2 and process.poll() is None:
            assert time.monotonic() < deadline, "preprocess wrote no part in 60 s"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its worker, mid-work
        process.wait()
    assert process.returncode == -signal.SIGKILL, "finished before it could be killed"
    done = [json.loads(p.read_text()) for p in parts.glob("s*.json")]
    result = run_preprocess([str(corpus)], str(small_tokenizer.model), str(prefix), workers=1,
                            part_tokens=4000, quiet=True)  # fmt: skip
    assert result["this_run"]["parts_reused"] == len(done) >= 2
    assert result["this_run"]["records_encoded"] == len(real_texts) * 3 - sum(
        m["records"] for m in done
    )
    sp = sp_model(small_tokenizer.model)
    assert read_dataset(prefix) == [ids + [2] for ids in sp.encode(real_texts * 3)]


# --------------------------------------------------------------------------------------------
# Bad input: each names the file and the line (row, or file for text files)


BAD_JSONL = [  # (bad line, skip reason)
    pytest.param(b'{"text": "unterminated', "malformed_json", id="malformed"),
    pytest.param(b'["not", "an", "object"]', "malformed_json", id="not-object"),
    pytest.param(b'{"body": "no text field"}', "missing_field", id="missing-field"),
    pytest.param(b'{"text": ["a", "list"]}', "not_a_string", id="not-string"),
    pytest.param(b'{"text": "caf\xe9"}', "invalid_utf8", id="invalid-utf8"),
    pytest.param(b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8", id="lone-surrogate"),
]


@pytest.mark.parametrize("bad, reason", BAD_JSONL)
def test_bad_jsonl_record_names_file_and_line(tmp_path, small_tokenizer, capsys, bad, reason):
    good = [json.dumps({"text": f"document {i}"}).encode() for i in range(4)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([*good[:2], bad, *good[2:]]) + b"\n")
    args = ["preprocess", "--input", str(path), "--tokenizer-model", str(small_tokenizer.model),
            "--output-prefix", str(tmp_path / "out"), "--workers", "0", "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and "--skip-bad" in err
    assert not (tmp_path / "out.bin").exists()
    assert main([*args, "--skip-bad"]) == 0  # resumes the same run, skipping the record
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["documents"] == 4 and sidecar["skipped"] == {reason: 1}


def test_bad_record_error_through_worker_pool(tmp_path, small_tokenizer, real_texts, capsys):
    lines = [json.dumps({"text": t}) for t in real_texts[:50]]
    lines[37] = "{not json"
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    args = ["preprocess", "--input", str(path), "--tokenizer-model", str(small_tokenizer.model),
            "--output-prefix", str(tmp_path / "out"), "--workers", "2", "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert f"{path}:38: malformed JSON" in capsys.readouterr().err


def test_invalid_utf8_replaced_when_asked(tmp_path, small_tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "fine"}\n')
    result = run_preprocess([str(path)], str(small_tokenizer.model), str(tmp_path / "out"),
                            workers=0, replace_invalid_utf8=True, quiet=True)  # fmt: skip
    assert result["documents"] == 2 and result["repaired"] == {"utf8_replaced": 1}
    sp = sp_model(small_tokenizer.model)
    assert read_dataset(tmp_path / "out")[0] == sp.encode("caf\ufffd au lait") + [2]


def test_empty_documents_and_blank_lines_are_skipped_and_counted(tmp_path, small_tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": "  \\n "}\n{"text": "two"}\n')
    result = run_preprocess([str(path)], str(small_tokenizer.model), str(tmp_path / "out"),
                            workers=0, quiet=True)  # fmt: skip
    assert result["documents"] == 2 and result["records"] == 5
    assert result["skipped"] == {"blank_line": 1, "empty": 2}


def test_bad_text_file_and_parquet_are_named(tmp_path, small_tokenizer, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("fine text")
    (text_dir / "b.txt").write_bytes(b"line one\nline two \xff\xfe\n")
    with pytest.raises(readers.BadRecordError, match=rf"{text_dir / 'b.txt'}: invalid UTF-8 at line 2"):
        list(readers.iter_texts([text_dir]))
    no_column = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a"]}), no_column)
    with pytest.raises(readers.BadRecordError, match=rf"{no_column}: no column 'text'"):
        list(readers.iter_texts([no_column]))
    nulls = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None]}), nulls, row_group_size=2)
    with pytest.raises(readers.BadRecordError, match=rf"{nulls}: row 2: 'text' is null"):
        list(readers.iter_texts([nulls]))
    args = ["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer-model",
            str(small_tokenizer.model), "--output-prefix", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_text_field_option(tmp_path, small_tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_text('{"content": "alpha beta", "text": "ignored"}\n')
    result = run_preprocess([str(path)], str(small_tokenizer.model), str(tmp_path / "out"),
                            text_field="content", workers=0, quiet=True)  # fmt: skip
    sp = sp_model(small_tokenizer.model)
    assert read_dataset(tmp_path / "out") == [sp.encode("alpha beta") + [2]]
    assert result["text_field"] == "content"


# --------------------------------------------------------------------------------------------
# Outputs are never overwritten without --overwrite


def test_outputs_not_overwritten_without_flag(small_dataset, tmp_path, capsys):
    prefix = tmp_path / "out"
    Path(f"{prefix}.idx").write_bytes(b"precious")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "some text"}\n')
    args = ["preprocess", "--input", str(inputs), "--tokenizer-model",
            str(small_dataset.tokenizer.model), "--output-prefix", str(prefix), "--workers", "0",
            "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert Path(f"{prefix}.idx").read_bytes() == b"precious"
    assert not Path(f"{prefix}.parts").exists()
    assert main([*args, "--overwrite"]) == 0
    assert read_dataset(prefix)[0][-1] == 2

    merge_args = ["merge", "--inputs", str(small_dataset.prefix), "--output-prefix", str(prefix)]
    assert main(merge_args) == 2
    assert main([*merge_args, "--overwrite"]) == 0
    assert files_of(prefix) == files_of(small_dataset.prefix)


def test_unfinished_run_with_other_settings_is_not_resumed(tmp_path, small_tokenizer, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "some text", "other": "more"}\n')
    prefix = tmp_path / "out"
    Path(f"{prefix}.parts").mkdir()
    plan = Path(f"{prefix}.parts/plan.json")
    plan.write_text('{"version": 1, "inputs": "something else"}')
    args = ["preprocess", "--input", str(inputs), "--tokenizer-model", str(small_tokenizer.model),
            "--output-prefix", str(prefix), "--workers", "0", "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert "unfinished run with other inputs" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert read_dataset(prefix) == [sp_model(small_tokenizer.model).encode("some text") + [2]]


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "data_tools", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    for command in ("train-tokenizer", "preprocess", "merge"):
        assert command in out


def test_gzip_progress_and_plain_jsonl_cut_anywhere(tmp_path, real_texts, jsonl_writer):
    """Every record is read exactly once whatever the byte ranges (line boundary cuts)."""
    plain = jsonl_writer(tmp_path / "a.jsonl", real_texts[:40])
    [source] = readers.discover([plain])
    whole = [p for p, _ in source.records(0, source.size)]
    cuts = sorted({0, source.size, *np.random.default_rng(0).integers(0, source.size, 25)})
    pieces = [p for a, b in zip(cuts, cuts[1:]) for p, _ in source.records(a, b)]
    assert pieces == whole and len(whole) == 40
    gz = jsonl_writer(tmp_path / "b.jsonl.gz", real_texts[:40])
    [source] = readers.discover([gz])
    records = list(source.records(0, source.size))
    assert [p for p, _ in records] == whole
    assert sum(step for _, step in records) == gz.stat().st_size
    assert list(source.records(1, source.size)) == []  # a compressed file is not cut
    with gzip.open(gz, "rt") as f:
        assert len(f.readlines()) == 40


def test_bulk_append_writes_what_add_document_writes(tmp_path, small_dataset):
    """DatasetWriter appends a batch through the builder's buffers; pin that the bytes equal
    megatron-core's own per-document add_document for the installed version."""
    from data_tools.indexed import DatasetWriter

    documents = read_dataset(small_dataset.prefix)[:50] + [[7], [2]]
    tokens = np.array([t for doc in documents for t in doc], dtype=np.uint16)
    lengths = np.array([len(doc) for doc in documents])
    with DatasetWriter(str(tmp_path / "bulk"), np.uint16) as writer:
        half = len(documents) // 2
        cut = int(lengths[:half].sum())
        writer.add_documents(tokens[:cut], lengths[:half])
        writer.add_documents(tokens[cut:], lengths[half:])
    builder = megatron_indexed_dataset().IndexedDatasetBuilder(str(tmp_path / "one.bin"), np.uint16)
    for doc in documents:
        builder.add_document(np.array(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(str(tmp_path / "one.idx"))
    assert files_of(tmp_path / "bulk") == files_of(tmp_path / "one")


def test_concurrent_run_on_same_prefix_is_refused(tmp_path, small_tokenizer):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "some text"}\n')
    prefix = tmp_path / "out"
    Path(f"{prefix}.parts").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(60)",
                               f"{prefix}.parts/lock"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="in use by another running preprocess"):
            run_preprocess([str(inputs)], str(small_tokenizer.model), str(prefix), workers=0,
                           quiet=True)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    run_preprocess([str(inputs)], str(small_tokenizer.model), str(prefix), workers=0, quiet=True)
