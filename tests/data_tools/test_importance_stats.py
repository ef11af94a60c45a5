"""`pn-data importance` and `pn-data stats`: known-answer weights, the resampled histogram, errors.

The clusterings here are constructed (tokens of a window carry its cluster id), so that what a
blend draws can be traced back to its cluster by reading the tokens themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from data_tools import cluster as cluster_mod
from data_tools.cli import main
from data_tools.importance import importance_weights, repeat_factors
from data_tools.indexed import megatron_indexed_dataset
from data_tools.stats import concentration
from data_tools.windows import IndexedTokens

EOD = 2
MARK = 100  # token value of cluster c = MARK + c


def read_blend(path) -> tuple[list, list]:
    """([(weight, prefix), ...], cluster ids) of a blend file, as the trainer reads it."""
    blend = json.loads(Path(path).read_text())
    return [(float(w), prefix) for w, prefix in blend["blend"]], blend["cluster_ids"]


# ---------------------------------------------------------------- known answers


def test_weights_known_answer_with_empty_clusters():
    generic = np.array([50.0, 30.0, 20.0, 0.0])  # cluster 3: spec only
    spec = np.array([0.0, 60.0, 20.0, 20.0])     # cluster 0: generic only
    r = importance_weights(generic, spec)
    assert r["dropped_spec_mass"] == pytest.approx(0.2)
    assert r["spec_only_clusters"] == [3]
    np.testing.assert_allclose(r["target_share"], [0.0, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(r["weights_w"], [0.0, 2.5, 1.25, 0.0])
    assert r["ess_fraction"] == pytest.approx(1 / (0.75**2 / 0.3 + 0.25**2 / 0.2))
    assert r["ess"] == pytest.approx(100 * r["ess_fraction"])

    per_cluster, overall, unique = repeat_factors(r["target_share"], generic, 100)
    np.testing.assert_allclose(per_cluster, [0.0, 2.5, 1.25, 0.0])
    assert unique == pytest.approx(50) and overall == pytest.approx(2.0)


def test_identical_histograms_give_unit_weights_and_full_ess():
    counts = np.array([7.0, 1.0, 2.0])
    r = importance_weights(counts, counts * 3)
    np.testing.assert_allclose(r["weights_w"], 1.0)
    assert r["ess_fraction"] == pytest.approx(1.0) and r["dropped_spec_mass"] == 0


def test_spec_mass_only_in_spec_only_clusters_is_an_error():
    with pytest.raises(ValueError, match="nothing to resample"):
        importance_weights(np.array([5.0, 0.0]), np.array([0.0, 3.0]))


def test_concentration_on_constructed_histograms():
    single = concentration([0, 10, 0, 0])
    assert single["entropy_nats"] == 0 and single["top_fraction"] == 1.0
    assert single["top_cluster"] == 1 and single["nonempty_clusters"] == 1

    uniform = concentration([5] * 8)
    assert uniform["entropy_nats"] == pytest.approx(math.log(8))
    assert uniform["entropy_bits"] == pytest.approx(3.0)
    assert uniform["top_fraction"] == pytest.approx(1 / 8)

    skewed = concentration([3, 1])
    assert skewed["entropy_nats"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert skewed["top_fraction"] == pytest.approx(0.75)


# ---------------------------------------------------------------- constructed clusterings


def build_clustering(root: Path, windows_per_cluster: list[int], length: int = 20) -> Path:
    """A generic source dataset + `cluster`-style outputs, window tokens = MARK + cluster."""
    import torch

    k = len(windows_per_cluster)
    assignments = np.repeat(np.arange(k, dtype=np.int32), windows_per_cluster)
    np.random.default_rng(0).shuffle(assignments)
    builder = megatron_indexed_dataset().IndexedDatasetBuilder(str(root / "source.bin"),
                                                             dtype=np.uint16)
    for c in assignments:
        builder.add_item(torch.tensor([MARK + int(c)] * length + [EOD]))
        builder.end_document()
    builder.finalize(str(root / "source.idx"))

    windows = np.stack([np.arange(len(assignments)), np.zeros(len(assignments), dtype=int),
                        np.full(len(assignments), length)], axis=1).astype(np.int64)
    out = root / "clusters"
    out.mkdir()
    params = {"k": k, "centroids_sha256": "c" * 64, "tokenizer_sha256": "t" * 64,
              "embedding_model": "test", "metric": "cosine", "eod_id": EOD,
              "source_prefix": str(root / "source")}
    np.save(out / "assignments.npy", assignments)
    cluster_mod.write_per_cluster(out, IndexedTokens(root / "source"), windows, assignments,
                                  params, out)
    return out


def write_spec(root: Path, tokens_per_cluster: list[int], sha: str = "c" * 64) -> Path:
    spec = root / "spec"
    spec.mkdir(exist_ok=True)
    (spec / "histogram.json").write_text(json.dumps({
        "k": len(tokens_per_cluster), "tokens": tokens_per_cluster, "centroids_sha256": sha,
        "windows": [t // 21 for t in tokens_per_cluster]}))
    return spec


def run_importance(generic: Path, spec: Path, output: Path, *extra: str) -> int:
    return main(["importance", "--generic", str(generic), "--spec", str(spec),
                 "--target-tokens", "5e4", "--output", str(output), *extra])


@pytest.fixture()
def clustering(tmp_path):
    # cluster 3 has no generic windows; the spec set below has none in cluster 0
    return build_clustering(tmp_path, [40, 25, 10, 0, 5])


def test_blend_file_weights_and_prefixes(tmp_path, clustering, capsys):
    spec = write_spec(tmp_path, [0, 210, 420, 210, 210])
    out = tmp_path / "out" / "blend.json"
    assert run_importance(clustering, spec, out) == 0
    blend = json.loads(out.read_text())
    assert blend["dropped_spec_mass"] == pytest.approx(0.2)
    assert blend["spec_only_clusters"] == [3]
    assert blend["cluster_ids"] == [1, 2, 4]
    np.testing.assert_allclose([w for w, _ in blend["blend"]], [0.25, 0.5, 0.25])
    generic_p = np.array([40, 25, 10, 0, 5]) / 80
    np.testing.assert_allclose(blend["weights_w"][1], 0.25 / generic_p[1])
    assert blend["weights_w"][0] == 0 and blend["weights_w"][3] == 0
    repeats = blend["expected_repeat_factor"]["per_cluster"]
    assert repeats[2] == pytest.approx(0.5 * 50000 / (10 * 21))
    stdout = capsys.readouterr().out
    assert "ESS" in stdout and "repeat factor" in stdout

    entries, ids = read_blend(out)
    for (_, prefix), c in zip(entries, ids):
        assert prefix == str(clustering / f"cluster_{c:04d}")
        data = IndexedTokens(prefix)
        assert len(data) > 0 and np.all(data.tokens[data.tokens != EOD] == MARK + c)


def test_resampled_histogram_matches_the_specialization_histogram(tmp_path, clustering):
    spec_tokens = [0, 300, 700, 0, 1000]
    spec = write_spec(tmp_path, spec_tokens)
    out = tmp_path / "blend.json"
    assert run_importance(clustering, spec, out) == 0
    entries, _ = read_blend(out)
    weights = np.array([w for w, _ in entries])
    expected = np.array([t for t in spec_tokens if t]) / sum(spec_tokens)

    # megatron-core's blending index (what BlendedDataset uses) with these weights
    from megatron.core.datasets import helpers

    size = 20000
    dataset_index = np.zeros(size, dtype=np.int16)
    helpers.build_blending_indices(dataset_index, np.zeros(size, dtype=np.int64), weights,
                                   len(weights), size, False)
    np.testing.assert_allclose(np.bincount(dataset_index) / size, expected, atol=1e-3)

    # random 64-token sequences drawn from the blend; the cluster is read from the tokens
    rng = np.random.default_rng(0)
    streams = [IndexedTokens(prefix).tokens for _, prefix in entries]
    drawn = np.zeros(MARK + 5, dtype=np.int64)  # token counts by token value
    draws = 4000
    for source in rng.choice(len(entries), size=draws, p=weights):
        stream = streams[source]
        start = rng.integers(len(stream))
        sequence = np.take(stream, np.arange(start, start + 64), mode="wrap")
        drawn += np.bincount(sequence, minlength=len(drawn))
    per_cluster = drawn[MARK : MARK + 5]
    observed = per_cluster[per_cluster > 0] / per_cluster.sum()
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(observed - expected) < 4 * sigma)


def test_importance_errors_name_the_file(tmp_path, clustering, capsys):
    (tmp_path / "other").mkdir()
    other = write_spec(tmp_path / "other", [1, 1, 1, 1, 1], sha="d" * 64)
    assert run_importance(clustering, other, tmp_path / "b.json") == 2
    err = capsys.readouterr().err
    assert "histogram.json" in err and "another clustering" in err and "pn-data assign" in err

    empty = write_spec(tmp_path, [0, 0, 0, 0, 0])
    assert run_importance(clustering, empty, tmp_path / "b.json") == 2
    err = capsys.readouterr().err
    assert "histogram.json" in err and "empty" in err
    assert not (tmp_path / "b.json").exists()


def test_importance_refuses_to_overwrite(tmp_path, clustering, capsys):
    spec = write_spec(tmp_path, [0, 1, 1, 0, 1])
    out = tmp_path / "blend.json"
    out.write_text("{}")
    assert run_importance(clustering, spec, out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "{}"
    assert run_importance(clustering, spec, out, "--overwrite") == 0
    assert "blend" in json.loads(out.read_text())


def test_generic_blend_is_the_generic_distribution(clustering):
    entries, ids = read_blend(clustering / "generic_blend.json")
    assert ids == [0, 1, 2, 4]
    np.testing.assert_allclose([w for w, _ in entries], np.array([40, 25, 10, 5]) / 80)


# ---------------------------------------------------------------- stats


def test_stats_writes_json_markdown_png(tmp_path, clustering, capsys):
    spec = write_spec(tmp_path, [0, 0, 21, 0, 63])
    prefix = tmp_path / "report" / "concentration"
    argv = ["stats", "--assignments", str(clustering), str(spec), "--names", "generic", "spec",
            "--output", str(prefix)]
    assert main(argv) == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    generic, spec_stats = report["corpora"]
    assert report["unit"] == "tokens" and generic["name"] == "generic"
    assert generic["top_cluster"] == 0 and generic["top_fraction"] == pytest.approx(0.5)
    assert spec_stats["top_fraction"] == pytest.approx(0.75)
    assert spec_stats["entropy_bits"] == pytest.approx(
        -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    table = prefix.with_suffix(".md").read_text()
    assert "| spec | 5 | 84 |" in table
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    assert main(argv) == 2  # no overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--unit", "windows"]) == 0
    assert json.loads(prefix.with_suffix(".json").read_text())["unit"] == "windows"


def test_stats_bad_inputs(tmp_path, clustering, capsys):
    out = str(tmp_path / "s")
    assert main(["stats", "--assignments", str(clustering), "--names", "a", "b",
                 "--output", out]) == 2
    assert "--names" in capsys.readouterr().err
    assert main(["stats", "--assignments", str(tmp_path / "nope"), "--output", out]) == 2
    err = capsys.readouterr().err
    assert "nope/histogram.json" in err and "pn-data assign" in err
