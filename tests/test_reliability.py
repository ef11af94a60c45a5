"""pn-train's pre-flight and checkpoint reliability: one line and exit code 2 for bad input
before any step is trained; a locked checkpoint.dir; a failed save that cleans up after itself
(exit 1); a damaged latest iteration passed over for the newest intact one. In-process."""

from __future__ import annotations

import errno
import re
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from helpers import (read_metrics, real_text_documents, start_train, tiny_overrides,
                     tiny_pn_overrides, write_byte_dataset, write_cluster_datasets,
                     write_run_checkpoints)
from megatron_pn import checkpoint
from megatron_pn.cli.train import main

CONFIG = "configs/tiny/slm.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_byte_dataset(tmp_path_factory.mktemp("rel_data") / "text", real_text_documents())


def run(args, capsys) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of pn-train in this process."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out


def error_of(args, capsys, code: int = 2) -> str:
    got, err, _ = run(args, capsys)
    assert got == code, err
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("pn-train: error: ")
    return err[0]


# -- pre-flight: every numeric key in range, output paths, validation data, data length --------


@pytest.mark.parametrize("override,message", [
    ("train.lr=-1", "train.lr: must be >= 0, got -1"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1, got 0"),
    ("model.seq_length=2000000", "model.seq_length: must be in [1, 1048576], got 2000000"),
    ("model.hidden_dropout=1.0", "model.hidden_dropout: must be in [0, 1), got 1"),
    ("train.adam_beta2=1.5", "train.adam_beta2: must be in [0, 1), got 1.5"),
    ("train.log_interval=0", "train.log_interval: must be >= 1, got 0"),
    ("train.min_lr=0.1", "train.min_lr: must be <= train.lr 0.003, got 0.1"),
    ("model.seq_length=1048576 model.vocab_size=32000", "GiB for one micro-batch"),
    ("train.valid_tokens=0", "train.valid_tokens: must be >= 1, got 0"),
    ("train.selection_margin=-0.1",
     "train.selection_margin: must be auto or a number of nats >= 0, got -0.1"),
    ("train.selection_margin=noise",
     "train.selection_margin: must be auto or a number of nats >= 0, got noise"),
    ("train.eval_steps=4", "train.eval_steps: no longer a key: validation scores fixed windows"),
])
def test_out_of_range_values(dataset, tmp_path, capsys, override, message):
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run"), *override.split(),
                    f"checkpoint.dir={tmp_path / 'ckpt'}"], capsys)
    assert message in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("key", ["checkpoint.dir", "logging.run_dir"])
def test_output_path_that_is_a_file(dataset, tmp_path, capsys, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    paths = {"logging.run_dir": tmp_path / "run", "checkpoint.dir": tmp_path / "ckpt", key: blocker}
    err = error_of([CONFIG, *tiny_overrides(dataset, paths["logging.run_dir"]),
                    f"checkpoint.dir={paths['checkpoint.dir']}"], capsys)
    assert f"{key} {blocker} is not writable: it is a file, not a directory ({key})" in err
    assert blocker.read_text() == "keep me"
    assert not read_metrics(paths["logging.run_dir"])  # nothing trained or saved
    assert checkpoint.latest_step(paths["checkpoint.dir"]) is None


@pytest.mark.parametrize("overrides,keys", [
    ("train.eval_interval=5 data.split=100,0,0", "train.eval_interval need validation data"),
    ("train.eval_interval=5 train.early_stopping_patience=2 checkpoint.keep_best=true "
     "data.split=100,0,0",
     "train.early_stopping_patience and checkpoint.keep_best and train.eval_interval need "
     "validation data"),
    ("train.early_stopping_patience=2", "train.early_stopping_patience compare validation losses, "
                                        "but train.eval_interval is 0"),
    ("checkpoint.keep_best=true", "checkpoint.keep_best compare validation losses"),
])
def test_validation_requested_without_validation_data(dataset, tmp_path, capsys, overrides,
                                                      keys):
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run"), *overrides.split()],
                   capsys)
    assert keys in err
    assert not (tmp_path / "run").exists()


