"""SLURM scripts: the batch-shell logic of slurm/common.sh (time left, signal forwarding, the
requeue decision) with stand-in commands. A real SLURM cluster runs the scripts in
tests/test_slurm_cluster.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
COMMON = REPO / "slurm" / "common.sh"


def outside_slurm() -> dict:
    """This environment without the variables of a SLURM job the tests may run in."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}


def bash(script: str, env=None) -> subprocess.CompletedProcess:
    """`script` in bash after sourcing slurm/common.sh."""
    return subprocess.run(["bash", "-c", f"source {COMMON}\n{script}"], capture_output=True,
                          text=True, env={**outside_slurm(), **(env or {})}, timeout=60)


# -- the batch-shell logic, with stand-ins ------------------------------------------------------

@pytest.mark.parametrize("script", [s.name for s in SCRIPTS if s.name != "common.sh"])
def test_every_script_has_help_and_parses(script):
    path = REPO / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout and "#SBATCH --" not in out.stdout


@pytest.mark.parametrize("text,seconds", [
    ("1-02:03:04", 93784), ("02:03:04", 7384), ("08:09", 489), ("0:59", 59),
    ("UNLIMITED", None), ("NOT_SET", None)])
def test_slurm_durations(text, seconds):
    out = bash(f"pn_duration_seconds {text}")
    assert (out.stdout.strip() or None) == (None if seconds is None else str(seconds))
    assert (out.returncode == 0) == (seconds is not None)


def test_exit_minutes_leave_a_margin_before_the_time_limit():
    now = int(time.time())
    minutes = lambda left: bash("pn_exit_minutes", {  # noqa: E731
        "SLURM_JOB_END_TIME": str(now + left), "PN_EXIT_MARGIN": "600"}).stdout.strip()
    assert float(minutes(3600)) == pytest.approx(50, abs=0.1)   # 1 h left: stop 10 min early
    assert float(minutes(900)) == pytest.approx(7.5, abs=0.1)   # short job: half of it
    assert bash("pn_exit_minutes").stdout.strip() == ""  # no time limit known


def test_cpu_processes_follow_the_tasks_per_node():
    assert bash("pn_cpu_procs", {"SLURM_TASKS_PER_NODE": "2(x3),1"}).stdout.strip() == "2"
    assert bash("pn_cpu_procs").stdout.strip() == "1"


