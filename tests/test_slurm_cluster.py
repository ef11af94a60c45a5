"""A real two-node SLURM cluster on this machine (two network namespaces, tests/slurm_cluster.py)
runs slurm/pretrain_pn.sh on the tiny projected network: to the end, as one node would; stopped
by SIGUSR1 (the time limit's signal); with a node killed or frozen mid-training, the
checkpoint disk full, and `scontrol requeue` during a save. After a
stop or a fault the job requeues itself from its newest complete checkpoint, in bounded time,
with one line naming the node at fault, losing at most one save interval, leaving no process
behind, and ends with the uninterrupted run's losses, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from helpers import REPO, losses, read_metrics, run_train, tiny_pn_overrides, write_cluster_datasets
from megatron_pn import checkpoint
from slurm_cluster import TwoHostSlurm, ended, ensure_slurm

pytestmark = pytest.mark.slow

STEPS, SAVE_INTERVAL = 20, 5
HEARTBEAT = 10  # s: train.heartbeat_timeout for these runs (default 120)
NODE1, NODE2 = TwoHostSlurm.HOSTS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    ensure_slurm()
    slurm = TwoHostSlurm(tmp_path_factory.mktemp("two_hosts"))
    request.addfinalizer(slurm.stop)  # also when start() fails half-way
    slurm.start()
    return slurm


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    return write_cluster_datasets(tmp_path_factory.mktemp("fault_data"))


def overrides(blend: Path, run_dir: Path, checkpoints: Path | None = None) -> list[str]:
    return tiny_pn_overrides(blend, run_dir, **{
        "data.split": "80,20,0", "train.steps": STEPS,
        "checkpoint.dir": checkpoints or run_dir / "ckpt",
        "checkpoint.save_interval": SAVE_INTERVAL, "train.heartbeat_timeout": HEARTBEAT})


def submit(cluster: TwoHostSlurm, blend: Path, run_dir: Path, checkpoints=None) -> str:
    """slurm/pretrain_pn.sh on both nodes, one gloo process each."""
    return cluster.sbatch(
        "--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--time=20",
        f"--output={run_dir}.out", "--chdir", str(REPO), "slurm/pretrain_pn.sh",
        "configs/tiny/pn.yaml", *map(str, overrides(blend, run_dir, checkpoints)))


def log_of(run_dir: Path) -> str:
    return Path(f"{run_dir}.out").read_text()


def checkpoint_step(checkpoints: Path) -> int:
    return checkpoint.latest_step(checkpoints) or 0


@pytest.fixture(scope="module")
def uninterrupted(cluster, blend, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fault_runs") / "uninterrupted"
    job = submit(cluster, blend, run_dir)
    return run_dir, cluster.wait_for(job, ended, "end")


def test_two_hosts_train_to_the_end_like_one_node(cluster, blend, uninterrupted, tmp_path):
    run_dir, info = uninterrupted
    log = log_of(run_dir)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert f"on 2 node(s) {NODE1.rstrip('1')}[1-2]" in log
    assert "world 2 = 2 node(s) x 1 cpu process(es)" in log  # the pre-flight check ran first
    assert "saves and stops by itself after" in log  # before the time limit
    assert f"rendezvous {NODE1}:" in log  # the first node's own name and address
    # the gradients crossed the veth link between the namespaces
    sent = int(cluster.in_host(NODE2, "cat", f"/sys/class/net/{NODE2}i/statistics/tx_bytes"))
    assert sent > 1_000_000
    one_node = tmp_path / "one_node"  # the same global batch, 2 processes on one host
    run_train(["configs/tiny/pn.yaml", *overrides(blend, one_node)], nproc=2)
    assert losses(run_dir) == pytest.approx(losses(one_node), abs=1e-6)
    assert len(losses(run_dir)) == STEPS


def test_sigusr1_saves_requeues_and_resumes_to_the_same_losses(cluster, blend, uninterrupted,
                                                               tmp_path):
    """`scancel --signal=USR1 --batch`, as --signal=B:USR1@300 before the time limit: every
    rank saves, the job requeues itself and resumes."""
    run_dir = tmp_path / "stopped"
    job = submit(cluster, blend, run_dir)
    cluster.wait_for(job, lambda i: ended(i) or max(read_metrics(run_dir), default=0) >= 3,
                     "training step 3")
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    cluster.wait_for(job, lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING",
                     "requeue")
    cluster.release_requeued(job)
    info = cluster.wait_for(job, lambda i: ended(i) and i["Restarts"] == "1", "end")
    log = log_of(run_dir)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log + cluster.logs()
    assert "SIGUSR1 received" in log and "requeueing job" in log
    stopped_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert f"saved checkpoint {run_dir / 'ckpt' / f'iter_{stopped_at:07d}'}" in log
    assert losses(run_dir) == losses(uninterrupted[0])


def run_with_fault(cluster: TwoHostSlurm, blend: Path, run_dir: Path, inject) -> dict:
    """Submit, wait for the first checkpoint and two more steps, call `inject()`, then
    `recover`."""
    job = submit(cluster, blend, run_dir)
    cluster.wait_for(job, lambda i: ended(i) or (checkpoint_step(run_dir / "ckpt") >= SAVE_INTERVAL and
                                                  max(read_metrics(run_dir)) >= SAVE_INTERVAL + 2),
                     "first checkpoint")
    fault_step, fault_time = max(read_metrics(run_dir)), time.time()
    inject()
    return recover(cluster, job, run_dir, f"node 2 {run_dir.name}", fault_step, fault_time)


def recover(cluster: TwoHostSlurm, job: str, run_dir: Path, fault: str, fault_step: int,
            fault_time: float) -> dict:
    """Wait until the job was requeued (by its batch script or by SLURM) and is pending, start
    it at once (SLURM would hold it 120 s), wait for its first resumed step and its end, and
    record the timings. Returns the log, the fault's and the resumed step, and the seconds from
    the fault to the requeue."""
    info = cluster.wait_for(job, lambda i: ended(i) or (i["Restarts"] == "1" and
                                                        i["JobState"] == "PENDING"),
                            "requeue", timeout=180)
    detected = time.time() - fault_time
    assert info["Restarts"] == "1" and not ended(info), log_of(run_dir) + cluster.logs()
    cluster.release_requeued(job)
    wait_for_a_resumed_step(cluster, job, run_dir)
    first_step = time.time() - fault_time
    info = cluster.wait_for(job, lambda i: ended(i) and i["Restarts"] == "1", "end")
    log = log_of(run_dir)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log + cluster.logs()
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    record_timing(fault, detected, first_step, fault_step - resumed)
    return dict(log=log, fault_step=fault_step, resumed=resumed, detected=detected)


def record_timing(fault: str, detected: float, first_step: float, lost: int) -> None:
    """For the README's fault table and figure: printed (pytest -s), and appended to the JSON
    lines file $PN_FAULT_TIMINGS when set (benchmarks/fault_figure.py draws it)."""
    print(f"\nfault timing {fault}: requeued {detected:.0f} s after the fault, first resumed "
          f"step after {first_step:.0f} s (SLURM's 120 s hold skipped), steps lost {lost}")
    if os.environ.get("PN_FAULT_TIMINGS"):
        with open(os.environ["PN_FAULT_TIMINGS"], "a") as f:
            f.write(json.dumps({"fault": fault, "requeued_s": round(detected, 1),
                                "first_step_s": round(first_step, 1), "steps_lost": lost}) + "\n")


def wait_for_a_resumed_step(cluster: TwoHostSlurm, job: str, run_dir: Path) -> None:
    logged = len((run_dir / "metrics.jsonl").read_text().splitlines())
    cluster.wait_for(job, lambda i: ended(i) or
                     len((run_dir / "metrics.jsonl").read_text().splitlines()) > logged,
                     "a resumed step")


def check_recovery(cluster: TwoHostSlurm, run_dir: Path, reference: Path, result: dict) -> None:
    assert result["detected"] < HEARTBEAT + 60  # ended and requeued in bounded time
    assert "requeueing job" in result["log"] and "after progress" in result["log"]
    assert result["fault_step"] - result["resumed"] <= SAVE_INTERVAL  # lost <= one interval
    assert losses(run_dir) == losses(reference)  # bit-exact, the resumed steps included
    assert_no_process_left(cluster)


def assert_no_process_left(cluster: TwoHostSlurm) -> None:
    deadline = time.time() + 15  # slurmstepd may take a moment to exit after the job
    while any(cluster.job_pids(h) for h in (NODE1, NODE2)) and time.time() < deadline:
        time.sleep(0.5)
    for host in (NODE1, NODE2):
        assert cluster.job_pids(host) == [], f"{host}: processes left after the job"


def training_pids(cluster: TwoHostSlurm, host: str) -> list[int]:
    """Every process the job runs on `host` (the launcher, torchrun, the workers and their
    children), not SLURM's own (slurmd, slurmstepd)."""
    return [p for p in cluster.job_pids(host)
            if not Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"slurmstepd")]


