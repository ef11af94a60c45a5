"""The megatron-core seams projected networks rely on (megatron_pn/pn/spec.py), checked by what
they do: a tiny PN (model.type pn) runs forward and backward through megatron-core's own
GPTModel, TransformerBlock, TransformerLayer and MLP built from the project's spec, in a world
of one process. A megatron-core upgrade that moves one of them fails here, by name, before any
training test. (The supported megatron-core versions: test_cli.py's version check.)"""

from __future__ import annotations

import logging

import pytest
import torch
from megatron.core import parallel_state as ps

from megatron_pn.config import load_config

IDS = [3, 0, 2, 0]  # the caller's order; experts 0, 2, 3 present, expert 1 absent


def tiny_cfg(**overrides):
    values = {"model.vocab_size": 257, "model.num_experts": 4, "model.bank_size": 3,
              "model.code_size": 2, **overrides}
    return load_config(["configs/tiny/pn.yaml"], [f"{k}={v}" for k, v in values.items()])


def build(cfg, **tconfig_changes):
    from megatron_pn.model import build_gpt, transformer_config

    tconfig = transformer_config(cfg, "cpu")
    for key, value in tconfig_changes.items():
        setattr(tconfig, key, value)
    return build_gpt(cfg, tconfig)


def batch(n=len(IDS), seq=16):
    tokens = torch.randint(0, 257, (n, seq), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(seq).expand(n, seq)


def record_mlp_routing(model) -> list[list]:
    """Per layer, the routing each call of its MLP received (its `padding_mask` keyword)."""
    calls = [[] for _ in model.decoder.layers]
    for layer, seen in zip(model.decoder.layers, calls):
        layer.mlp.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append(kwargs.get("padding_mask")),
            with_kwargs=True)
    return calls


def loss_and_grads(model):
    """One training micro-batch as the trainer runs it: each expert's weights projected once
    for the step (projected_once), backpropagated into T, M and E in its (last) backward."""
    from megatron_pn.pn import projected_once

    tokens, positions = batch()
    model.zero_grad()
    with projected_once([model], micro_batches=1):  # the backward contracts dL/dW into T, M, E
        loss = model(tokens, positions, None, labels=tokens, cluster_ids=IDS).sum()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_routing_reaches_every_mlp_through_context_and_padding_mask(world):
    """GPTModel hands extra_block_kwargs to the block, the block hands `context` to every layer,
    PNTransformerLayer passes it on as the MLP's `padding_mask`: each layer's MLP gets the
    micro-batch's routing (built once by PNGPTModel from the caller's cluster ids), once."""
    from megatron_pn.pn.layers import ExpertRouting

    model = build(tiny_cfg()).eval()
    calls = record_mlp_routing(model)
    tokens, positions = batch()
    with torch.no_grad():
        model(tokens, positions, None, cluster_ids=IDS)
    assert len(calls) == 4 and all(len(seen) == 1 for seen in calls)
    routings = [seen[0] for seen in calls]
    assert all(isinstance(r, ExpertRouting) for r in routings)
    assert all(r is routings[0] for r in routings)  # one routing for the whole block
    assert routings[0].experts == (0, 2, 3) and routings[0].counts == (2, 1, 1)
    assert torch.equal(routings[0].codes, model.expert_codes[[0, 2, 3]])


def test_projected_attention_gets_the_routing_around_the_attention_call(world):
    """model.project_attention: the attention's linears are called with the hidden states only;
    the layer binds the routing around the attention call (and nothing outlives it)."""
    model = build(tiny_cfg(**{"model.project_attention": "true"})).eval()
    seen = []
    for layer in model.decoder.layers:
        for linear in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj):
            linear.register_forward_pre_hook(
                lambda module, args: seen.append(module._routing[0].experts))
    tokens, positions = batch()
    with torch.no_grad():
        model(tokens, positions, None, cluster_ids=IDS)
    assert seen == [(0, 2, 3)] * 8
    assert all(layer.self_attention.linear_qkv._routing is None for layer in model.decoder.layers)


