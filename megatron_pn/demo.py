"""`make demo`: the shipped corpus -> tokenizer -> indexed dataset -> a tiny SLM trained with
megatron-core on 2 CPU processes (TP=2, gloo) -> a results table.

Every step is one of the project's own commands (`pn-data`, `pn-train`), run as a user would;
finished steps are kept in demo_out/ and skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"


def run(title: str, cmd: list[str]) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.time() - start


def pn_data(*args: str) -> list[str]:
    return [sys.executable, "-m", "data_tools", *args]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "demo_out"), help="working directory")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    tokenizer, prefix, run_dir = out / "tokenizer" / "spm", out / "data" / "generic", out / "run"
    timings = {}

    if not tokenizer.with_suffix(".model").is_file():
        timings["tokenizer"] = run("1. SentencePiece tokenizer (4k vocabulary) on generic text", pn_data(
            "train-tokenizer", "--input", str(CORPUS / "generic" / "train.jsonl.gz"),
            "--vocab-size", "4096", "--sample-docs", "3000", "--output", str(tokenizer)))
    if not Path(f"{prefix}.idx").is_file():
        timings["preprocess"] = run("2. Megatron indexed dataset (.bin/.idx)", pn_data(
            "preprocess", "--input", str(CORPUS / "generic" / "train.jsonl.gz"),
            "--tokenizer-model", f"{tokenizer}.model", "--output-prefix", str(prefix),
            "--workers", "2"))
    if run_dir.exists():
        print(f"\n(removing the previous demo run {run_dir})")
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    timings["train"] = run("3. Train the tiny SLM: megatron-core, TP=2 over gloo, 2 CPU processes", [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "-m", "megatron_pn.train", "configs/tiny/slm.yaml",
        f"data.blend=[{prefix}]", f"data.tokenizer_model={tokenizer}.model",
        "parallel.tensor=2", f"train.steps={args.steps}", "train.eval_interval=100",
        "train.log_interval=50", "logging.progress_bar=true", f"logging.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}"])

    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    rate = sum(r["tokens_per_s"] for r in train) / len(train)
    print("\n=== Results (tiny SLM, generic corpus, CPU)\n")
    print("| step | train loss | valid loss | valid ppl |")
    print("|-----:|-----------:|-----------:|----------:|")
    by_step = {r["step"]: r for r in train}
    for v in valid:
        t = by_step.get(v["step"], {})
        print(f"| {v['step']} | {t.get('loss', float('nan')):.3f} | {v['loss']:.3f} | "
              f"{math.exp(v['loss']):.1f} |")
    print(f"\nuniform over the 4096-token vocabulary: loss {math.log(4096):.3f}")
    print(f"throughput: {rate:,.0f} tokens/s; wall time: " +
          ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"checkpoints: {run_dir / 'checkpoints'}; metrics: {run_dir / 'metrics.jsonl'}; "
          f"TensorBoard: {run_dir / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
