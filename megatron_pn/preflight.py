"""The checks of a training job before a long allocation (`python -m megatron_pn.cli.preflight`
runs them all; the trainer reuses check_writable_dir)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pn_base.errors import UserError

NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp")  # not seen by the other nodes


class PreflightError(UserError):
    """The job would fail: one line saying why."""


def check_layout(cfg, nodes: int, procs: int, device: str) -> tuple[int, list[str]]:
    """The world size, after pn-train's own checks pass for it, and their warnings."""
    from megatron_pn.checks import check_config

    if nodes < 1 or procs < 1:
        raise PreflightError(f"--nodes {nodes} and processes per node {procs} must be >= 1")
    world = nodes * procs
    warnings = check_config(cfg, world, device)
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
