"""Long-lived step processes: start-up (torch, megatron-core: seconds of CPU) paid once per
worker instead of once per step.

`LocalRunner` hands a single-process step (`python -m MODULE ARGS...` with MODULE one of the
project's commands below) to an idle worker; the worker calls the command's `main(ARGS)` in
its main thread, with its file descriptors 1 and 2 on the step's log (C-level output and child
processes included), and replies with the exit code (`sys.exit` codes included; an uncaught
exception prints its traceback to the log and counts as 1, as in a fresh interpreter).

Between steps the worker puts back what a step may leave behind, so that each step starts from
what a fresh interpreter would give it: the environment (the launcher variables and
MASTER_PORT `init_distributed` sets), the working directory, `sys.argv`, the signal handlers
(the trainer's stop handlers), warning filters, the root logger's handlers, torch's thread
count and RNG states (torch, NumPy, Python); after the step, megatron-core's model-parallel
state, the torch.distributed process group, megatron's num-microbatches calculator and the
model-parallel RNG tracker are destroyed, open tqdm bars closed, garbage collected. Kept on
purpose: imported modules (the point), what `compat.activate()` sets up once per process, and
the objects that survive a step (modules, caches), frozen out of the garbage collector's way
(`gc.freeze`: a step's collections then walk only its own objects).

A worker serves only steps that succeed: after a failed step (non-zero exit), or a step that
imported DeepSpeed (process-global communication state it has no teardown for), it exits and
the runner starts a fresh one for the next step. A worker that dies in a step (segfault,
`os._exit`) fails that step, with a note in its log.

Protocol: one JSON request per line on stdin {"argv": [...], "log": PATH, "threads": N}, one
JSON reply per line on the worker's original stdout {"rc": N}.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

# `python -m KEY` -> the module whose main(argv) runs it.
ENTRY_POINTS = {**{command: command for command in (
    "megatron_pn.cli.train", "megatron_pn.cli.evaluate", "megatron_pn.cli.project",
    "megatron_pn.cli.experiment")}, "data_tools": "data_tools.cli"}
# A step that imported one of these retires its worker (global state without a teardown).
RETIRING_MODULES = ("deepspeed",)
STEPS_PER_WORKER = 200  # then a fresh worker (bounds memory fragmentation over a long run)


PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def stop_with_parent() -> None:
    """`preexec_fn` of every step process: SIGTERM when the runner dies, even by SIGKILL
    (Linux), so that a step saves and stops instead of running on as an orphan that holds its
    checkpoint lock (elsewhere only a runner that is stopped stops its steps)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def entry_module(cmd: list[str]) -> str | None:
    """The module whose main() runs `cmd` in a worker, or None when it must be a process of
    its own (torchrun, another interpreter, an unknown module)."""
    if len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m":
        return ENTRY_POINTS.get(cmd[2])
    return None


# ---------------------------------------------------------------------------------------------
# The runner's side


class Worker:
    """One worker process; `submit` a step, then `poll` its job until it has an exit code."""

    def __init__(self, env: dict, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_pn.experiment.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=cwd,
                                     preexec_fn=stop_with_parent)
        self.steps = 0
        self.job: WorkerJob | None = None
        self.retired = False  # it exits after its step: the next step needs a fresh worker

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, cmd: list[str], log: Path, threads: int) -> "WorkerJob":
        assert self.job is None, "a worker runs one step at a time"
        request = {"argv": [str(a) for a in cmd], "log": str(log), "threads": threads}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        self.steps += 1
        self.job = WorkerJob(self, log)
        return self.job

    def close(self, timeout: float = 5.0) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # EOF: an idle worker exits
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=timeout if self.job is None else 0.1)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class WorkerJob:
    """A step in a worker, polled like a subprocess.Popen (`poll()`, `returncode`)."""

    def __init__(self, worker: Worker, log: Path):
        self.worker, self.log, self.returncode = worker, log, None
        self._buffer = b""

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        out = self.worker.proc.stdout
        if select.select([out], [], [], 0)[0]:
            chunk = os.read(out.fileno(), 4096)
            self._buffer += chunk
            if b"\n" in self._buffer:
                reply = json.loads(self._buffer.split(b"\n")[0])
                self.worker.retired = reply["retire"]
                return self._finish(reply["rc"])
            if chunk:
                return None
            # end of file without a reply: the worker died in the step
            code = self.worker.proc.wait()
            with open(self.log, "a") as f:
                f.write(f"\nthe worker process running this step died (exit code {code})\n")
            self.worker.retired = True
            return self._finish(code or 1)
        return None

    def terminate(self) -> None:
        """SIGTERM to the worker: the step's stop handler (pn-train: save and exit), else the
        default (the worker exits; `poll` then reports the step failed)."""
        self.worker.proc.terminate()

    def kill(self) -> None:
        self.worker.proc.kill()

    def _finish(self, code: int) -> int:
        self.returncode = code
        self.worker.job = None
        return code


