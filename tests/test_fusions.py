"""The fused kernels the GPU path enables (compat.fusion_settings), each against the plain torch
computation it replaces. On CPU they run eagerly (megatron-core's `torch.compile` would only add
compile time there); on a GPU compiled, as in training (compat.torch_compile_usable)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def compiled_on_gpu_only():
    from megatron_pn.compat import torch_compile_usable

    stance = "default" if DEVICE == "cuda" and torch_compile_usable() else "force_eager"
    with torch.compiler.set_stance(stance):
        yield


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()


def value_and_grads(function, *inputs):
    out = function(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    return out, grads


def test_fused_swiglu_matches_silu_times_gate():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    torch.manual_seed(0)
    y = leaf(64, 2, 2 * 96)
    fused, fused_grad = value_and_grads(lambda t: bias_swiglu_impl(t, None, False, False), y)
    plain, plain_grad = value_and_grads(lambda t: F.silu(t.chunk(2, -1)[0]) * t.chunk(2, -1)[1], y)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad[0], plain_grad[0], rtol=1e-5, atol=1e-6)


def test_fused_bias_gelu_matches_gelu_of_sum():
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    torch.manual_seed(0)
    y, bias = leaf(64, 2, 96), leaf(96)
    fused, fused_grads = value_and_grads(bias_gelu_impl, y, bias)
    plain, plain_grads = value_and_grads(lambda a, b: F.gelu(a + b, approximate="tanh"), y, bias)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_bias_dropout_add_matches_plain_sum():
    from megatron.core.fusions.fused_bias_dropout import bias_dropout_add_fused_train

    torch.manual_seed(0)
    x, residual = leaf(64, 2, 96), leaf(64, 2, 96)
    fused, fused_grads = value_and_grads(
        lambda a, r: bias_dropout_add_fused_train((a, None), r, 0.0), x, residual)
    plain, plain_grads = value_and_grads(lambda a, r: a + r, x, residual)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_fused_cross_entropy_matches_vocab_parallel_one_in_bf16(world):
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits = leaf(32, 2, 384, dtype=torch.bfloat16)
    target = torch.randint(0, 384, (32, 2), device=DEVICE)
    group = ps.get_tensor_model_parallel_group()
    fused, fused_grad = value_and_grads(
        lambda t: fused_vocab_parallel_cross_entropy(t, target, group), logits)
    plain, plain_grad = value_and_grads(lambda t: vocab_parallel_cross_entropy(t, target), logits)
    torch.testing.assert_close(fused.float(), plain.float(), rtol=1e-5, atol=1e-5)
    # Both return the gradient in bf16: one rounding apart at most.
    torch.testing.assert_close(fused_grad[0].float(), plain_grad[0].float(), rtol=1e-2, atol=1e-4)


def test_fused_adam_matches_the_foreach_update():
    from types import SimpleNamespace

    from megatron_pn.engines import use_fused_adam

    torch.manual_seed(0)
    start = [torch.randn(48, 32, device=DEVICE), torch.randn(32, device=DEVICE)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
        if fused:  # as megatron-core wraps it
            use_fused_adam(SimpleNamespace(optimizer=optimizer))
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            optimizer.step()
        assert bool(optimizer.param_groups[0]["fused"]) is fused
        results.append(params)
    for foreach, fused in zip(*results):
        assert not torch.equal(foreach, start[0] if foreach.ndim == 2 else start[1])
        torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-7)


def test_fusions_are_on_for_gpu_and_off_for_cpu(monkeypatch):
    from megatron_pn import compat

    monkeypatch.setattr(compat, "torch_compile_usable", lambda: True)
    gpu, cpu = compat.fusion_settings("cuda", True, True), compat.fusion_settings("cpu", False, True)
    assert gpu["bias_activation_fusion"] and gpu["bias_dropout_fusion"]
    assert gpu["cross_entropy_loss_fusion"]
    assert not compat.fusion_settings("cuda", False, True)["cross_entropy_loss_fusion"]  # fp32
    assert not any(v for v in cpu.values() if isinstance(v, bool))
    # Without triton or a C compiler torch.compile cannot build the kernels: the plain ops run.
    monkeypatch.setattr(compat, "torch_compile_usable", lambda: False)
    assert not any(v for k, v in compat.fusion_settings("cuda", True, True).items()
                   if isinstance(v, bool) and not compat.transformer_engine_available())


def test_sync_free_grad_norm_matches_megatron_fallback(world):
    from megatron.core.utils import local_multi_tensor_l2_norm

    from megatron_pn.engines import foreach_l2_norm

    torch.manual_seed(0)
    grads = [torch.randn(64, 48, device=DEVICE), torch.randn(48, device=DEVICE) * 3,
             torch.randn(7, 5, 3, device=DEVICE)]
    expected, _ = local_multi_tensor_l2_norm(0, None, [grads], False)
    total, _ = foreach_l2_norm(0, None, [grads], False)
    assert total.shape == (1,) and total.dtype == torch.float32
    torch.testing.assert_close(total.cpu(), expected.cpu(), rtol=1e-6, atol=0)
