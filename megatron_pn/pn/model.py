"""PNGPTModel: megatron-core's GPTModel with the expert codes E shared by all projected layers.

E (k x m) is a model-level parameter like a tied embedding: every pipeline stage (and virtual
stage) holds a copy, the copies start equal (seeded), their gradients are summed across copies
after the data-parallel reduction (`allreduce_expert_code_grads`), so they stay equal. As with
megatron-core's tied embedding: the copies sit in their own DDP bucket (`shared_embedding`), so
the distributed optimizer shards them identically on every stage; only the first copy counts in
the gradient norm (`shared` on the others) and is the checkpoint's main replica.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.models.gpt import GPTModel

from megatron_pn.pn.layers import ExpertRouting, PNConfig, ProjectedWeights, seeded_generator


class PNGPTModel(GPTModel):
    def __init__(self, *args, pn: PNConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.pn = pn
        config = self.config
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.expert_codes = torch.nn.Parameter(
            torch.empty(pn.num_experts, pn.code_size, device=device, dtype=config.params_dtype)
        )
        self.expert_codes.shared_embedding = True
        self.is_main_code_copy = ps.get_pipeline_model_parallel_rank() == 0 and not self.vp_stage
        if not self.is_main_code_copy:
            self.expert_codes.shared = True
        self.projected_weights: ProjectedWeights | None = None  # see projected_once
        if config.perform_initialization:
            self._init_expert_codes()

    @torch.no_grad()
    def _init_expert_codes(self) -> None:
        """Unit-norm rows (see pn/layers.py: projected experts then have the dense init std).

        random: independent codes, so the experts' mixing vectors alpha = E[i] M are unrelated
        (for h = 3, m = 2 they lie on one circle, some nearly opposite: W[j] ~ -W[i]).
        shared: E[i] = c + spread * d[i] (then normalized) for one random unit code c and
        random directions d[i]: every expert starts near the same network and what all
        clusters share is learned once, in the shared direction.
        """
        generator = seeded_generator(self.pn.seed, "expert_codes")
        k, m = self.pn.num_experts, self.pn.code_size
        codes = torch.randn(k, m, generator=generator)
        if self.pn.code_init == "shared":
            shared = torch.randn(1, m, generator=generator)
            directions = codes / codes.norm(dim=1, keepdim=True)
            codes = shared / shared.norm() + self.pn.code_init_spread * directions
        self.expert_codes.copy_(codes / codes.norm(dim=1, keepdim=True))

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                *args, cluster_ids, loss_mask=None, **kwargs):
        """As GPTModel.forward, plus `cluster_ids` [b]: the expert of each sequence, in any
        order, on the host (a list or CPU tensor: no device round-trip).

        The model computes in grouped row order (each expert's rows contiguous, see
        ExpertRouting) and returns the loss [b, s] or logits [b, s, v] in the caller's order.
        Every pipeline stage groups the same way, so the hidden states passed between stages
        stay grouped; only the last stage restores the order.
        """
        routing = ExpertRouting.from_cluster_ids(cluster_ids, self.expert_codes,
                                                 self.projected_weights)
        if decoder_input is not None:  # [s, b, d]
            decoder_input = routing.group(decoder_input.transpose(0, 1)).transpose(0, 1)
        group = routing.group
        output = super().forward(
            group(input_ids), group(position_ids), group(attention_mask), decoder_input,
            group(labels), *args, loss_mask=group(loss_mask),
            extra_block_kwargs={"context": routing}, **kwargs)
        return routing.ungroup(output) if self.post_process else output

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        codes = state[f"{prefix}expert_codes"]
        if not self.is_main_code_copy:  # a replica of the first stage's copy
            codes.replica_id = (1, *codes.replica_id[1:])
        return state


def _unwrap(chunk) -> PNGPTModel:
    return getattr(chunk, "module", chunk)  # under megatron-core's DDP


@contextlib.contextmanager
def projected_once(model_chunks, backprop: bool = True, experts=()):
    """Around one optimizer step's micro-batches (finalize_pn_model_grads then backpropagates
    the projections) or one evaluation (backprop False): every expert's weights projected once
    for all of them (ProjectedWeights); `experts`, the step's when known, all at once. Models
    other than PNs are left as they are."""
    models = [m for m in map(_unwrap, model_chunks) if isinstance(m, PNGPTModel)]
    for model in models:
        model.projected_weights = ProjectedWeights(model.expert_codes, backprop, experts)
    try:
        yield
    finally:
        for model in models:
            model.projected_weights = None


def allreduce_expert_code_grads(model_chunks) -> None:
    """Sum the gradients of this rank's copies of E, then across pipeline stages."""
    codes = [_unwrap(chunk).expert_codes for chunk in model_chunks]
    if len(codes) == 1 and ps.get_pipeline_model_parallel_world_size() == 1:
        return
    total = torch.stack([p.main_grad for p in codes]).sum(dim=0)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    for p in codes:
        p.main_grad.copy_(total)


def finalize_pn_model_grads(model_chunks, num_tokens=None, **kwargs) -> None:
    """The step's projections backpropagated (when it kept them), megatron-core's gradient
    finalization (DP reduction, tied embeddings, token scaling), then the expert codes'
    cross-stage reduction."""
    for chunk in model_chunks:
        if _unwrap(chunk).projected_weights is not None:
            _unwrap(chunk).projected_weights.backward()
    finalize_model_grads(model_chunks, num_tokens, **kwargs)
    allreduce_expert_code_grads(model_chunks)
