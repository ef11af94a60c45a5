"""`pn-data importance`: cluster importance sampling (SLM-is) as a blend of cluster datasets.

Unit: tokens throughout — each window's tokens plus its EOD, i.e. what the cluster datasets hold
and what the LM trains on (the loss is a per-token average, so token frequencies are the right
P(c)). With n_gen(c), n_spec(c) the tokens of cluster c in the generic and specialization sets:

  P(c|generic) = n_gen(c) / sum n_gen,   P(c|spec) = n_spec(c) / sum n_spec
  spec-only clusters (n_gen = 0, n_spec > 0): their mass cannot be drawn from the generic set;
      it is dropped, reported as `dropped_spec_mass`, and the rest renormalized.
  generic-only clusters (n_spec = 0): weight 0, never drawn.
  target share q(c) = P(c|spec) / (1 - dropped) on clusters with n_gen(c) > 0
  weight w(c) = q(c) / P(c|generic)  (= P(c|spec)/P(c|generic) up to the renormalization)

The resampled set draws q(c) * target_tokens tokens from cluster c. Effective sample size of the
weighted generic set (Kish): ESS = (sum_x w)^2 / sum_x w^2 = N / sum_c q(c)^2 / P(c|generic),
with N generic tokens. Expected repeat factor of cluster c: q(c) * target_tokens / n_gen(c);
overall: target_tokens / expected distinct tokens, sum_c min(q(c) * target_tokens, n_gen(c)).

Output JSON: "blend" [[weight, prefix], ...] (clusters with q > 0; prefixes are --generic as
given joined with the cluster dataset name, so relative to the working directory like every
path in the trainer's config), "cluster_ids" (cluster of each blend entry: a BlendedDataset's
dataset_id indexes this list), "target_tokens", "weights_w", "target_share", "p_spec",
"p_generic", "ess", "ess_fraction", "expected_repeat_factor" {"per_cluster", "overall"},
"expected_unique_tokens", "dropped_spec_mass", "spec_only_clusters", "seed", "k", "unit", ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pn_base.fileio import atomic_write_json, check_writable
from pn_base.outputs import HISTOGRAM


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return json.loads(path.read_text())


def load_histograms(generic_dir: Path, spec_dir: Path):
    """(generic manifest, generic tokens, spec tokens), checked to share one clustering."""
    manifest = read_json(generic_dir / "clusters.json",
                         "--generic must be a directory written by `pn-data cluster`")
    generic = read_json(generic_dir / HISTOGRAM, "rerun `pn-data cluster`")
    spec = read_json(spec_dir / HISTOGRAM,
                     "--spec must be a directory written by `pn-data assign`")
    if spec.get("centroids_sha256") != manifest["centroids_sha256"]:
        raise ValueError(f"{spec_dir / HISTOGRAM} was assigned with another clustering "
                         f"than {generic_dir}; rerun `pn-data assign --clusters {generic_dir}`")
    k = manifest["k"]
    for name, hist, path in (("generic", generic, generic_dir), ("spec", spec, spec_dir)):
        if len(hist["tokens"]) != k:
            raise ValueError(f"{path / HISTOGRAM} has {len(hist['tokens'])} clusters, "
                             f"{generic_dir / 'clusters.json'} has k={k}; rerun the step")
    spec_tokens = np.asarray(spec["tokens"], dtype=np.float64)
    if spec_tokens.sum() == 0:
        raise ValueError(f"{spec_dir / HISTOGRAM} holds no tokens: the specialization set "
                         f"is empty; assign a non-empty one")
    return manifest, np.asarray(generic["tokens"], dtype=np.float64), spec_tokens


def importance_weights(generic_tokens: np.ndarray, spec_tokens: np.ndarray) -> dict:
    """Target shares, weights and ESS for token histograms (see the module docstring)."""
    p_gen = generic_tokens / generic_tokens.sum()
    p_spec = spec_tokens / spec_tokens.sum()
    in_generic = generic_tokens > 0
    dropped = float(p_spec[~in_generic].sum())
    if dropped >= 1.0 - 1e-12:
        raise ValueError("no specialization token falls in a cluster the generic set has: "
                         "nothing to resample")
    share = np.where(in_generic, p_spec, 0.0) / (1.0 - dropped)
    weights = np.divide(share, p_gen, out=np.zeros_like(share), where=in_generic)
    ess_fraction = 1.0 / float(np.sum(share[in_generic] ** 2 / p_gen[in_generic]))
    return {
        "p_generic": p_gen,
        "p_spec": p_spec,
        "target_share": share,
        "weights_w": weights,
        "dropped_spec_mass": dropped,
        "spec_only_clusters": np.flatnonzero(~in_generic & (spec_tokens > 0)).tolist(),
        "ess_fraction": ess_fraction,
        "ess": ess_fraction * float(generic_tokens.sum()),
    }


def repeat_factors(share: np.ndarray, generic_tokens: np.ndarray, target_tokens: int):
    """Expected repeats per cluster and overall, and expected distinct tokens drawn."""
    wanted = share * target_tokens
    per_cluster = np.divide(wanted, generic_tokens, out=np.zeros_like(wanted),
                            where=generic_tokens > 0)
    unique = float(np.minimum(wanted, generic_tokens).sum())
    return per_cluster, target_tokens / unique, unique


def build_blend(manifest, generic_dir: Path, share: np.ndarray):
    """[[weight, prefix]] for clusters with a positive share, and their cluster ids."""
    ids = np.flatnonzero(share > 0).tolist()
    blend = [[float(share[c]), str(generic_dir / manifest["names"][c])] for c in ids]
    return blend, ids


def report(result: dict) -> str:
    share = np.asarray(result["target_share"])
    repeats = np.asarray(result["expected_repeat_factor"]["per_cluster"])
    top = np.argsort(-share, kind="stable")[:5]
    lines = [
        f"clusters drawn: {len(result['blend'])} of {result['k']}; dropped specialization mass "
        f"(spec-only clusters {result['spec_only_clusters']}): {result['dropped_spec_mass']:.4f}",
        f"ESS: {result['ess']:.4g} tokens ({result['ess_fraction']:.4f} of the generic set)",
        f"expected repeat factor: overall {result['expected_repeat_factor']['overall']:.3f}, "
        f"max {repeats.max():.3f} (target {result['target_tokens']} tokens, "
        f"{result['expected_unique_tokens']:.4g} distinct)",
    ]
    lines += [f"  cluster {c}: share {share[c]:.4f}, w {result['weights_w'][c]:.3f}, "
              f"repeat {repeats[c]:.3f}" for c in top if share[c] > 0]
    return "\n".join(lines)


def token_count(text: str) -> int:
    """A positive token count; accepts 1e9-style notation."""
    value = float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of tokens, got {text}")
    return int(value)


def run_importance(args) -> int:
    output = check_writable(args.output, args.overwrite)
    generic_dir, spec_dir = Path(args.generic), Path(args.spec)
    manifest, generic_tokens, spec_tokens = load_histograms(generic_dir, spec_dir)
    result = importance_weights(generic_tokens, spec_tokens)
    per_cluster, overall, unique = repeat_factors(result["target_share"], generic_tokens,
                                                  args.target_tokens)
    blend, ids = build_blend(manifest, generic_dir, result["target_share"])
    result = {key: (value.tolist() if isinstance(value, np.ndarray) else value)
              for key, value in result.items()}
    result.update(
        blend=blend, cluster_ids=ids, target_tokens=args.target_tokens, seed=args.seed,
        k=manifest["k"], unit="tokens",
        expected_repeat_factor={"per_cluster": per_cluster.tolist(), "overall": overall},
        expected_unique_tokens=unique, generic=str(generic_dir), spec=str(spec_dir),
        centroids_sha256=manifest["centroids_sha256"],
        tokenizer_sha256=manifest["tokenizer_sha256"],
    )
    atomic_write_json(output, result, overwrite=args.overwrite)
    print(report(result))
    print(f"wrote {output}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "importance",
        help="cluster importance sampling: a blend of cluster datasets matching a spec set",
        description="Weights w(c) = P(c|spec)/P(c|generic) from token histograms of the "
        "generic clustering and of a specialization set assigned to it; writes a blend file "
        "(JSON: [[weight, prefix], ...] over the per-cluster datasets, weights = target token "
        "share of each cluster) that resamples the generic set to the specialization "
        "histogram. Clusters with no generic tokens are dropped (their specialization mass is "
        "reported); clusters with no specialization tokens get weight 0. Prints the effective "
        "sample size and the expected repeat factors.",
    )
    parser.add_argument("--generic", required=True, help="directory from `pn-data cluster`")
    parser.add_argument("--spec", required=True, help="directory from `pn-data assign` (the "
                        "specialization set)")
    parser.add_argument("--target-tokens", type=token_count, required=True, help="size of "
                        "the resampled pretraining set in tokens, e.g. 2e9 (the trainer's "
                        "token budget)")
    parser.add_argument("--output", required=True, help="blend file to write (JSON)")
    parser.add_argument("--seed", type=int, default=1234, help="seed recorded in the blend for "
                        "the trainer's sample order (default: 1234)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run_importance)
