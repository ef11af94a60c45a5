"""Tokenizer identity end to end (pn_base/tokenizer_identity.py, megatron_pn/run_tokenizer.py):
checkpoints record the tokenizer they were trained with; pn-train (pretraining blend,
fine-tuning, resume, distillation teacher), pn-eval, pn-project and pn-export-hf refuse data or
a tokenizer of another one with one line naming both files (exit 2, nothing written), let it
through with the override, and accept matching or unrecorded ones; pn-export-hf /
pn-import-hf carry the record through Hugging Face.

Datasets are byte-level with a PREFIX.json sidecar as `pn-data preprocess` writes it (the
recorded sha256 stands for a tokenizer); the export test trains one real tokenizer.
"""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import perturbed_model, real_text_documents, tiny_overrides, write_byte_dataset
from megatron_pn.config import load_config
from megatron_pn.run_tokenizer import checkpoint_fingerprint

SLM, PN = "configs/tiny/slm.yaml", "configs/tiny/pn.yaml"
SHA_A, SHA_B = "a1" * 32, "b2" * 32
RECORD_A = {"sha256": SHA_A, "model": "/tokenizers/a.model"}


def dataset(root, name, sha: str | None):
    """A byte-level dataset whose PREFIX.json records tokenizer `sha` (none: no sidecar)."""
    prefix = write_byte_dataset(root / name, [d[:1500] for d in real_text_documents(40_000)])
    if sha:
        model = f"/tokenizers/{name}.model"
        (root / f"{name}.json").write_text(json.dumps(
            {"tokenizer": {"path": model, "sha256": sha}, "tokenizer_sha256": sha}))
    return prefix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_data")
    return {"a": dataset(root, "a", SHA_A), "b": dataset(root, "b", SHA_B),
            "none": dataset(root, "none", None)}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def assert_names_both(line: str, given: str, trained: str, override: str) -> None:
    assert line.count("tokenizer mismatch") == 1, line
    assert given in line and trained in line and override in line, line


# -- where the records are read --------------------------------------------------------------

def test_records_beside_the_data(tmp_path):
    from pn_base.errors import ConfigError
    from pn_base.tokenizer_identity import dataset_fingerprint, hf_tokenizer_fingerprint

    # per-cluster datasets (`pn-data cluster`): the clusters.json of their directory
    (tmp_path / "clusters.json").write_text(json.dumps(
        {"names": ["cluster_0000"], "tokenizer_sha256": SHA_A}))
    found = dataset_fingerprint(tmp_path / "cluster_0000")
    assert found.sha256 == SHA_A and found.source == str(tmp_path / "clusters.json")
    assert dataset_fingerprint(tmp_path / "elsewhere") is None
    # an HF tokenizer directory from before pn_tokenizer.json: the PREFIX.json beside it
    (tmp_path / "spm_hf").mkdir()
    (tmp_path / "spm.json").write_text(json.dumps(
        {"sha256": SHA_B, "model": "spm.model", "hf_dir": str(tmp_path / "spm_hf")}))
    assert hf_tokenizer_fingerprint(tmp_path / "spm_hf").sha256 == SHA_B
    # a damaged record is one clear error
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: cannot read its tokenizer record"):
        dataset_fingerprint(tmp_path / "bad")


# -- pn-train, in process (first: each run creates and destroys the process group) --------------

@pytest.fixture(scope="module")
def trained_a(data, tmp_path_factory):
    """The tiny SLM's initial checkpoint (0 steps) on dataset a: it records a's tokenizer."""
    from megatron_pn.cli.train import main

    root = tmp_path_factory.mktemp("tok_train")
    assert main([SLM, *tiny_overrides(data["a"], root / "run", **{
        "train.steps": 0, "checkpoint.dir": root / "ckpt"})]) == 0
    return root / "ckpt"


def train_error(args, capsys) -> str:
    from megatron_pn.cli.train import main

    assert main([str(a) for a in args]) == 2
    return one_error_line(capsys.readouterr().err)


