"""Step time of a projected network (k=32, h=23) over the dense SLM of the same expert shape:
same batch, same device, measured in the same run, printed as a ratio.

    python benchmarks/pn_overhead.py                  # CPU: a reduced size (d 256, 4 layers)
    python benchmarks/pn_overhead.py --shape paper    # the paper's 126M expert shape (GPU default)
    python benchmarks/pn_overhead.py --shape tiny     # seconds: a smoke run of the benchmark

PN runs twice: with micro-batches that mix clusters (one projected matrix per distinct cluster
in each micro-batch) and with `data.group_by_cluster` (micro-batches of one or two clusters).
Goal: <= 1.10x (the paper's implementation: 3.6 / 2.2 GPU-hours per 1B tokens = 1.64x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import measure, random_dataset, write_section  # noqa: E402

from megatron_pn.metrics import device_description  # noqa: E402

SECTION = "## PN overhead"
SHAPES = {  # overrides of configs/paper/{slm,pn32}.yaml; paper: none
    "paper": [],
    "reduced": ["model.hidden_size=256", "model.ffn_hidden_size=688",
                "model.num_attention_heads=4", "model.num_layers=4", "model.seq_length=256",
                "model.vocab_size=8192", "train.micro_batch_size=4", "train.global_batch_size=16"],
    "tiny": ["model.hidden_size=64", "model.ffn_hidden_size=176", "model.num_attention_heads=4",
             "model.num_layers=2", "model.seq_length=64", "model.vocab_size=512",
             "train.micro_batch_size=2", "train.global_batch_size=8"],
}


def cluster_blend(root: Path, k: int, vocab: int, tokens_per_cluster: int) -> Path:
    blend = []
    root.mkdir(parents=True, exist_ok=True)
    for cluster in range(k):
        prefix = root / f"cluster_{cluster:04d}"
        random_dataset(prefix, vocab, tokens_per_cluster, seed=cluster)
        blend.append([1.0, str(prefix)])
    path = root / "generic_blend.json"
    path.write_text(json.dumps({"blend": blend, "cluster_ids": list(range(k))}))
    return path


def main() -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="paper" if on_gpu else "reduced",
                        help="paper: the paper's SLM expert shape (default on GPU); reduced: "
                             "d 256, 4 layers (default on CPU); tiny: a smoke run")
    parser.add_argument("--steps", type=int, default=30 if on_gpu else 8)
    parser.add_argument("--warmup", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    vocab = int(next((o.split("=")[1] for o in shape if o.startswith("model.vocab_size=")), 32000))
    paper = args.shape == "paper"

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens = (args.steps + 2) * 128 * 1025 * 2 // 32 if paper else 200_000
        blend = cluster_blend(work / "clusters", 32, vocab, tokens)
        common = shape + [f"data.blend_file={blend}"]
        runs = {
            "dense SLM (baseline)": ("configs/paper/slm.yaml", common + [
                "data.blend_file=null", f"data.blend=[{work / 'clusters' / 'cluster_0000'}]"]),
            "PN k=32 h=23, mixed micro-batches": ("configs/paper/pn32.yaml", common),
            "PN k=32 h=23, group_by_cluster": ("configs/paper/pn32.yaml",
                                               common + ["data.group_by_cluster=true"]),
        }
        best = {}
        for _ in range(args.rounds):  # interleaved rounds, best of each: robust to a busy host
            for name, (config, overrides) in runs.items():
                result = measure(config, overrides, 1, args.steps, args.warmup, work)
                if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = result
    dense = best["dense SLM (baseline)"]
    rows = list(best.items())
    lines = [f"Device: {device_description()}; date {datetime.date.today()}; "
             f"{'paper expert shape (d 1024, 7 layers)' if paper else args.shape + ': ' + ' '.join(shape)}; "
             f"median of steps {args.warmup + 1}-{args.steps}, best of {args.rounds} "
             "interleaved rounds.", "",
             "| run | tokens/s | step time vs dense |", "|---|---:|---:|"]
    for name, result in rows:
        ratio = dense["tokens_per_s"] / result["tokens_per_s"]
        lines.append(f"| {name} | {result['tokens_per_s']:,.0f} | {ratio:.2f}x |")
    report = "\n".join(lines)
    print(report)

    write_section(Path(args.results), report, SECTION, "`benchmarks/pn_overhead.py`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
