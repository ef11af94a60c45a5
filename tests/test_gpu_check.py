"""benchmarks/gpu_check.sh stays runnable: its --cpu-smoke mode runs every CPU-capable stage
(tests, throughput sweep, PN MLP grouped vs loop, PN overhead) at tiny sizes and reports them
in OUT/RESULTS.md."""

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
    for stage in ("device", "tests", "throughput_slm", "pn_mlp", "pn_overhead"):
        assert f"| {stage} | ok |" in check
    assert "| configs/tiny/slm.yaml | train.micro_batch_size=4 |" in results
    assert "model.hidden_size=64 model.ffn_hidden_size=176" in results  # the tiny PN shape
    assert "| PN, regrouped, grouped GEMM |" in results  # the grouped-vs-loop row
    # a copy, added to: every section of the repository's file is still there, whole
    for section in (REPO / "benchmarks" / "RESULTS.md").read_text().split("\n## "):
        assert section.rstrip() in results


@pytest.mark.slow
def test_throughput_sweep_keeps_its_numbers_when_one_run_fails(tmp_path):
    """A one-shot GPU session must not lose the sweep to one run (out of memory, say): the failed
    run is a row of its own, the others are measured, and the exit status says something failed."""
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--configs", "configs/tiny/slm.yaml",
         "--micro-batch-sizes", "3", "2", "--steps", "2", "--warmup", "0", "--results", str(results)],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not divisible by train.micro_batch_size 3" in proc.stderr  # pn-train's own line
    table = results.read_text()
    assert "| train.micro_batch_size=3 | failed (pn-train exit code" in table
    measured = [line for line in table.splitlines() if "| train.micro_batch_size=2 |" in line]
    assert len(measured) == 1 and float(measured[0].split("|")[3].replace(",", "")) > 0
