"""`pn-data train-tokenizer`: special ids, byte fallback, the Hugging Face copy, output safety."""

from __future__ import annotations

import json

import pytest

from data_tools.cli import main
from data_tools.tokenizer import SPECIAL_IDS, reservoir_sample

# Text SentencePiece and a careless HF conversion disagree on: leading/repeated spaces, control
# characters, literal special-token strings, characters outside the training text.
TRICKY = [
    "", " ", "   leading spaces", "trailing  ", "two  spaces\tand\ttabs", "line\nbreaks\n\n",
    "windows\r\nline", "<s> </s> <pad> <unk> as plain text", "digits 1234567890 3.14159",
    "héllo wörld — naïve café", "日本語のテキスト", "emoji 😀🚀", "\u00a0nbsp ﬁ ligature ①",
    "▁already▁a▁metaspace", "\x00nul\x07bell",
]  # fmt: skip


def test_special_ids_and_byte_fallback(small_tokenizer):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(small_tokenizer.model))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert small_tokenizer.metadata["special_ids"] == SPECIAL_IDS
    assert small_tokenizer.metadata["eod_id"] == sp.eos_id()
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"]
    assert sp.vocab_size() == 1000
    for text in TRICKY:  # byte fallback: nothing unknown, everything round-trips
        ids = sp.encode(text)
        assert sp.unk_id() not in ids
        if "▁" not in text:  # SentencePiece's own space symbol decodes as a space
            assert sp.decode(ids) == text


def test_hf_tokenizer_loads_offline_and_matches_sentencepiece(small_tokenizer, real_texts):
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(small_tokenizer.model))
    hf = AutoTokenizer.from_pretrained(str(small_tokenizer.hf_dir), local_files_only=True)
    texts = real_texts + TRICKY
    assert hf(texts)["input_ids"] == sp.encode(texts)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert len(hf) == sp.vocab_size()
    for text in TRICKY[2:]:
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    check = small_tokenizer.metadata["hf_check"]
    assert check["identical"] == check["documents"] > 0


def test_unigram_model_trains_and_exports(tmp_path, real_texts, jsonl_writer):
    from transformers import AutoTokenizer

    corpus = jsonl_writer(tmp_path / "c.jsonl", real_texts[::4])
    args = ["train-tokenizer", "--input", str(corpus), "--output", str(tmp_path / "u"),
            "--vocab-size", "600", "--model-type", "unigram", "--threads", "2"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((tmp_path / "u.json").read_text())
    assert meta["model_type"] == "unigram" and meta["hf_check"]["documents"] > 0
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "u_hf"), local_files_only=True)
    assert hf.eos_token_id == 2 and len(hf) == 600


def test_outputs_not_overwritten_without_flag(tmp_path, real_texts, capsys, jsonl_writer):
    corpus = jsonl_writer(tmp_path / "c.jsonl", real_texts[:60])
    existing = tmp_path / "tok.model"
    existing.write_bytes(b"keep me")
    args = ["train-tokenizer", "--input", str(corpus), "--output", str(tmp_path / "tok"),
            "--vocab-size", "400", "--threads", "2"]  # fmt: skip
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "tok_hf").exists() and not (tmp_path / "tok.vocab").exists()
    assert main([*args, "--overwrite"]) == 0
    assert existing.read_bytes() != b"keep me" and (tmp_path / "tok_hf" / "tokenizer.json").is_file()


def test_too_large_vocab_is_a_clear_error(tmp_path, capsys, jsonl_writer):
    corpus = jsonl_writer(tmp_path / "c.jsonl", ["just a few words here"] * 3)
    assert main(["train-tokenizer", "--input", str(corpus), "--output", str(tmp_path / "t"),
                 "--vocab-size", "5000"]) == 2  # fmt: skip
    assert "SentencePiece training failed" in capsys.readouterr().err
    assert not list(tmp_path.glob("t*"))


def test_reservoir_sample_is_uniform_and_seeded():
    sample, seen = reservoir_sample((str(i) for i in range(1000)), 100, seed=1)
    assert seen == 1000 and len(set(sample)) == 100
    assert sample == reservoir_sample((str(i) for i in range(1000)), 100, seed=1)[0]
    assert max(map(int, sample)) > 500  # not just the first documents
    assert reservoir_sample(["a", "b"], 5, seed=0) == (["a", "b"], 2)


@pytest.mark.parametrize("bad_line", ['{"text": "ok"', '{"body": "no text field"}'])
def test_bad_input_names_file_and_line(tmp_path, capsys, bad_line):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n' + bad_line + "\n")
    assert main(["train-tokenizer", "--input", str(corpus), "--output", str(tmp_path / "t")]) == 2
    assert f"{corpus}:2:" in capsys.readouterr().err
