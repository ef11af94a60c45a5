"""Pre-flight check of a training job before a long allocation: fail in seconds, not hours.

    python -m megatron_pn.cli.preflight CONFIG.yaml [key=value ...] --nodes 4 --gpus-per-node 8

Checks, each failing with one clear line and exit code 2:
  - the config files exist and every key is valid (megatron_pn.config.load_config);
  - the model, the layout and the data (every dataset prefix, blend file, cluster ids) pass
    pn-train's own start-up checks (megatron_pn.checks.check_config), for the world size
    nodes x processes per node;
  - tensor-parallel groups lie within a node (TP divides the processes per node);
  - checkpoint.dir (required with --require-checkpoint-dir: a requeued job resumes from it) and
    logging.run_dir can be created and written; a checkpoint to resume from or to load is valid.
The slurm/*.sh scripts run it first, on the allocation's first node; run it on a login node
before submitting with the job's --nodes and --gpus-per-node.
"""

from __future__ import annotations

import argparse
import sys

from megatron_pn.preflight import PreflightError, check_checkpoints, check_layout
from pn_base.errors import ArgumentParser, run_command


def preflight(args) -> str:
    from megatron_pn.cli.launch import procs_per_node, visible_gpus
    from megatron_pn.config import load_config, split_args
    from megatron_pn.families import family_of

    files, overrides = split_args(args.args)
    if not files:
        raise PreflightError("give at least one CONFIG.yaml")
    cfg = load_config(files, overrides)
    gpus = visible_gpus() if args.gpus_per_node is None else args.gpus_per_node
    procs = procs_per_node(gpus, args.cpu_procs)
    device = "cuda" if gpus > 0 else "cpu"
    world, warnings = check_layout(cfg, args.nodes, procs, device)
    cfg = family_of(cfg).job_config(cfg)  # SLM-mix: this expert's data and directories
    notes = check_checkpoints(cfg, args.require_checkpoint_dir, args.nodes)
    notes += [f"WARNING: {warning}" for warning in warnings]
    p = cfg.parallel
    dp = world // (p.tensor * p.pipeline)
    return (f"world {world} = {args.nodes} node(s) x {procs} {device} process(es): "
            f"TP {p.tensor} x PP {p.pipeline} x DP {dp}; checkpoint.dir {cfg.checkpoint.dir} "
            f"({'; '.join(notes)})")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m megatron_pn.cli.preflight", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="what pn-train would get: YAML config files, then dotted overrides")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs per node; 0 for CPU nodes (default: the GPUs visible here)")
    parser.add_argument("--cpu-procs", type=int, default=1,
                        help="processes per node when there are no GPUs (default 1)")
    parser.add_argument("--require-checkpoint-dir", action="store_true",
                        help="fail when checkpoint.dir is not set (batch jobs: requeue resumes "
                        "from it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow options
    return run_command("preflight", lambda: print(f"preflight: ok: {preflight(args)}"))


if __name__ == "__main__":
    sys.exit(main())
