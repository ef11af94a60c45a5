"""The README's fault figure: time from each fault to its requeue and to the first resumed step,
from the timings the two-host cluster tests record.

    PN_FAULT_TIMINGS=faults.jsonl pytest tests/test_slurm_cluster.py
    python benchmarks/fault_figure.py faults.jsonl --out docs/fault_recovery.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("timings", type=Path, help="JSON lines: fault, requeued_s, first_step_s")
    parser.add_argument("--out", type=Path, default=Path("docs/fault_recovery.png"))
    parser.add_argument("--title", default="Two-host SLURM cluster, tiny PN (SLURM's 120 s "
                        "requeue hold skipped)")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.timings.read_text().splitlines() if line]
    if not records:
        parser.error(f"{args.timings}: no timings")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['fault']}\n({r['steps_lost']} steps lost)" for r in records]
    rows = range(len(records))
    fig, ax = plt.subplots(figsize=(7, 0.7 * len(records) + 1.2))
    ax.barh(rows, [r["first_step_s"] for r in records], color="#9ecae1",
            label="fault -> first resumed step")
    ax.barh(rows, [r["requeued_s"] for r in records], color="#3182bd",
            label="fault -> job requeued")
    for row, r in zip(rows, records):
        ax.text(r["first_step_s"] + 0.5, row, f"{r['first_step_s']:.0f} s", va="center")
    ax.set_yticks(list(rows), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds after the fault")
    ax.set_title(args.title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
