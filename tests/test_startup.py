"""Start-up paid once. Long-lived step workers (megatron_pn/experiment/worker.py): a sequence
of steps run in one worker gives the same bytes as one fresh interpreter per step; a failed or
killed step retires its worker and the next step gets a fresh one. Light commands (--help, the
format-only data steps, listings) import neither megatron-core nor what it pulls in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import numpy as np

from helpers import (REPO, real_text_documents, tiny_overrides, tiny_pn_overrides,
                     write_byte_dataset, write_cluster_datasets)
from megatron_pn.experiment.grid import Step, finished, python
from megatron_pn.experiment.runner import LocalRunner, log_path, step_env
from megatron_pn.experiment.worker import WorkerPool, entry_module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker_data")
    docs = [d[:2000] for d in real_text_documents(100_000)]
    return {"text": write_byte_dataset(root / "text", docs),
            "held_out": write_byte_dataset(root / "held_out", [d.upper() for d in docs[:10]]),
            "blend_file": write_cluster_datasets(root / "clusters", num_clusters=2)}


def step_sequence(root: Path, data) -> dict[str, Step]:
    """A dense pretraining, its evaluation, a PN pretraining (another config, same worker) and
    a fine-tuning of the dense model: each one of the project's commands, as the grid builds
    them."""
    dense, pn, ft = root / "dense", root / "pn", root / "ft"
    steps = [
        Step("dense", "pretrain", finished(dense), python(
            "megatron_pn.cli.train", "configs/tiny/slm.yaml",
            *tiny_overrides(data["text"], dense, **{"train.steps": 4,
                                                   "checkpoint.dir": dense / "ckpt"}))),
        Step("eval", "eval", root / "eval.json", python(
            "megatron_pn.cli.evaluate", "--checkpoint", dense / "ckpt", "--data",
            data["held_out"], "--names", "held_out", "--output", root / "eval.json",
            "--quiet"), ["dense"]),
        Step("pn", "pretrain", finished(pn), python(
            "megatron_pn.cli.train", "configs/tiny/pn.yaml",
            *tiny_pn_overrides(data["blend_file"], pn, **{
                "train.steps": 3, "model.num_experts": 2, "data.split": "80,20,0",
                "checkpoint.dir": pn / "ckpt"})), ["eval"]),
        Step("ft", "finetune", finished(ft), python(
            "megatron_pn.cli.train", "configs/tiny/slm.yaml",
            *tiny_overrides(data["text"], ft, **{
                "train.steps": 3, "train.lr": 1e-3, "train.seed": 7,
                "checkpoint.load": dense / "ckpt", "checkpoint.dir": ft / "ckpt"})), ["pn"]),
    ]
    return {s.name: s for s in steps}


def checkpoint_tensors(run_dir: Path) -> dict:
    """Every tensor of the run's latest checkpoint (megatron-core's distributed format)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    step_dir = max((run_dir / "ckpt").glob("iter_*"))
    state = _load_state_dict_from_keys(storage_reader=FileSystemReader(str(step_dir)))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", state)
    return flat


def train_records(run_dir: Path) -> list[dict]:
    timing = ("elapsed", "per_s", "tflops", "mfu", "seconds", "time", "wall")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in records]


