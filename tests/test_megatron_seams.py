"""The megatron-core seams projected networks rely on (megatron_pn/pn/spec.py). A megatron-core
upgrade that moves one of them fails here, by name, before any training test."""

from __future__ import annotations

import inspect

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_gpt_model_forwards_extra_block_kwargs_to_the_block():
    assert "extra_block_kwargs" in parameters(GPTModel.forward)
    assert "**(extra_block_kwargs or {})" in inspect.getsource(GPTModel.forward)


def test_block_hands_context_to_every_layer():
    assert "context" in parameters(TransformerBlock.forward)
    assert "context=context" in inspect.getsource(TransformerBlock)


def test_layer_splits_attention_and_mlp_and_mlp_takes_padding_mask():
    source = inspect.getsource(TransformerLayer.forward)
    assert "self._forward_attention(*args, **kwargs)" in source
    assert "self._forward_mlp(" in source
    assert "padding_mask" in parameters(TransformerLayer._forward_mlp)
    assert "self.mlp(pre_mlp_layernorm_output, padding_mask=padding_mask)" in inspect.getsource(
        TransformerLayer._forward_mlp)
    assert "context" in parameters(TransformerLayer._forward_attention)


def test_mlp_and_attention_call_their_linears_with_hidden_states_only():
    assert "self.linear_fc1(hidden_states)" in inspect.getsource(MLP.forward)
    assert "apply_module(self.linear_qkv)(hidden_states)" in inspect.getsource(SelfAttention)
    assert "set_layer_number" not in vars(MLP)  # PNTransformerLayer seeds the banks itself
