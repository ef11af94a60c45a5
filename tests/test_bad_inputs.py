"""Bad input, over every command: one line `COMMAND: error: ...` naming the file or key, exit
code 2, no traceback, and nothing written or changed in the workspace (issue 14's table).

Every case runs the command's entry point in this process (the same code a console script
runs); a traceback would surface here as an exception and fail the case.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from helpers import (real_text_documents, tiny_overrides, write_byte_dataset,
                     write_model_checkpoint)

SLM = "configs/tiny/slm.yaml"


def entry_points() -> dict:
    from data_tools.cli import main as pn_data
    from megatron_pn.cli.evaluate import main as pn_eval
    from megatron_pn.cli.experiment import main as pn_experiment
    from megatron_pn.cli.hf import export_main, import_main
    from megatron_pn.cli.merge_lora import main as pn_merge_lora
    from megatron_pn.cli.plan import main as pn_plan
    from megatron_pn.cli.project import main as pn_project
    from megatron_pn.cli.train import main as pn_train

    return {"pn-train": pn_train, "pn-eval": pn_eval, "pn-project": pn_project,
            "pn-export-hf": export_main, "pn-import-hf": import_main, "pn-data": pn_data,
            "pn-plan": pn_plan, "pn-experiment": pn_experiment, "pn-merge-lora": pn_merge_lora}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of good and bad inputs: a byte-level dataset, a tiny SLM checkpoint,
    a small SentencePiece tokenizer, JSONL text, and broken files of every kind."""
    from data_tools.cli import main as pn_data

    root = tmp_path_factory.mktemp("ws")
    docs = real_text_documents(60_000)
    write_byte_dataset(root / "bytes", docs)
    write_model_checkpoint(root / "ckpt", [SLM], tiny_overrides(root / "bytes", root / "run"))
    with gzip.open(root / "text.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    assert pn_data(["train-tokenizer", "--input", str(root / "text.jsonl.gz"), "--vocab-size",
                    "600", "--output", str(root / "tok")]) == 0
    (root / "empty.jsonl").write_text("")
    (root / "file").write_text("a file, not a directory\n")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "truncated.json").write_text('{"methods": {"slm": [')
    (root / "garbled_hf").mkdir()
    (root / "garbled_hf" / "config.json").write_text("{not json")
    (root / "weightless_hf").mkdir()
    (root / "weightless_hf" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 257, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}))
    (root / "garbled_hf_parent").mkdir()  # a directory of other files: --overwrite refuses it
    (root / "garbled_hf_parent" / "notes.txt").write_text("not an export\n")
    (root / "corrupt.model").write_text("not a SentencePiece model\n")
    (root / "exp").mkdir()
    (root / "exp" / "experiment.json").write_text('{"config": ')
    return root