def test_mlp_recomputation_reenters_with_the_right_routing(world):
    """Selective recomputation of the MLP (megatron-core's checkpoint of the layer's MLP call)
    runs PNMLP.forward again in the backward pass with the same routing: the same loss and the
    same gradients as without recomputation, and gradients reach every bank, code_projection
    and the codes of the experts present (none for the absent one). As in training, within
    projected_once: the step's projected weights are leaves (without it, a second recomputed
    layer would backpropagate through routing.codes' graph a second time)."""
    cfg = tiny_cfg()
    plain = build(cfg).train()
    recomputed = build(cfg, recompute_granularity="selective", recompute_modules=["mlp"]).train()
    recomputed.load_state_dict(plain.state_dict())
    assert all(layer.recompute_mlp for layer in recomputed.decoder.layers)
    calls = record_mlp_routing(recomputed)
    loss, grads = loss_and_grads(plain)
    got_loss, got = loss_and_grads(recomputed)
    assert all(len(seen) == 2 for seen in calls)  # forward, then the recomputation
    assert all(seen[1].experts == seen[0].experts == (0, 2, 3) for seen in calls)
    assert all(seen[1].counts == seen[0].counts for seen in calls)
    assert torch.allclose(got_loss, loss, rtol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(got[name], grad, rtol=1e-5, atol=1e-7 * grad.abs().max()), name
    projected = [n for n in got if n.endswith((".bank", ".code_projection"))]
    assert len(projected) == 4 * 2 * 2  # layers x (fc1, fc2) x (bank, code_projection)
    assert all(got[n].abs().sum() > 0 for n in projected)
    codes = got["expert_codes"]
    assert (codes[[0, 2, 3]].norm(dim=1) > 0).all() and codes[1].abs().sum() == 0


def test_the_mlp_linears_get_the_tensor_parallel_group(world, caplog):
    """TransformerLayer gives its TP group only to a plain `MLP` (and warns about any other
    class): the spec gives PNMLP megatron-core's TP group itself, and the warning is silenced."""
    with caplog.at_level(logging.WARNING):
        model = build(tiny_cfg())
    assert "Unknown MLP type" not in caplog.text
    group = ps.get_tensor_model_parallel_group()
    for layer in model.decoder.layers:
        assert layer.mlp.linear_fc1.tp_group is group and layer.mlp.linear_fc2.tp_group is group


class HalfOfTwo:
    """A stand-in tensor-parallel group: rank 1 of 2 (the sharding metadata reads only these)."""

    def size(self):
        return 2

    def rank(self):
        return 1


def test_sharded_state_dict_of_a_bank_declares_its_split(world):
    """dist_checkpointing sees each bank as a slice of the whole bank, split over TP like the
    dense weight it replaces: fc1 along its outputs, [gate; up] halves separately (megatron-
    core's SwiGLU factory), fc2 along its inputs; code_projection and E are replicated."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_pn.families.pn import pn_config
    from megatron_pn.model import transformer_config
    from megatron_pn.pn.layers import PNColumnParallelLinear, PNRowParallelLinear

    cfg = tiny_cfg()
    tconfig = transformer_config(cfg, "cpu")
    d, ffn, h = tconfig.hidden_size, tconfig.ffn_hidden_size, cfg.model.bank_size
    common = {"config": tconfig, "init_method": None, "pn": pn_config(cfg), "tp_group": HalfOfTwo()}
    fc2 = PNRowParallelLinear(ffn, d, init_key=("layer", 1, "mlp.linear_fc2"), **common)
    bank = fc2.sharded_state_dict("fc2.")["fc2.bank"]
    assert isinstance(bank, ShardedTensor)
    assert bank.local_shape == (d, ffn // 2, h) and bank.global_shape == (d, ffn, h)
    assert bank.global_offset == (0, ffn // 2, 0)
    fc1 = PNColumnParallelLinear(d, 2 * ffn, init_key=("layer", 1, "mlp.linear_fc1"), **common)
    bank = fc1.sharded_state_dict("fc1.")["fc1.bank"]
    assert bank.global_shape == (2 * ffn, d, h) and bank.global_offset == (ffn, 0, 0)

    # In the model (TP 1; the block prepends the layer axis): fc1's bank is megatron-core's
    # SwiGLU factory, the gate and up halves two fragments along the outputs.
    layers = cfg.model.num_layers
    state = build(cfg).sharded_state_dict()
    fc1_bank = state["decoder.layers.0.mlp.linear_fc1.bank"]
    assert isinstance(fc1_bank, ShardedTensorFactory)
    gate, up = fc1_bank.build()
    assert gate.local_shape == up.local_shape == (ffn, d, h)
    assert gate.global_shape == (layers, 2 * ffn, d, h) and gate.axis_fragmentations[1] == 2
    assert (gate.global_offset, up.global_offset) == ((0, 0, 0, 0), (0, ffn, 0, 0))
    code_projection = state["decoder.layers.0.mlp.linear_fc1.code_projection"]
    assert code_projection.axis_fragmentations == (layers, 1, 1)  # one per layer, not split
    codes = state["expert_codes"]
    assert codes.global_shape == codes.local_shape == (4, 2) and codes.replica_id == (0, 0, 0)
