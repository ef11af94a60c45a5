"""Per-rank training memory of a config under each engine, by construction (no GPU needed):
parameter counts from a meta-device build, bytes per parameter from each engine's layout.

    python benchmarks/zero_memory.py configs/paper/pn32.yaml --dp 8

Mixed precision (bf16 on GPU), Adam. Per parameter: bf16 weight 2 B, gradient (fp32 in
megatron-core's DDP buffer: 4 B; bf16 in DeepSpeed: 2 B), fp32 master weight + 2 Adam moments
12 B. Activations are not included (they depend on micro-batch and sequence, not on the engine).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import write_section  # noqa: E402

GIB = 2**30


def total_parameters(config: str) -> int:
    out = subprocess.run([sys.executable, "-m", "megatron_pn.cli.train", config, "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "total" in l)
    return int(line.split("total ")[1].split(" ")[0].replace(",", ""))


def per_rank_bytes(n: int, dp: int, tp: int) -> dict[str, float]:
    n = n / tp  # tensor parallelism splits (almost) every parameter
    return {
        "megatron DDP, plain optimizer": n * (2 + 4 + 12),
        "megatron DDP, distributed optimizer": n * (2 + 4 + 12 / dp),
        "DeepSpeed ZeRO-1": n * (2 + 2 + 12 / dp),
        "DeepSpeed ZeRO-2": n * (2 + (2 + 12) / dp),
        "DeepSpeed ZeRO-3": n * (2 + 2 + 12) / dp,
        "DeepSpeed ZeRO-3 + CPU offload (GPU side)": n * 2 / dp,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/paper/pn32.yaml")
    parser.add_argument("--dp", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    n = total_parameters(args.config)
    rows = per_rank_bytes(n, args.dp, args.tp)
    baseline = rows["megatron DDP, plain optimizer"]
    lines = [f"{args.config}: {n / 1e6:,.1f}M parameters, DP={args.dp}, TP={args.tp}; "
             f"by construction, {datetime.date.today()} (weights, gradients, optimizer state; "
             "no activations).", "",
             "| engine | GiB per rank | vs plain DDP |", "|---|---:|---:|"]
    lines += [f"| {name} | {b / GIB:.2f} | {b / baseline:.2f}x |" for name, b in rows.items()]
    report = "\n".join(lines)
    print(report)
    write_section(Path(args.results), report, "## Per-rank memory by engine",
                  "`benchmarks/zero_memory.py` (the ZeRO-3 partition itself is measured in "
                  "tests/test_deepspeed.py: rank 0 holds half the parameters at DP=2).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
