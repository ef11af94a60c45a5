"""`pn-train CONFIG.yaml [CONFIG.yaml ...] [section.key=value ...]`

Launch with torchrun for several processes (`torchrun --nproc-per-node 8 -m megatron_pn.train
configs/paper/slm.yaml`); run directly for one. `--dry-run` builds the model on the meta device
and prints its parameter count; `--print-config` shows every key with its default.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_pn.config import ConfigError, describe, load_config

EPILOG = """examples:
  pn-train configs/tiny/slm.yaml
  pn-train configs/paper/slm.yaml --dry-run
  torchrun --nproc-per-node 4 -m megatron_pn.train configs/tiny/slm.yaml parallel.tensor=2 \\
      checkpoint.dir=runs/ckpt train.steps=100

Later config files and overrides win. Run `pn-train --print-config` for every key."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    """Parameter count of the whole model, built unsharded on the meta device."""
    import dataclasses

    import torch

    from megatron_pn import compat
    from megatron_pn.distributed import init_distributed, shutdown
    from megatron_pn.model import (build_model_chunks, count_expert_parameters,
                                   count_parameters, transformer_config)
    from megatron_pn.validation import validate_model

    from megatron.core import parallel_state as ps

    validate_model(cfg)
    whole = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, tensor=1, pipeline=1, virtual_pipeline=None)
    )
    compat.activate()
    init_distributed("cpu")
    ps.initialize_model_parallel(1, 1)
    tconfig = transformer_config(whole, "cpu")
    tconfig.perform_initialization = False
    with torch.device("meta"):
        chunks = build_model_chunks(whole, tconfig)
    total = count_parameters(chunks)
    embedding = chunks[0].embedding.word_embeddings.weight.numel()
    print(f"model: {cfg.model.type}, {cfg.model.num_layers} layers, d_model {cfg.model.hidden_size}")
    print(f"parameters: total {total:,} ({total / 1e6:.1f}M); "
          f"non-embedding {total - embedding:,} ({(total - embedding) / 1e6:.1f}M)")
    if cfg.model.type == "pn":
        expert = count_expert_parameters(chunks)
        print(f"per expert (inference, the dense SLM it projects to): {expert:,} "
              f"({expert / 1e6:.1f}M) x {cfg.model.num_experts} experts")
    shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_config:
        print("\n".join(describe()))
        return 0
    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if not files:
        build_parser().error("give at least one CONFIG.yaml")
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(files, overrides)
        if args.dry_run:
            dry_run(cfg)
            return 0
        from megatron_pn.trainer import Trainer

        Trainer(cfg).train()
        return 0
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        if not _is_user_error(err):
            raise
        if rank == 0:
            print(f"pn-train: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # 2: bad input; 1: a failed save (SaveFailed)
    finally:
        from megatron_pn.distributed import shutdown

        shutdown()


def _is_user_error(err: Exception) -> bool:
    from megatron_pn.checkpoint import CheckpointError
    from megatron_pn.compat import UnsupportedMegatronCore
    from megatron_pn.data import DataError
    from megatron_pn.preflight import PreflightError

    return isinstance(err, (ConfigError, DataError, CheckpointError, UnsupportedMegatronCore,
                            PreflightError))


if __name__ == "__main__":
    sys.exit(main())
