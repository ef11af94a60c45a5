"""Checkpoints: bit-exact resume after SIGKILL, stop-and-save on SIGUSR1 agreed across ranks,
loading into another TP layout, atomic saves."""

from __future__ import annotations

import json

import shutil
import signal
import time

import psutil
import pytest

from helpers import (losses, read_metrics, real_text_documents, run_train, start_train,
                     tiny_overrides, write_byte_dataset)

CONFIG = "configs/tiny/slm.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_data")
    return write_byte_dataset(root / "text", real_text_documents())


def wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(read_metrics(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, f"training ended early with {proc.returncode}"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(dataset, tmp_path):
    steps = 30
    common = {"train.steps": steps, "checkpoint.save_interval": 3, "logging.tensorboard": "true",
              "logging.wandb_mode": "offline"}
    reference = tmp_path / "reference"
    run_train([CONFIG, *tiny_overrides(dataset, reference, **common,
                                       **{"checkpoint.dir": reference / "ckpt"})])

    killed = tmp_path / "killed"
    args = [CONFIG, *tiny_overrides(dataset, killed, **common,
                                    **{"checkpoint.dir": killed / "ckpt"})]
    proc = start_train(args)
    wait_for_step(killed, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # (a busy machine may let it run a few steps past 7 before the kill lands)
    latest = int((killed / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert latest % 3 == 0 and 6 <= latest < steps
    assert not (killed / "finished.json").exists()
    run_train(args)  # resumes from the latest checkpoint by itself
    assert json.loads((killed / "finished.json").read_text())["reason"] == "train.steps"

    assert losses(killed) == losses(reference)  # exact, every step
    assert len(losses(reference)) == steps

    # Logging: the scalars, TensorBoard events and an offline wandb run are there.
    record = read_metrics(reference)[10]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert list((reference / "wandb").glob("offline-run-*"))
    # Warm-up then cosine decay to min_lr (configs/tiny/slm.yaml: peak 3e-3, 2 warm-up steps).
    lrs = [read_metrics(reference)[s]["lr"] for s in range(1, steps + 1)]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-4)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


@pytest.mark.slow
def test_signal_on_one_rank_stops_all_ranks_with_one_checkpoint(dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [CONFIG, *tiny_overrides(dataset, run_dir, **{
        "train.steps": 1000, "checkpoint.dir": run_dir / "ckpt"})]
    proc = start_train(args, nproc=2, log_path=tmp_path / "log.txt")
    wait_for_step(run_dir, 2, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "megatron_pn.cli.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGUSR1)  # only one rank hears it
    assert proc.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    saved = int((run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 1000
    assert max(read_metrics(run_dir)) == saved


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train([CONFIG, *tiny_overrides(dataset, run_dir, **{
        "train.steps": 1000, "checkpoint.dir": run_dir / "ckpt"})])
    wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    saved = int((run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert saved == max(read_metrics(run_dir)) >= 2


@pytest.mark.slow
def test_time_limit_saves_and_exits(dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_train([CONFIG, *tiny_overrides(dataset, run_dir, **{
        "train.steps": 100000, "train.exit_duration_minutes": 0.001,
        "checkpoint.dir": run_dir / "ckpt"})])
    saved = int((run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert saved == max(read_metrics(run_dir)) < 100000
    assert not (run_dir / "finished.json").exists()  # stopped, not over: a rerun resumes


@pytest.mark.slow
def test_tp2_checkpoint_resumes_and_evaluates_at_tp1(dataset, tmp_path):
    tp2 = tmp_path / "tp2"
    common = {"train.steps": 6, "train.eval_interval": 3, "checkpoint.save_interval": 3}
    run_train([CONFIG, *tiny_overrides(dataset, tp2, **common, **{
        "parallel.tensor": 2, "checkpoint.dir": tp2 / "ckpt"})], nproc=2)

    # Full resume (model, optimizer, scheduler, data position) of step 3 at TP=1.
    tp1 = tmp_path / "tp1"
    (tp1 / "ckpt").mkdir(parents=True)
    shutil.copytree(tp2 / "ckpt" / "iter_0000003", tp1 / "ckpt" / "iter_0000003")
    (tp1 / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3\n")
    run_train([CONFIG, *tiny_overrides(dataset, tp1, **common, **{"checkpoint.dir": tp1 / "ckpt"})])
    assert sorted(read_metrics(tp1)) == [4, 5, 6]
    assert losses(tp1) == pytest.approx(losses(tp2)[3:], rel=1e-5)

    # The final TP=2 weights give the same validation loss at TP=1.
    evaluated = tmp_path / "eval"
    run_train([CONFIG, *tiny_overrides(dataset, evaluated, **{
        "train.steps": 0, "train.eval_interval": 1, "checkpoint.load": tp2 / "ckpt"})])
    tp2_valid = read_metrics(tp2, "valid")[6]["loss"]
    assert read_metrics(evaluated, "valid")[0]["loss"] == pytest.approx(tp2_valid, rel=1e-5)