def test_dataset_shorter_than_one_sequence(tmp_path, capsys):
    short = write_byte_dataset(tmp_path / "data" / "short", ["a few bytes", "and a few more"])
    err = error_of([CONFIG, *tiny_overrides(short, tmp_path / "run")], capsys)
    assert f"dataset prefix {short}: its training documents hold" in err
    assert "fewer than one sequence of model.seq_length 64" in err and f"({short}.bin)" in err
    assert not (tmp_path / "run").exists()


def test_expert_without_training_data_is_a_loud_warning(tmp_path):
    from megatron_pn.config import load_config
    from megatron_pn.checks import check_config

    blend = write_cluster_datasets(tmp_path / "clusters", num_clusters=4)
    cfg = load_config(["configs/tiny/pn.yaml"], tiny_pn_overrides(blend, tmp_path / "run", **{
        "model.num_experts": 6}))
    [warning] = check_config(cfg, 1, "cpu")
    assert "experts 4, 5 of model.num_experts 6 get no training data" in warning
    assert "trained on nothing" in warning
    cfg.model.num_experts = 4
    assert check_config(cfg, 1, "cpu") == []


def test_pn_train_prints_the_expert_warning_once(tmp_path, capsys):
    blend = write_cluster_datasets(tmp_path / "clusters", num_clusters=3)
    code, err, _ = run(["configs/tiny/pn.yaml", *tiny_pn_overrides(blend, tmp_path / "run", **{
        "model.num_experts": 4, "train.steps": 0})], capsys)
    assert code == 0
    assert err == ["pn-train: warning: expert 3 of model.num_experts 4 gets no training data "
                   "from the blend (data.blend_file / data.cluster_ids): trained on nothing, "
                   "keeping their initial parameters — lower model.num_experts or add the "
                   "clusters' data unless that is what you mean"]


# -- checkpoint.dir: one run at a time ---------------------------------------------------------


def test_second_run_on_a_locked_checkpoint_dir_is_refused(dataset, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    holder = checkpoint.DirLock(ckpt)  # another run (flock: another open file, same process)
    assert holder.acquire() is None
    args = [CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "train.steps": 0, "checkpoint.dir": ckpt})]
    err = error_of(args, capsys)
    assert f"checkpoint.dir {ckpt} is in use by another run" in err
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in err
    assert not (tmp_path / "run").exists() and checkpoint.latest_step(ckpt) is None
    holder.release()

    code, _, _ = run(args, capsys)  # free again: it runs, and releases the lock at its end
    assert code == 0 and checkpoint.latest_step(ckpt) == 0  # (0 steps: its initial checkpoint)
    assert checkpoint.DirLock(ckpt).acquire() is None


@pytest.mark.slow
def test_a_running_job_keeps_its_checkpoint_dir(dataset, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    first = start_train([CONFIG, *tiny_overrides(dataset, tmp_path / "first", **{
        "train.steps": 100000, "checkpoint.dir": ckpt})])
    try:
        deadline = time.time() + 300
        while not ((ckpt / checkpoint.LOCK).is_file()
                   and (ckpt / checkpoint.LOCK).read_text().startswith("pid")):
            assert first.poll() is None and time.time() < deadline, "the first run never locked"
            time.sleep(0.1)
        err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "second", **{
            "checkpoint.dir": ckpt})], capsys)
        assert f"in use by another run (pid {first.pid} on host {socket.gethostname()}" in err
        assert not (tmp_path / "second").exists()
    finally:
        first.send_signal(signal.SIGTERM)  # saves and exits
        assert first.wait(timeout=300) == 0
    assert checkpoint.DirLock(ckpt).acquire() is None  # its exit released the lock


# -- a failed save -----------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_during_save(dataset, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    real_save, calls = checkpoint.dist_checkpointing.save, []

    def save_then_fill_the_disk(state, path, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            return real_save(state, path, **kwargs)
        (Path(path) / "__0_0.distcp").write_bytes(b"\0" * 100)  # half written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", save_then_fill_the_disk)
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "train.steps": 4, "checkpoint.save_interval": 1, "checkpoint.dir": ckpt})], capsys,
        code=1)
    assert re.search(r"saving checkpoint step 2 failed on \S+ \(rank 0\): disk full \(ENOSPC\)", err)
    assert "free space on that disk" in err and "resumes from step 1" in err
    assert checkpoint.latest_step(ckpt) == 1  # untouched
    assert {p.name for p in ckpt.iterdir()} == {checkpoint.LOCK, checkpoint.LATEST,
                                                "iter_0000001"}  # no .tmp_iter_*
    assert max(read_metrics(tmp_path / "run")) == 2  # stopped at the failed save
    assert checkpoint.DirLock(ckpt).acquire() is None  # released


