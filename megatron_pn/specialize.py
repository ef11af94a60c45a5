"""`pn-project`: one expert of a projected network (or the mixture of a cluster histogram), in
closed form, as a dense SLM checkpoint.

    pn-project --checkpoint runs/pn32/checkpoints --spec-data runs/spec/arxiv_assign \\
        --strategy most-frequent --output runs/spec/arxiv_slm

`--spec-data` is the output directory of `pn-data assign` for the specialization set (its
cluster histogram, and the indexed dataset it was computed from). `--histogram FILE` instead
takes the histogram alone — a histogram.json of `pn-data assign`, or {"k", "tokens" (or "p"),
"centroids_sha256"} — from a data owner who sends no text; it needs neither the spec set nor
the training data, and its "centroids_sha256" must be the clustering the checkpoint was trained
on (pn-train records it in the checkpoint). Strategies (paper, Table 5):
  most-frequent  the expert of the spec set's most frequent cluster
  best-loss      the expert with the lowest loss on the spec set's first --sample-tokens, in
                 pn-eval's windows (projection.json records each expert's loss and stderr;
                 --spec-data only)
  histogram      the dense model the checkpoint is for the spec set's cluster histogram p, in
                 one closed-form step (a hard-routed PN: the projection of the code
                 sum_i p(i) E[i]; beyond the paper; a one-hot histogram gives that expert)
  cluster=I      expert I
The output is the checkpoint format `pn-train` writes (model weights only, any TP/PP on load):
fine-tune it with `pn-train CONFIG checkpoint.load=OUTPUT ...`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megatron_pn.checkpoint_tools import ToolError
from megatron_pn.config import Config
from megatron_pn.families import one_hot
from pn_base.fileio import atomic_write_json, check_writable, file_sha256
from pn_base.outputs import HISTOGRAM
from pn_base.tokenizer_identity import from_record, require_same, spec_fingerprint

STRATEGIES = ("most-frequent", "best-loss", "histogram", "cluster=I")
NEEDS_TEXT = ("best-loss",)  # strategies that read the spec set's tokens, not only its histogram
CLUSTERING_FLAG = "--allow-clustering-mismatch"


class ProjectionError(ToolError):
    pass


# -- the specialization set's histogram ---------------------------------------------------------

def histogram_file(args) -> tuple[Path, str]:
    """The histogram.json to read, and how errors name it (the option and the file)."""
    if args.histogram:
        if args.histogram.is_dir():
            raise ProjectionError(f"--histogram {args.histogram} is a directory; give the "
                                  f"file, {args.histogram / HISTOGRAM}, or pass the directory "
                                  "as --spec-data")
        return args.histogram, f"--histogram {args.histogram}"
    path = args.spec_data / HISTOGRAM
    if not path.is_file():
        raise ProjectionError(f"--spec-data {args.spec_data}: no {HISTOGRAM}; give the output "
                              "directory of `pn-data assign` for the specialization set")
    return path, f"--spec-data {path}"


def read_histogram(path: Path, k: int, what: str) -> dict:
    """A histogram.json of `pn-data assign`, or its minimal form {"k", "tokens" (or "p"),
    "centroids_sha256"}, with "p": its cluster weights, summing to 1."""
    try:
        spec = json.loads(path.read_text())
    except OSError as err:
        raise ProjectionError(f"{what}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise ProjectionError(f"{what}: not valid JSON ({err}); give a {HISTOGRAM} of "
                              "`pn-data assign`") from None
    if not isinstance(spec, dict):
        raise ProjectionError(f'{what}: expected a JSON object with "k" and "tokens"')
    if spec.get("k") != k or isinstance(spec.get("k"), bool):
        given = f"is {spec['k']!r}" if "k" in spec else "is missing"
        raise ProjectionError(f'{what}: "k" {given} but the checkpoint has {k} experts (one per '
                              "cluster); assign the data with the checkpoint's clustering")
    field = next((f for f in ("tokens", "p") if f in spec), None)
    if field is None:
        raise ProjectionError(f'{what}: no "tokens" (or "p"): the count of each cluster')
    spec["p"] = cluster_weights(spec[field], k, f'{what}: "{field}"')
    return spec


def cluster_weights(values, k: int, what: str) -> np.ndarray:
    """k counts (or weights) as weights summing to 1: finite, none negative, not all zero."""
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ProjectionError(f"{what}: expected a list of {k} numbers, one per cluster")
    if len(values) != k:
        raise ProjectionError(f"{what} has {len(values)} entries but the checkpoint has {k} "
                              "experts (one per cluster)")
    counts = np.asarray(values, dtype=np.float64)
    for bad, why in ((~np.isfinite(counts), "not finite"), (counts < 0, "negative")):
        if bad.any():
            i = int(np.argmax(bad))
            raise ProjectionError(f"{what}: entry {i} is {why} ({values[i]})")
    if counts.sum() <= 0:
        raise ProjectionError(f"{what}: all zero: the histogram holds no tokens")
    return counts / counts.sum()


def check_clustering(spec: dict, trained: dict | None, what: str, allow: bool) -> str | None:
    """The histogram must be of the clustering the checkpoint was trained on (by the sha256 of
    its centroids): cluster i must mean expert i. `allow` turns a refusal into a warning. A
    checkpoint that knows no clustering (saved before the record, its data gone) is not checked,
    as files without a tokenizer record are not. Returns what the histogram matched, if any."""
    given = spec.get("centroids_sha256")
    known = (trained or {}).get("centroids_sha256")
    if not given or not isinstance(given, str):
        problem = (f'{what}: no "centroids_sha256", so nothing says which clustering its '
                   "clusters are")
        fix = f"send the {HISTOGRAM} of `pn-data assign` (it records them)"
    elif known and given != known:
        problem = (f'{what}: "centroids_sha256" {given[:12]} is another clustering than the '
                   f"checkpoint's ({trained['source']}: {known[:12]})")
        fix = "assign the data with the clustering the checkpoint was trained on"
    else:
        return trained["source"] if known else None
    if not allow:
        raise ProjectionError(f"{problem} — {fix}, or pass {CLUSTERING_FLAG}")
    warn(f"{problem} (allowed by {CLUSTERING_FLAG})")
    return None


def check_tokenizer(args, spec: dict, path: Path, trained, clustering: dict | None) -> None:
    """The histogram's tokenizer is the checkpoint's and its clustering's. A spec set's dataset
    may record it; a histogram sent alone records it or is not checked."""
    given = (spec_fingerprint(args.spec_data, spec) if args.spec_data
             else from_record(spec.get("tokenizer_sha256"), path))
    of_clustering = from_record((clustering or {}).get("tokenizer_sha256"),
                                (clustering or {}).get("source"))
    for expected in (trained, of_clustering):
        require_same(given, expected, allow=args.allow_tokenizer_mismatch,
                     fix="assign a specialization set tokenized with the checkpoint's tokenizer")


def warn(message: str) -> None:
    print(f"pn-project: warning: {message}", file=sys.stderr, flush=True)


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


def check_strategy(strategy: str, has_text: bool) -> None:
    """--strategy is one of STRATEGIES, with the spec set's text if it needs it (checked before
    anything is read)."""
    fixed = STRATEGIES[:-1]
    if strategy not in fixed and not (strategy.startswith("cluster=")
                                      and strategy.split("=", 1)[1].isdigit()):
        raise ProjectionError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    if strategy in NEEDS_TEXT and not has_text:
        raise ProjectionError(f"--strategy {strategy} scores the experts on the specialization "
                              "set's text: give --spec-data (a `pn-data assign` output), not "
                              "--histogram")


def choose(strategy: str, spec: dict, model, cfg: Config, device, sample_tokens: int):
    """(expert or None, the cluster weights to instantiate, details) for a strategy: one-hot
    weights for an expert, the spec set's histogram for `histogram`."""
    p, k = spec["p"], len(spec["p"])
    if strategy == "most-frequent":
        expert = int(np.argmax(p))
        return expert, one_hot(expert, k), {"p_expert": float(p[expert])}
    if strategy.startswith("cluster="):
        expert = int(strategy.split("=", 1)[1])
        if not 0 <= expert < k:
            raise ProjectionError(f"--strategy {strategy}: the checkpoint has experts 0..{k - 1}")
        return expert, one_hot(expert, k), {"p_expert": float(p[expert])}
    if strategy == "histogram":
        return None, p.tolist(), {"weights": p.tolist()}
    if strategy == "best-loss":
        results = expert_losses(model, cfg, spec["source_prefix"], sample_tokens, device)
        losses = [r["nll"] for r in results]
        expert = int(np.argmin(losses))
        return (expert, one_hot(expert, k),
                {"losses": losses, "stderrs": [r["stderr"] for r in results],
                 "sample_tokens": sample_tokens, "tokens": results[0]["tokens"]})
    raise ProjectionError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")


