"""Pre-flight check of a training job before a long allocation: fail in seconds, not hours.

    python -m megatron_pn.preflight CONFIG.yaml [key=value ...] --nodes 4 --gpus-per-node 8

Checks, each failing with one clear line and exit code 2:
  - the config files exist and every key is valid (megatron_pn.config.load_config);
  - the model, the layout and the data (every dataset prefix, blend file, cluster ids) pass
    pn-train's own start-up checks (megatron_pn.validation.validate_config), for the world size
    nodes x processes per node;
  - tensor-parallel groups lie within a node (TP divides the processes per node);
  - checkpoint.dir (required with --require-checkpoint-dir: a requeued job resumes from it) and
    logging.run_dir can be created and written; a checkpoint to resume from or to load is valid.
The slurm/*.sh scripts run it first, on the allocation's first node; run it on a login node
before submitting with the job's --nodes and --gpus-per-node.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from megatron_pn.errors import ArgumentParser, UserError, run_command

NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp")  # not seen by the other nodes


class PreflightError(UserError):
    """The job would fail: one line saying why."""


def check_layout(cfg, nodes: int, procs: int, device: str) -> tuple[int, list[str]]:
    """The world size, after pn-train's own checks pass for it, and their warnings."""
    from megatron_pn.validation import validate_config

    if nodes < 1 or procs < 1:
        raise PreflightError(f"--nodes {nodes} and processes per node {procs} must be >= 1")
    world = nodes * procs
    warnings = validate_config(cfg, world, device)
    tp = cfg.parallel.tensor
    if procs % tp:
        where = "span nodes" if tp > procs else "straddle node boundaries"
        raise PreflightError(
            f"parallel.tensor {tp} does not divide the {procs} processes per node: tensor-parallel "
            f"groups would {where}; use a TP that divides {procs} (PP and DP may span nodes)")
    return world, warnings


def check_writable_dir(path: str, key: str) -> None:
    """Create `path` and write a file in it, as the trainer will (pn-train runs this for every
    output directory before any work)."""
    blocker = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = "it is a file" if blocker == Path(path) else f"{blocker} is a file"
        raise PreflightError(f"{key} {path} is not writable: {what}, not a directory ({key}) — "
                             f"remove it or set {key} to a directory")
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".preflight-"):
            pass
    except OSError as err:
        raise PreflightError(f"{key} {path} is not writable: {err.strerror or err} ({key}) — "
                             f"fix its permissions or set {key} elsewhere") from None


def check_checkpoints(cfg, require_dir: bool, nodes: int) -> list[str]:
    """Checkpoint and run directories; returns notes for the report."""
    from megatron_pn import checkpoint

    ckpt, notes = cfg.checkpoint, []
    if not ckpt.dir and require_dir:
        raise PreflightError("checkpoint.dir is not set: a preempted or requeued job could not "
                             "resume; set checkpoint.dir=PATH on storage every node sees")
    if ckpt.dir:
        check_writable_dir(ckpt.dir, "checkpoint.dir")
        # a damaged latest iteration is said here (or fails, on_damaged=stop), not in the job
        step, warning = checkpoint.resume_step(ckpt.dir, ckpt.on_damaged)
        notes.append(f"resumes from step {step}" if step is not None else "starts from step 0")
        if warning:
            notes.append(f"WARNING: {warning}")
        if nodes > 1 and os.path.abspath(ckpt.dir).startswith(NODE_LOCAL):
            notes.append(f"WARNING: checkpoint.dir {ckpt.dir} looks node-local; with {nodes} "
                         "nodes it must be on shared storage")
    if ckpt.load:
        notes.append(f"loads weights from {checkpoint.resolve(ckpt.load)}")
    check_writable_dir(cfg.logging.run_dir, "logging.run_dir")
    return notes


def preflight(args) -> str:
    from megatron_pn.config import load_config
    from megatron_pn.launch import procs_per_node, visible_gpus
    from megatron_pn.mix import expert_job

    files = [a for a in args.args if "=" not in a]
    if not files:
        raise PreflightError("give at least one CONFIG.yaml")
    cfg = load_config(files, [a for a in args.args if "=" in a])
    gpus = visible_gpus() if args.gpus_per_node is None else args.gpus_per_node
    procs = procs_per_node(gpus, args.cpu_procs)
    device = "cuda" if gpus > 0 else "cpu"
    world, warnings = check_layout(cfg, args.nodes, procs, device)
    cfg = expert_job(cfg)  # SLM-mix: this expert's data and directories
    notes = check_checkpoints(cfg, args.require_checkpoint_dir, args.nodes)
    notes += [f"WARNING: {warning}" for warning in warnings]
    p = cfg.parallel
    dp = world // (p.tensor * p.pipeline)
    return (f"world {world} = {args.nodes} node(s) x {procs} {device} process(es): "
            f"TP {p.tensor} x PP {p.pipeline} x DP {dp}; checkpoint.dir {cfg.checkpoint.dir} "
            f"({'; '.join(notes)})")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m megatron_pn.preflight", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
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
