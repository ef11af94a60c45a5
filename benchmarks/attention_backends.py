"""Core attention on this device: SDPA against megatron-core's local DotProductAttention, forward
plus backward of one attention call at the paper SLM's head shape, as a time ratio.

    python benchmarks/attention_backends.py                     # seq 256, 512, 1024
    python benchmarks/attention_backends.py --seq 1024 --batch 8

Both modules run the same query/key/value, interleaved, best of --repeats; goal: SDPA no slower
than local (ratio <= 1.0) at every length.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SECTION = "## Attention backends"


def modules(device: str):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_pn.config import load_config
    from megatron_pn.families.dense import ATTENTION_BACKENDS, core_attention
    from megatron_pn.model import transformer_config

    tconfig = transformer_config(load_config([str(REPO / "configs/paper/slm.yaml")]), device)
    return {name: core_attention(name)(tconfig, layer_number=1,
                                       attn_mask_type=AttnMaskType.causal,
                                       attention_type="self").to(device)
            for name in ATTENTION_BACKENDS}, tconfig


def seconds(module, query, key, value, device) -> float:
    start = time.perf_counter()
    module(query, key, value, None).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_pn import compat
    from megatron_pn.distributed import init_distributed
    from megatron_pn.metrics import device_description
    from train_throughput import write_section

    device = compat.activate()
    init_distributed(device)
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    backends, tconfig = modules(device)
    heads, dim = tconfig.num_attention_heads, tconfig.kv_channels
    lines = [f"Device: {device_description()}; date {datetime.date.today()}; "
             f"{torch.get_num_threads()} threads; {tconfig.params_dtype}; batch {args.batch}, "
             f"{heads} heads x {dim}, causal; forward + backward, best of {args.repeats}.", "",
             "| seq | local ms | sdpa ms | sdpa / local |", "|---:|---:|---:|---:|"]
    for seq in args.seq:
        qkv = [torch.randn(seq, args.batch, heads, dim, device=device, dtype=tconfig.params_dtype,
                           requires_grad=True) for _ in range(3)]
        best = {name: float("inf") for name in backends}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, module in backends.items():
                best[name] = min(best[name], seconds(module, *qkv, device))
        lines.append(f"| {seq} | {1e3 * best['local']:.1f} | {1e3 * best['sdpa']:.1f} | "
                     f"{best['sdpa'] / best['local']:.2f} |")
    report = "\n".join(lines)
    print(report)
    write_section(Path(args.results), report, SECTION, "`benchmarks/attention_backends.py`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
