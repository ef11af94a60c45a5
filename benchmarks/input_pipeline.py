"""Does data loading show in the step time? The time the trainer waits for each step's
micro-batches, loaded in the step (data.num_workers=0) or prefetched by workers.

    python benchmarks/input_pipeline.py               # tiny SLM, seq 512, 8 micro-batches a step
    python benchmarks/input_pipeline.py --workers 0 2 --steps 12

Each setting trains in its own process on random tokens; the wait is measured around the
trainer's `next()` on its step iterator (the part of the timed step that is not compute).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SECTION = "## Input pipeline"
SHAPE = ["model.seq_length=512", "train.micro_batch_size=4", "train.global_batch_size=32",
         "model.vocab_size=4096"]


def one_run(workers: int, steps: int, dataset: str, run_dir: str) -> dict:
    """Train in this process; median wait for a step's batches and median step time (ms)."""
    import torch

    from megatron_pn.config import load_config
    from megatron_pn.trainer import Trainer
    from pn_base.outputs import METRICS

    torch.set_num_threads(1)  # robust to a shared machine (the workers get the other cores)

    cfg = load_config(["configs/tiny/slm.yaml"], [
        *SHAPE, f"data.num_workers={workers}", f"data.blend=[{dataset}]", "data.split=1,0,0",
        f"train.steps={steps}", "train.eval_interval=0", f"logging.run_dir={run_dir}",
        "logging.tensorboard=false", "logging.wandb_mode=disabled", "checkpoint.dir=null"])
    trainer = Trainer(cfg)
    waits, batches_by_step = [], trainer._batches_by_step

    def timed():
        batches = batches_by_step()
        while True:
            start = time.perf_counter()
            step_batches = next(batches)
            waits.append(time.perf_counter() - start)
            yield step_batches
    trainer._batches_by_step = timed
    trainer.train()
    records = [json.loads(line) for line in (Path(run_dir) / METRICS).open()]
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    step_times = [tokens_per_step / r["tokens_per_s"] for r in records if r["split"] == "train"]
    skip = 2  # start-up: worker launch, first allocations
    return {"workers": workers, "wait_ms": 1e3 * statistics.median(waits[skip:]),
            "step_ms": 1e3 * statistics.median(step_times[skip:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args.one, args.steps, args.dataset, args.run_dir)))
        return 0

    from train_throughput import random_dataset, write_section

    from megatron_pn.metrics import device_description

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "random"
        random_dataset(prefix, 4096, (args.steps + 2) * 32 * 513 * 2)
        for workers in args.workers:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(workers), "--steps", str(args.steps),
                 "--dataset", str(prefix), "--run-dir", f"{tmp}/run_{workers}"],
                cwd=REPO, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    lines = [f"Device: {device_description()}; date {datetime.date.today()}; configs/tiny/slm.yaml "
             f"with {' '.join(SHAPE)}; medians of steps 3-{args.steps}.", "",
             "| data.num_workers | wait for a step's batches (ms) | step time (ms) | wait / step |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['wait_ms']:.2f} | {r['step_ms']:.1f} | "
                     f"{r['wait_ms'] / r['step_ms']:.1%} |")
    report = "\n".join(lines)
    print(report)
    write_section(Path(args.results), report, SECTION, "`benchmarks/input_pipeline.py`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
