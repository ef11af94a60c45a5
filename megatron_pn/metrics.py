"""Training metrics to stdout, `metrics.jsonl`, TensorBoard and wandb — from one rank.

The logging rank is the last global rank: it sits on the last pipeline stage, where the loss is.
wandb runs offline unless `logging.wandb_mode=online`; `disabled` turns it off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pn_base.outputs import METRICS

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s, from NVIDIA's data sheets, for MFU. The
# first key found in the device name wins: form factors before the family. H100/H200 SXM report
# e.g. "NVIDIA H100 80GB HBM3" / "NVIDIA H200"; unknown devices need logging.peak_tflops.
PEAK_TFLOPS = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H200 NVL", 835.0), ("H200", 989.0),  # (GH200 too)
    ("A100", 312.0),  # SXM and PCIe alike
    ("L40S", 362.0), ("A10", 125.0),
)


def peak_tflops_of(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key.lower() in device_name.lower()), None)


def device_peak_tflops(override: float | None) -> float | None:
    """The override, else this GPU's bf16 peak (None on CPU or an unknown GPU: no MFU)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    return peak_tflops_of(torch.cuda.get_device_name())


def peak_memory() -> dict:
    """{'max_mem_gib': peak GPU memory this process allocated so far} on a GPU, {} on CPU."""
    if not torch.cuda.is_available():
        return {}
    return {"max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, config: dict, tensorboard: bool,
                 wandb_mode: str, wandb_project: str):
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / METRICS, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=wandb_project, dir=str(self.run_dir), mode=wandb_mode, config=config
            )

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        line = f"[{prefix}] step {step:>6} | {shown}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        for key, value in values.items():
            if isinstance(value, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def start_progress(self, done: int, total: int) -> None:
        """A tqdm bar over training steps (log lines are printed above it)."""
        if self.enabled:
            import sys

            from tqdm import tqdm

            # Redraw rarely when the output is a log file rather than a terminal.
            interval = 0.1 if sys.stderr.isatty() else 10.0
            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True,
                            mininterval=interval)

    def advance(self, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)