class WorkerPool:
    """Up to `size` workers, started when first needed; a worker that failed a step, or ran
    STEPS_PER_WORKER, is closed and replaced by a fresh one."""

    def __init__(self, size: int, env: dict, cwd: Path, threads: int):
        self.size, self.env, self.cwd, self.threads = size, env, cwd, threads
        self.workers: list[Worker] = []

    def submit(self, cmd: list[str], log: Path) -> WorkerJob:
        for worker in list(self.workers):
            if worker.job is None and (worker.retired or not worker.alive
                                       or worker.steps >= STEPS_PER_WORKER):
                worker.close()
                self.workers.remove(worker)
        idle = [w for w in self.workers if w.job is None]
        if idle:
            worker = idle[0]
        else:
            if len(self.workers) >= self.size:
                raise RuntimeError("every worker is busy")  # the runner counts slots: a bug
            worker = Worker(self.env, self.cwd)
            self.workers.append(worker)
        try:
            return worker.submit(cmd, log, self.threads)
        except BrokenPipeError:  # it died while idle (e.g. killed for memory): a fresh one
            worker.close()
            self.workers.remove(worker)
            worker = Worker(self.env, self.cwd)
            self.workers.append(worker)
            return worker.submit(cmd, log, self.threads)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []


# ---------------------------------------------------------------------------------------------
# The worker's side


class FreshState:
    """What a fresh interpreter starts a step with, captured once at worker start-up."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)

    def __init__(self):
        self.environ = dict(os.environ)
        self.cwd = os.getcwd()
        self.handlers = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        self.log_level = logging.getLogger().level
        import numpy as np
        import torch  # every model step needs it: imported once, its fresh RNG state kept

        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def restore(self, argv: list[str], threads: int) -> None:
        import numpy as np
        import torch

        os.environ.clear()
        os.environ.update(self.environ)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.chdir(self.cwd)
        sys.argv = list(argv)
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(self.log_level)
        torch.set_num_threads(threads)
        python_rng, numpy_rng, torch_rng = self.rng
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(torch_rng)


def teardown() -> None:
    """Destroy the process-global state a step may have created (only what it imported)."""
    modules = sys.modules
    if "megatron.core.parallel_state" in modules:
        ps = modules["megatron.core.parallel_state"]
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if "megatron.core.num_microbatches_calculator" in modules:
        modules["megatron.core.num_microbatches_calculator"].destroy_num_microbatches_calculator()
    if "megatron.core.tensor_parallel.random" in modules:
        modules["megatron.core.tensor_parallel.random"].get_cuda_rng_tracker().reset()
    if "tqdm" in modules:
        tqdm = modules["tqdm"].tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    gc.collect()
    # What survives is the worker's (modules, caches): out of the collector's way, so that the
    # next step's collections walk only its own objects.
    gc.freeze()
    if "megatron_pn.compat" in modules:
        modules["megatron_pn.compat"].release_cached_memory()


def exit_code(code) -> int:
    """A SystemExit code as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def call_main(module: str, args: list[str]) -> int:
    try:
        return exit_code(importlib.import_module(module).main(args))
    except SystemExit as exit:
        return exit_code(exit.code)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception, exit status 1
        traceback.print_exc()
        return 1


def run_step(argv: list[str], log: str, threads: int, fresh: FreshState,
             devnull: int) -> tuple[int, bool]:
    """Runs one step with fds 1 and 2 on its log; returns (exit code, whether this worker
    can serve another step)."""
    fresh.restore([importlib.util.find_spec(argv[2]).origin or argv[2], *argv[3:]], threads)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with warnings.catch_warnings():  # the filters a step adds end with it
                rc = call_main(entry_module(argv), argv[3:])
            healthy = rc == 0
            try:
                teardown()
            except BaseException:  # noqa: BLE001 - in the log; the worker retires
                traceback.print_exc()
                healthy = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
    return rc, healthy and not any(m in sys.modules for m in RETIRING_MODULES)


def serve() -> int:
    # Replies on the original stdout, requests on the original stdin; the step's fds 0/1/2 are
    # /dev/null or its log (a step or its children must not touch the protocol pipes).
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    requests = os.fdopen(os.dup(0), "r")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    fresh = FreshState()
    gc.freeze()
    for line in requests:
        request = json.loads(line)
        rc, healthy = run_step(request["argv"], request["log"], int(request["threads"]), fresh,
                               devnull)
        replies.write(json.dumps({"rc": rc, "retire": not healthy}) + "\n")
        if not healthy:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(serve())
