"""Projected-network linear layers (Grangier et al., "projected networks").

For a projected matrix l (here: one MLP linear of one layer) and expert i,

    W[l,i][a,b] = sum_q sum_r  E[i,q] * M[l][q,r] * T[l][a,b,r]

with E (k x m) one code per expert, shared by all layers (it lives in `PNGPTModel`), M[l] (m x h)
this layer's `code_projection`, and T[l] (out x in x h) its `bank`. Equivalently

    alpha[l,i] = E[i] @ M[l]                      (h mixing weights)
    W[l,i]     = sum_r alpha[l,i][r] * T[l][:,:,r]

The model groups a micro-batch's rows by expert (`ExpertRouting`, built from the caller's cluster
ids in any order): we materialize one W per distinct expert in it - one bank contraction per
expert, never per token - and apply it as one GEMM to that expert's contiguous block of rows
(all the micro-batch's experts in one grouped GEMM where the device has one: compat.grouped_gemm).
An "expert" is a cluster id, or, in mixture training, a mixture of clusters (k weights w): its
code is then the model's map of w, w @ E or a learned f(w) (PNGPTModel.codes); a mixture
micro-batch has one expert.
In training (and evaluation) W is projected once per optimizer step, not per micro-batch, and
its gradient backpropagated into T, M and E once, in the step's last backward pass
(`ProjectedWeights`), under either engine.

Tensor parallelism partitions T exactly like megatron-core partitions the dense weight: along
`out` for the column-parallel layer (fc1), along `in` for the row-parallel one (fc2); every rank
holds its slice of all h bank matrices. M and E are replicated; each rank's slice of T contributes
a partial dL/dalpha, summed over TP by `copy_to_tensor_model_parallel_region` (identity forward,
all-reduce backward), so M and E get the full gradient on every rank.

Initialization (a projected expert has the statistics of a dense SLM at init): T ~ N(0, s^2) with
s the dense layer's init std, M has orthonormal rows (m <= h) and the rows of E have unit norm, so
||alpha[l,i]|| = ||E[i] M[l]|| = ||E[i]|| = 1 and W[l,i] ~ N(0, s^2) for every expert and layer.
By default the codes also start close to one another (PNGPTModel, `model.code_init: shared`), so
the experts start as one network and branch out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Union

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

from megatron_pn import compat


@dataclass(frozen=True)
class PNConfig:
    num_experts: int  # k: experts = clusters
    bank_size: int  # h: matrices in each bank
    code_size: int  # m: length of an expert code
    seed: int = 1234  # initialization seed (banks are seeded per layer: layout-independent)
    code_init: str = "shared"  # E: "shared" or independent unit codes "random" (see PNGPTModel)
    code_init_spread: float = 0.1  # shared: each code's deviation from the shared one
    code_map: str = "linear"  # a mixture w's code: "linear" w @ E, or "learned" (LearnedCodeMap)
    code_map_hidden: int = 64  # learned: width of its hidden layer
    grouped_gemm: str = "auto"  # per-expert GEMMs: auto, grouped or loop (compat.grouped_gemm)


def seeded_generator(seed: int, *names) -> torch.Generator:
    """A CPU generator whose seed depends only on (seed, names): the same at any TP/PP layout."""
    key = zlib.crc32(repr(names).encode())
    return torch.Generator().manual_seed(seed * 1_000_003 + key)


def select_codes(expert_codes: torch.Tensor, experts) -> torch.Tensor:
    """The rows of E of `experts` (host ids, ascending), on E's device; gradients flow into E."""
    index = compat.host_to_device(torch.as_tensor(experts), expert_codes.device)
    return expert_codes.index_select(0, index)


Expert = Union[int, tuple[float, ...]]  # a cluster id, or mixture weights over the k clusters
CodesOf = Callable[[tuple], torch.Tensor]  # experts (ascending) -> their codes [u, m]


