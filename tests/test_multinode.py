"""The launcher (megatron_pn.cli.launch): its plan from a SLURM job, two torchrun "nodes" on
localhost reproducing a single-node run, and stop signals reaching the workers through it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from helpers import (REPO, free_port, losses, read_metrics, real_text_documents, run_train,
                     tiny_overrides, train_env, write_byte_dataset)
from megatron_pn.cli import launch

CONFIG = "configs/tiny/slm.yaml"


def options(**given):
    values = dict(nnodes=None, node_rank=None, nproc_per_node=None, cpu_procs=1,
                  rdzv_endpoint=None, rdzv_id=None, stop_timeout=270)
    return SimpleNamespace(**{**values, **given})


SLURM_NODE_1 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                "SLURM_JOB_NODELIST": "gpu[07-08]", "OMP_NUM_THREADS": "4"}


def test_plan_under_slurm(monkeypatch):
    monkeypatch.setattr(launch, "first_host", lambda nodelist: "gpu07")
    plan = launch.make_plan(options(), SLURM_NODE_1, gpus=8)
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node, plan.device) == (2, 1, 8, "cuda")
    assert plan.endpoint == f"gpu07:{launch.PORT_BASE + 4242}" and plan.rdzv_id == "4242"
    assert plan.threads is None  # the user's OMP_NUM_THREADS stays
    argv = launch.torchrun_argv(plan, ["configs/paper/pn32.yaml", "train.steps=5"])
    assert argv[argv.index("--rdzv-conf") + 1].startswith("is_host=false")  # node 1 joins
    assert "SIGUSR1" in argv[argv.index("--signals-to-handle") + 1].split(",")
    assert argv[-4:] == ["-m", "megatron_pn.cli.train", "configs/paper/pn32.yaml", "train.steps=5"]


def test_plan_without_gpus_uses_the_requested_cpu_processes():
    plan = launch.make_plan(options(cpu_procs=2), {"SLURM_JOB_ID": "7"}, gpus=0)
    assert (plan.nnodes, plan.nproc_per_node, plan.device) == (1, 2, "cpu")
    assert plan.endpoint.startswith("127.0.0.1:") and plan.threads >= 1
    argv = launch.torchrun_argv(plan, [CONFIG])
    assert argv[argv.index("--rdzv-conf") + 1].startswith("is_host=true")


def test_plan_errors():
    with pytest.raises(launch.LaunchError, match="--rdzv-endpoint"):
        launch.make_plan(options(nnodes=2), {}, gpus=0)
    with pytest.raises(launch.LaunchError, match="outside"):
        launch.make_plan(options(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), {}, gpus=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_byte_dataset(tmp_path_factory.mktemp("multinode") / "text",
                              real_text_documents())


def launcher(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_pn.cli.launch", "train", *args],
                            cwd=REPO, env=train_env(), stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_nodes_reproduce_a_single_node_run(dataset, tmp_path):
    single = tmp_path / "single"
    run_train([CONFIG, *tiny_overrides(dataset, single)], nproc=2)

    nodes = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    args = [CONFIG, *tiny_overrides(dataset, nodes)]
    with open(tmp_path / "node0.log", "w") as log0, open(tmp_path / "node1.log", "w") as log1:
        procs = [launcher(["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                           "--rdzv-endpoint", endpoint, "--rdzv-id", "test", *args], log)
                 for rank, log in ((0, log0), (1, log1))]
        codes = [proc.wait(timeout=600) for proc in procs]
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    assert len(losses(single)) == 20
    assert losses(nodes) == pytest.approx(losses(single), abs=1e-6)


@pytest.mark.slow
def test_sigusr1_to_the_launcher_saves_and_stops_the_workers(dataset, tmp_path):
    """Plain torchrun dies on SIGUSR1 and orphans its workers; through the launcher the
    workers get the signal, save one checkpoint and exit, and the launcher exits 128 + 10.
    The signal goes to every process of the launcher's tree, as slurmstepd sends it to every
    process of a job step, after a periodic save: the checkpoint writer's helper process
    (started by that save) must survive it, or the stop's own save fails."""
    import psutil

    run_dir = tmp_path / "run"
    args = [CONFIG, *tiny_overrides(dataset, run_dir, **{
        "train.steps": 1000, "checkpoint.dir": run_dir / "ckpt",
        "checkpoint.save_interval": 2})]
    with open(tmp_path / "log.txt", "w") as log:
        proc = launcher(["--cpu-procs", "2", "--stop-timeout", "120", *args], log)
        deadline = time.time() + 300
        while max(read_metrics(run_dir), default=0) < 3:
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        code = proc.wait(timeout=300)
    out = (tmp_path / "log.txt").read_text()
    assert code == 128 + signal.SIGUSR1, out[-3000:]
    saved = int((run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved == max(read_metrics(run_dir)) < 1000, out[-3000:]
    assert "pn-train: error" not in out and "workers asked to save" in out
