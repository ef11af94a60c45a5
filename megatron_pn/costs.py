"""Cost and perplexity bookkeeping for comparing methods (the paper's Tables 5/8, Figs. 1/4/6).

Costs are device-hours from each run's `cost.json`: wall time x devices on GPUs; on a CPU, the
CPU time of the run's processes (wall time would count whatever else the machine ran beside it:
two runs sharing two cores each take twice as long). The total for N
domains is C_total(N) = C_generic + N * C_specialization; methods are compared at equal
pretraining cost by interpolating their perplexity between measured budgets. A held-out NLL
comes with its standard error over windows (`mean_and_stderr`: pn-eval, pn-train's validation,
the margin of its checkpoint selection).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pn_base.outputs import COST


def macro_average(nlls) -> float | None:
    """The paper's macro-average: the mean of the per-domain NLLs (each domain weighs the same;
    its exp is the macro-averaged perplexity). None while a domain lacks its number."""
    nlls = list(nlls)
    if not nlls or any(v is None for v in nlls):
        return None
    return float(np.mean(nlls))


def mean_and_stderr(sums: np.ndarray, sizes: np.ndarray) -> tuple[float | None, float | None]:
    """The mean per-token NLL of windows with these NLL sums and token counts, and its standard
    error. Tokens of one window share their context and are correlated, so the windows are the
    samples: the mean R = sum(s) / sum(n) is a ratio estimator whose standard error (the delta
    method) is sqrt(sum((s_w - R n_w)^2) / (W (W - 1))) / mean(n) over the W windows; with
    windows of equal size, the standard error of the per-window mean NLLs. (None, None) without
    tokens; no standard error from fewer than two windows."""
    sizes = np.asarray(sizes, dtype=np.float64)
    count = len(sizes)
    if not sizes.sum():
        return None, None
    mean = float(sums.sum() / sizes.sum())
    if count < 2:
        return mean, None
    residuals = sums - mean * sizes
    return mean, float(np.sqrt((residuals ** 2).sum() / (count * (count - 1))) / sizes.mean())


def total_cost(generic: float, specialization: float, domains: int | np.ndarray):
    """C_total(N) = C_generic + N * C_specialization."""
    return generic + np.asarray(domains) * specialization


def interpolate_at_cost(costs, values, target: float) -> float:
    """A value (e.g. perplexity) at pretraining cost `target`, linear in log-cost between the
    measured budgets (the paper interpolates its curves at 200 and 400 GPU-hours)."""
    costs, values = np.asarray(costs, dtype=float), np.asarray(values, dtype=float)
    order = np.argsort(costs)
    costs, values = costs[order], values[order]
    if not costs[0] <= target <= costs[-1]:
        raise ValueError(f"cost {target} is outside the measured range "
                         f"[{costs[0]:g}, {costs[-1]:g}]; measure more budgets")
    return float(np.interp(math.log(target), np.log(costs), values))


def run_device_hours(run: dict) -> float:
    """One entry of a cost log: its CPU-hours on a CPU (when logged), else wall x devices."""
    if run.get("device", "").startswith("CPU") and "cpu_seconds" in run:
        return run["cpu_seconds"] / 3600
    return run["device_hours"]


def shared_machine(run: dict, others: list[dict]) -> bool:
    """Whether a cost-log entry ran beside other work: another entry (of the same experiment)
    overlapping it in time, or, a sign of work from outside, a 1-minute load average at its end
    above its machine's cores + 1 (the run's own threads count up to the cores). Entries logged
    before these fields existed are taken as alone."""
    if "started" not in run:
        return False
    overlaps = any(o is not run and "started" in o and o["started"] < run["ended"]
                   and run["started"] < o["ended"] for o in others)
    return overlaps or run["load_average"] > run["cpus"] + 1


def device_hours(run_dir: str | Path, phase: str | None = None) -> float:
    """Device-hours logged in run_dir/cost.json (all runs, or those of one phase)."""
    path = Path(run_dir) / COST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cost log (written by pn-train at the end of a run)")
    runs = json.loads(path.read_text())["runs"]
    return sum(run_device_hours(r) for r in runs if phase is None or r["phase"] == phase)
