"""Compare model variants (attention backend, fusions, precision) on the same weights and batch:
the largest differences of their logits and of their gradients.

In a test process (a megatron world of one) call `max_differences`; under torchrun

    python -m torch.distributed.run --nproc-per-node 2 tests/backend_check.py --tp 2

prints the differences of SDPA vs local attention at that TP size as JSON (rank 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "slm.yaml"
# Grouped-query attention (4 heads, 2 groups), causal, no dropout: deterministic.
GQA = ["model.num_query_groups=2", "model.vocab_size=256", "model.make_vocab_size_divisible_by=64"]


def build(overrides: list[str], tp: int, device: str):
    from megatron_pn.config import load_config
    from megatron_pn.model import build_gpt, transformer_config

    cfg = load_config([str(CONFIG)], [*GQA, f"parallel.tensor={tp}", *overrides])
    model = build_gpt(cfg, transformer_config(cfg, device.split(":")[0]))
    return model.to(device)


def logits_and_grads(model, tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    logits = model(tokens, positions, None)
    model.zero_grad()
    model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).sum().backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters()}
    return logits.float().detach(), grads


def max_differences(reference: list[str], candidate: list[str], tp: int = 1,
                    device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Largest |difference| of logits and of any gradient, candidate vs reference, relative to
    the reference's largest magnitude; the candidate gets the reference's weights."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    ref = build(reference, tp, device)
    cand = build(candidate, tp, device)
    cand.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device)
    ref_logits, ref_grads = logits_and_grads(ref, tokens)
    cand_logits, cand_grads = logits_and_grads(cand, tokens)
    grad_scale = max(g.abs().max() for g in ref_grads.values())
    differences = torch.stack([
        (cand_logits - ref_logits).abs().max() / ref_logits.abs().max(),
        max((cand_grads[k] - g).abs().max() for k, g in ref_grads.items()) / grad_scale,
    ])
    if torch.distributed.get_world_size() > 1:  # each rank holds its shards
        torch.distributed.all_reduce(differences, op=torch.distributed.ReduceOp.MAX)
    return {"logits": differences[0].item(), "grads": differences[1].item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_pn import compat
    from megatron_pn.distributed import init_distributed, shutdown

    device = compat.activate()
    torch.set_num_threads(1)
    env = init_distributed(device)
    ps.initialize_model_parallel(args.tp, 1)
    result = max_differences(["model.attention_backend=local", "train.precision=fp32"],
                             ["model.attention_backend=sdpa", "train.precision=fp32"],
                             args.tp, str(env.device))
    if env.rank == 0:
        print(json.dumps(result))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