def test_pn_train_records_and_refuses_another_tokenizer(data, trained_a, tmp_path, capsys):
    recorded = checkpoint_fingerprint(trained_a)
    assert recorded.sha256 == SHA_A and recorded.model == "/tokenizers/a.model"

    def args(prefix, **extra):
        return [SLM, *tiny_overrides(prefix, tmp_path / "run", **{"train.steps": 1, **extra})]

    # fine-tuning from checkpoint.load on data of another tokenizer
    err = train_error(args(data["b"], **{"checkpoint.load": trained_a,
                                         "checkpoint.dir": tmp_path / "ft"}), capsys)
    assert err.startswith("pn-train: error: tokenizer mismatch: ")
    assert_names_both(err, f"{data['b']}.json records tokenizer {SHA_B[:12]}",
                      f"checkpoint {trained_a}/iter_0000000 was trained with {SHA_A[:12]}… "
                      "(a.model)", "data.allow_tokenizer_mismatch=true")
    # resuming checkpoint.dir on such data
    latest = (trained_a / "latest_checkpointed_iteration.txt").read_text()
    err = train_error(args(data["b"], **{"checkpoint.dir": trained_a}), capsys)
    assert_names_both(err, f"{data['b']}.json", str(trained_a), "data.allow_tokenizer_mismatch")
    # a blend of two tokenizers' datasets
    err = train_error([SLM, *tiny_overrides(data["a"], tmp_path / "run"),
                       f"data.blend=[{data['a']},{data['b']}]",
                       f"checkpoint.dir={tmp_path / 'blend'}"], capsys)
    assert_names_both(err, f"{data['b']}.json", f"{data['a']}.json", "allow_tokenizer_mismatch")
    # a distillation teacher of another tokenizer
    err = train_error(args(data["b"], **{"distill.teacher": trained_a}), capsys)
    assert_names_both(err, f"{data['b']}.json", str(trained_a), "allow_tokenizer_mismatch")
    assert "teacher" in err
    # nothing written: no checkpoint, no run directory, `latest` untouched
    assert not (tmp_path / "ft").exists() and not (tmp_path / "blend").exists()
    assert not (tmp_path / "run").exists()
    assert (trained_a / "latest_checkpointed_iteration.txt").read_text() == latest
    assert sorted(p.name for p in trained_a.glob("iter_*")) == ["iter_0000000"]


@pytest.mark.slow
def test_deepspeed_checkpoint_records_its_tokenizer_and_resume_checks_it(data, tmp_path, capsys):
    """A DeepSpeed engine's checkpoint records the tokenizer beside its files (readable without
    the weights); resuming it on data of another tokenizer is refused like a megatron one."""
    from helpers import run_train

    ckpt = tmp_path / "ds"
    run_train([SLM, *tiny_overrides(data["a"], tmp_path / "run", **{
        "train.steps": 1, "engine": "deepspeed", "deepspeed.zero_stage": 1,
        "checkpoint.dir": ckpt, "checkpoint.save_interval": 1})])
    assert checkpoint_fingerprint(ckpt).sha256 == SHA_A
    err = train_error([SLM, *tiny_overrides(data["b"], tmp_path / "run", **{
        "train.steps": 2, "engine": "deepspeed", "checkpoint.dir": ckpt})], capsys)
    assert_names_both(err, f"{data['b']}.json", str(ckpt), "data.allow_tokenizer_mismatch")


def test_pn_train_override_and_matching_tokenizers(data, trained_a, tmp_path, capsys):
    from megatron_pn.cli.train import main

    for name, prefix, extra in (("allowed", data["b"], {"data.allow_tokenizer_mismatch": "true"}),
                                ("same", data["a"], {}), ("unrecorded", data["none"], {})):
        assert main([SLM, *tiny_overrides(prefix, tmp_path / name, **{  # (0 steps: it saves)
            "train.steps": 0, "checkpoint.load": trained_a, "checkpoint.dir": tmp_path / name /
            "ckpt", **extra})]) == 0
    assert "allowed by data.allow_tokenizer_mismatch" in capsys.readouterr().err
    # the fine-tuned model records the tokenizer of its data; unrecorded data keeps the loaded one
    assert checkpoint_fingerprint(tmp_path / "allowed" / "ckpt").sha256 == SHA_B
    assert checkpoint_fingerprint(tmp_path / "same" / "ckpt").sha256 == SHA_A
    assert checkpoint_fingerprint(tmp_path / "unrecorded" / "ckpt").sha256 == SHA_A


# -- pn-eval ------------------------------------------------------------------------------------

def tiny_config(path=SLM, *overrides, vocab=257, eod=256):
    return load_config([path], [f"model.vocab_size={vocab}", f"data.eod_id={eod}", *overrides])


def write(cfg, path, record=RECORD_A):
    from megatron_pn.hf import write_checkpoint

    return write_checkpoint(perturbed_model(cfg), cfg, path,
                            extra=None if record is None else {"tokenizer": record})


