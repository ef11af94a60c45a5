"""The PN transformer layer as a megatron-core layer spec.

Only the spec changes: megatron-core's local GPT layer with (1) the MLP's two linears replaced by
projected ones and (2) the per-micro-batch `ExpertRouting` carried to the MLP as an argument.
The routing travels as the block's `context` (which TransformerBlock hands to every layer and
which cross-attention, an identity in a GPT layer, ignores); PNTransformerLayer passes it to the
MLP through `padding_mask`, the one keyword TransformerLayer._forward_mlp forwards. Arguments
(not module state) keep 1F1B pipelining and MLP recomputation correct.
"""

from __future__ import annotations

import contextlib
import logging

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.mlp import MLP, MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_pn.pn.layers import PNColumnParallelLinear, PNConfig, PNRowParallelLinear


# TransformerLayer passes its TP group only to an MLP that is exactly `MLP` and logs a warning for
# any other class; PNMLP then takes megatron-core's default TP group, the one the layer uses.
logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
    lambda record: "Unknown MLP type" not in record.getMessage()
)


class PNTransformerLayer(TransformerLayer):
    def forward(self, *args, **kwargs):
        routing = kwargs.pop("context", None)
        kwargs.pop("dynamic_inference_decode_only", None)
        hidden_states, _ = self._forward_attention(*args, **kwargs)
        output = self._forward_mlp(
            hidden_states, kwargs.get("inference_context"), padding_mask=routing
        )
        return output, routing


class PNMLP(MLP):
    """megatron-core's MLP (activation, gating, TP layout unchanged) over projected linears."""

    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, **kwargs)
        self.linear_fc1.gated = config.gated_linear_unit

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer with the global layer number: seeds the banks."""
        self.layer_number = layer_number
        self.linear_fc1.reset_parameters("layer", layer_number, "fc1")
        self.linear_fc2.reset_parameters("layer", layer_number, "fc2")

    def forward(self, hidden_states, padding_mask=None, **kwargs):
        routing = padding_mask  # see the module docstring
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.linear_fc1.routed(routing))
            stack.enter_context(self.linear_fc2.routed(routing))
            return super().forward(hidden_states, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        bank_key = f"{prefix}linear_fc1.bank"
        if self.config.gated_linear_unit and isinstance(state.get(bank_key), ShardedTensor):
            # [gate; up] halves are split over TP separately, as for the dense fc1 weight.
            state[bank_key] = apply_swiglu_sharded_factory(state[bank_key], sharded_offsets)
        return state


def pn_layer_spec(normalization: str, pn: PNConfig) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.module = PNTransformerLayer
    spec.submodules.mlp = ModuleSpec(
        module=PNMLP,
        submodules=MLPSubmodules(
            linear_fc1=ModuleSpec(module=PNColumnParallelLinear, params={"pn": pn}),
            linear_fc2=ModuleSpec(module=PNRowParallelLinear, params={"pn": pn}),
        ),
    )
    return spec