# -- a damaged latest iteration ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_saves(dataset, tmp_path_factory):
    """checkpoint.dir of a tiny run with iterations 1 and 2 (latest: 2), saved without training:
    for the cases refused before any state is loaded."""
    root = tmp_path_factory.mktemp("two_saves")
    return write_run_checkpoints([CONFIG], tiny_overrides(dataset, root / "run", **{
        "checkpoint.dir": root / "ckpt"}), steps=(1, 2))


@pytest.fixture(scope="module")
def two_trained_saves(dataset, tmp_path_factory):
    """The same after 2 trained steps: resumable (its optimizer holds state)."""
    root = tmp_path_factory.mktemp("two_trained_saves")
    assert main([CONFIG, *tiny_overrides(dataset, root / "run", **{
        "train.steps": 2, "checkpoint.save_interval": 1, "checkpoint.dir": root / "ckpt"})]) == 0
    return root / "ckpt"


def _truncate_a_shard(it: Path) -> str:
    shard = max(it.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return f"shard {shard.name} is truncated"


def _remove_a_shard(it: Path) -> str:
    shard = sorted(it.glob("*.distcp"))[0]
    shard.unlink()
    return f"shard {shard.name} is missing"


def _remove_metadata(it: Path) -> str:
    (it / ".metadata").unlink()
    return ".metadata is missing"


def _garble_common_state(it: Path) -> str:
    (it / "common.pt").write_bytes(b"not a torch file")
    return "its common state (common.pt) is unreadable"


def _remove_the_iteration(it: Path) -> str:
    shutil.rmtree(it)
    return "its directory is missing"


DAMAGES = [_truncate_a_shard, _remove_a_shard, _remove_metadata, _garble_common_state,
           _remove_the_iteration]


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_damaged_latest_falls_back_to_the_newest_intact(two_trained_saves, dataset, tmp_path,
                                                        capsys, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_trained_saves, ckpt)
    reason = damage(ckpt / "iter_0000002")
    step, notes = checkpoint.newest_intact(ckpt)
    assert step == 1 and len(notes) == 1 and notes[0].startswith(f"iter_0000002: {reason}")
    code, err, out = run([CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "train.steps": 1, "checkpoint.dir": ckpt})], capsys)
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("pn-train: warning: damaged checkpoint in")
    assert f"iter_0000002: {reason}" in err[0]
    assert "resuming from iter_0000001, the newest intact iteration" in err[0]
    assert f"resumed from {ckpt / 'iter_0000001'} at step 1" in out


def test_damaged_latest_with_on_damaged_stop(two_saves, dataset, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_saves, ckpt)
    reason = _truncate_a_shard(ckpt / "iter_0000002")
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "train.steps": 3, "checkpoint.dir": ckpt, "checkpoint.on_damaged": "stop"})], capsys)
    assert f"iter_0000002: {reason}" in err
    assert "delete it to resume from iter_0000001" in err
    assert not read_metrics(tmp_path / "run")  # nothing trained
    assert checkpoint.latest_step(ckpt) == 2


def test_no_intact_iteration_left(two_saves, dataset, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_saves, ckpt)
    for it in ("iter_0000001", "iter_0000002"):
        _remove_metadata(ckpt / it)
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "train.steps": 3, "checkpoint.dir": ckpt})], capsys)
    assert "no intact iteration is left" in err and "iter_0000001: .metadata is missing" in err


