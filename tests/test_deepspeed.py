"""The DeepSpeed engine: ZeRO-1/2/3 reproduce the megatron engine's loss curve (DP=2, gloo),
TP=2 under ZeRO-2, bit-exact resume, PN under ZeRO-3 with its banks partitioned, bad input."""

from __future__ import annotations

import re

import pytest

from helpers import (losses, read_metrics, real_text_documents, run_train, tiny_overrides,
                     tiny_pn_overrides, write_byte_dataset, write_cluster_datasets)
from megatron_pn.cli.train import main

CONFIG = "configs/tiny/slm.yaml"
STEPS = 5


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    prefix = write_byte_dataset(root / "text", real_text_documents())
    init = root / "init"
    run_train([CONFIG, *tiny_overrides(prefix, root / "init_run", **{
        "train.steps": 0, "checkpoint.dir": init})])

    def run(name, nproc, **extra):
        run_dir = root / name
        run_train([CONFIG, *tiny_overrides(prefix, run_dir, **{
            "train.steps": STEPS, "checkpoint.load": init, **extra})], nproc=nproc)
        return losses(run_dir)
    return run, run("megatron", 1), prefix, root


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,extra", [
    ("zero1_dp2", 2, {"deepspeed.zero_stage": 1}),
    ("zero2_dp2", 2, {"deepspeed.zero_stage": 2}),
    ("zero3_dp2", 2, {"deepspeed.zero_stage": 3}),
    ("zero2_tp2", 2, {"deepspeed.zero_stage": 2, "parallel.tensor": 2}),
])
def test_deepspeed_reproduces_megatron_curve(dense, name, nproc, extra):
    run, reference, _, _ = dense
    curve = run(name, nproc, engine="deepspeed", **extra)
    assert len(curve) == STEPS and reference[-1] < reference[0]
    assert curve == pytest.approx(reference, rel=1e-4), f"{curve} != {reference}"


@pytest.mark.slow
def test_deepspeed_resume_is_bit_exact(dense, tmp_path):
    _, _, prefix, _ = dense

    def args(name, **extra):
        run_dir = tmp_path / name
        return run_dir, [CONFIG, *tiny_overrides(prefix, run_dir, **{
            "engine": "deepspeed", "deepspeed.zero_stage": 2, "train.steps": 6,
            "checkpoint.dir": run_dir / "ckpt", **extra})]
    reference, reference_args = args("reference")
    run_train(reference_args, nproc=2)
    resumed, resumed_args = args("resumed")
    run_train(resumed_args + ["train.exit_after_steps=3"], nproc=2)
    assert max(read_metrics(resumed)) == 3
    run_train(resumed_args, nproc=2)
    assert losses(resumed) == losses(reference)


@pytest.mark.slow
def test_pn_under_zero3_matches_megatron_engine(tmp_path):
    blend = write_cluster_datasets(tmp_path / "data")
    init = tmp_path / "init"
    common = {"data.split": "80,20,0"}
    run_train(["configs/tiny/pn.yaml", *tiny_pn_overrides(blend, tmp_path / "init_run", **common,
               **{"train.steps": 0, "checkpoint.dir": init})])
    curves, logs = {}, {}
    for engine, nproc in (("megatron", 1), ("deepspeed", 2)):
        run_dir = tmp_path / engine
        proc = run_train(["configs/tiny/pn.yaml", *tiny_pn_overrides(blend, run_dir, **common, **{
            "train.steps": STEPS, "checkpoint.load": init, "engine": engine,
            "deepspeed.zero_stage": 3})], nproc=nproc)
        curves[engine], logs[engine] = losses(run_dir), proc.stdout
    assert curves["deepspeed"] == pytest.approx(curves["megatron"], rel=1e-4)
    # ZeRO-3 partitions the parameters (the banks hold most of them) across the 2 DP ranks.
    held, total = (int(x.replace(",", "")) for x in re.search(
        r"rank 0 holds ([\d,]+) of ([\d,]+) parameter elements", logs["deepspeed"]).groups())
    assert abs(held - total / 2) < 0.01 * total


@pytest.mark.parametrize("override,message", [
    ("parallel.pipeline=2", "engine deepspeed: parallel.pipeline must be 1"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: 4 is not one of 1, 2, 3"),
    ("deepspeed.offload_optimizer=true", "on a CPU-only machine there is nothing to offload"),
    ("deepspeed.offload_params=true", "deepspeed.offload_params needs deepspeed.zero_stage=3"),
    ("deepspeed.zero_stagee=2", "unknown key 'zero_stagee'"),
    ("parallel.distributed_optimizer=true", "ZeRO shards the optimizer"),
])
def test_deepspeed_bad_input(tmp_path, capsys, override, message):
    prefix = write_byte_dataset(tmp_path / "text", real_text_documents()[:40])
    assert main([CONFIG, *tiny_overrides(prefix, tmp_path / "run"), "engine=deepspeed",
                 override]) == 2
    assert message in capsys.readouterr().err