def project(args) -> dict:
    from megatron_pn import checkpoint  # megatron-core: seconds to import, not for --help
    from megatron_pn.clustering import checkpoint_clustering
    from megatron_pn.families import family_of
    from megatron_pn.run_tokenizer import checkpoint_fingerprint
    from megatron_pn.model import build_model
    from megatron_pn.checkpoint_tools import inference_world, load_model, resolve_checkpoint

    start = time.time()
    check_strategy(args.strategy, has_text=args.spec_data is not None)
    check_writable(args.output, args.overwrite)
    path = resolve_checkpoint(args.checkpoint)
    cfg = checkpoint.saved_config(path)
    family = family_of(cfg)
    if not family.projectable:
        raise ProjectionError(f"--checkpoint {args.checkpoint} is a {cfg.model.type} checkpoint; "
                              "pn-project needs a model with one expert per cluster (model.type "
                              "pn or cond)")
    hist_path, what = histogram_file(args)
    spec = read_histogram(hist_path, cfg.model.num_experts, what)
    clustering = checkpoint_clustering(path, cfg)
    matched = check_clustering(spec, clustering, what, args.allow_clustering_mismatch)
    trained = checkpoint_fingerprint(path)  # the projected expert keeps its tokenizer
    check_tokenizer(args, spec, hist_path, trained, clustering)
    with inference_world(single_process=True) as env:
        loaded = load_model(args.checkpoint, env)
        expert, weights, details = choose(args.strategy, spec, loaded.model, loaded.cfg,
                                          env.device, args.sample_tokens)
        dense_cfg = family.dense_run_config(loaded.cfg)
        # every weight comes from the projection
        [dense] = build_model(dense_cfg, env.device.type, initialize=False)
        load_every_weight(dense, family.dense_state(loaded.model, weights))
        record = {"source": str(loaded.path), "strategy": args.strategy, "expert": expert,
                  "spec_data": str(args.spec_data) if args.spec_data else None,
                  "histogram_file": str(hist_path), "histogram_sha256": file_sha256(hist_path),
                  "clustering_matched": matched,
                  **details, "seconds": time.time() - start}
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
