"""The pre-flight check the SLURM scripts run before a long allocation: every way a job would
fail early (config, data, layout, checkpoint directory) fails here, in-process, with one clear
line and a nonzero exit code; a good job passes with its layout in the report."""

from __future__ import annotations

import pytest

from helpers import REPO, tiny_pn_overrides, write_cluster_datasets
from megatron_pn.cli.preflight import main

PN = str(REPO / "configs/tiny/pn.yaml")
SLM = str(REPO / "configs/tiny/slm.yaml")


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    return write_cluster_datasets(tmp_path_factory.mktemp("preflight_data"))


@pytest.fixture
def job(blend, tmp_path):
    """A good 2-process CPU job on the tiny projected network."""
    return [PN, *tiny_pn_overrides(blend, tmp_path / "run", **{
        "data.split": "80,20,0", "checkpoint.dir": tmp_path / "run" / "ckpt"})]


def preflight(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_good_job_passes_and_reports_its_layout(job, capsys):
    code, out = preflight([*job, "--nodes", "1", "--gpus-per-node", "0", "--cpu-procs", "2",
                           "--require-checkpoint-dir"], capsys)
    assert code == 0, out
    assert "world 2 = 1 node(s) x 2 cpu process(es): TP 1 x PP 1 x DP 2" in out
    assert "starts from step 0" in out


def test_gpu_layout_is_checked_without_gpus(job, capsys):
    """On a login node: 2 nodes x 8 GPUs, TP 2 x PP 2 x DP 4."""
    code, out = preflight([*job, "parallel.tensor=2", "parallel.pipeline=2",
                           "train.global_batch_size=64", "--nodes", "2", "--gpus-per-node", "8"],
                          capsys)
    assert code == 0, out
    assert "world 16 = 2 node(s) x 8 cuda process(es): TP 2 x PP 2 x DP 4" in out


def test_missing_config_file(capsys):
    code, out = preflight([str(REPO / "configs/tiny/nope.yaml")], capsys)
    assert code == 2 and "configs/tiny/nope.yaml does not exist" in out


def test_unknown_key(job, capsys):
    code, out = preflight([*job, "train.stepz=3"], capsys)
    assert code == 2 and "unknown key 'stepz'" in out and "steps" in out


def test_missing_data_prefix(tmp_path, capsys):
    code, out = preflight([SLM, f"data.blend=[{tmp_path}/missing]", "--gpus-per-node", "0"],
                          capsys)
    assert code == 2 and f"{tmp_path}/missing.bin not found" in out


def test_missing_blend_file(job, tmp_path, capsys):
    code, out = preflight([*job, f"data.blend_file={tmp_path}/none.json"], capsys)
    assert code == 2 and "data.blend_file: cannot read" in out


def test_world_not_a_multiple_of_tp_x_pp(job, capsys):
    code, out = preflight([*job, "parallel.tensor=2", "--nodes", "3", "--gpus-per-node", "0"],
                          capsys)
    assert code == 2 and "world size 3 is not divisible by parallel.tensor 2" in out


def test_tensor_parallel_across_nodes(job, capsys):
    code, out = preflight([*job, "parallel.tensor=2", "--nodes", "2", "--gpus-per-node", "0",
                           "--cpu-procs", "1"], capsys)
    assert code == 2 and "tensor-parallel groups would span nodes" in out


def test_tensor_parallel_straddling_nodes(job, capsys):
    code, out = preflight([*job, "parallel.tensor=4", "train.global_batch_size=48",
                           "--nodes", "2", "--gpus-per-node", "6"], capsys)
    assert code == 2 and "would straddle node boundaries" in out


def test_checkpoint_dir_required_for_batch_jobs(blend, tmp_path, capsys):
    args = [PN, *tiny_pn_overrides(blend, tmp_path / "run"), "--gpus-per-node", "0"]
    assert preflight(args, capsys)[0] == 0  # optional for an interactive run
    code, out = preflight([*args, "--require-checkpoint-dir"], capsys)
    assert code == 2 and "checkpoint.dir is not set" in out


def test_unwritable_checkpoint_dir(job, tmp_path, capsys):
    blocker = tmp_path / "a_file"  # a file where a directory should be: fails even as root
    blocker.write_text("")
    code, out = preflight([*job, f"checkpoint.dir={blocker}/ckpt", "--gpus-per-node", "0"],
                          capsys)
    assert code == 2 and f"checkpoint.dir {blocker}/ckpt is not writable" in out


def test_corrupt_resume_marker(job, tmp_path, capsys):
    ckpt = tmp_path / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")  # iter_0000007 is missing
    code, out = preflight([*job, "--gpus-per-node", "0"], capsys)
    assert code == 2 and "iter_0000007: its directory is missing; no intact iteration" in out


def test_bf16_needs_a_gpu(job, capsys):
    code, out = preflight([*job, "train.precision=bf16", "--gpus-per-node", "0"], capsys)
    assert code == 2 and "bf16 needs a GPU" in out
