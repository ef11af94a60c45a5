"""Start-up cost: CPU seconds of importing the heavy modules in a fresh interpreter, and of one
tiny step (pn-train of 4 steps with a checkpoint, then pn-eval of it; a format-only
`pn-data merge`) in a fresh interpreter against the same step in a warm worker
(megatron_pn/experiment/worker.py, as `pn-experiment run` uses it). CPU time, not wall time:
the numbers stay meaningful on a shared machine.

    python benchmarks/startup.py
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test data helpers (benchmark-only)

from helpers import real_text_documents, tiny_overrides, write_byte_dataset  # noqa: E402

from megatron_pn.experiment.grid import python  # noqa: E402
from megatron_pn.experiment.runner import step_env  # noqa: E402
from megatron_pn.experiment.worker import WorkerPool  # noqa: E402

IMPORTS = ("torch", "megatron.core", "megatron_pn.trainer", "megatron_pn.cli.evaluate",
           "megatron_pn.cli.project", "data_tools.cli")


def fresh_cpu(cmd: list[str]) -> float:
    """CPU seconds (user + system) of a command in a fresh process, its children included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=REPO, env=step_env(1), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def worker_cpu(pool: WorkerPool, cmd: list[str], log: Path) -> float:
    """CPU seconds the (already started) worker spends on one step."""
    job = pool.submit(cmd, log)
    pid = job.worker.proc.pid
    start = process_cpu(pid)
    while job.poll() is None:
        time.sleep(0.05)
    if job.returncode != 0:
        raise RuntimeError(log.read_text()[-3000:])
    return process_cpu(pid) - start  # the worker waits, idle, for its next step


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="startup_"))
    try:
        print("| fresh interpreter: `python -c 'import X'` | CPU s |\n|---|---:|")
        for module in IMPORTS:
            print(f"| {module} | {fresh_cpu([sys.executable, '-c', f'import {module}']):.2f} |")
        data = write_byte_dataset(root / "text", [d[:2000] for d in real_text_documents(100_000)])

        def steps(run: Path) -> dict[str, list[str]]:
            return {
                "pn-train, 4 steps + checkpoint": python(
                    "megatron_pn.cli.train", "configs/tiny/slm.yaml", *tiny_overrides(
                        data, run, **{"train.steps": 4, "checkpoint.dir": run / "ckpt"})),
                "pn-eval of that checkpoint": python(
                    "megatron_pn.cli.evaluate", "--checkpoint", run / "ckpt", "--data", data,
                    "--names", "text", "--output", run / "eval.json", "--quiet"),
                "pn-data merge (format only)": python(
                    "data_tools", "merge", "--inputs", data, data, "--output-prefix",
                    run / "merged"),
            }

        fresh = {name: fresh_cpu(cmd) for name, cmd in steps(root / "fresh").items()}
        pool = WorkerPool(1, step_env(1), REPO, threads=1)
        try:
            for name, cmd in steps(root / "warm_up").items():  # the worker's imports, once
                worker_cpu(pool, cmd, root / "warm_up.log")
            warm = {name: worker_cpu(pool, cmd, root / "warm.log")
                    for name, cmd in steps(root / "warm").items()}
        finally:
            pool.close()
        print("\n| step | fresh interpreter, CPU s | warm worker, CPU s |\n|---|---:|---:|")
        for name in fresh:
            print(f"| {name} | {fresh[name]:.2f} | {warm[name]:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