def test_damaged_deepspeed_iteration(tmp_path):
    import torch

    it = tmp_path / "iter_0000004"
    it.mkdir()
    assert "neither metadata.json nor DeepSpeed model states" in checkpoint.damage(it)
    states = it / "mp_rank_00_model_states.pt"
    torch.save({"iteration": 4, "weights": torch.zeros(1000)}, states)
    assert checkpoint.damage(it) is None
    with open(states, "r+b") as f:
        f.truncate(states.stat().st_size // 2)
    assert checkpoint.damage(it) == "mp_rank_00_model_states.pt is truncated or unreadable"


def test_why_a_save_failed_on_another_rank():
    """torch's distributed checkpointing gathers every rank's exception into one."""
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert checkpoint.why_failed(CheckpointException("save", {1: (full, None)})) == \
        "disk full (ENOSPC)"
    denied = PermissionError(errno.EACCES, "Permission denied", "/ckpt/x.distcp")
    assert checkpoint.why_failed(RuntimeError("wrapped")) == "RuntimeError: wrapped"
    try:
        try:
            raise denied
        except OSError as err:
            raise RuntimeError("write failed") from err
    except RuntimeError as err:
        assert checkpoint.why_failed(err) == "Permission denied (EACCES) (/ckpt/x.distcp)"


def test_damaged_checkpoint_load_is_one_line(two_saves, dataset, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_saves, ckpt)
    reason = _remove_a_shard(ckpt / "iter_0000002")
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "checkpoint.load": ckpt})], capsys)
    assert f"cannot initialize the model from {ckpt / 'iter_0000002'}: {reason}" in err
    assert "(checkpoint.load)" in err and not read_metrics(tmp_path / "run")


def test_resuming_another_model_says_what_differs(two_saves, dataset, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_saves, ckpt)
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "train.steps": 3, "checkpoint.dir": ckpt, "model.hidden_size": 128})], capsys)
    assert f"cannot resume from {ckpt / 'iter_0000002'}: another model (model.hidden_size 64 " \
           "in the checkpoint, 128 here)" in err
    assert not read_metrics(tmp_path / "run") and checkpoint.latest_step(ckpt) == 2


@pytest.mark.slow
def test_disk_full_during_a_deepspeed_save(dataset, tmp_path, capsys, monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine

    ckpt, real_save, calls = tmp_path / "ckpt", DeepSpeedEngine.save_checkpoint, []

    def save_then_fill_the_disk(self, save_dir, tag=None, **kwargs):
        calls.append(tag)
        if len(calls) == 1:
            return real_save(self, save_dir, tag=tag, **kwargs)
        (Path(save_dir) / tag).mkdir()
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", save_then_fill_the_disk)
    err = error_of([CONFIG, *tiny_overrides(dataset, tmp_path / "run", **{
        "engine": "deepspeed", "train.steps": 4, "checkpoint.save_interval": 1,
        "checkpoint.dir": ckpt})], capsys, code=1)
    assert re.search(r"saving checkpoint step 2 failed on \S+ \(rank 0\): disk full \(ENOSPC\)", err)
    assert checkpoint.latest_step(ckpt) == 1 and not (ckpt / "iter_0000002").exists()


@pytest.mark.slow
def test_a_finetuning_stopped_after_its_step0_candidate_reruns_to_the_same_losses(dataset,
                                                                                 tmp_path):
    """The step-0 candidate is saved before any optimizer step: a run stopped right after it
    starts again from those weights (no optimizer state to resume; it failed on the missing
    Adam moments before), and trains exactly as an uninterrupted run."""
    from helpers import losses, run_train, write_model_checkpoint

    base = tmp_path / "base"
    write_model_checkpoint(base / "ckpt", ["configs/tiny/slm.yaml"],
                           tiny_overrides(dataset, base))

    def finetune(name, **extra):
        run = tmp_path / name
        return run, run_train(["configs/tiny/slm.yaml", *tiny_overrides(dataset, run, **{
            "train.steps": 6, "checkpoint.load": base / "ckpt", "checkpoint.dir": run / "ckpt",
            "checkpoint.keep_best": "true", "train.eval_interval": 2, "data.split": "90,10,0",
            **extra})])

    whole, _ = finetune("whole")
    stopped, _ = finetune("stopped", **{"train.exit_after_steps": 0})
    assert [p.name for p in (stopped / "ckpt").glob("iter_*")] == ["iter_0000000"]
    _, rerun = finetune("stopped")
    assert "starting from them at step 0" in rerun.stdout
    assert losses(stopped) == losses(whole) and len(losses(whole)) == 6
