"""Running the step graph: locally (a pool of processes on this machine) or on SLURM (one job
per step, chained with --dependency=afterok). Finished steps (their `done` file exists) are
skipped, so a re-run continues where a killed one stopped."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron_pn.experiment.grid import Grid, Step
from megatron_pn.experiment.worker import WorkerPool, entry_module, stop_with_parent
from pn_base.fileio import atomic_path, atomic_write_json

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
EVAL_BATCH = 64  # evaluations per pn-eval process


class StepFailed(RuntimeError):
    pass


class Stopped(Exception):
    """The runner was told to stop (SIGTERM, SIGHUP or Ctrl-C); its running steps were stopped
    the way a scheduler stops a job, so a rerun resumes them."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def first_documents(source: Path, target: Path, max_chars: int | None) -> Path:
    """The first documents of a JSONL.gz file, up to max_chars of text (deterministic);
    max_chars None: the whole file (linked, not copied)."""
    if target.exists():
        return target
    with atomic_path(target) as tmp:
        if max_chars is None:
            tmp.symlink_to(Path(source).resolve())
        else:
            chars = 0
            with gzip.open(source, "rt", encoding="utf-8") as f, \
                    gzip.open(tmp, "wt", encoding="utf-8") as out:
                for line in f:
                    out.write(line)
                    chars += len(json.loads(line)["text"])
                    if chars >= max_chars:
                        break
    return target


def prepare_subsets(grid: Grid) -> None:
    cfg = grid.cfg
    first_documents(grid.corpus_file("generic", "train"), grid.subset_file("generic"),
                    cfg.generic_chars)
    for d in cfg.domains:
        for size, chars in cfg.spec_sizes.items():
            first_documents(grid.corpus_file(d, "train"), grid.subset_file(f"{d}_{size}"), chars)