@pytest.mark.slow
def test_steps_in_one_worker_give_the_bytes_of_fresh_processes(data, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(REPO)
    outputs = {}
    for workers in (True, False):
        root = tmp_path / ("workers" if workers else "processes")
        steps = step_sequence(root, data)
        grid = SimpleNamespace(steps=steps, out=root)
        runner = LocalRunner(grid, slots=1, quiet=True, workers=workers)
        started = []
        if workers:  # every step in the same worker process
            real = WorkerPool.submit

            def spy(pool, cmd, log):
                job = real(pool, cmd, log)
                started.append(job.worker.proc.pid)
                return job

            monkeypatch.setattr(WorkerPool, "submit", spy)
        runner.run()
        monkeypatch.undo()
        monkeypatch.chdir(REPO)
        if workers:
            assert len(started) == 4 and len(set(started)) == 1
            log = log_path(root, "pn").read_text()
            assert log.startswith("$ ") and "training steps 0 -> 3" in log
        outputs[workers] = {
            "eval": json.loads((root / "eval.json").read_text())["datasets"],
            **{name: (train_records(root / name), checkpoint_tensors(root / name))
               for name in ("dense", "pn", "ft")}}
    assert outputs[True]["eval"] == outputs[False]["eval"]
    for name in ("dense", "pn", "ft"):
        (records, tensors), (records_ref, tensors_ref) = outputs[True][name], outputs[False][name]
        assert records == records_ref and len(records) >= 3, name
        assert tensors.keys() == tensors_ref.keys() and len(tensors) > 10, name
        for key, tensor in tensors.items():
            assert torch.equal(tensor, tensors_ref[key]), (name, key)


def test_a_failed_or_killed_step_retires_its_worker(data, tmp_path):
    out = tmp_path / "out"
    pool = WorkerPool(1, step_env(1), REPO, threads=1)
    try:
        bad = python("data_tools", "stats", "--no-such-option")
        assert entry_module(bad) == "data_tools.cli"
        log = tmp_path / "bad.log"
        job = pool.submit(bad, log)
        while job.poll() is None:
            time.sleep(0.05)
        assert job.returncode == 2 and "pn-data stats: error" in log.read_text()
        first = job.worker
        assert first.retired
        # a step killed in the middle (segfault, out of memory): failed, noted, replaced
        slow = python("megatron_pn.cli.train", "configs/tiny/slm.yaml",
                      *tiny_overrides(data["text"], out / "killed", **{"train.steps": 1000}))
        job = pool.submit(slow, tmp_path / "killed.log")
        assert job.worker is not first
        time.sleep(1.0)
        os.kill(job.worker.proc.pid, signal.SIGKILL)
        while job.poll() is None:
            time.sleep(0.05)
        assert job.returncode == -signal.SIGKILL
        assert "worker process running this step died" in (tmp_path / "killed.log").read_text()
        help_job = pool.submit(python("megatron_pn.cli.experiment", "--help"), tmp_path / "help.log")
        while help_job.poll() is None:
            time.sleep(0.05)
        assert help_job.returncode == 0 and "pn-experiment" in (tmp_path / "help.log").read_text()
    finally:
        pool.close()



@pytest.mark.slow
@pytest.mark.parametrize("workers", [True, False])
def test_a_stopped_runner_stops_its_steps_and_the_rerun_resumes(data, tmp_path, workers):
    """SIGTERM to `pn-experiment run` (a job scheduler, `kill`): the running pn-train gets it
    too, saves and exits, its checkpoint directory is free (no orphan holds its lock), and the
    same steps run again resume where they stopped."""
    import fcntl
    import threading

    from megatron_pn.experiment.runner import Stopped

    run = tmp_path / "long"

    def long_step(steps):
        return {"long": Step("long", "pretrain", finished(run), python(
            "megatron_pn.cli.train", "configs/tiny/slm.yaml", *tiny_overrides(
                data["text"], run, **{"train.steps": steps, "checkpoint.dir": run / "ckpt"})))}

    grid = SimpleNamespace(steps=long_step(100_000), out=tmp_path / "out")
    log = log_path(grid.out, "long")

    def stop_once_training():
        while "training steps" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_training, daemon=True).start()
    with pytest.raises(Stopped, match="SIGTERM"):
        LocalRunner(grid, slots=1, quiet=True, workers=workers).run()
    assert "stop requested (signal or time limit): saved step" in log.read_text()
    with open(run / "ckpt" / ".pn-train.lock") as lock:  # released: nothing still runs there
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    saved = int((run / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    grid.steps = long_step(saved + 2)
    LocalRunner(grid, slots=1, quiet=True, workers=workers).run()
    assert f"resumed from {run / 'ckpt'}" in log.read_text()
    assert json.loads((run / "finished.json").read_text())["step"] == saved + 2


@pytest.mark.slow
def test_a_killed_runner_leaves_no_step_running(data, tmp_path):
    """SIGKILL gives the runner no say (the OOM killer, `kill -9`): its worker gets SIGTERM from
    the kernel (Linux: PR_SET_PDEATHSIG), so the step it ran saves and stops, no orphan."""
    import fcntl

    run, out = tmp_path / "long", tmp_path / "out"
    script = tmp_path / "runner.py"
    script.write_text(f"""
from pathlib import Path
from types import SimpleNamespace
from megatron_pn.experiment.grid import Step, finished, python
from megatron_pn.experiment.runner import LocalRunner
cmd = python("megatron_pn.cli.train", *{["configs/tiny/slm.yaml", *map(str, tiny_overrides(
    data["text"], run, **{"train.steps": 100_000, "checkpoint.dir": run / "ckpt"}))]!r})
grid = SimpleNamespace(steps={{"long": Step("long", "pretrain", finished(Path({str(run)!r})),
                                           cmd)}}, out=Path({str(out)!r}))
LocalRunner(grid, slots=1, quiet=True).run()
""")
    runner = subprocess.Popen([sys.executable, str(script)], cwd=REPO)
    log = log_path(out, "long")
    deadline = time.time() + 300
    while "training steps" not in (log.read_text() if log.exists() else ""):
        assert runner.poll() is None and time.time() < deadline, "the step never started"
        time.sleep(0.1)
    runner.kill()
    runner.wait()
    while "stop requested (signal or time limit): saved step" not in log.read_text():
        assert time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    lock = run / "ckpt" / ".pn-train.lock"
    while True:  # the step's process lets go of its checkpoint directory
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, "the step still holds its checkpoint lock"
                time.sleep(0.1)

def test_only_single_process_project_commands_go_to_workers():
    assert entry_module(python("megatron_pn.cli.train", "c.yaml")) == "megatron_pn.cli.train"
    assert entry_module(python("megatron_pn.cli.evaluate", "--batch", "b")) == "megatron_pn.cli.evaluate"
    assert entry_module(python("megatron_pn.cli.train", "c.yaml", procs=2)) is None  # torchrun
    assert entry_module([sys.executable, "-c", "pass"]) is None
    assert entry_module(["python3", "-m", "megatron_pn.cli.train"]) is None  # another interpreter


# -- light commands ---------------------------------------------------------------------------

HEAVY = ("megatron.core", "torch._inductor", "torch._dynamo", "wandb", "transformers")


def heavy_imports(module: str, *args: str) -> list[str]:
    """The heavy modules `python -m MODULE ARGS` has imported when it exits."""
    script = (f"import runpy, sys\nsys.argv = [{module!r}, *sys.argv[1:]]\n"
              f"try:\n    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
              f"except SystemExit:\n    pass\n"
              f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=step_env(1))
    line = [l for l in out.stderr.splitlines() if l.startswith("HEAVY")]
    assert line, out.stderr[-2000:]
    return eval(line[-1][len("HEAVY "):])


@pytest.mark.parametrize("command", [
    ["megatron_pn.cli.train", "--help"], ["megatron_pn.cli.project", "--help"],
    ["megatron_pn.cli.evaluate", "--help"], ["megatron_pn.cli.hf", "--help"],
    ["data_tools", "--help"], ["data_tools", "preprocess", "--help"],
    ["megatron_pn.cli.plan", "--help"], ["megatron_pn.cli.experiment", "--help"],
    ["megatron_pn.cli.experiment", "list", "configs/experiments/tiny.yaml", "--out", "/nonexistent"],
])
def test_light_commands_import_no_megatron_core(command):
    assert heavy_imports(*command) == []


def test_format_only_data_steps_import_no_megatron_core(data, tmp_path):
    merged = tmp_path / "merged"
    assert heavy_imports("data_tools", "merge", "--inputs", str(data["text"]),
                         str(data["held_out"]), "--output-prefix", str(merged)) == []
    assert merged.with_suffix(".idx").is_file()


def test_index_format_is_megatron_cores(data, tmp_path):
    """The NumPy writer (data_tools/indexed.py) against megatron-core's builder: the dtype
    codes, and a concatenation byte for byte (add_index's document boundaries included)."""
    from data_tools.indexed import DTYPE_CODES, concat_datasets, megatron_indexed_dataset

    mc = megatron_indexed_dataset()
    assert {code: mc.DType.dtype_from_code(code) for code in DTYPE_CODES} == DTYPE_CODES
    prefixes = [str(data["text"]), str(data["held_out"]), str(data["text"])]
    concat_datasets(prefixes, str(tmp_path / "ours"), overwrite=False)
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        assert ((tmp_path / f"ours{suffix}").read_bytes()
                == (tmp_path / f"theirs{suffix}").read_bytes()), suffix


def test_megatron_core_imports_without_the_compiler():
    """megatron-core's fusions are decorated with torch.compile at import: deferred to their
    first call (megatron_pn/deferred_compile.py), the import loads neither TorchDynamo nor
    TorchInductor, and torch.compile is torch's own again afterwards."""
    script = ("import sys, torch, megatron_pn, megatron.core\n"
              "from megatron.core import jit\n"
              "print(sorted(m for m in ('torch._dynamo', 'torch._inductor.compile_fx')"
              " if m in sys.modules), jit.jit_fuser.__name__, torch.compile.__module__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=step_env(1))
    assert out.stdout.split() == ["[]", "compile_later", "torch"], out.stderr[-2000:]


def test_a_deferred_compile_compiles_once_at_the_first_call_with_its_options():
    import torch

    from megatron_pn.deferred_compile import compile_on_first_call

    calls = []

    def compile_now(model, **options):
        calls.append((model, options))
        return lambda x: model(x) + 0

    compile_later = compile_on_first_call(compile_now)

    def double(x):
        return 2 * x
    deferred = compile_later(double, mode="max-autotune")
    decorated = compile_later(fullgraph=True)(double)
    assert calls == [] and deferred.__name__ == "double"
    assert deferred(3) == deferred(4) - 2 == 6
    assert decorated(1) == 2
    assert calls == [(double, {"mode": "max-autotune"}), (double, {"fullgraph": True})]
    module = torch.nn.Linear(2, 2)
    compile_later(module)  # not a function: compiled as before
    assert calls[-1] == (module, {})
