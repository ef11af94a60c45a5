"""`pn-project`: one expert of a projected network, in closed form, as a dense SLM checkpoint.

    pn-project --checkpoint runs/pn32/checkpoints --spec-data runs/spec/arxiv_assign \\
        --strategy most-frequent --output runs/spec/arxiv_slm

`--spec-data` is the output directory of `pn-data assign` for the specialization set (its
cluster histogram, and the indexed dataset it was computed from). Strategies (paper, Table 5):
  most-frequent  the expert of the spec set's most frequent cluster
  best-loss      the expert with the lowest loss on the spec set's first --sample-tokens, in
                 pn-eval's windows (projection.json records each expert's loss and stderr)
  soft           one projection of the histogram-weighted code sum_i p(i|spec) E[i] (beyond the
                 paper; with a one-hot histogram it is most-frequent)
  cluster=I      expert I
The output is the checkpoint format `pn-train` writes (model weights only, any TP/PP on load):
fine-tune it with `pn-train CONFIG checkpoint.load=OUTPUT ...`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from megatron_pn.checkpoint_tools import ToolError
from megatron_pn.config import Config
from megatron_pn.families import one_hot
from pn_base.fileio import atomic_write_json, check_writable
from pn_base.outputs import HISTOGRAM
from pn_base.tokenizer_identity import require_same, spec_fingerprint

STRATEGIES = ("most-frequent", "best-loss", "soft", "cluster=I")


class ProjectionError(ToolError):
    pass


# -- the specialization set -----------------------------------------------------------------------

def read_spec(spec_dir: Path, k: int) -> dict:
    path = spec_dir / HISTOGRAM
    if not path.is_file():
        raise ProjectionError(f"--spec-data {spec_dir}: no {HISTOGRAM}; give the output "
                              "directory of `pn-data assign` for the specialization set")
    spec = json.loads(path.read_text())
    if spec.get("k") != k:
        raise ProjectionError(f"--spec-data {spec_dir}: assigned to {spec.get('k')} clusters but "
                              f"the checkpoint has {k} experts")
    tokens = np.asarray(spec["tokens"], dtype=np.float64)
    if tokens.sum() <= 0:
        raise ProjectionError(f"--spec-data {spec_dir}: the specialization set has no tokens")
    spec["p"] = tokens / tokens.sum()
    return spec


def check_same_clustering(cfg: Config, spec: dict, spec_dir: Path) -> None:
    """The spec set must be assigned with the centroids (and tokenizer) of the clustering the PN
    was trained on."""
    if not cfg.data.blend_file:
        return
    manifest = Path(cfg.data.blend_file).parent / "clusters.json"
    if not manifest.is_file():
        return
    clusters = json.loads(manifest.read_text())
    for key, what in (("centroids_sha256", "centroids"), ("tokenizer_sha256", "tokenizer")):
        if clusters.get(key) and spec.get(key) and clusters[key] != spec[key]:
            raise ProjectionError(
                f"--spec-data {spec_dir} was assigned with other {what} ({spec[key][:12]}) than "
                f"the clustering the checkpoint trained on ({manifest}: {clusters[key][:12]}); "
                f"re-run `pn-data assign --clusters {manifest.parent}`"
            )


# -- choosing the expert --------------------------------------------------------------------------

@torch.no_grad()
def expert_losses(model, cfg: Config, prefix: str, sample_tokens: int, device) -> list[dict]:
    """Every expert's result (per-token NLL and its standard error) on the first
    `sample_tokens` of the spec set, in pn-eval's windows (every token predicted once, within
    its document): the same fixed windows for every expert, as a fine-tuning's selection scores
    its checkpoints (train.valid_tokens: the same default)."""
    from types import SimpleNamespace

    from megatron_pn.evaluate import evaluate_set, held_out, model_eod_id

    held = held_out("spec", prefix, cfg.model.seq_length, sample_tokens)
    if not held.num_tokens:
        raise ProjectionError(f"spec data {prefix}: no tokens to score the experts on")
    loaded, eod = SimpleNamespace(model=model.eval(), cfg=cfg, device=device), model_eod_id(cfg)
    results = []
    for expert in range(cfg.model.num_experts):
        held.cluster_ids = np.full(len(held.windows), expert, dtype=np.int64)
        results.append(evaluate_set(loaded, held, eod, cfg.train.micro_batch_size))
    return results


def check_strategy(strategy: str) -> None:
    """--strategy is one of STRATEGIES (checked before anything is read)."""
    fixed = STRATEGIES[:-1]
    if strategy not in fixed and not (strategy.startswith("cluster=")
                                      and strategy.split("=", 1)[1].isdigit()):
        raise ProjectionError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")


def choose(strategy: str, spec: dict, model, cfg: Config, device, sample_tokens: int):
    """(expert or None, the cluster weights to instantiate, details) for a strategy: one-hot
    weights for an expert, the spec set's histogram for `soft`."""
    p, k = spec["p"], len(spec["p"])
    if strategy == "most-frequent":
        expert = int(np.argmax(p))
        return expert, one_hot(expert, k), {"p_expert": float(p[expert])}
    if strategy.startswith("cluster="):
        expert = int(strategy.split("=", 1)[1])
        if not 0 <= expert < k:
            raise ProjectionError(f"--strategy {strategy}: the checkpoint has experts 0..{k - 1}")
        return expert, one_hot(expert, k), {"p_expert": float(p[expert])}
    if strategy == "soft":
        return None, p.tolist(), {"histogram": p.tolist()}
    if strategy == "best-loss":
        results = expert_losses(model, cfg, spec["source_prefix"], sample_tokens, device)
        losses = [r["nll"] for r in results]
        expert = int(np.argmin(losses))
        return (expert, one_hot(expert, k),
                {"losses": losses, "stderrs": [r["stderr"] for r in results],
                 "sample_tokens": sample_tokens, "tokens": results[0]["tokens"]})
    raise ProjectionError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")