@dataclass(frozen=True)
class ExpertRouting:
    """Which expert computes which rows of a micro-batch, built on the host from the caller's
    cluster ids (any order), or its one mixture, by `PNGPTModel.forward` and passed down as an
    argument.

    The model computes in *grouped* row order: rows sorted by expert (stable), so each expert's
    rows form one contiguous block of `counts[j]` rows. `group` puts a batch-first tensor in that
    order, `ungroup` restores the caller's order; both are identities when the caller's rows are
    already sorted (`data.group_by_cluster`).
    """

    codes: torch.Tensor  # [u, m], the codes of the experts present (gradients flow into E)
    experts: tuple[Expert, ...]  # the u distinct experts, ascending
    counts: tuple[int, ...]  # rows of each expert, in grouped order
    order: torch.Tensor | None  # grouped row r is caller row order[r] (device); None: sorted
    restore: torch.Tensor | None  # the inverse permutation (device)
    projected: "ProjectedWeights | None" = None  # W of the step or evaluation, if it keeps them
    contracts: bool = False  # the step's last micro-batch: its backward contracts dL/dW

    @classmethod
    def from_cluster_ids(cls, cluster_ids, codes_of: CodesOf, k: int, device) -> "ExpertRouting":
        ids = torch.as_tensor(cluster_ids)
        if ids.device.type != "cpu":
            raise ValueError("cluster_ids must be on the host (a list or a CPU tensor): reading "
                             "them from the device would stall it every micro-batch")
        ids = ids.view(-1).long()
        bad = ids[(ids < 0) | (ids >= k)]
        if len(bad):
            raise ValueError(f"cluster id {int(bad[0])} is outside [0, {k}) "
                             f"(model.num_experts = {k})")
        order = restore = None
        if len(ids) > 1 and bool((ids[1:] < ids[:-1]).any()):
            host_order = torch.argsort(ids, stable=True)
            ids = ids[host_order]
            order = compat.host_to_device(host_order, device)
            restore = compat.host_to_device(torch.argsort(host_order), device)
        experts, counts = torch.unique_consecutive(ids, return_counts=True)
        experts = tuple(experts.tolist())
        return cls(codes=codes_of(experts), experts=experts, counts=tuple(counts.tolist()),
                   order=order, restore=restore)

    @classmethod
    def from_mixture(cls, weights, rows: int, codes_of: CodesOf) -> "ExpertRouting":
        """Every row of the micro-batch computed with the code of one mixture `weights` (k
        floats on the host, summing to 1): mixture training's micro-batches."""
        expert = tuple(float(w) for w in torch.as_tensor(weights, dtype=torch.float64).view(-1))
        return cls(codes=codes_of((expert,)), experts=(expert,), counts=(rows,), order=None,
                   restore=None)

    def group(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """A batch-first tensor [b, ...] in grouped row order (a leading 1 broadcasts: kept)."""
        if rows is None or self.order is None or rows.shape[0] == 1:
            return rows
        return rows.index_select(0, self.order)

    def ungroup(self, rows: torch.Tensor) -> torch.Tensor:
        """A batch-first tensor [b, ...] back in the caller's row order."""
        return rows if self.restore is None else rows.index_select(0, self.restore)


class ProjectedWeights:
    """The experts' weights of one optimizer step (or one evaluation), each projected once:
    SLM-pn's fast path.

    T, M and E do not change within a step, so W[l, i] is the same in every micro-batch. The
    first micro-batch that reaches a projected linear projects every expert the step uses (one
    GEMM: the bank read once), kept as leaf tensors; autograd sums dL/dW over the micro-batches
    into them. The step's last micro-batch (`route` counts them) reads them through
    `_StepContraction`, whose backward adds its own dL/dW and contracts the sum into T, M and E
    (one GEMM per linear for each). That happens inside the last backward pass the engine runs
    anyway, before any gradient reduction, so the engine sees an ordinary gradient: megatron-
    core's DDP in the bank's `main_grad`, DeepSpeed's ZeRO-1/2 in their gradient hooks (an
    engine must take a parameter's first gradient of a step in a later micro-batch than the
    first: ZeRO-3 does not, engines.py). Per step the bank is read about three times, whatever
    the number of micro-batches; the price is memory for the W and dL/dW of every expert the
    step uses. An evaluation (`micro_batches` None) keeps nothing for a backward. It lives for
    one step or evaluation only (the optimizer changes T, M and E): `pn.model.projected_once`.
    """

    def __init__(self, codes_of: CodesOf, micro_batches: int | None = None, experts=()):
        self.codes_of = codes_of
        self.backprop = micro_batches is not None
        self.remaining = micro_batches  # forward passes still to come in the step
        self.experts = tuple(sorted(set(experts)))  # the step's, when known: projected at once
        self._weights: dict = {}  # linear -> {expert: W, a leaf}

    def route(self, routing: ExpertRouting) -> ExpertRouting:
        """A micro-batch's routing, its weights read from here; called once per micro-batch (a
        recomputation reuses its routing), so the step's last one is known in its forward."""
        last = False
        if self.backprop:
            if not self.remaining:
                raise RuntimeError("more micro-batches than the step was given")
            self.remaining -= 1
            last = self.remaining == 0
        return dataclasses.replace(routing, projected=self, contracts=last)

    def weights(self, linear: "ProjectedLinear", routing: ExpertRouting) -> list[torch.Tensor]:
        known = self._weights.setdefault(linear, {})
        if any(e not in known for e in routing.experts):
            new = sorted((set(routing.experts) | set(self.experts)) - set(known))
            with torch.no_grad():
                projected = linear.project(self.codes_of(tuple(new)))
            for expert, w in zip(new, projected.unbind(0)):
                known[expert] = w.detach().requires_grad_(self.backprop)
        if not routing.contracts:
            return [known[e] for e in routing.experts]
        # codes selected here, in the linear's call: a recomputed MLP gets a graph of its own
        experts = tuple(sorted(known))
        step = dict(zip(experts, linear.contract_step(self.codes_of(experts),
                                                      [known[e] for e in experts])))
        return [step[e] for e in routing.experts]


def _projection_grads(bank: torch.Tensor, grad_weights: torch.Tensor, alpha: torch.Tensor):
    """The backward of W = alpha x T^T: (dL/dalpha = dL/dW x T, the bank's gradient). dL/dT =
    dL/dW^T x alpha goes into DDP's `main_grad` in place when the bank has one (one addmm, as
    megatron-core's gradient-accumulation fusion does for dense weights; then a placeholder
    gradient for DDP's grad-ready hook), else it is returned for autograd."""
    flat = bank.view(-1, bank.shape[-1])
    grad_alpha = grad_weights @ flat
    if getattr(bank, "grad_added_to_main_grad", None) is None:  # no DDP buffer
        return grad_alpha, (grad_weights.t() @ alpha).view_as(bank)
    main_grad = bank.main_grad.view(-1, bank.shape[-1])
    main_grad.addmm_(grad_weights.t().to(main_grad.dtype), alpha.to(main_grad.dtype))
    bank.grad_added_to_main_grad = True  # DDP's hook then skips its own add
    return grad_alpha, torch.empty_like(bank)


class _BankProjection(torch.autograd.Function):
    """weights [u, out*in] = alpha [u, h] x T [out*in, h]^T: one GEMM that reads the bank once;
    each expert's weight comes out contiguous.

    Backward: `_projection_grads`.
    """

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(alpha)
        ctx.bank = bank
        return F.linear(alpha, bank.view(-1, bank.shape[-1]))

    @staticmethod
    def backward(ctx, grad_weights: torch.Tensor):
        (alpha,) = ctx.saved_tensors
        return _projection_grads(ctx.bank, grad_weights, alpha)


class _StepContraction(torch.autograd.Function):
    """The step's weights W (leaves, projected in its first micro-batch) in its last: forward
    passes them through; backward adds this micro-batch's dL/dW to the earlier ones' (the
    leaves' .grad) and takes the sum through W = alpha x T^T into alpha and T, once per step
    (`_projection_grads`). The leaves ride along as a list, not as inputs: autograd gives
    them nothing more."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, bank: torch.Tensor, weights: list):
        ctx.save_for_backward(alpha)
        ctx.bank, ctx.weights = bank, weights
        ctx.set_materialize_grads(False)  # None for an expert this micro-batch does not use
        return tuple(w.detach() for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        (alpha,) = ctx.saved_tensors
        summed = torch.stack([_step_sum(g, w) for g, w in zip(grads, ctx.weights)])
        return *_projection_grads(ctx.bank, summed.view(len(grads), -1), alpha), None


def _step_sum(grad: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """dL/dW of the step: the last micro-batch's plus the earlier ones' (None: none used it)."""
    if weight.grad is None:
        return torch.zeros_like(weight) if grad is None else grad
    return weight.grad if grad is None else weight.grad + grad


class ProjectedLinear(MegatronModule):
    """Shared by the column- and row-parallel variants: the bank, M and the projection."""

    partition_dim: int  # dim of the bank split across TP ranks (0: out, 1: in)

    def __init__(self, input_size: int, output_size: int, *, config, init_method, pn: PNConfig,
                 init_key: tuple, bias: bool = False, skip_bias_add: bool = True,
                 is_expert: bool = False, tp_group=None, stride: int = 1, **unused):
        super().__init__(config=config)
        if bias:
            raise ValueError("projected linears have no bias: set model.add_bias_linear=false")
        if is_expert:
            raise ValueError("projected linears cannot be MoE experts")
        self.pn = pn
        self.init_key = init_key  # seeds T and M: ("layer", global layer number, module name)
        # megatron-core's MLP passes the layer's TP group (None only outside a TransformerLayer)
        self.tp_group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
        self.tp_size = self.tp_group.size()
        self.tp_rank = self.tp_group.rank()
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
        # megatron-core's MLP passes stride 2 to a SwiGLU fc1: [gate; up] halves split separately
        self.gated = stride == 2
        self._routing: ExpertRouting | None = None
        self.reset_parameters()

    @contextlib.contextmanager
    def routed(self, routing: ExpertRouting, batch_first: bool):
        """Bind this micro-batch's routing for the duration of one MLP (or attention) call.

        megatron-core's MLP.forward calls its linears with the hidden states alone, so PNMLP
        binds the routing around that call (and again around a recomputation, which re-enters
        PNMLP.forward with its own argument); nothing outlives the call. `batch_first`: the
        inputs are [b, s, in] in grouped row order (PNMLP regroups once per call), else
        megatron's sequence-first [s, b, in].
        """
        self._routing = (routing, batch_first)
        try:
            yield
        finally:
            self._routing = None

    def _current_routing(self) -> tuple[ExpertRouting, bool]:
        if self._routing is None:
            raise RuntimeError("a projected linear ran outside PNMLP.forward: no expert routing")
        return self._routing

    # -- initialization -------------------------------------------------------------------------

    def init_std(self) -> float:
        """The dense layer's init std (megatron-core's init_method_std)."""
        return self.config.init_method_std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seeded by (seed, *init_key): the same full bank at any TP/PP layout, then sliced."""
        if not self.config.perform_initialization:
            return
        generator = seeded_generator(self.pn.seed, *self.init_key)
        full = torch.empty(*self.full_shape, self.pn.bank_size)
        full.normal_(0.0, self.init_std(), generator=generator)
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

    def mixing_weights(self, codes: torch.Tensor) -> torch.Tensor:
        """alpha[l, i] = E[i] @ M[l] for each code given: [u, h]."""
        # sum dL/dalpha over the TP slices of the bank
        return copy_to_tensor_model_parallel_region(codes @ self.code_projection, self.tp_group)

    def project(self, codes: torch.Tensor) -> torch.Tensor:
        """W[l, i] for each code E[i] given: [u, out_local, in_local], each expert contiguous."""
        alpha = self.mixing_weights(codes)
        weights = _BankProjection.apply(alpha, self.bank)  # sum_r alpha[r] T[:,:,r]
        return weights.view(len(codes), *self.local_shape)

    def contract_step(self, codes: torch.Tensor, weights: list) -> tuple:
        """The step's W of the experts with `codes`, passed through; backward contracts the
        step's summed dL/dW into T, M and E (ProjectedWeights, the step's last micro-batch)."""
        return _StepContraction.apply(self.mixing_weights(codes), self.bank, weights)

    def expert_weights(self, routing: ExpertRouting):
        """W[l, i] of the routing's experts: this step's, if it keeps them (a list), else
        projected now (one [u, out, in] tensor)."""
        if routing.projected is not None:
            return routing.projected.weights(self, routing)
        return self.project(routing.codes)

    def _apply_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert's matrix applied to its block of rows (see `routed` for the layouts)."""
        routing, batch_first = self._current_routing()
        weights = self.expert_weights(routing)
        if len(weights) == 1:  # one expert: one GEMM over the whole micro-batch, any layout
            return F.linear(x, weights[0])
        if batch_first:
            return self._per_expert(x, weights, routing)
        # [s, b, in]: an expert's rows x[:, a:b] are strided and F.linear on them runs s tiny
        # GEMMs; make them contiguous first (PNMLP avoids this by regrouping once per call).
        rows = x.transpose(0, 1).contiguous()
        return self._per_expert(rows, weights, routing).transpose(0, 1).contiguous()

    def _per_expert(self, rows: torch.Tensor, weights, routing: ExpertRouting) -> torch.Tensor:
        """rows [b, ..., in] in grouped order, weights the u experts' [out, in] (a list, or
        one [u, out, in] tensor): each expert's matrix on its contiguous block of rows, in one
        grouped GEMM where compat.grouped_gemm says so, else one GEMM per expert."""
        out, inp = weights[0].shape
        if (compat.grouped_gemm(self.pn.grouped_gemm, rows.device, rows.dtype)
                and compat.grouped_gemm_fits(inp, out, rows.dtype)):
            stacked = weights if torch.is_tensor(weights) else torch.stack(weights)
            return grouped_linear(rows, stacked, routing.counts)
        blocks = rows.split(routing.counts, dim=0)
        return torch.cat([F.linear(block, w) for block, w in zip(blocks, weights)])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"bank": self.partition_dim}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        )


