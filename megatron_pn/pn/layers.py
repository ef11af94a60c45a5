"""Projected-network linear layers (Grangier et al., "projected networks").

For a projected matrix l (here: one MLP linear of one layer) and expert i,

    W[l,i][a,b] = sum_q sum_r  E[i,q] * M[l][q,r] * T[l][a,b,r]

with E (k x m) one code per expert, shared by all layers (it lives in `PNGPTModel`), M[l] (m x h)
this layer's `code_projection`, and T[l] (out x in x h) its `bank`. Equivalently

    alpha[l,i] = E[i] @ M[l]                      (h mixing weights)
    W[l,i]     = sum_r alpha[l,i][r] * T[l][:,:,r]

A micro-batch is grouped by expert (`ExpertRouting.spans`): we materialize one W per distinct
expert in it and apply it to that expert's rows - one bank contraction per expert, never per token.

Tensor parallelism partitions T exactly like megatron-core partitions the dense weight: along
`out` for the column-parallel layer (fc1), along `in` for the row-parallel one (fc2); every rank
holds its slice of all h bank matrices. M and E are replicated; each rank's slice of T contributes
a partial dL/dalpha, summed over TP by `copy_to_tensor_model_parallel_region` (identity forward,
all-reduce backward), so M and E get the full gradient on every rank.

Initialization (a projected expert has the statistics of a dense SLM at init): T ~ N(0, s^2) with
s the dense layer's init std, M has orthonormal rows (m <= h) and the rows of E have unit norm, so
||alpha[l,i]|| = ||E[i] M[l]|| = ||E[i]|| = 1 and W[l,i] ~ N(0, s^2) for every expert and layer.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


@dataclass(frozen=True)
class PNConfig:
    num_experts: int  # k: experts = clusters
    bank_size: int  # h: matrices in each bank
    code_size: int  # m: length of an expert code
    seed: int = 1234  # initialization seed (banks are seeded per layer: layout-independent)


def seeded_generator(seed: int, *names) -> torch.Generator:
    """A CPU generator whose seed depends only on (seed, names): the same at any TP/PP layout."""
    key = zlib.crc32(repr(names).encode())
    return torch.Generator().manual_seed(seed * 1_000_003 + key)


@dataclass(frozen=True)
class ExpertRouting:
    """Which expert computes which rows of a micro-batch.

    `codes[j]` is the code E[e_j] of the j-th distinct expert and `spans[j]` its batch slice
    (the trainer sorts each micro-batch by cluster so every expert's rows are contiguous).
    Built once per micro-batch and model chunk, passed down as an argument to every layer.
    """

    codes: torch.Tensor  # [u, m], rows of E (gradients flow back into E)
    experts: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def from_cluster_ids(cls, cluster_ids: torch.Tensor, expert_codes: torch.Tensor):
        ids = cluster_ids.view(-1).tolist()
        k = expert_codes.shape[0]
        if any(c < 0 or c >= k for c in ids):
            bad = next(c for c in ids if c < 0 or c >= k)
            raise ValueError(f"cluster id {bad} is outside [0, {k}) (model.num_experts = {k})")
        experts, spans, start = [], [], 0
        for row in range(1, len(ids) + 1):
            if row == len(ids) or ids[row] != ids[start]:
                experts.append(ids[start])
                spans.append((start, row))
                start = row
        if len(set(experts)) != len(experts):
            raise ValueError("a micro-batch must be grouped by cluster id (sort it by cluster)")
        index = torch.tensor(experts, device=expert_codes.device)
        return cls(codes=expert_codes.index_select(0, index), experts=tuple(experts),
                   spans=tuple(spans))


class ProjectedLinear(MegatronModule):
    """Shared by the column- and row-parallel variants: the bank, M and the projection."""

    partition_dim: int  # dim of the bank split across TP ranks (0: out, 1: in)

    def __init__(self, input_size: int, output_size: int, *, config, init_method, pn: PNConfig,
                 bias: bool = False, skip_bias_add: bool = True, is_expert: bool = False,
                 **unused):
        super().__init__(config=config)
        if bias:
            raise ValueError("projected linears have no bias: set model.add_bias_linear=false")
        if is_expert:
            raise ValueError("projected linears cannot be MoE experts")
        self.pn = pn
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.full_shape = (output_size, input_size)
        local = list(self.full_shape)
        if local[self.partition_dim] % self.tp_size:
            raise ValueError(
                f"the projected bank's partitioned dimension {local[self.partition_dim]} is not "
                f"divisible by parallel.tensor {self.tp_size}"
            )
        local[self.partition_dim] //= self.tp_size
        self.local_shape = tuple(local)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        # T: [out, in, h] (local slice), the paper's T[l][a, b, r]
        self.bank = torch.nn.Parameter(
            torch.empty(*self.local_shape, pn.bank_size, device=device, dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.bank, True, self.partition_dim, 1)
        # M: [m, h], replicated across TP
        self.code_projection = torch.nn.Parameter(
            torch.empty(pn.code_size, pn.bank_size, device=device, dtype=config.params_dtype)
        )
        self.gated = False  # set by PNMLP for SwiGLU's fc1 ([gate; up] halves, split separately)
        self.init_std = config.init_method_std
        self._routing: ExpertRouting | None = None

    @contextlib.contextmanager
    def routed(self, routing: ExpertRouting):
        """Bind this micro-batch's routing for the duration of one MLP call.

        megatron-core's MLP.forward calls its linears with the hidden states alone, so PNMLP
        binds the routing around that call (and again around a recomputation, which re-enters
        PNMLP.forward with its own argument); nothing outlives the call.
        """
        self._routing = routing
        try:
            yield
        finally:
            self._routing = None

    def _current_routing(self) -> ExpertRouting:
        if self._routing is None:
            raise RuntimeError("a projected linear ran outside PNMLP.forward: no expert routing")
        return self._routing

    # -- initialization -------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, *names) -> None:
        """Seeded by (seed, layer, name): the same full bank at any TP/PP layout, then sliced."""
        if not self.config.perform_initialization:
            return
        generator = seeded_generator(self.pn.seed, *names)
        full = torch.empty(*self.full_shape, self.pn.bank_size)
        full.normal_(0.0, self.init_std, generator=generator)
        self.bank.copy_(self._local_slice(full))
        projection = torch.empty(self.pn.code_size, self.pn.bank_size)
        torch.nn.init.orthogonal_(projection, generator=generator)  # orthonormal rows (m <= h)
        self.code_projection.copy_(projection)

    def _local_slice(self, full: torch.Tensor) -> torch.Tensor:
        if self.gated:  # SwiGLU fc1: each rank holds [gate slice; up slice]
            return torch.cat([self._slice(half) for half in full.chunk(2, dim=0)], dim=0)
        return self._slice(full)

    def _slice(self, full: torch.Tensor) -> torch.Tensor:
        size = full.shape[self.partition_dim] // self.tp_size
        return full.narrow(self.partition_dim, self.tp_rank * size, size)

    # -- the projection -------------------------------------------------------------------------

    def project(self, codes: torch.Tensor) -> torch.Tensor:
        """W[l, i] for each code E[i] given: [u, out_local, in_local]."""
        h = self.pn.bank_size
        alpha = codes @ self.code_projection  # [u, h]      alpha = E[i] @ M[l]
        alpha = copy_to_tensor_model_parallel_region(alpha)  # sum dL/dalpha over TP slices
        weights = self.bank.reshape(-1, h) @ alpha.t()  # [out*in, u]  sum_r alpha[r] T[:,:,r]
        return weights.t().reshape(len(codes), *self.local_shape)

    def _apply_experts(self, x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        """x: [s, b, in]; rows spans[j] of the batch use expert j's matrix."""
        weights = self.project(routing.codes)
        if len(routing.spans) == 1:
            return F.linear(x, weights[0])
        return torch.cat(
            [F.linear(x[:, a:b], w) for w, (a, b) in zip(weights, routing.spans)], dim=1
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"bank": self.partition_dim}, sharded_offsets
        )


class PNColumnParallelLinear(ProjectedLinear):
    """Drop-in for megatron-core's ColumnParallelLinear (fc1): output partitioned over TP."""

    partition_dim = 0

    def forward(self, x: torch.Tensor):
        x = copy_to_tensor_model_parallel_region(x)  # backward: sum input grads over TP
        return self._apply_experts(x, self._current_routing()), None


class PNRowParallelLinear(ProjectedLinear):
    """Drop-in for megatron-core's RowParallelLinear (fc2): input partitioned over TP."""

    partition_dim = 1

    def __init__(self, *args, config, **kwargs):
        super().__init__(*args, config=config, **kwargs)
        # Output layers use megatron-core's scaled init: std / sqrt(2 * num_layers).
        self.init_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)

    def forward(self, x: torch.Tensor):
        y = self._apply_experts(x, self._current_routing())
        return reduce_from_tensor_model_parallel_region(y), None