def step_env(threads: int | None) -> dict:
    """A fresh job's environment: no launcher variables of a parent torchrun, quiet warnings."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONWARNINGS"] = "ignore"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def log_path(out: Path, name: str) -> Path:
    return out / "logs" / (name.replace("/", "__").replace("=", "_") + ".log")


def pending(steps: dict[str, Step]) -> dict[str, Step]:
    return {name: s for name, s in steps.items() if not s.done.exists()}


def eval_batch_cmd(out: Path, steps: list[Step]) -> list[str]:
    """One pn-eval process for many evaluations (loading megatron-core once)."""
    batch = out / "logs" / f"eval_batch_{time.time_ns()}.json"
    atomic_write_json(batch, [s.eval_job for s in steps])
    return [sys.executable, "-m", "megatron_pn.cli.evaluate", "--batch", str(batch)]


# ---------------------------------------------------------------------------------------------
# Local


class LocalRunner:
    """Up to `slots` processes at a time (a torchrun step of N processes takes N slots).

    With `workers` (the default), single-process steps of the project's commands run in up to
    `slots` long-lived worker processes (experiment/worker.py), which import torch and
    megatron-core once instead of once per step; torchrun steps and anything else get a
    process of their own.
    """

    def __init__(self, grid: Grid, slots: int, quiet: bool = False, workers: bool = True):
        self.grid, self.out, self.slots, self.quiet = grid, grid.out, slots, quiet
        self.threads = max(1, (os.cpu_count() or 1) // slots)
        self.workers = workers

    def run(self) -> None:
        self.pool = (WorkerPool(self.slots, step_env(self.threads), REPO, self.threads)
                     if self.workers else None)
        self.running: dict[subprocess.Popen, tuple[list[Step], Path]] = {}
        # (signal handlers belong to the main thread; a runner elsewhere leaves them be)
        handlers = ({sig: signal.signal(sig, _raise_stopped)
                     for sig in (signal.SIGTERM, signal.SIGHUP)}
                    if threading.current_thread() is threading.main_thread() else {})
        try:
            self._run()
        except KeyboardInterrupt:
            raise Stopped("SIGINT") from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._stop_running()
            if self.pool is not None:
                self.pool.close()

    def _stop_running(self, grace: float = 120.0) -> None:
        """Left early (a signal, Ctrl-C): send the steps still running SIGTERM, as a scheduler
        would (pn-train saves a checkpoint at its next step boundary and exits), and wait for
        them; left running, they would hold their checkpoint directories' locks against the
        rerun, and finish steps nobody waits for."""
        if not self.running:
            return
        print(f"stopping {len(self.running)} running step(s) (up to {grace:.0f} s): "
              f"{', '.join(steps[0].name for steps, _ in self.running.values())}",
              file=sys.stderr, flush=True)
        for proc in self.running:
            proc.terminate()
        deadline = time.time() + grace
        while any(p.poll() is None for p in self.running) and time.time() < deadline:
            time.sleep(0.2)
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()

    def _run(self) -> None:
        from tqdm import tqdm

        todo = pending(self.grid.steps)
        done = set(self.grid.steps) - set(todo)
        running = self.running
        failed: list[tuple[Step, Path]] = []
        bar = tqdm(total=len(todo), desc="experiment steps", unit="step", dynamic_ncols=True,
                   disable=self.quiet)
        while todo or running:
            if not failed:
                self._launch_ready(todo, done, running)
            if not running:
                if failed or todo:
                    break
                continue
            proc = self._wait_any(running)
            steps, log = running.pop(proc)
            for step in steps:
                todo.pop(step.name, None)
                # an evaluation's output is written atomically: it exists only if it succeeded
                # (a batch exits 2 when one of its evaluations failed; the others count)
                if step.done.exists() and (proc.returncode == 0 or step.eval_job is not None):
                    done.add(step.name)
                    bar.update(1)
                else:
                    failed.append((step, log))
            bar.set_postfix_str(", ".join(s[0].name for s, _ in running.values())[:60])
        bar.close()
        if failed:
            raise StepFailed(self._failure_report(failed))
        if todo:
            raise StepFailed(f"{len(todo)} steps could not start: their dependencies are missing "
                             f"({', '.join(sorted(todo)[:5])} ...)")

    def _launch_ready(self, todo, done, running) -> None:
        busy = {s.name for steps, _ in running.values() for s in steps}
        used = sum(max(s.procs for s in steps) for steps, _ in running.values())
        ready = [s for name, s in todo.items()
                 if name not in busy and all(d in done for d in s.deps)]
        evals = [s for s in ready if s.eval_job is not None]
        others = [s for s in ready if s.eval_job is None]
        # One batch of the ready evaluations, then pretraining (everything waits on it), then
        # the rest in graph order.
        others.sort(key=lambda s: s.kind != "pretrain")
        jobs = ([evals[:EVAL_BATCH]] if evals else []) + [[s] for s in others]
        for steps in jobs:
            need = max(s.procs for s in steps)
            if used + need > self.slots and used > 0:
                continue
            if steps[0].eval_job is not None:
                name, cmd = f"eval_batch_{steps[0].name}", eval_batch_cmd(self.out, steps)
            else:
                name, cmd = steps[0].name, steps[0].cmd
            running[self._start(cmd, name)] = (steps, log_path(self.out, name))
            used += need

    def _start(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = log_path(self.out, name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            if self.pool is not None and entry_module(cmd) is not None:
                return self.pool.submit(cmd, log)
            return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    env=step_env(self.threads), preexec_fn=stop_with_parent)

    @staticmethod
    def _wait_any(running) -> subprocess.Popen:
        while True:
            for proc in running:
                if proc.poll() is not None:
                    return proc
            time.sleep(0.2)

    @staticmethod
    def _failure_report(failed) -> str:
        lines = []
        for step, log in failed[:3]:
            tail = log.read_text().splitlines()[-15:] if log.exists() else []
            lines += [f"step {step.name} failed (log: {log}):", *("    " + t for t in tail)]
        more = len(failed) - 3
        return "\n".join(lines + ([f"... and {more} more"] if more > 0 else []))


# ---------------------------------------------------------------------------------------------
# SLURM


class SlurmRunner:
    """Submits every pending step as a SLURM job, after the jobs of its pending dependencies.

    Training steps go through slurm/pretrain.sh (multi-node torchrun, requeue on time limits);
    data, projection and evaluation steps are single-task jobs (`sbatch --wrap`). sbatch options
    per step kind come from the experiment's `slurm:` section (e.g. pretrain: [--nodes=4]).
    """

    def __init__(self, grid: Grid, sbatch: str = "sbatch"):
        self.grid, self.out, self.sbatch = grid, grid.out, sbatch

    def run(self) -> dict[str, str]:
        todo = pending(self.grid.steps)
        jobs: dict[str, str] = {}
        for name in self._order(todo):
            step = todo[name]
            after = [jobs[d] for d in step.deps if d in jobs]
            jobs[name] = self._submit(step, after)
        atomic_write_json(self.out / "slurm_jobs.json", jobs)
        return jobs

    def _order(self, todo: dict[str, Step]) -> list[str]:
        order, seen = [], set()

        def visit(name: str) -> None:
            if name in seen or name not in todo:
                return
            seen.add(name)
            for dep in todo[name].deps:
                visit(dep)
            order.append(name)

        for name in todo:
            visit(name)
        return order

    def _submit(self, step: Step, after: list[str]) -> str:
        options = [f"--job-name=pn-{step.kind}", "--parsable",
                   f"--output={log_path(self.out, step.name)}.%j",
                   *map(str, self.grid.cfg.slurm.get(step.kind, []))]
        if after:
            options.append("--dependency=afterok:" + ":".join(after))
        if step.eval_job is not None:
            argv = [*options, "--wrap", shlex.join(eval_batch_cmd(self.out, [step]))]
        elif step.kind in ("pretrain", "finetune"):
            train_args = step.cmd[step.cmd.index("megatron_pn.cli.train") + 1:]
            argv = [*options, str(REPO / "slurm" / "pretrain.sh"), *train_args]
        else:
            argv = [*options, "--wrap", shlex.join(step.cmd)]
        out = subprocess.run([self.sbatch, *argv], cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            raise StepFailed(f"sbatch for step {step.name} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]
