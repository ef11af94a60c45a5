"""benchmarks/gpu_check.sh stays runnable: its --cpu-smoke mode runs every CPU-capable stage
(tests, throughput sweep, PN overhead) at tiny sizes and reports them in OUT/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, train_env


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=train_env({"PYTHON": sys.executable}),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = (tmp_path / "RESULTS.md").read_text()
    check = results[results.index("## GPU check: CPU only"):]
    for stage in ("device", "tests", "throughput_slm", "pn_overhead"):
        assert f"| {stage} | ok |" in check
    assert "| configs/tiny/slm.yaml | train.micro_batch_size=4 |" in results
    assert "model.hidden_size=64 model.ffn_hidden_size=176" in results  # the tiny PN shape
    # a copy, added to: every section of the repository's file is still there, whole
    for section in (REPO / "benchmarks" / "RESULTS.md").read_text().split("\n## "):
        assert section.rstrip() in results
