"""The clustering a routed model was trained on, known by its centroids' sha256 (`pn-data
cluster` records it in clusters.json, `pn-data assign` in histogram.json). pn-train stores it in
the checkpoint, beside the tokenizer, so that pn-project can refuse a histogram of another
clustering when the training data is long gone."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_pn.config import Config
from megatron_pn.families import family_of

MANIFEST = "clusters.json"  # `pn-data cluster`'s, beside its generic_blend.json


def blend_manifest(cfg: Config) -> tuple[Path, dict] | None:
    """(path, content) of the clusters.json beside data.blend_file; None when there is none
    (a blend written by hand, or data deleted since)."""
    if not cfg.data.blend_file:
        return None
    path = Path(cfg.data.blend_file).parent / MANIFEST
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (path, content) if isinstance(content, dict) else None


def run_clustering(cfg: Config) -> dict | None:
    """What a routed run's checkpoints record: {"centroids_sha256", "k"} of its clustering."""
    manifest = blend_manifest(cfg) if family_of(cfg).routed else None
    if manifest is None or not manifest[1].get("centroids_sha256"):
        return None
    return {"centroids_sha256": manifest[1]["centroids_sha256"], "k": manifest[1].get("k")}


def checkpoint_clustering(iteration: Path, cfg: Config) -> dict | None:
    """The clustering a checkpoint (iteration directory) was trained on, with a "source" that
    says where that is known: its record, else — saved before clusterings were recorded — the
    clusters.json beside its data.blend_file while that is still there (with its
    "tokenizer_sha256")."""
    from megatron.core import dist_checkpointing

    recorded = dist_checkpointing.load_common_state_dict(str(iteration)).get("clustering")
    if recorded:
        return {**recorded, "source": f"checkpoint {iteration}"}
    manifest = blend_manifest(cfg)
    return {**manifest[1], "source": str(manifest[0])} if manifest else None