def grouped_linear(rows: torch.Tensor, weights: torch.Tensor, counts) -> torch.Tensor:
    """rows [b, ..., in], expert j's the j-th contiguous block of counts[j] rows, times its
    weights[j]^T ([u, out, in]): one torch._grouped_mm over the flattened rows, each group ending
    at a host-computed offset."""
    flat = rows.reshape(-1, rows.shape[-1])
    per_row = flat.shape[0] // rows.shape[0]  # the tokens of one row
    ends = torch.tensor(counts).cumsum(0).mul_(per_row).to(torch.int32)
    out = torch._grouped_mm(flat, weights.transpose(1, 2),
                            offs=compat.host_to_device(ends, rows.device))
    if out.requires_grad:  # its backward rejects a broadcast or column-major gradient
        out.register_hook(torch.Tensor.contiguous)
    return out.view(*rows.shape[:-1], out.shape[-1])


class PNColumnParallelLinear(ProjectedLinear):
    """Drop-in for megatron-core's ColumnParallelLinear (fc1): output partitioned over TP."""

    partition_dim = 0

    def forward(self, x: torch.Tensor):
        # backward: sum the input gradients over TP
        x = copy_to_tensor_model_parallel_region(x, self.tp_group)
        return self._apply_experts(x), None


class PNRowParallelLinear(ProjectedLinear):
    """Drop-in for megatron-core's RowParallelLinear (fc2): input partitioned over TP."""

    partition_dim = 1

    def init_std(self) -> float:
        """Output layers use megatron-core's scaled init: std / sqrt(2 * num_layers)."""
        return self.config.init_method_std / math.sqrt(2.0 * self.config.num_layers)

    def forward(self, x: torch.Tensor):
        y = self._apply_experts(x)
        return reduce_from_tensor_model_parallel_region(y, self.tp_group), None
