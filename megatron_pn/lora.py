"""LoRA (Hu et al., 2021) on megatron-core's dense linears: y = W x + (alpha / r) B A x, with W
frozen, A [r, in] and B [out, r] trained, B zero at the start (step 0 is the base model).

Where it enters megatron-core: the dense family's layer spec (families/dense.py) builds the
targeted linears of megatron-core's local spec (finetune.lora.targets: linear_qkv, linear_proj of
the attention, linear_fc1, linear_fc2 of the MLP) as the subclasses below, which add the adapter
to the layer's own output; `LoRAGPTModel` freezes every other parameter and seeds the adapters.
Nothing else changes: megatron-core's DDP and (distributed) optimizer hold only what requires a
gradient (the adapters), and its frozen-weight linear skips W's weight-gradient GEMM.

Tensor parallelism, the adapter split like the weight it adapts:
  column-parallel (qkv, fc1; W split by output rows): B split by rows, A replicated. The rank-r
      activation h = A x passes copy_to_tensor_model_parallel_region (identity forward,
      all-reduce backward), so dL/dh sums every rank's rows: A's gradient and the input
      gradient through the adapter are whole, and equal, on every rank.
  row-parallel (proj, fc2; W split by input columns): A split by columns, B replicated. The
      partial h = A_r x_r are summed by the same reduction the layer applies to its partial
      outputs, on r numbers per token instead of `out`, before B: B h is then computed whole on
      every rank and B's gradient needs no reduction of its own (adding B A_r x_r to each partial
      output would leave it one rank's share).
  With sequence parallelism those reductions are the layer's sequence gather / reduce-scatter,
      and the replicated factor, seeing one slice of the sequence per rank, is marked
      `sequence_parallel` like the norms: megatron-core's finalize_model_grads all-reduces it.
Adapters are seeded by (train.seed, global layer number, module name) and drawn whole, then
sliced: the same adapters at any TP/PP layout.

An adapter checkpoint (checkpoint.py) holds the adapters and where the frozen base is (its path
and fingerprint, `base_record`), not the base weights; `merged_state` folds W + (alpha / r) B A
into a plain dense model (pn-merge-lora, pn-export-hf).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_pn.config import LORA_TARGETS

ADAPTER_NAMES = ("lora_a", "lora_b")  # the parameters of an adapted linear


def is_adapter(name: str) -> bool:
    """Whether a parameter (or state dict key) is an adapter factor."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


class LoRALinear:
    """The adapter of a megatron-core linear (mixed into its column- or row-parallel class)."""

    split: str  # which factor is split over TP like W: "lora_b" (column), "lora_a" (row)

    def add_adapter(self, lora, in_local: int, out_local: int) -> None:
        config = self.config
        self.rank, self.scale, self.dropout = lora.rank, lora.alpha / lora.rank, lora.dropout
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.lora_a = torch.nn.Parameter(torch.empty(lora.rank, in_local, device=device,
                                                     dtype=config.params_dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_local, lora.rank, device=device,
                                                     dtype=config.params_dtype))
        split_dim = 0 if self.split == "lora_b" else 1
        set_tensor_model_parallel_attributes(getattr(self, self.split), True, split_dim, 1)
        replicated = self.lora_a if self.split == "lora_b" else self.lora_b
        setattr(replicated, "sequence_parallel", self.sequence_parallel)

    @torch.no_grad()
    def reset_adapter(self, seed: int, layer: int, name: str) -> None:
        """A as peft draws it (Kaiming-uniform, a = sqrt(5)) from a generator of (seed, layer,
        name), whole then sliced; B zero."""
        from megatron_pn.pn.layers import seeded_generator

        whole = torch.empty(self.rank, self.input_size)
        torch.nn.init.kaiming_uniform_(whole, a=math.sqrt(5),
                                       generator=seeded_generator(seed, "lora", layer, name))
        if self.split == "lora_a":
            width = self.lora_a.shape[1]
            whole = whole.narrow(1, self.tp_group.rank() * width, width)
        self.lora_a.copy_(whole)
        self.lora_b.zero_()

    def adapter_input(self, x: torch.Tensor, partitioned: bool) -> torch.Tensor:
        """Dropout on the adapter's input: a TP-partitioned input draws from the model-parallel
        RNG (as megatron-core's attention dropout), a replicated one from the default RNG, equal
        on every TP rank (as its hidden dropout)."""
        if not (self.training and self.dropout):
            return x
        if partitioned:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.dropout(x, self.dropout)
        return F.dropout(x, self.dropout)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A on this rank's slice of W."""
        return self.scale * (self.lora_b @ self.lora_a)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        split = {"weight": 0, "bias": 0} if self.split == "lora_b" else {"weight": 1}
        split[self.split] = split["weight"]
        sharded = make_sharded_tensors_for_checkpoint(
            state, prefix, split, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"])
        if self.gated:  # SwiGLU fc1: B's [gate; up] halves split over TP separately, as W's
            key = f"{prefix}lora_b"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded


class LoRAColumnParallelLinear(LoRALinear, ColumnParallelLinear):
    split = "lora_b"

    def __init__(self, input_size, output_size, *, lora, stride: int = 1, **kwargs):
        super().__init__(input_size, output_size, stride=stride, **kwargs)
        if self.gather_output:
            raise ValueError("LoRA adapters on a column-parallel linear need gather_output=False")
        self.gated = stride == 2  # megatron-core's MLP passes 2 for a SwiGLU fc1
        self.add_adapter(lora, input_size, self.output_size_per_partition)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight, runtime_gather_output)
        h = F.linear(self.adapter_input(input_, self.sequence_parallel), self.lora_a)
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, True, group=self.tp_group)
        else:
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return output + self.scale * F.linear(h, self.lora_b), bias


