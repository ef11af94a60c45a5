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
        run_dir = root / name
        run_train([CONFIG, *tiny_overrides(prefix, run_dir, **{
            "train.steps": STEPS, "checkpoint.load": init, **extra})], nproc=nproc)
        return losses(run_dir)
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
