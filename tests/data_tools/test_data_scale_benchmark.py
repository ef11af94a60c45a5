"""benchmarks/data_scale.py on a tiny size, in-process, so that it does not rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("data_scale", REPO / "benchmarks" / "data_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_scale_benchmark_runs_every_step_on_a_tiny_corpus(tmp_path):
    from data_tools.windows import IndexedTokens

    bench = load_benchmark()
    work, report = tmp_path / "work", tmp_path / "results.md"
    bench.main(["--windows", "3000", "--dim", "16", "--ks", "4,8", "--workdir", str(work),
                "--in-process", "--keep", "--json", str(tmp_path / "out.json"),
                "--append", str(report)])
    result = json.loads((tmp_path / "out.json").read_text())
    assert [(s["step"], s["k"]) for s in result["steps"]] == [
        ("assign", 4), ("write", 4), ("assign", 8), ("write", 8), ("resample", 8)]
    assert result["input"]["windows"] == 3000
    assert all(s["windows_per_s"] > 0 and s["peak_rss_gib"] > 0 for s in result["steps"])

    corpus = IndexedTokens(work / "corpus")
    for k in (4, 8):
        hist = json.loads((work / f"k{k}" / "histogram.json").read_text())
        lengths = [IndexedTokens(work / f"k{k}" / f"cluster_{c:04d}").lengths for c in range(k)]
        assert sum(len(x) for x in lengths) == hist["num_windows"] == 3000
        assert [int(x.sum()) for x in lengths] == hist["tokens"]
        # every window + one EOD per window: the corpus minus its own EODs, plus one per window
        assert hist["num_tokens"] == corpus.num_tokens - len(corpus) + 3000
    assert np.load(work / "k8" / "assignments.npy").max() < 8
    assert "| resample | 8 |" in report.read_text()
