"""Start pn-train on one node: torchrun with a c10d rendezvous, under SLURM or by hand.

    python -m megatron_pn.cli.launch train [options] CONFIG.yaml [key=value ...]
    python -m megatron_pn.cli.launch checkpoint-step CONFIG.yaml [key=value ...]

`train` runs one torchrun agent for this node. Under SLURM (one task per node, started by
slurm/common.sh) every option has a default from the job: the node count, this node's index,
the rendezvous host (the allocation's first node) and port (from the job id). Processes per node:
one per visible GPU; on a machine without GPUs, `--cpu-procs` (default 1) gloo processes.

Stop signals. torchrun forwards SIGTERM to its workers but dies on SIGUSR1 (its default action),
leaving the workers orphaned. So torchrun runs here with SIGUSR1 added to the signals it
handles: on SIGUSR1 or SIGTERM it forwards that signal to every worker, waits up to
`--stop-timeout` seconds for them to save a checkpoint and exit, and the launcher exits
128 + the signal number: the batch script tells such a stop from a crash even when the signal
reached only the job step.

`checkpoint-step` prints "STEP STEPS": the step of the run's newest complete checkpoint (0 when
there is none) and train.steps (exit code 2 on a bad config). The batch script requeues a
stopped job only when it has not finished, and a failed one only when it made progress
(slurm/common.sh).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from pn_base.errors import ArgumentParser, UserError, run_command

STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
PORT_BASE, PORT_SPAN = 15000, 15000  # below Linux's ephemeral port range (32768+)

EPILOG = """examples:
  # under SLURM, one task per node (slurm/common.sh does this):
  srun --ntasks-per-node=1 python -m megatron_pn.cli.launch train configs/paper/pn32.yaml
  # two "nodes" by hand, one process each (run both commands):
  python -m megatron_pn.cli.launch train --nnodes 2 --node-rank 0 --nproc-per-node 1 \\
      --rdzv-endpoint 127.0.0.1:29400 configs/tiny/slm.yaml
  python -m megatron_pn.cli.launch train --nnodes 2 --node-rank 1 --nproc-per-node 1 \\
      --rdzv-endpoint 127.0.0.1:29400 configs/tiny/slm.yaml"""


class LaunchError(UserError):
    """The launch cannot be planned (one clear line)."""


@dataclass
class Plan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    endpoint: str  # HOST:PORT of the c10d rendezvous store
    rdzv_id: str
    device: str  # "cuda" or "cpu"
    stop_timeout: int
    threads: int | None  # OMP_NUM_THREADS per process when the user set none


# -- the plan ----------------------------------------------------------------------------------

def first_host(nodelist: str) -> str:
    """The allocation's first node (it hosts the rendezvous), as SLURM expands the list."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as err:
        raise LaunchError(f"cannot expand SLURM_JOB_NODELIST '{nodelist}' with scontrol "
                          f"({err}); pass --rdzv-endpoint HOST:PORT") from None
    if not out:
        raise LaunchError(f"SLURM_JOB_NODELIST '{nodelist}' names no host")
    return out[0]


def rendezvous_port(env: dict) -> int:
    """PN_RDZV_PORT, else one derived from the job id: jobs sharing a node get different ports."""
    if env.get("PN_RDZV_PORT"):
        return int(env["PN_RDZV_PORT"])
    return PORT_BASE + int(env.get("SLURM_JOB_ID", 0)) % PORT_SPAN


def procs_per_node(gpus: int, cpu_procs: int) -> int:
    """One process per GPU; without GPUs, the requested number of CPU processes."""
    return gpus if gpus > 0 else max(1, cpu_procs)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_threads(nproc: int) -> int:
    """Intra-op threads per process: this task's CPUs shared by its processes."""
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def make_plan(args, env: dict, gpus: int) -> Plan:
    in_slurm = "SLURM_JOB_ID" in env
    nnodes = args.nnodes or int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
    node_rank = args.node_rank if args.node_rank is not None else int(env.get("SLURM_NODEID", 0))
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"node rank {node_rank} is outside [0, {nnodes})")
    endpoint = args.rdzv_endpoint
    if endpoint is None:
        if nnodes > 1 and not in_slurm:
            raise LaunchError("several nodes outside SLURM: pass --rdzv-endpoint HOST:PORT")
        from megatron_pn.distributed import free_port

        host = first_host(env["SLURM_JOB_NODELIST"]) if in_slurm and nnodes > 1 else "127.0.0.1"
        endpoint = f"{host}:{rendezvous_port(env) if in_slurm else free_port()}"
    nproc = args.nproc_per_node or procs_per_node(gpus, args.cpu_procs)
    device = "cuda" if gpus > 0 else "cpu"
    return Plan(nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc, endpoint=endpoint,
                rdzv_id=args.rdzv_id or env.get("SLURM_JOB_ID", "pn-train"), device=device,
                stop_timeout=args.stop_timeout,
                threads=None if "OMP_NUM_THREADS" in env else cpu_threads(nproc))


