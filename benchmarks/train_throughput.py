"""Training throughput (tokens/s), MFU and peak memory of `pn-train` on this device.

    python benchmarks/train_throughput.py                 # CPU: tiny + paper SLM (short)
    python benchmarks/train_throughput.py --configs configs/paper/slm.yaml \
        --micro-batch-sizes 8 16 32                       # GPU: a micro-batch sweep

Each config trains for a few steps on random tokens (a Megatron indexed dataset made here); the
median step after warm-up gives tokens/s. MFU = model FLOPs per token x tokens/s per device /
the device's dense bf16 peak (known GPUs, or --peak-tflops); the baseline measured in the same
run is a plain matmul of the training precision on the same device, so "vs matmul" says how
close training gets to what this device does on its best kernel.
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_pn.config import load_config  # noqa: E402
from megatron_pn.metrics import PEAK_TFLOPS, device_description, device_peak_tflops  # noqa: E402
from megatron_pn.model import FLOPS_FORMULA, flops_per_token  # noqa: E402
from pn_base.outputs import METRICS  # noqa: E402

SECTION = "## Training throughput"


class RunFailed(Exception):
    """A measured pn-train run exited non-zero (out of memory, say): its row says so and the
    other runs still go on, so a one-shot GPU session keeps every number it got."""


def matmul_tflops(device: str, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def random_dataset(prefix: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16 if vocab < 65500 else np.int32)
    for _ in range(max(1, tokens // 4096)):
        doc = rng.integers(3, vocab, 4096).astype(np.int64)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def measure(config: str, overrides: list[str], nproc: int, steps: int, warmup: int,
            work: Path) -> dict:
    """Median tokens/s of `pn-train config overrides` over steps after warm-up. Without a data
    override the run reads random tokens."""
    cfg = load_config([config], overrides)
    shown = " ".join(overrides)  # the generated dataset's path is not worth a column
    if not any(o.startswith("data.blend") for o in overrides):
        prefix = work / f"random_{cfg.model.vocab_size}"
        if not Path(f"{prefix}.idx").exists():
            random_dataset(prefix, cfg.model.vocab_size, (steps + 2) *
                           cfg.train.global_batch_size * (cfg.model.seq_length + 1) * 2)
        overrides = [*overrides, f"data.blend=[{prefix}]"]
    run_dir = Path(tempfile.mkdtemp(prefix=Path(config).stem + "_", dir=work))
    args = [config, *overrides, "data.split=1,0,0",
            f"train.steps={steps}", "train.eval_interval=0", "train.log_interval=1",
            f"logging.run_dir={run_dir}", "logging.tensorboard=false", "logging.wandb_mode=disabled",
            "checkpoint.dir=null"]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "-m", "megatron_pn.cli.train"]
    # stderr stays this script's: a run's progress and error land in the benchmark's log
    proc = subprocess.run(launcher + args, cwd=REPO, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RunFailed(f"pn-train exit code {proc.returncode}, its error above in the log")
    records = [json.loads(l) for l in (run_dir / METRICS).read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in train if r["step"] > warmup)
    return {"config": config, "overrides": shown, "nproc": nproc,
            "tokens_per_s": tokens_per_s, "max_mem_gib": train[-1].get("max_mem_gib"),
            "model_tflops": flops_per_token(cfg) * tokens_per_s / nproc / 1e12}


def main() -> int:
    on_gpu = torch.cuda.is_available()
    peaks = ", ".join(f"{name} {peak:g}" for name, peak in PEAK_TFLOPS)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"MFU: {FLOPS_FORMULA}.\nDevice peaks (dense bf16 TFLOP/s, first match in the "
               f"device name): {peaks}.")
    parser.add_argument("--configs", nargs="+", default=(
        ["configs/paper/slm.yaml", "configs/paper/llm.yaml"] if on_gpu
        else ["configs/tiny/slm.yaml", "configs/paper/slm.yaml"]))
    parser.add_argument("--override", action="append", default=[],
                        help="override for every config (repeatable), e.g. train.micro_batch_size=4")
    parser.add_argument("--micro-batch-sizes", nargs="+", type=int, default=[None],
                        help="one run per micro-batch size (default: each config's own)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument("--steps", type=int, default=None, help="steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the median")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: from the device name)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    steps = args.steps or (30 if on_gpu else 6)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)

    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    baseline = matmul_tflops(device, dtype, 8192 if on_gpu else 2048, 50 if on_gpu else 5)
    peak = device_peak_tflops(args.peak_tflops)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            for micro in args.micro_batch_sizes:
                overrides = list(args.override)
                if not on_gpu and "paper" in config:  # keep a CPU run to about a minute
                    overrides += ["train.micro_batch_size=1", "train.global_batch_size=1"]
                if micro is not None:
                    overrides.append(f"train.micro_batch_size={micro}")
                try:
                    row = measure(config, overrides, args.nproc, steps, warmup, Path(tmp))
                except RunFailed as error:
                    row = {"config": config, "overrides": " ".join(overrides), "failed": str(error)}
                print(table_row(row, peak, baseline), flush=True)  # kept in the log if cut short
                rows.append(row)

    lines = [f"Device: {device_description()} ({'bf16' if on_gpu else 'fp32'}); "
             f"date {datetime.date.today()}; {args.nproc} process(es); "
             f"median of steps {warmup + 1}-{steps}.",
             f"Baseline measured in the same run: {'bf16' if on_gpu else 'fp32'} matmul "
             f"{baseline:.2f} TFLOP/s" + (f"; device peak {peak:.0f} TFLOP/s" if peak else ""),
             f"MFU: {FLOPS_FORMULA}.", "",
             "| config | overrides | tokens/s | model TFLOP/s per device | vs matmul | MFU "
             "| peak memory GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [table_row(r, peak, baseline) for r in rows]
    report = "\n".join(lines)
    print(report)
    write_section(Path(args.results), report, SECTION, "`benchmarks/train_throughput.py`.")
    return 1 if any("failed" in r for r in rows) else 0


def table_row(r: dict, peak: float | None, baseline: float) -> str:
    if "failed" in r:
        return f"| {r['config']} | {r['overrides'] or '-'} | failed ({r['failed']}) | | | | |"
    mfu = f"{r['model_tflops'] / peak:.1%}" if peak else "n/a"
    memory = f"{r['max_mem_gib']:.1f}" if r["max_mem_gib"] is not None else "n/a"
    return (f"| {r['config']} | {r['overrides'] or '-'} | {r['tokens_per_s']:,.0f} | "
            f"{r['model_tflops']:.3f} | {r['model_tflops'] / baseline:.2f}x | {mfu} | {memory} |")


def write_section(path: Path, body: str, section: str, intro: str) -> None:
    """Append this run under `section` of RESULTS.md (earlier runs, other devices, are kept)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if section not in text:
        text = text.rstrip() + f"\n\n{section}\n\n{intro}\n"
    head, _, tail = text.partition(section)
    rest = tail.split("\n## ", 1)
    body = rest[0].rstrip() + "\n\n" + body + "\n"
    path.write_text(head + section + body + ("\n## " + rest[1] if len(rest) > 1 else ""))


if __name__ == "__main__":
    sys.exit(main())
