"""The PN transformer block as a megatron-core block spec (one layer spec per layer).

Only the spec changes: megatron-core's local GPT layer with (1) the MLP's two linears (and, as an
option, the attention's) replaced by projected ones, each seeded by its global layer number and
name (spec parameters: the same weights at any TP/PP layout), and (2) the per-micro-batch
`ExpertRouting` carried to them as an argument (PNGPTModel builds it from the caller's cluster ids and groups
the rows by expert itself). The routing travels as the block's `context`, which
TransformerBlock hands to every layer and which cross-attention (an identity in a GPT layer)
ignores. PNTransformerLayer passes it to the MLP through `padding_mask`, the one keyword
TransformerLayer._forward_mlp forwards, so MLP recomputation re-enters PNMLP.forward with the right
routing; projected attention linears get it bound around the attention call. Arguments, not
module state carried between calls, keep 1F1B pipelining correct.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.mlp import MLP, MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (LayerNormImpl,
                                                         TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                         get_transformer_layer_offset)

from megatron_pn.pn.layers import (PNColumnParallelLinear, PNConfig, PNRowParallelLinear,
                                   ProjectedLinear)

# TransformerLayer passes its TP group only to an MLP that is exactly `MLP` and logs a warning for
# any other class; PNMLP gets the same group (megatron's default one) from its spec instead.
logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
    lambda record: "Unknown MLP type" not in record.getMessage()
)


def _routed(linears, routing, batch_first: bool) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for linear in linears:
        stack.enter_context(linear.routed(routing, batch_first))
    return stack


class PNTransformerLayer(TransformerLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.projected_attention = [m for m in self.self_attention.modules()
                                    if isinstance(m, ProjectedLinear)]

    def forward(self, *args, **kwargs):
        routing = kwargs.pop("context", None)
        kwargs.pop("dynamic_inference_decode_only", None)
        with _routed(self.projected_attention, routing, batch_first=False):
            hidden_states, _ = self._forward_attention(*args, **kwargs)
        output = self._forward_mlp(
            hidden_states, kwargs.get("inference_context"), padding_mask=routing
        )
        return output, routing


class PNMLP(MLP):
    """megatron-core's MLP (activation, gating, TP layout unchanged) over projected linears."""

    def forward(self, hidden_states, padding_mask=None, **kwargs):
        """hidden_states [s, b, d], its rows in the routing's grouped order."""
        routing = padding_mask  # see the module docstring
        linears = (self.linear_fc1, self.linear_fc2)
        if len(routing.experts) == 1:  # one GEMM per linear over the whole micro-batch
            with _routed(linears, routing, batch_first=False):
                return super().forward(hidden_states, **kwargs)
        # Several experts: regroup once to [b, s, d], where each expert's rows are one
        # contiguous block, run the whole MLP there (one GEMM per expert and linear), and back.
        with _routed(linears, routing, batch_first=True):
            output, bias = super().forward(hidden_states.transpose(0, 1).contiguous(), **kwargs)
        return output.transpose(0, 1).contiguous(), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        bank_key = f"{prefix}linear_fc1.bank"
        if self.config.gated_linear_unit and isinstance(state.get(bank_key), ShardedTensor):
            # [gate; up] halves are split over TP separately, as for the dense fc1 weight.
            state[bank_key] = apply_swiglu_sharded_factory(state[bank_key], sharded_offsets)
        return state


def pn_layer_spec(normalization: str, pn: PNConfig, layer: int,
                  project_attention: bool = False) -> ModuleSpec:
    """The spec of global layer `layer` (1-based): its projected linears are seeded by it."""

    def projected(module, name: str) -> ModuleSpec:
        return ModuleSpec(module=module, params={"pn": pn, "init_key": ("layer", layer, name)})

    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.module = PNTransformerLayer
    spec.submodules.mlp = ModuleSpec(
        module=PNMLP,
        params={"tp_group": ps.get_tensor_model_parallel_group()},
        submodules=MLPSubmodules(
            linear_fc1=projected(PNColumnParallelLinear, "mlp.linear_fc1"),
            linear_fc2=projected(PNRowParallelLinear, "mlp.linear_fc2"),
        ),
    )
    if project_attention:
        attention = spec.submodules.self_attention.submodules
        attention.linear_qkv = functools.partial(
            PNColumnParallelLinear, pn=pn, init_key=("layer", layer, "self_attention.linear_qkv"))
        attention.linear_proj = projected(PNRowParallelLinear, "self_attention.linear_proj")
    return spec


def pn_block_spec(config, normalization: str, pn: PNConfig, project_attention: bool = False,
                  vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers of this (virtual) pipeline stage, as megatron-core's
    get_gpt_decoder_block_spec slices heterogeneous layers: global layer numbers offset + 1..."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    layers = [pn_layer_spec(normalization, pn, offset + i + 1, project_attention)
              for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=LayerNormImpl)