@pytest.mark.parametrize("fault,sig,line", [
    ("killed", signal.SIGKILL, rf"srun: error: {NODE2}: task 1: Killed"),  # no signal to save
    ("frozen", signal.SIGSTOP,
     rf"pn: error: rank 0 on {NODE1}: node {NODE2} \(rank 1\) sent no heartbeat"),
], ids=["killed", "frozen"])
def test_node_killed_or_frozen(cluster, blend, uninterrupted, tmp_path, fault, sig, line):
    """Every process of node 2's job killed (the job's peers see it at once) or frozen (only
    the heartbeats see it): reported in one line naming the node, recovered."""
    run_dir = tmp_path / fault

    def signal_node2():
        for pid in training_pids(cluster, NODE2):
            os.kill(pid, sig)

    result = run_with_fault(cluster, blend, run_dir, signal_node2)
    assert re.search(line, result["log"]), result["log"]
    check_recovery(cluster, run_dir, uninterrupted[0], result)


def test_disk_full_during_a_save(cluster, blend, uninterrupted, tmp_path):
    """Checkpoints on a 9 MiB disk both nodes share (a tiny PN checkpoint takes 6 MiB): the
    save at step 10 fails with ENOSPC. The job requeues once (it made progress: step
    5), fails again at the same save and stops (no progress: a repeating failure must not
    loop), naming the node and the cause. Never a torn checkpoint: after space is freed, a
    resubmitted job resumes from step 5 and ends with the uninterrupted run's losses."""
    run_dir, checkpoints = tmp_path / "full", cluster.disk / "full"
    cluster.resize_disk(9)
    job = submit(cluster, blend, run_dir, checkpoints)
    info = cluster.wait_for(job, lambda i: i["Restarts"] == "1" or ended(i), "requeue")
    if info["JobState"] == "PENDING":
        cluster.release_requeued(job)
    info = cluster.wait_for(job, lambda i: ended(i) and i["Restarts"] == "1", "end")
    log = log_of(run_dir)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log
    assert len(re.findall(rf"saving checkpoint step 10 failed on {NODE1} \(rank 0\): disk full "
                          r"\(ENOSPC\)", log)) == 2, log
    assert "after progress (checkpoint step 0 -> 5)" in log
    assert "no checkpoint newer than step 5, where this job started: not requeued" in log
    assert checkpoint_step(checkpoints) == 5
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000005"]

    cluster.resize_disk(64)  # the user frees space
    job = submit(cluster, blend, run_dir, checkpoints)  # the user's resubmit
    info = cluster.wait_for(job, ended, "end")
    assert info["JobState"] == "COMPLETED", log_of(run_dir)
    assert "resumed from" in log_of(run_dir).split(f"job {job} ")[1]
    assert losses(run_dir) == losses(uninterrupted[0])


