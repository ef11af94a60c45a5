"""SDPA core attention (the default) against megatron-core's local DotProductAttention: the same
logits and gradients in fp32 (causal, GQA, TP 1 and 2), dropout from the model-parallel RNG;
on a GPU also in bf16, no further from fp32 than the local attention is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from backend_check import max_differences
from helpers import REPO, free_port, train_env

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOCAL, SDPA = "model.attention_backend=local", "model.attention_backend=sdpa"
FP32 = "train.precision=fp32"


def test_sdpa_reproduces_local_attention(world):
    differences = max_differences([LOCAL, FP32], [SDPA, FP32], device=DEVICE)
    assert differences["logits"] < 1e-5 and differences["grads"] < 1e-5, differences


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sdpa_reproduces_local_attention_at_tp2():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "tests/backend_check.py", "--tp", "2"]
    proc = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    differences = json.loads(proc.stdout.strip().splitlines()[-1])
    assert differences["logits"] < 1e-5 and differences["grads"] < 1e-5, differences


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs a CUDA GPU")
def test_sdpa_in_bf16_is_as_close_to_fp32_as_local(world):
    reference = [LOCAL, FP32]
    local = max_differences(reference, [LOCAL, "train.precision=bf16"], device=DEVICE)
    sdpa = max_differences(reference, [SDPA, "train.precision=bf16"], device=DEVICE)
    for key in ("logits", "grads"):
        assert sdpa[key] <= 1.5 * local[key] + 1e-3, (sdpa, local)


def test_attention_dropout_draws_from_the_model_parallel_rng(world):
    from megatron.core import tensor_parallel

    from megatron_pn.attention import SDPAttention
    from megatron_pn.config import load_config
    from megatron_pn.model import transformer_config
    from megatron.core.transformer.enums import AttnMaskType

    cfg = load_config([str(REPO / "configs/tiny/slm.yaml")], ["model.attention_dropout=0.5"])
    attention = SDPAttention(transformer_config(cfg, "cpu"), layer_number=1,
                             attn_mask_type=AttnMaskType.causal, attention_type="self")
    query, key, value = torch.randn(3, 32, 2, 4, 16).unbind(0)  # [s, b, heads, dim]

    def forward(seed):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return attention(query, key, value, None)
    assert torch.equal(forward(1), forward(1))
    assert not torch.equal(forward(1), forward(2))
    attention.eval()
    assert torch.equal(forward(1), forward(2))  # no dropout in evaluation


def test_transformer_engine_is_optional():
    from megatron_pn.compat import transformer_engine_available
    from megatron_pn.checks import check_transformer_engine
    from megatron_pn.config import load_config
    from megatron_pn.families.dense import layer_spec
    from pn_base.errors import ConfigError

    auto = load_config([str(REPO / "configs/tiny/slm.yaml")], ["model.transformer_impl=auto"])
    core = layer_spec(auto).submodules.self_attention.submodules.core_attention
    if not transformer_engine_available():  # auto falls back to the local spec with SDPA
        from megatron_pn.attention import SDPAttention

        assert core is SDPAttention
        te = load_config([str(REPO / "configs/tiny/slm.yaml")],
                         ["model.transformer_impl=transformer_engine"])
        with pytest.raises(ConfigError, match="needs a GPU with Transformer Engine"):
            check_transformer_engine(te, DEVICE)
    else:
        assert "TEDotProductAttention" in getattr(core, "__name__", str(core))
