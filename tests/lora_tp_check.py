"""LoRA linears under tensor parallelism against the unsharded formula, at the module level:
a column-parallel linear feeding a row-parallel one (as qkv -> proj, fc1 -> fc2), with and
without sequence parallelism (whose norms megatron-core's local spec cannot run on CPU, so no
whole model tests it). Under torchrun:

    python -m torch.distributed.run --nproc-per-node 2 tests/lora_tp_check.py [--sequence-parallel]

prints, as JSON on rank 0, the relative error (largest difference over largest value) of the
output and of every adapter gradient against the unsharded computation.
"""

from __future__ import annotations

import argparse
import json

import torch

S, B, D, F, R = 8, 2, 16, 32, 4  # sequence, batch, width, inner width, rank
ALPHA = 6.0


def whole_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (S, B, D), "target": (S, B, D), "w1": (F, D), "a1": (R, D), "b1": (F, R),
              "w2": (D, F), "a2": (R, F), "b2": (D, R)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def reference(t: dict) -> dict[str, torch.Tensor]:
    """Output and adapter gradients of the unsharded formula W x + (alpha / r) B A x."""
    leaves = {k: t[k].clone().requires_grad_(k[0] in "ab") for k in t}
    scale = ALPHA / R
    h = leaves["x"] @ leaves["w1"].T + scale * leaves["x"] @ leaves["a1"].T @ leaves["b1"].T
    y = h @ leaves["w2"].T + scale * h @ leaves["a2"].T @ leaves["b2"].T
    (y * leaves["target"]).sum().backward()
    return {"y": y.detach(), **{k: leaves[k].grad for k in ("a1", "b1", "a2", "b2")}}


def sharded(t: dict, sequence_parallel: bool) -> dict[str, torch.Tensor]:
    """The same through LoRAColumnParallelLinear -> LoRARowParallelLinear on this rank's
    shards, gathered back whole."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from megatron_pn.config import LoraConfig
    from megatron_pn.lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    tp, rank = dist.get_world_size(), dist.get_rank()
    config = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=2,
                               tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                               use_cpu_initialization=True, perform_initialization=False)
    lora = LoraConfig(rank=R, alpha=ALPHA)
    init = torch.nn.init.zeros_
    column = LoRAColumnParallelLinear(D, F, config=config, init_method=init, bias=False,
                                      gather_output=False, lora=lora)
    row = LoRARowParallelLinear(F, D, config=config, init_method=init, bias=False,
                                input_is_parallel=True, skip_bias_add=True, lora=lora)
    rows, cols = t["w1"].chunk(tp, 0)[rank], t["w2"].chunk(tp, 1)[rank]
    with torch.no_grad():
        for param, value in ((column.weight, rows), (column.lora_a, t["a1"]),
                             (column.lora_b, t["b1"].chunk(tp, 0)[rank]), (row.weight, cols),
                             (row.lora_a, t["a2"].chunk(tp, 1)[rank]), (row.lora_b, t["b2"])):
            param.copy_(value)
    for param in (column.weight, row.weight):
        param.requires_grad_(False)
    x, target = t["x"], t["target"]
    if sequence_parallel:  # the sequence is split over the TP ranks outside the linears
        x, target = x.chunk(tp, 0)[rank], target.chunk(tp, 0)[rank]
    y, _ = row(column(x)[0])
    (y * target).sum().backward()
    group = ps.get_tensor_model_parallel_group()
    for param in (column.lora_a, row.lora_b):  # replicated: what finalize_model_grads reduces
        if getattr(param, "sequence_parallel", False):
            dist.all_reduce(param.grad, group=group)

    def gather(tensor, dim):
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim)

    return {"y": gather(y.detach(), 0) if sequence_parallel else y.detach(),
            "a1": column.lora_a.grad, "b1": gather(column.lora_b.grad, 0),
            "a2": gather(row.lora_a.grad, 1), "b2": row.lora_b.grad}


def main() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pn import compat
    from megatron_pn.distributed import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    compat.activate()
    init_distributed("cpu")
    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    tensors = whole_tensors()
    got, expected = sharded(tensors, args.sequence_parallel), reference(tensors)
    if dist.get_rank() == 0:
        print(json.dumps({k: float((got[k] - expected[k]).abs().max() / expected[k].abs().max())
                          for k in expected}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