def torchrun_argv(plan: Plan, train_args: list[str]) -> list[str]:
    # is_host: the first node hosts the store, whatever its name resolves to on each node.
    return [
        "--nnodes", str(plan.nnodes), "--nproc-per-node", str(plan.nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", plan.endpoint, "--rdzv-id", plan.rdzv_id,
        "--rdzv-conf", f"is_host={str(plan.node_rank == 0).lower()},read_timeout=300",
        "--max-restarts", "0",
        "--signals-to-handle", STOP_SIGNALS, "--shutdown-timeout", str(plan.stop_timeout),
        "-m", "megatron_pn.cli.train", *train_args,
    ]


# -- commands ----------------------------------------------------------------------------------

def _stop_before_start(signum, frame) -> None:
    """A stop signal before torchrun installs its own handlers: leave without starting."""
    raise SystemExit(128 + signum)


def train(args) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    plan = make_plan(args, dict(os.environ), visible_gpus())
    if plan.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(plan.threads)
    print(f"launch: node {plan.node_rank}/{plan.nnodes}, {plan.nproc_per_node} {plan.device} "
          f"processes, rendezvous {plan.endpoint} (id {plan.rdzv_id})", flush=True)
    try:
        torchrun(torchrun_argv(plan, args.train_args))
    except SignalException as err:  # the workers were asked to save and stop
        print(f"launch: {err.sigval.name}: workers asked to save a checkpoint and stop",
              flush=True)
        return 128 + err.sigval
    return 0


def checkpoint_step(train_args: list[str]) -> int:
    from megatron_pn import checkpoint
    from megatron_pn.config import load_config, split_args
    from megatron_pn.families import family_of

    cfg = load_config(*split_args(train_args))
    cfg = family_of(cfg).job_config(cfg)  # SLM-mix: this expert's directories
    step = checkpoint.latest_step(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    print(step or 0, cfg.train.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m megatron_pn.cli.launch", description=__doc__,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="run torchrun + pn-train on this node",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--nnodes", type=int, help="nodes (default: SLURM_JOB_NUM_NODES, else 1)")
    run.add_argument("--node-rank", type=int,
                     help="this node's index; node 0 hosts the rendezvous (default: SLURM_NODEID)")
    run.add_argument("--nproc-per-node", type=int,
                     help="processes on this node (default: visible GPUs, else --cpu-procs)")
    run.add_argument("--cpu-procs", type=int, default=1,
                     help="processes per node on a machine without GPUs (default 1)")
    run.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous store "
                     "(default: the job's first node, port PN_RDZV_PORT or from the job id)")
    run.add_argument("--rdzv-id", help="rendezvous id (default: SLURM_JOB_ID)")
    run.add_argument("--stop-timeout", type=int, default=270,
                     help="seconds workers get to save and exit after a stop signal before they "
                     "are killed (default 270: inside the scripts' --signal=B:USR1@300)")
    run.add_argument("train_args", nargs=argparse.REMAINDER, metavar="CONFIG.yaml | key=value")
    step = commands.add_parser("checkpoint-step", help="print the newest complete checkpoint's "
                               "step (0: none) and train.steps")
    step.add_argument("train_args", nargs=argparse.REMAINDER, metavar="CONFIG.yaml | key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _stop_before_start)
    args = build_parser().parse_args(argv)
    if not args.train_args:
        build_parser().error("give CONFIG.yaml [key=value ...]")
    return run_command(f"launch {args.command}", lambda: train(args) if args.command == "train"
                       else checkpoint_step(args.train_args))


if __name__ == "__main__":
    sys.exit(main())