def worker_pids(cluster: TwoHostSlurm, host: str) -> list[int]:
    """The training worker processes of the job on `host` (not the batch shell, srun, the
    launcher or torchrun)."""
    def is_worker(pid):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return False
        return b"megatron_pn.cli.train" in words and b"torch.distributed.run" not in words
    return [p for p in training_pids(cluster, host) if is_worker(p)]


def test_scontrol_requeue_during_a_save(cluster, blend, uninterrupted, tmp_path):
    """`scontrol requeue` (an administrator's, or a preemption that requeues) while step 10's
    checkpoint is being written: SLURM sends SIGCONT and SIGTERM to every process of the job,
    SIGKILL KillWait later, and requeues it. The rerun resumes from the newest complete
    checkpoint (step 10 if its save finished, else step 5; never the torn one) and ends with
    the uninterrupted run's losses. Node 1's worker is frozen as soon as the save's temporary
    directory appears, so the requeue always lands mid-save (SLURM's SIGCONT wakes it)."""
    run_dir = tmp_path / "requeued"
    partial = run_dir / "ckpt" / ".tmp_iter_0000010"
    job = submit(cluster, blend, run_dir)
    deadline = time.time() + 300
    while not partial.exists():  # a save lasts a fraction of a second: poll the file alone
        assert time.time() < deadline, f"no save of step 10 after 300 s:\n{log_of(run_dir)}"
        time.sleep(0.01)
    frozen = worker_pids(cluster, NODE1)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    fault_step, fault_time = max(read_metrics(run_dir)), time.time()
    cluster.run("scontrol", "requeue", job)
    result = recover(cluster, job, run_dir, "scontrol requeue during a save", fault_step,
                     fault_time)
    assert frozen and result["detected"] < 120
    assert "DUE TO JOB REQUEUE" in result["log"] and "SIGTERM received" in result["log"]
    assert result["resumed"] in (5, 10) and not partial.exists()
    assert losses(run_dir) == losses(uninterrupted[0])
    assert_no_process_left(cluster)