TRAIN = tiny_overrides(Path("{ws}/bytes"), Path("{ws}/new_run"))
LORA = ["checkpoint.load={ws}/ckpt", "finetune.lora.rank=8"]
CASES = [
    # pn-train
    ("pn-train", ["{ws}/nope.yaml"], "nope.yaml"),
    ("pn-train", ["{ws}/bad.yaml"], "bad.yaml"),
    ("pn-train", [SLM, *TRAIN, "train.lrr=1"], "lrr"),
    ("pn-train", [SLM, *TRAIN, "train.lr=abc"], "train.lr"),
    ("pn-train", [SLM, *TRAIN, "model.type=bogus"], "model.type"),
    ("pn-train", [SLM, *TRAIN, "data.blend=[{ws}/nope]"], "nope"),
    ("pn-train", [SLM, *TRAIN, "checkpoint.load={ws}/nope"], "nope"),
    ("pn-train", [SLM, *TRAIN, "engine=bogus"], "engine"),
    ("pn-train", [SLM, *TRAIN, "parallel.tensor=3"], "parallel.tensor"),
    # pn-train, LoRA (finetune.lora)
    ("pn-train", [SLM, *TRAIN, *LORA, "finetune.lora.rank=0"], "finetune.lora.rank"),
    ("pn-train", [SLM, *TRAIN, *LORA, "finetune.lora.rank=-4"], "finetune.lora.rank"),
    ("pn-train", [SLM, *TRAIN, *LORA, "finetune.lora.targets=ffn"], "finetune.lora.targets"),
    ("pn-train", [SLM, *TRAIN, *LORA, "finetune.lora.alpha=0"], "finetune.lora.alpha"),
    ("pn-train", [SLM, *TRAIN, *LORA, "finetune.lora.dropout=1"], "finetune.lora.dropout"),
    ("pn-train", ["configs/tiny/pn.yaml", *TRAIN, *LORA], "model.type pn"),
    ("pn-train", [SLM, *TRAIN, "finetune.lora.rank=8"], "checkpoint.load"),
    ("pn-train", [SLM, *TRAIN, *LORA, "engine=deepspeed"], "engine"),
    # pn-eval
    ("pn-eval", ["--checkpoint", "{ws}/nope", "--data", "{ws}/bytes"], "nope"),
    ("pn-eval", ["--checkpoint", "{ws}/ckpt", "--data", "{ws}/nope"], "nope"),
    ("pn-eval", ["--checkpoint", "{ws}/file", "--data", "{ws}/bytes"], "file"),
    ("pn-eval", ["--data", "{ws}/bytes"], "--checkpoint"),
    ("pn-eval", ["--checkpoint", "{ws}/ckpt", "--data", "{ws}/bytes", "--expert", "3"],
     "expert"),
    ("pn-eval", ["--checkpoint", "{ws}/ckpt", "--data", "{ws}/bytes", "--output",
                 "{ws}/file"], "file"),
    ("pn-eval", ["--batch", "{ws}/nope.json"], "nope.json"),
    ("pn-eval", ["--checkpoint", "{ws}/ckpt", "--data", "{ws}/bytes", "--max-tokens", "0"],
     "--max-tokens"),
    # pn-merge-lora
    ("pn-merge-lora", ["--checkpoint", "{ws}/nope", "--output", "{ws}/merged"], "nope"),
    ("pn-merge-lora", ["--checkpoint", "{ws}/ckpt", "--output", "{ws}/merged"],
     "holds no LoRA adapters"),
    ("pn-export-hf", ["--checkpoint", "{ws}/ckpt", "--output", "{ws}/hf_out", "--adapter"],
     "--adapter"),
    # pn-project
    ("pn-project", ["--checkpoint", "{ws}/nope", "--spec-data", "{ws}/nope_spec", "--output",
                    "{ws}/projected"], "nope"),
    ("pn-project", ["--checkpoint", "{ws}/ckpt", "--spec-data", "{ws}/nope_spec", "--output",
                    "{ws}/projected"], "{ws}/"),
    ("pn-project", ["--checkpoint", "{ws}/ckpt", "--spec-data", "{ws}/nope_spec",
                    "--strategy", "bogus", "--output", "{ws}/projected"], "strategy"),
    ("pn-project", ["--checkpoint", "{ws}/ckpt", "--spec-data", "{ws}/nope_spec", "--output",
                    "{ws}/file"], "file"),
    # pn-export-hf
    ("pn-export-hf", ["--checkpoint", "{ws}/nope", "--output", "{ws}/hf_out"], "nope"),
    ("pn-export-hf", ["--checkpoint", "{ws}/ckpt", "--output", "{ws}/file"], "file"),
    ("pn-export-hf", ["--checkpoint", "{ws}/ckpt", "--output", "{ws}/hf_out", "--tokenizer",
                      "{ws}/nope_tok"], "nope_tok"),
    ("pn-export-hf", ["--checkpoint", "{ws}/ckpt", "--output", "{ws}/hf_out", "--expert",
                      "2"], "expert"),
    ("pn-export-hf", ["--checkpoint", "{ws}/ckpt", "--output", "{ws}/garbled_hf_parent",
                      "--overwrite"], "not a Hugging Face model"),
    # pn-import-hf
    ("pn-import-hf", ["--hf", "{ws}/nope", "--output", "{ws}/imported"], "nope"),
    ("pn-import-hf", ["--hf", "{ws}/garbled_hf", "--output", "{ws}/imported"], "config.json"),
    ("pn-import-hf", ["--hf", "{ws}/weightless_hf", "--output", "{ws}/imported"],
     "safetensors"),
    ("pn-import-hf", ["--hf", "{ws}/weightless_hf", "--output", "{ws}/file"], "file"),
    # pn-data
    ("pn-data", ["train-tokenizer", "--input", "{ws}/nope.jsonl", "--vocab-size", "300",
                 "--output", "{ws}/tok2"], "nope.jsonl"),
    ("pn-data", ["preprocess", "--input", "{ws}/nope.jsonl", "--tokenizer-model",
                 "{ws}/tok.model", "--output-prefix", "{ws}/pre"], "nope.jsonl"),
    ("pn-data", ["preprocess", "--input", "{ws}/text.jsonl.gz", "--tokenizer-model",
                 "{ws}/nope.model", "--output-prefix", "{ws}/pre"], "nope.model"),
    ("pn-data", ["preprocess", "--input", "{ws}/text.jsonl.gz", "--tokenizer-model",
                 "{ws}/corrupt.model", "--output-prefix", "{ws}/pre"], "corrupt.model"),
    ("pn-train", [SLM, *TRAIN, "model.vocab_size=100"], "vocab"),
    ("pn-train", [SLM, *TRAIN, "data.tokenizer_model={ws}/corrupt.model"], "corrupt.model"),
    ("pn-train", [SLM, *TRAIN, "checkpoint.load={ws}/ckpt", "model.hidden_size=128"],
     "hidden_size"),
    ("pn-data", ["preprocess", "--input", "{ws}/empty.jsonl", "--tokenizer-model",
                 "{ws}/tok.model", "--output-prefix", "{ws}/pre"], "empty.jsonl"),
    ("pn-data", ["preprocess", "--input", "{ws}/text.jsonl.gz", "--tokenizer-model",
                 "{ws}/tok.model", "--output-prefix", "{ws}/file/pre"], "file"),
    ("pn-data", ["embed", "--data-prefix", "{ws}/nope", "--tokenizer-model", "{ws}/tok.model",
                 "--output", "{ws}/emb"], "nope"),
    ("pn-data", ["cluster", "--embeddings", "{ws}/nope", "--k", "2", "--output", "{ws}/cl"],
     "nope"),
    ("pn-data", ["assign", "--data-prefix", "{ws}/bytes", "--clusters", "{ws}/nope",
                 "--output", "{ws}/as"], "nope"),
    ("pn-data", ["merge", "--inputs", "{ws}/nope", "{ws}/bytes", "--output-prefix",
                 "{ws}/merged"], "nope"),
    # pn-plan
    ("pn-plan", ["--results", "{ws}/nope.json", "--domains", "5", "--spec-size", "s50k"],
     "nope.json"),
    ("pn-plan", ["--results", "{ws}/truncated.json", "--domains", "5", "--spec-size", "s50k"],
     "truncated.json"),
    # pn-experiment
    ("pn-experiment", ["run", "{ws}/nope.yaml"], "nope.yaml"),
    ("pn-experiment", ["run", "configs/experiments/tiny.yaml", "bogus_key=1", "--out",
                       "{ws}/exp_out"], "bogus_key"),
    ("pn-experiment", ["list", "configs/experiments/tiny.yaml", "domains=[nope]"], "nope"),
    ("pn-experiment", ["list", "configs/experiments/tiny.yaml", "methods.slm.budgets=[-1]"],
     "budgets"),
    ("pn-experiment", ["report", "{ws}/nope_dir"], "experiment.json"),
    ("pn-experiment", ["report", "{ws}/exp"], "experiment.json"),
    # command lines argparse refuses: the same one line
    ("pn-train", [], "CONFIG.yaml"),
    ("pn-project", ["--checkpoint", "{ws}/ckpt", "--output", "{ws}/projected"],
     "one of the arguments --spec-data --histogram is required"),
    ("pn-project", ["--checkpoint", "{ws}/ckpt", "--spec-data", "{ws}/nope_spec", "--histogram",
                    "{ws}/h.json", "--output", "{ws}/projected"], "not allowed with"),
    ("pn-eval", ["--checkpoint", "{ws}/ckpt", "--precision", "fp8"], "fp8"),
    ("pn-data", ["preprocess", "--bogus"], "required"),
    ("pn-experiment", [], "command"),
]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.parametrize("command, argv, names", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_nothing_written(ws, capsys, monkeypatch, command,
                                                          argv, names):
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    before = snapshot(ws)
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    try:
        code = entry_points()[command](argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{command}") and ": error: " in lines[0], err
    assert names.replace("{ws}", str(ws)) in lines[0], err
    assert snapshot(ws) == before, "the workspace changed"
    os.environ.pop("RANK", None)