def test_first_stop_signal_is_forwarded_once():
    """The batch shell runs the step in the background, traps USR1/TERM, forwards the first one
    as USR1 and ignores the next (a second signal would cut torchrun's graceful shutdown)."""
    step = ("import signal, time; n = []; signal.signal(signal.SIGUSR1, lambda *a: n.append(1)); "
            "print('ready', flush=True); time.sleep(4); print('got', len(n))")
    proc = subprocess.Popen(
        ["bash", "-c", f"source {COMMON}; pn_trap_stop_signals\n"
                       f"pn_run_step {sys.executable} -c \"{step}\"\necho rc=$? by=$PN_STOPPED_BY"],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert "got 1" in out and "rc=0 by=TERM" in out


@pytest.fixture
def stand_ins(tmp_path):
    """scontrol and a Python whose `launch checkpoint-step` prints "$STEP $STEPS", both
    logging calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {tmp_path}/calls\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "python $*" >> {tmp_path}/calls\n'
                                    '[ "$3" = checkpoint-step ] && echo "$STEP $STEPS"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return tmp_path


def requeue_decision(stand_ins, rc: int, stopped_by="", steps=(0, 5), restarts=0, env=None):
    """The batch shell's decision after a training step ended with `rc`; `steps`: the newest
    checkpoint when the job started and now (of 20)."""
    env = {"PATH": f"{stand_ins}/bin:{os.environ['PATH']}", "PN_PYTHON": "python",
           "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": str(restarts), "STEP": str(steps[1]),
           "STEPS": "20", "PN_MAX_REQUEUES": "3", **(env or {})}
    (stand_ins / "calls").unlink(missing_ok=True)
    out = bash(f"PN_STOPPED_BY={stopped_by}; PN_START_STEP={steps[0]}; "
               f"pn_requeue_if_stopped {rc} cfg.yaml a=1; echo returned=$?", env)
    calls = (stand_ins / "calls").read_text() if (stand_ins / "calls").exists() else ""
    return out.stdout, "scontrol requeue 77" in calls


def test_requeue_decision(stand_ins):
    far = {"SLURM_JOB_END_TIME": str(int(time.time()) + 7200)}
    near = {"SLURM_JOB_END_TIME": str(int(time.time()) + 60)}
    out, requeued = requeue_decision(stand_ins, 0, env=far)
    assert "returned=0" in out and not requeued  # finished normally
    out, requeued = requeue_decision(stand_ins, 1, env=far, steps=(10, 10))
    assert "returned=1" in out and not requeued  # a crash without progress is not retried
    assert "no checkpoint newer than step 10" in out
    out, requeued = requeue_decision(stand_ins, 1, env=far, steps=(10, 15))  # a lost node
    assert requeued and "after progress (checkpoint step 10 -> 15)" in out
    out, requeued = requeue_decision(stand_ins, 1, env=far, steps=(15, 20))
    assert "returned=0" in out and not requeued  # failed after its last save: done
    out, requeued = requeue_decision(stand_ins, 138, stopped_by="USR1", env=far)
    assert requeued and "returned" not in out  # the job ends right after the requeue
    out, requeued = requeue_decision(stand_ins, 138, env=far)  # USR1 reached the step only
    assert requeued
    out, requeued = requeue_decision(stand_ins, 0, env=near)  # train.exit_duration_minutes
    assert requeued and "the time limit" in out
    out, requeued = requeue_decision(stand_ins, 1, stopped_by="USR1", steps=(0, 20), env=far)
    assert "returned=0" in out and not requeued  # stopped after the last step: done
    out, requeued = requeue_decision(stand_ins, 138, stopped_by="USR1", restarts=3, env=far)
    assert "returned=1" in out and not requeued and "PN_MAX_REQUEUES" in out
    for rc in (138, 143):  # scancel, hard limit, preemption: SIGTERM to the batch shell too
        out, requeued = requeue_decision(stand_ins, rc, stopped_by="TERM", env=far)
        assert f"returned={rc}" in out and not requeued and "SIGTERM" in out
    # SIGTERM to the step alone: srun ending a node's task after another node failed
    out, requeued = requeue_decision(stand_ins, 143, env=far, steps=(10, 15))
    assert requeued and "a failure (exit code 143) after progress" in out


def test_embed_cluster_submits_a_gpu_array_then_a_dependent_merge_and_cluster(tmp_path):
    """With stand-in sbatch and pn-data: the submit stage asks for one GPU per array task and
    a merge+cluster job after all of them; a task embeds its shard; the last job merges the
    shards in order and clusters for each k."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "sbatch $*" >> {tmp_path}/calls\necho 41\n')
    (bin_dir / "pn-data").write_text(f'#!/bin/sh\necho "pn-data $*" >> {tmp_path}/calls\n')
    (bin_dir / "python").write_text("#!/bin/sh\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = REPO / "slurm" / "embed_cluster.sh"
    options = ["--data-prefix", "d/p", "--tokenizer-model", "t.model", "--output", "out",
               "--k", "32,1024"]
    env = {**outside_slurm(), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PN_PYTHON": str(bin_dir / "python"), "PN_REPO": str(REPO)}

    def run(*args, **extra):
        done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                              env={**env, **extra}, cwd=tmp_path, timeout=60)
        assert done.returncode == 0, done.stderr
        calls = (tmp_path / "calls").read_text().splitlines()
        (tmp_path / "calls").unlink()
        return calls

    array, after = run("8", *options)
    assert "--array=0-7" in array and "--gres=gpu:1" in array and "--stage shard 8" in array
    assert "--dependency=afterok:41" in after and "--stage cluster 8" in after
    (embed,) = run("--stage", "shard", "8", *options, SLURM_ARRAY_TASK_ID="3")
    assert embed.startswith("pn-data embed --shard 3/8 ") and "--output out/embeddings.shards/0003" in embed
    merge, *clusters = run("--stage", "cluster", "8", *options)
    shard_dirs = " ".join(f"out/embeddings.shards/{i:04d}" for i in range(8))
    assert merge == f"pn-data merge-embeddings --inputs {shard_dirs} --output out/embeddings"
    assert [c.split("--k ")[1].split()[0] for c in clusters] == ["32", "1024"]
