"""GPU code paths (NCCL, bf16): run where CUDA is present, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from helpers import losses, real_text_documents, run_train, tiny_overrides, write_byte_dataset

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_nccl_training_matches_fp32_closely(tmp_path):
    prefix = write_byte_dataset(tmp_path / "text", real_text_documents())
    curves = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        run_train(["configs/tiny/slm.yaml", *tiny_overrides(prefix, run_dir, **{
            "train.steps": 20, "train.precision": precision})])
        curves[precision] = losses(run_dir)
    assert curves["bf16"][-1] < curves["bf16"][0]
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.05)
