"""PNGPTModel: megatron-core's GPTModel with the expert codes E shared by all projected layers.

E (k x m) is a model-level parameter like a tied embedding: every pipeline stage (and virtual
stage) holds a copy, the copies start equal (seeded), their gradients are summed across copies
after the data-parallel reduction (`allreduce_code_grads`), so they stay equal. As with
megatron-core's tied embedding: the copies sit in their own DDP bucket (`shared_embedding`), so
the distributed optimizer shards them identically on every stage; only the first copy counts in
the gradient norm (`shared` on the others) and is the checkpoint's main replica. A learned code
map (mixture training, `LearnedCodeMap`) is held and reduced the same way.

A mixture of clusters w (k weights) has the code w @ E, or f(w) = w @ E + g(w) with the learned
map; cluster i is the one-hot mixture, so with the learned map its code is f(e_i), in routing,
evaluation and projection alike (`codes`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.models.gpt import GPTModel

from megatron_pn.pn.layers import (
    ExpertRouting,
    PNConfig,
    ProjectedWeights,
    seeded_generator,
    select_codes,
)


class LearnedCodeMap(torch.nn.Module):
    """g(w) = gelu(w A + a) B: Soup-of-Experts' small learned map from mixture weights to the
    coefficients of a linear combination (here: a code, added to w @ E). B starts at zero, so a
    model starts with the linear map and its initialization is unchanged."""

    def __init__(self, k: int, m: int, hidden: int, device, dtype):
        super().__init__()
        self.weight_in = torch.nn.Parameter(torch.empty(k, hidden, device=device, dtype=dtype))
        self.bias_in = torch.nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))
        self.weight_out = torch.nn.Parameter(torch.empty(hidden, m, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        k, hidden = self.weight_in.shape
        self.weight_in.copy_(torch.randn(k, hidden, generator=generator) / k ** 0.5)
        self.bias_in.zero_()
        self.weight_out.zero_()

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(weights @ self.weight_in + self.bias_in) @ self.weight_out


class PNGPTModel(GPTModel):
    def __init__(self, *args, pn: PNConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.pn = pn
        config = self.config
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.expert_codes = torch.nn.Parameter(
            torch.empty(pn.num_experts, pn.code_size, device=device, dtype=config.params_dtype)
        )
        self.code_map = None
        if pn.code_map == "learned":
            self.code_map = LearnedCodeMap(pn.num_experts, pn.code_size, pn.code_map_hidden,
                                           device, config.params_dtype)
        self.is_main_code_copy = ps.get_pipeline_model_parallel_rank() == 0 and not self.vp_stage
        for _, param in self.code_parameters():
            param.shared_embedding = True
            if not self.is_main_code_copy:
                param.shared = True
        self.projected_weights: ProjectedWeights | None = None  # see projected_once
        if config.perform_initialization:
            self._init_expert_codes()

    def code_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """E and the learned code map: replicated on every pipeline stage."""
        extra = [] if self.code_map is None else [
            (f"code_map.{name}", p) for name, p in self.code_map.named_parameters()]
        return [("expert_codes", self.expert_codes), *extra]

    def codes(self, experts: tuple) -> torch.Tensor:
        """The codes [u, m] of experts (ascending): cluster ids (rows of E, plus g of their
        one-hot mixture with a learned map), or mixtures (k weights each: w @ E (+ g(w)))."""
        k, codes = self.pn.num_experts, self.expert_codes
        if isinstance(experts[0], int):
            if self.code_map is None:
                return select_codes(codes, experts)
            weights = torch.eye(k, dtype=codes.dtype)[list(experts)].to(codes.device)
            return select_codes(codes, experts) + self.code_map(weights)
        weights = torch.tensor(experts, dtype=codes.dtype).to(codes.device)
        if weights.shape[1] != k:
            raise ValueError(f"mixture of {weights.shape[1]} cluster weights for "
                             f"model.num_experts = {k}")
        mixed = weights @ codes
        return mixed if self.code_map is None else mixed + self.code_map(weights)

    @torch.no_grad()
    def _init_expert_codes(self) -> None:
        """E, and a learned code map if there is one. E has unit-norm rows (see pn/layers.py:
        projected experts then have the dense init std).

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
        if self.code_map is not None:
            self.code_map.reset_parameters(seeded_generator(self.pn.seed, "code_map"))

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                *args, cluster_ids=None, mixture=None, loss_mask=None, **kwargs):
        """As GPTModel.forward, plus `cluster_ids` [b]: the expert of each sequence, in any
        order, on the host (a list or CPU tensor: no device round-trip); or, in mixture
        training, `mixture`: k cluster weights (host) whose code computes every sequence.

        The model computes in grouped row order (each expert's rows contiguous, see
        ExpertRouting) and returns the loss [b, s] or logits [b, s, v] in the caller's order.
        Every pipeline stage groups the same way, so the hidden states passed between stages
        stay grouped; only the last stage restores the order.
        """
        if (cluster_ids is None) == (mixture is None):
            raise ValueError("a projected network computes each sequence with its cluster's "
                             "expert: pass cluster_ids (or, mixture training, mixture)")
        if mixture is not None:
            rows = len(input_ids) if input_ids is not None else decoder_input.shape[1]
            routing = ExpertRouting.from_mixture(mixture, rows, self.codes)
        else:
            routing = ExpertRouting.from_cluster_ids(
                cluster_ids, self.codes, self.pn.num_experts, self.expert_codes.device)
        if self.projected_weights is not None:  # the step's (or evaluation's) weights
            routing = self.projected_weights.route(routing)
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
        if not self.is_main_code_copy:  # replicas of the first stage's copies
            for name, _ in self.code_parameters():
                tensor = state[f"{prefix}{name}"]
                tensor.replica_id = (1, *tensor.replica_id[1:])
        return state


def _unwrap(chunk) -> PNGPTModel:
    return getattr(chunk, "module", chunk)  # under megatron-core's DDP or DeepSpeed's engine


@contextlib.contextmanager
def projected_once(model_chunks, micro_batches: int | None = None, experts=()):
    """Around one optimizer step's `micro_batches` (the last one's backward contracts the
    step's dL/dW into T, M and E) or one evaluation (None: no backward): every expert's weights
    projected once for all of them (ProjectedWeights); `experts`, the step's when known, all at
    once. Models other than PNs are left as they are."""
    models = [m for m in map(_unwrap, model_chunks) if isinstance(m, PNGPTModel)]
    for model in models:
        model.projected_weights = ProjectedWeights(model.codes, micro_batches, experts)
    try:
        yield
    finally:
        for model in models:
            model.projected_weights = None


def allreduce_code_grads(model_chunks) -> None:
    """Sum the gradients of this rank's copies of E (and of a learned code map), then across
    pipeline stages."""
    if len(model_chunks) == 1 and ps.get_pipeline_model_parallel_world_size() == 1:
        return
    copies = zip(*(_unwrap(chunk).code_parameters() for chunk in model_chunks))
    for params in copies:  # one parameter, one copy per chunk
        total = torch.stack([p.main_grad for _, p in params]).sum(dim=0)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        for _, p in params:
            p.main_grad.copy_(total)


def finalize_pn_model_grads(model_chunks, num_tokens=None, **kwargs) -> None:
    """megatron-core's gradient finalization (DP reduction, tied embeddings, token scaling),
    then the expert codes' cross-stage reduction."""
    finalize_model_grads(model_chunks, num_tokens, **kwargs)
    allreduce_code_grads(model_chunks)