class LoRARowParallelLinear(LoRALinear, RowParallelLinear):
    split = "lora_a"
    gated = False

    def __init__(self, input_size, output_size, *, lora, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        if not self.input_is_parallel:
            raise ValueError("LoRA adapters on a row-parallel linear need input_is_parallel")
        self.add_adapter(lora, self.input_size_per_partition, output_size)

    def forward(self, input_):
        output, bias = super().forward(input_)
        h = F.linear(self.adapter_input(input_, partitioned=True), self.lora_a)
        if self.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return output + self.scale * F.linear(h, self.lora_b), bias


# -- the spec and the model ------------------------------------------------------------------

def with_adapters(spec: ModuleSpec, lora) -> ModuleSpec:
    """A local-spec layer whose targeted linears carry adapters."""
    import functools

    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    targets = LORA_TARGETS[lora.targets]
    if "linear_qkv" in targets:  # SelfAttention calls this one itself: a class, not a spec
        attention.linear_qkv = functools.partial(LoRAColumnParallelLinear, lora=lora)
    for parent, name, module in ((attention, "linear_proj", LoRARowParallelLinear),
                                 (mlp, "linear_fc1", LoRAColumnParallelLinear),
                                 (mlp, "linear_fc2", LoRARowParallelLinear)):
        if name in targets:
            setattr(parent, name, ModuleSpec(module=module, params={"lora": lora}))
    return spec


class LoRAGPTModel(GPTModel):
    """megatron-core's GPTModel with adapters: every other parameter frozen, the adapters
    seeded per layer (when the model initializes its weights)."""

    def __init__(self, *args, lora_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        for name, param in self.named_parameters():
            param.requires_grad_(is_adapter(name))
        if self.config.perform_initialization:
            for layer in self.decoder.layers:
                for name, module in adapted_linears(layer):
                    module.reset_adapter(lora_seed, layer.layer_number, name)


def adapted_linears(module: torch.nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoRALinear)]


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(adapted_linears(model))


# -- merging ---------------------------------------------------------------------------------

def merged_state(model: torch.nn.Module) -> dict:
    """The state dict of the dense model the adapted one computes: each adapted W replaced by
    W + (alpha / r) B A (this rank's slice), the adapters dropped."""
    state = model.state_dict()
    with torch.no_grad():
        for name, linear in adapted_linears(model):
            state[f"{name}.weight"] = linear.weight + linear.delta_weight().to(linear.weight.dtype)
    return {k: v for k, v in state.items() if not is_adapter(k)}


def base_state(model: torch.nn.Module) -> dict:
    """The frozen base model's state dict (the adapters left out)."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter(k)}


def adapter_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A, B) of every adapted linear (this rank's slices)."""
    return {name: (m.lora_a.detach(), m.lora_b.detach()) for name, m in adapted_linears(model)}


# -- the base an adapter checkpoint needs ----------------------------------------------------

def fingerprint(iteration: str | Path) -> str:
    """sha256 over the files of a checkpoint iteration (names and contents): an adapter
    checkpoint's base must be the one it was trained on."""
    digest = hashlib.sha256()
    root = Path(iteration)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def base_record(iteration: str | Path) -> dict:
    """What an adapter checkpoint records of its frozen base (checkpoint.BASE_KEY)."""
    path = Path(iteration).resolve()
    return {"path": str(path), "sha256": fingerprint(path)}
