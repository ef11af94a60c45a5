"""`pn-train CONFIG.yaml [CONFIG.yaml ...] [section.key=value ...]`

Launch with torchrun for several processes (`torchrun --nproc-per-node 8 -m megatron_pn.cli.train
configs/paper/slm.yaml`); run directly for one. `--dry-run` builds the model on the meta device
and prints its parameter count; `--print-config` shows every key with its default.
"""

from __future__ import annotations

import argparse
import sys

from megatron_pn.config import describe, load_config, split_args
from pn_base.errors import ArgumentParser, run_command

EPILOG = """examples:
  pn-train configs/tiny/slm.yaml
  pn-train configs/paper/slm.yaml --dry-run
  torchrun --nproc-per-node 4 -m megatron_pn.cli.train configs/tiny/slm.yaml parallel.tensor=2 \\
      checkpoint.dir=runs/ckpt train.steps=100

Later config files and overrides win. Run `pn-train --print-config` for every key."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-train",
        description="Pretrain or fine-tune a GPT model (dense SLM/LLM) with megatron-core: "
        "tensor, pipeline and data parallelism, distributed optimizer, resumable checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="YAML config files, then dotted overrides such as train.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device, print parameter counts, exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config key with its default and meaning, exit")
    return parser


def dry_run(cfg) -> None:
    from megatron_pn.checks import check_model
    from megatron_pn.model import parameter_counts

    check_model(cfg)
    counts = parameter_counts(cfg)
    total, non_embedding = counts["total"], counts["total"] - counts["embedding"]
    print(f"model: {cfg.model.type}, {cfg.model.num_layers} layers, d_model {cfg.model.hidden_size}")
    print(f"parameters: total {total:,} ({total / 1e6:.1f}M); "
          f"non-embedding {non_embedding:,} ({non_embedding / 1e6:.1f}M)")
    if counts["trainable"] != total:
        print(f"trainable (LoRA adapters; the rest frozen): {counts['trainable']:,} "
              f"({counts['trainable'] / 1e6:.2f}M)")
    if counts["expert"] is not None:
        print(f"per expert (inference, the dense SLM it projects to): {counts['expert']:,} "
              f"({counts['expert'] / 1e6:.1f}M) x {cfg.model.num_experts} experts")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # options anywhere among the args
    if args.print_config:
        print("\n".join(describe()))
        return 0
    files, overrides = split_args(args.args)
    if not files:
        build_parser().error("give at least one CONFIG.yaml")
    try:
        return run_command("pn-train", lambda: train(load_config(files, overrides),
                                                     args.dry_run))
    finally:
        from megatron_pn.distributed import shutdown

        shutdown()


def train(cfg, dry_run_only: bool = False) -> int:
    if dry_run_only:
        dry_run(cfg)
        return 0
    from megatron_pn.trainer import Trainer

    Trainer(cfg).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
