"""The Trainer's cost recorder: each invocation of a run appends its wall time x devices and the
CPU seconds of all its processes to run_dir/cost.json (megatron_pn.costs reads it), with what
tells whether it had the machine to itself: when it started and ended (runs of one experiment
that overlap shared it) and the load average at its end. CPU seconds rise too when other CPU
work runs beside a run (spinning threads), so equal-cost comparisons take runs made alone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_pn.metrics import device_description
from pn_base.fileio import atomic_write_json
from pn_base.outputs import COST


class CostRecorder:
    def __init__(self):
        self.start_wall, self.start_cpu = time.time(), time.process_time()

    def wall_seconds(self) -> float:
        return time.time() - self.start_wall

    def record(self, run_dir: str, phase: str, env, steps: int, tokens: int,
               writes: bool) -> None:
        """Collective (the CPU seconds are summed over ranks); the rank that `writes` appends
        this invocation's entry."""
        cpu = torch.tensor([time.process_time() - self.start_cpu], dtype=torch.float64,
                           device=env.device)
        dist.all_reduce(cpu)
        if not writes:
            return
        path = Path(run_dir) / COST
        log = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        wall = self.wall_seconds()
        log["runs"].append({
            "phase": phase, "device": device_description(), "devices": env.world_size,
            "wall_seconds": wall, "cpu_seconds": cpu.item(),
            "device_hours": wall * env.world_size / 3600, "steps": steps, "tokens": tokens,
            "started": self.start_wall, "ended": self.start_wall + wall,
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
        })
        log["total_device_hours"] = sum(r["device_hours"] for r in log["runs"])
        log["total_tokens"] = sum(r["tokens"] for r in log["runs"])
        atomic_write_json(path, log)