def project(args) -> dict:
    import dataclasses

    from megatron_pn import checkpoint  # megatron-core: seconds to import, not for --help
    from megatron_pn.families import family_of
    from megatron_pn.run_tokenizer import checkpoint_fingerprint
    from megatron_pn.model import build_model
    from megatron_pn.checkpoint_tools import inference_world, load_model, resolve_checkpoint

    start = time.time()
    check_strategy(args.strategy)
    check_writable(args.output, args.overwrite)
    path = resolve_checkpoint(args.checkpoint)
    cfg = checkpoint.saved_config(path)
    family = family_of(cfg)
    if not family.projectable:
        raise ProjectionError(f"--checkpoint {args.checkpoint} is a {cfg.model.type} checkpoint; "
                              "pn-project needs a model with one expert per cluster (model.type "
                              "pn or cond)")
    spec = read_spec(args.spec_data, cfg.model.num_experts)
    check_same_clustering(cfg, spec, args.spec_data)
    trained = checkpoint_fingerprint(path)  # the projected expert keeps its tokenizer
    require_same(spec_fingerprint(args.spec_data, spec), trained,
                 allow=args.allow_tokenizer_mismatch,
                 fix="assign a specialization set tokenized with the checkpoint's tokenizer")
    with inference_world(single_process=True) as env:
        loaded = load_model(args.checkpoint, env)
        expert, weights, details = choose(args.strategy, spec, loaded.model, loaded.cfg,
                                          env.device, args.sample_tokens)
        dense_cfg = dataclasses.replace(loaded.cfg, model=family.dense_config(loaded.cfg.model))
        # every weight comes from the projection
        [dense] = build_model(dense_cfg, env.device.type, initialize=False)
        load_every_weight(dense, family.dense_state(loaded.model, weights))
        record = {"source": str(loaded.path), "strategy": args.strategy, "expert": expert,
                  "spec_data": str(args.spec_data), **details,
                  "seconds": time.time() - start}
        checkpoint.save(args.output, 0, [dense], extra={
            "config": dense_cfg.to_dict(), "projection": record,
            "tokenizer": trained.record() if trained else None})
        if env.rank == 0:  # the choice, readable without loading the checkpoint
            atomic_write_json(Path(args.output) / "projection.json", record)
    return record


def load_every_weight(dense, state: dict) -> None:
    """Strict loading (megatron's `_extra_state` entries aside): a weight the projection did
    not produce would stay uninitialized memory."""
    missing, unexpected = dense.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"the projected state does not fit the dense model: missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]}")
