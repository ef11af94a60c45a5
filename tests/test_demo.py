"""A smoke run of `make demo` (configs/experiments/demo.yaml through the experiment runner) at a
reduced size: every command of the project chained as the demo chains them, ending in the
results tables and a Hugging Face model."""

from __future__ import annotations

import json

import pytest

from megatron_pn.cli.experiment import main as experiment


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, capsys):
    code = experiment(["run", "configs/experiments/demo.yaml", "domains=[bible]",
                       "generic_chars=400000", "spec_sizes.s200k=40000",
                       "methods.slm.budgets=[20]", "methods.pn.budgets=[20]",
                       "finetune_steps.s200k=10", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Per domain, spec size s200k" in out and "| bible |" in out
    assert "**macro-average**" in out
    assert (tmp_path / "hf" / "pn" / "bible" / "config.json").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("slm", "pn"):
        bible = results["methods"][method][0]["sizes"]["s200k"]["domains"]["bible"]
        assert bible["nll_before"] > 0 and bible["nll_after"] > 0, method
    # the demo evaluates on the test split, not on the validation split early stopping used
    evaluation = json.loads((tmp_path / "spec" / "pn" / "b20" / "bible_s200k"
                             / "eval_after.json").read_text())
    assert evaluation["datasets"][0]["name"] == "bible_test"
