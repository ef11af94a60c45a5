"""MFU inputs: model FLOPs per token as Megatron-LM counts them, and the exact device peak."""

from __future__ import annotations

import pytest

from megatron_pn.config import load_config
from megatron_pn.metrics import peak_tflops_of
from megatron_pn.model import flops_per_token, padded_vocab_size


@pytest.mark.parametrize("config,overrides", [
    ("configs/paper/slm.yaml", []),
    ("configs/paper/llm.yaml", []),
    ("configs/tiny/slm.yaml", ["model.num_query_groups=2", "model.activation=gelu"]),
])
def test_flops_per_token_is_megatron_lms_causal_count(config, overrides):
    m = load_config([config], overrides).model
    h, s, layers, heads = m.hidden_size, m.seq_length, m.num_layers, m.num_attention_heads
    groups = m.num_query_groups or heads
    gated = 3 / 2 if m.activation == "swiglu" else 1
    # Megatron-LM training.py, per token: 12 L h^2 ((1 + g/n + s/(2h)) + f/h x gated) + 6 h V
    expected = 12 * layers * h * h * ((1 + groups / heads + s / h / 2)
                                      + m.ffn_hidden_size / h * gated)
    expected += 6 * h * padded_vocab_size(m)
    assert flops_per_token(load_config([config], overrides)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_device_peak_is_the_exact_models(name, peak):
    assert peak_tflops_of(name) == peak
