"""TP, PP (1F1B and interleaved), DP and the distributed optimizer reproduce the 1-process loss
curve on CPU over gloo. All runs start from one initial checkpoint ("initialize once, then
shard"), fp32, dropout 0."""

from __future__ import annotations

import pytest

from helpers import losses, run_train, tiny_overrides, real_text_documents, write_byte_dataset

STEPS = 6
CONFIG = "configs/tiny/slm.yaml"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    prefix = write_byte_dataset(root / "data" / "text", real_text_documents())
    init = root / "init"
    # Step 0 of a 1-process run: the initial weights every layout loads.
    run_train([CONFIG, *tiny_overrides(prefix, root / "init_run", **{
        "train.steps": 0, "checkpoint.dir": init})])
    def run(name: str, nproc: int, **extra) -> list[float]:
        """The curve of a run (once per name: tests share them); a run whose checkpoint.dir
        holds a stopped run resumes it."""
        run_dir = root / name
        if name not in curves or extra.get("checkpoint.dir"):
            run_train([CONFIG, *tiny_overrides(prefix, run_dir, **{
                "train.steps": STEPS, "checkpoint.load": init, **extra})], nproc=nproc)
            curves[name] = losses(run_dir)
        return curves[name]
    curves = {}
    return run, run("single", 1)


def assert_same_curve(curve, expected, rel=1e-5):
    assert len(curve) == len(expected) == STEPS
    assert curve == pytest.approx(expected, rel=rel), f"{curve} != {expected}"
    assert expected[-1] < expected[0]  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,extra", [
    ("tp2", 2, {"parallel.tensor": 2}),
    ("pp2", 2, {"parallel.pipeline": 2}),
    ("pp2_interleaved", 2, {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2}),
    ("dp2", 2, {}),
    ("dp2_distopt", 2, {"parallel.distributed_optimizer": "true"}),
    ("tp2_pp2_dp2_distopt", 8, {"parallel.tensor": 2, "parallel.pipeline": 2,
                                "parallel.distributed_optimizer": "true"}),
])
def test_layout_reproduces_single_process_curve(reference, name, nproc, extra):
    run, single = reference
    assert_same_curve(run(name, nproc, **extra), single)


@pytest.mark.slow
def test_distributed_optimizer_resume_is_bit_exact(reference, tmp_path):
    """Stopped after step 3 and resumed, DP2 with the distributed optimizer (its Adam states
    sharded across the ranks, on torch's Adam: compat.prepare_optimizer_state) continues
    the uninterrupted run's curve exactly."""
    run, _ = reference
    distopt = {"parallel.distributed_optimizer": "true"}
    stopped = {**distopt, "checkpoint.dir": tmp_path / "ckpt"}
    assert len(run("dp2_distopt_stopped", 2, **stopped, **{"train.exit_after_steps": 3})) == 3
    assert run("dp2_distopt_stopped", 2, **stopped) == run("dp2_distopt", 2, **distopt)