@pytest.fixture(scope="module")
def dense(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_dense")
    cfg = tiny_config()
    return {"a": write(cfg, root / "a"), "old": write(cfg, root / "old", record=None)}


def test_pn_eval(dense, data, tmp_path, capsys):
    from megatron_pn.cli.evaluate import main

    out = tmp_path / "out.json"
    base = ["--checkpoint", dense["a"], "--output", out, "--quiet", "--max-tokens", 200]
    assert main([str(a) for a in [*base, "--data", f"{data['a']},{data['b']}"]]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("pn-eval: error: tokenizer mismatch: ")
    assert_names_both(err, f"{data['b']}.json records tokenizer {SHA_B[:12]}…",
                      f"checkpoint {dense['a']}/iter_0000000 was trained with {SHA_A[:12]}… "
                      "(a.model)", "--allow-tokenizer-mismatch")
    assert not out.exists()
    for args in ([*base, "--data", data["b"], "--allow-tokenizer-mismatch"],  # the override
                 [*base, "--data", f"{data['a']},{data['none']}"],  # same or unrecorded
                 ["--checkpoint", dense["old"], "--data", data["b"], "--output", out, "--quiet",
                  "--max-tokens", 200, "--overwrite"]):  # a checkpoint without a record
        assert main([str(a) for a in args]) == 0
        assert json.loads(out.read_text())["datasets"]
        out.unlink()
    assert "allowed by --allow-tokenizer-mismatch" in capsys.readouterr().err


def test_checkpoint_without_a_record_has_its_config_tokenizer(world, tmp_path):
    """A checkpoint saved before tokenizers were recorded: its data.tokenizer_model, if there."""
    import hashlib

    model = tmp_path / "old.model"
    model.write_bytes(b"a sentencepiece model")
    ckpt = write(tiny_config(SLM, f"data.tokenizer_model={model}"), tmp_path / "c", record=None)
    found = checkpoint_fingerprint(ckpt)
    assert found.sha256 == hashlib.sha256(b"a sentencepiece model").hexdigest()
    assert found.describe().endswith("(old.model)")
    model.unlink()
    assert checkpoint_fingerprint(ckpt) is None


# -- pn-project ---------------------------------------------------------------------------------

def spec(root, name, sha):
    path = root / name
    path.mkdir()
    (path / "histogram.json").write_text(json.dumps(
        {"k": 4, "tokens": [1, 5, 1, 1], "windows": [1, 5, 1, 1], "tokenizer_sha256": sha,
         "centroids_sha256": "c" * 64}))
    return path


def test_pn_project(world, tmp_path, capsys):
    from megatron_pn.cli.project import main

    cfg = tiny_config(PN, "model.num_experts=4", "model.bank_size=3", "model.code_size=2")
    ckpt = write(cfg, tmp_path / "pn")
    base = ["--checkpoint", str(ckpt), "--strategy", "most-frequent"]
    other = spec(tmp_path, "spec_b", SHA_B)
    assert main([*base, "--spec-data", str(other), "--output", str(tmp_path / "o")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("pn-project: error: tokenizer mismatch: ")
    assert_names_both(err, f"{other}/histogram.json records tokenizer {SHA_B[:12]}",
                      f"checkpoint {ckpt}/iter_0000000 was trained with",
                      "--allow-tokenizer-mismatch")
    assert not (tmp_path / "o").exists()
    assert main([*base, "--spec-data", str(other), "--output", str(tmp_path / "allowed"),
                 "--allow-tokenizer-mismatch"]) == 0
    assert main([*base, "--spec-data", str(spec(tmp_path, "spec_a", SHA_A)), "--output",
                 str(tmp_path / "same")]) == 0
    # the projected expert keeps the tokenizer of the network it comes from
    for name in ("allowed", "same"):
        assert checkpoint_fingerprint(tmp_path / name).sha256 == SHA_A


# -- pn-export-hf and pn-import-hf --------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A real SentencePiece/HF tokenizer (`pn-data train-tokenizer`) and a copy of its HF
    directory that records another tokenizer."""
    from data_tools.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok_hf")
    corpus = root / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in real_text_documents(30_000)))
    meta = train_tokenizer([str(corpus)], str(root / "a"), vocab_size=400, threads=1)
    record = json.loads((root / "a_hf" / "pn_tokenizer.json").read_text())
    assert record["sha256"] == meta["sha256"]  # the HF copy names its .model
    other = root / "b_hf"
    shutil.copytree(root / "a_hf", other)
    (other / "pn_tokenizer.json").write_text(json.dumps({"sha256": SHA_B, "model": "b.model"}))
    return {"a": root / "a_hf", "b": other, "sha": meta["sha256"], "model": root / "a.model"}


def test_pn_export_hf_and_import(world, tokenizers, tmp_path, capsys):
    from megatron_pn.cli.hf import export_main, import_main

    cfg = tiny_config(vocab=400, eod=2)
    ckpt = write(cfg, tmp_path / "ckpt", {"sha256": tokenizers["sha"],
                                          "model": str(tokenizers["model"])})
    base = ["--checkpoint", str(ckpt), "--output"]
    assert export_main([*base, str(tmp_path / "o"), "--tokenizer", str(tokenizers["b"])]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("pn-export-hf: error: tokenizer mismatch: ")
    assert_names_both(err, f"{tokenizers['b']}/pn_tokenizer.json records tokenizer {SHA_B[:12]}",
                      f"checkpoint {ckpt}/iter_0000000 was trained with "
                      f"{tokenizers['sha'][:12]}… (a.model)", "--allow-tokenizer-mismatch")
    assert not (tmp_path / "o").exists()
    assert export_main([*base, str(tmp_path / "allowed"), "--tokenizer", str(tokenizers["b"]),
                        "--allow-tokenizer-mismatch"]) == 0
    assert export_main([*base, str(tmp_path / "hf"), "--tokenizer", str(tokenizers["a"])]) == 0
    for name in ("allowed", "hf"):  # the export records the checkpoint's tokenizer
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["megatron_pn"]["tokenizer"]["sha256"] == tokenizers["sha"]
    # ... and pn-import-hf records it again in the checkpoint it writes
    assert import_main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    assert checkpoint_fingerprint(tmp_path / "back").sha256 == tokenizers["sha"]
