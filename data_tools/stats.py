"""`pn-data stats`: cluster concentration per corpus/domain (paper Tables 9 and 10).

Reads DIR/histogram.json of `cluster` or `assign` outputs. For each corpus: the cluster
histogram, its entropy (nats and bits), the most frequent cluster and the fraction of the corpus
in it, and the number of non-empty clusters. Counts are tokens by default (each window's tokens
plus its EOD, the unit `importance` uses) or windows with --unit windows.

Writes PREFIX.json ({"unit", "corpora": [{"name", "dir", "k", "total", "histogram",
"fractions", "entropy_nats", "entropy_bits", "max_entropy_bits", "top_cluster",
"top_fraction", "nonempty_clusters"}]}), PREFIX.md (Markdown table) and PREFIX.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pn_base.fileio import atomic_path, atomic_write_json, atomic_write_text, check_writable
from pn_base.outputs import HISTOGRAM


def concentration(counts) -> dict:
    """Entropy and top-cluster fraction of a histogram (empty clusters contribute 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("empty histogram: no windows assigned")
    fractions = counts / total
    nonzero = fractions[fractions > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    top = int(np.argmax(counts))
    return {
        "k": len(counts),
        "total": int(total),
        "histogram": counts.astype(np.int64).tolist(),
        "fractions": fractions.tolist(),
        "entropy_nats": entropy,
        "entropy_bits": entropy / math.log(2),
        "max_entropy_bits": math.log2(len(counts)),
        "top_cluster": top,
        "top_fraction": float(fractions[top]),
        "nonempty_clusters": int((counts > 0).sum()),
    }


def load_counts(directory: Path, unit: str) -> list[int]:
    path = directory / HISTOGRAM
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --assignments takes directories written by "
                                f"`pn-data cluster` or `pn-data assign`")
    return json.loads(path.read_text())[unit]


def markdown_table(corpora: list[dict], unit: str) -> str:
    lines = [
        f"Cluster concentration (counts in {unit}).",
        "",
        "| corpus | k | total | entropy (nats) | entropy (bits) | top cluster | top fraction "
        "| non-empty clusters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in corpora:
        lines.append(f"| {c['name']} | {c['k']} | {c['total']} | {c['entropy_nats']:.3f} | "
                     f"{c['entropy_bits']:.3f} | {c['top_cluster']} | {c['top_fraction']:.3f} | "
                     f"{c['nonempty_clusters']} |")
    return "\n".join(lines) + "\n"


def plot(corpora: list[dict], unit: str, path: Path) -> None:
    """One bar chart of cluster fractions per corpus, stacked vertically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(corpora), 1, figsize=(8, 2.2 * len(corpora) + 0.5),
                             squeeze=False)
    for ax, c in zip(axes[:, 0], corpora):
        ax.bar(np.arange(c["k"]), c["fractions"], width=1.0)
        ax.set_title(f"{c['name']}: H = {c['entropy_bits']:.2f} bits, "
                     f"top = {c['top_fraction']:.2f}", fontsize=9)
        ax.set_xlim(-0.5, c["k"] - 0.5)
        ax.set_ylabel(f"fraction ({unit})", fontsize=8)
    axes[-1, 0].set_xlabel("cluster")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_stats(args) -> int:
    dirs = [Path(d) for d in args.assignments]
    names = args.names or [d.name for d in dirs]
    if len(names) != len(dirs):
        raise ValueError(f"--names has {len(names)} names for {len(dirs)} --assignments "
                         f"directories; give one name per directory")
    outputs = [Path(f"{args.output}.{ext}") for ext in ("json", "md", "png")]
    for path in outputs:
        check_writable(path, args.overwrite)

    corpora = [dict(name=name, dir=str(d), **concentration(load_counts(d, args.unit)))
               for name, d in zip(names, dirs)]
    json_path, md_path, png_path = outputs
    atomic_write_json(json_path, {"unit": args.unit, "corpora": corpora})
    table = markdown_table(corpora, args.unit)
    atomic_write_text(md_path, table)
    plot(corpora, args.unit, png_path)
    print(table, end="")
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="cluster histograms, entropy and top-cluster fraction per corpus",
        description="For each corpus (a `cluster` or `assign` output directory): the cluster "
        "histogram, its entropy in nats and bits and the fraction in the most frequent cluster "
        "(paper Tables 9/10). Writes PREFIX.json, PREFIX.md (Markdown table) and PREFIX.png.",
    )
    parser.add_argument("--assignments", nargs="+", required=True, metavar="DIR",
                        help="directories holding histogram.json (from cluster or assign)")
    parser.add_argument("--names", nargs="+", default=None, help="one display name per "
                        "directory (default: the directory names)")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.json, "
                        "PREFIX.md and PREFIX.png")
    parser.add_argument("--unit", choices=["tokens", "windows"], default="tokens",
                        help="count tokens (default; windows' tokens + EOD, as `importance`) "
                        "or windows")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run_stats)
