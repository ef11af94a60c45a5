"""The DeepSpeed engine: ZeRO-1/2/3 reproduce the megatron engine's loss curve (DP=2, gloo),
TP=2 under ZeRO-2, bit-exact resume, PN under ZeRO-1/2/3 (each expert projected once per step,
the banks partitioned under ZeRO-3), bad input."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import (losses, read_metrics, real_text_documents, run_train, tiny_overrides,
                     tiny_pn_overrides, write_byte_dataset, write_cluster_datasets)
from megatron_pn.cli.train import main
from megatron_pn.config import load_config

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


@pytest.fixture(scope="module")
def pn(tmp_path_factory):
    """A tiny PN's initial checkpoint, its megatron-engine curve, and a runner for the rest."""
    root = tmp_path_factory.mktemp("ds_pn")
    blend = write_cluster_datasets(root / "data")
    init = root / "init"
    common = {"data.split": "80,20,0"}
    run_train(["configs/tiny/pn.yaml", *tiny_pn_overrides(blend, root / "init_run", **common,
               **{"train.steps": 0, "checkpoint.dir": init})])

    def run(run_dir, nproc, **extra):
        return run_train(["configs/tiny/pn.yaml", *tiny_pn_overrides(blend, run_dir, **common, **{
            "train.steps": STEPS, "checkpoint.load": init, **extra})], nproc=nproc)
    run(root / "megatron", 1)
    return run, losses(root / "megatron")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_pn_under_deepspeed_matches_megatron_engine(pn, tmp_path, stage):
    """The PN's curve under ZeRO-1/2/3 (DP=2; projected once per step under ZeRO-1/2, per
    micro-batch under ZeRO-3, as the run's start-up line says) is the megatron engine's; ZeRO-3
    still partitions the banks."""
    run, reference = pn
    proc = run(tmp_path, 2, engine="deepspeed", **{"deepspeed.zero_stage": stage})
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-4)
    per = "micro-batch" if stage == 3 else "optimizer step"  # the start-up line says which
    assert (f"pn: experts projected once per {per}; per-expert GEMMs in a loop "
            "(train.pn_grouped_gemm=auto, cpu, float32)") in proc.stdout
    if stage == 3:  # the parameters (the banks hold most of them) across the 2 DP ranks
        held, total = (int(x.replace(",", "")) for x in re.search(
            r"rank 0 holds ([\d,]+) of ([\d,]+) parameter elements", proc.stdout).groups())
        assert abs(held - total / 2) < 0.01 * total


@pytest.mark.slow
def test_pn_deepspeed_resume_is_bit_exact(pn, tmp_path):
    """Projected once per step under ZeRO-2: an interrupted and resumed run repeats the
    uninterrupted one's losses exactly."""
    run, _ = pn
    def settings(name):  # (a run resumes from its checkpoint.dir before checkpoint.load)
        return {"engine": "deepspeed", "deepspeed.zero_stage": 2,
                "checkpoint.dir": tmp_path / name / "ckpt"}
    run(tmp_path / "reference", 2, **settings("reference"))
    run(tmp_path / "resumed", 2, **settings("resumed"), **{"train.exit_after_steps": 2})
    assert max(read_metrics(tmp_path / "resumed")) == 2
    run(tmp_path / "resumed", 2, **settings("resumed"))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "reference")


def deepspeed_pn_steps(stage: int, once_per_step: bool, steps: int = 3):
    """`steps` optimizer steps of a tiny PN under DeepSpeed ZeRO-`stage` in this process (3
    micro-batches each, mixed clusters): (the loss of each step, the number of projections).
    Every parameter has moved by the end: each got a gradient."""
    from megatron.core import tensor_parallel

    from megatron_pn.engines import DeepSpeedEngine, lr_scheduler
    from megatron_pn.model import build_model, transformer_config
    from megatron_pn.pn.layers import ProjectedLinear

    cfg = load_config(["configs/tiny/pn.yaml"], [
        "model.vocab_size=257", "model.seq_length=16", "engine=deepspeed",
        f"deepspeed.zero_stage={stage}", "train.micro_batch_size=2", "train.global_batch_size=6",
        f"train.pn_project_once_per_step={str(once_per_step).lower()}"])
    tconfig = transformer_config(cfg, "cpu")
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # the same initial weights every time
    engine = DeepSpeedEngine(cfg, tconfig, build_model(cfg, "cpu", tconfig=tconfig))
    scheduler = lr_scheduler(engine.optimizer, cfg.train)
    projections = []
    project = ProjectedLinear.project

    def counted(self, codes):
        projections.append(len(codes))
        return project(self, codes)

    def forward_step(iterator, model):
        tokens, ids = next(iterator)
        loss = model(tokens, torch.arange(16).expand_as(tokens), None, labels=tokens,
                     cluster_ids=ids)
        return loss, lambda out: (out.sum(), out.numel(), out.sum().item() / out.numel())

    params = dict(engine.engine.module.named_parameters())
    initial = gathered(params, stage)
    g = torch.Generator().manual_seed(1)
    curve = []
    ProjectedLinear.project = counted
    try:
        for _ in range(steps):
            batches = [(torch.randint(0, 257, (2, 16), generator=g), ids)
                       for ids in ([0, 2], [2, 3], [1, 0])]
            reports, _ = engine.train_step(forward_step, batches, scheduler, experts={0, 1, 2, 3})
            curve.append(sum(reports) / len(reports))
    finally:
        ProjectedLinear.project = project
    final = gathered(params, stage)
    assert all(not torch.equal(final[n], initial[n]) for n in params), "a parameter did not move"
    return curve, len(projections)


def gathered(params: dict, stage: int) -> dict:
    """Copies of the parameters (ZeRO-3: gathered from their partitions)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("stage,per_step", [(1, 1), (2, 1), (3, 3)])
def test_deepspeed_projects_pn_experts_once_per_step(world, stage, per_step):
    """Under DeepSpeed ZeRO-1/2 as under the megatron engine: each expert projected once per
    optimizer step, not per micro-batch, its dL/dW summed over the micro-batches and contracted
    into the banks, codes and projections in the last one's backward, before ZeRO reduces the
    gradients: the losses of projecting in every micro-batch. ZeRO-3 adds the previous step's
    gradient to one that first comes in a later micro-batch (engines.py): there every
    micro-batch projects its experts, whatever train.pn_project_once_per_step says."""
    once, once_projections = deepspeed_pn_steps(stage, once_per_step=True)
    every, every_projections = deepspeed_pn_steps(stage, once_per_step=False)
    linears = 2 * 4  # (fc1, fc2) x layers
    assert once_projections == 3 * per_step * linears  # 3 steps of 3 micro-batches
    assert every_projections == 3 * 3 * linears
    assert every[-1] < every[0]
    assert once == pytest.approx(every, rel=1e-5)


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
