"""A smoke run of the whole pipeline (`make demo`) at a reduced size: every command of the
project chained as the demo chains them, ending in the results table and a HF model."""

from __future__ import annotations

import pytest

from megatron_pn.demo import main as demo


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, capsys):
    code = demo(["--out", str(tmp_path), "--domains", "bible", "--generic-chars", "400000",
                 "--spec-chars", "40000", "--pretrain-steps", "20", "--finetune-steps", "10"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| bible |" in out and "**macro-average**" in out
    assert (tmp_path / "hf" / "bible" / "config.json").is_file()
    assert (tmp_path / "spec" / "bible" / "ft" / "best_checkpointed_iteration.txt").is_file()
